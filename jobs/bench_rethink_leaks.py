"""Measure how often the rethink prompts make a small agent copy our scaffolding back (the leak guard's reason).

Renders the rethink prompts (mode as the demo would pick it: repair for a wrong original, else easy/hard) for N
synthetic problems, generates greedily with vllm.LLM, and counts rewrites that `find_leak` flags and that reach the
gold answer. `--prompts DIR` compares other templates (DIR/rethink_{easy,hard,repair}.j2), e.g. from git history:

    python jobs/bench_rethink_leaks.py                          # SmolLM2-135M-Instruct, 24 problems, 256 tokens
    mkdir -p /tmp/old && for m in easy hard repair; do
      git show REV:crv_ray/refine/prompts/rethink_$m.j2 > /tmp/old/rethink_$m.j2; done
    python jobs/bench_rethink_leaks.py --prompts /tmp/old

Measured here (24 problems, 256 tokens): the prompts before the leak guard gave 22 leaking rewrites and 0 that were
leak-free with the right answer; the packaged ones 9 and 3.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompts", default=None, help="folder with rethink_{easy,hard,repair}.j2 overrides")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from crv_ray.answers import check_answer
    from crv_ray.config import InputConfig
    from crv_ray.data.input import read_problems
    from crv_ray.models.builtin import resolve_model
    from crv_ray.refine.guards import find_leak
    from crv_ray.refine.parsing import extract_rewrite
    from crv_ray.refine.prompts import render_messages

    rows = list(read_problems(InputConfig(source="synthetic",
                                          synthetic={"n": args.n, "seed": 0, "wrong_fraction": 0.15})))
    convs = []
    for r in rows:
        mode = ("repair" if not check_answer(r["cot"], r["answer"]).correct
                else ("easy", "hard")[zlib.crc32(r["problem_id"].encode()) % 2])
        override = f"{args.prompts}/rethink_{mode}.j2" if args.prompts else None
        convs.append(render_messages(f"rethink_{mode}", override, problem=r["problem"], answer=r["answer"],
                                     cot=r["cot"], student_name="SmolLM2-135M-Instruct", student_size="135M"))
    llm = LLM(model=str(resolve_model(args.model)), max_model_len=1536, dtype="bfloat16", enforce_eager=True)
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    leak = right = clean_right = 0
    examples = []
    for r, o in zip(rows, outs):
        text = extract_rewrite(o.outputs[0].text)
        phrase = find_leak(text, r["problem"])
        ok = text is not None and bool(check_answer(text, r["answer"]).correct)
        leak += phrase is not None
        right += ok
        clean_right += ok and phrase is None
        if phrase and len(examples) < 3:
            examples.append({"phrase": phrase, "rewrite": (text or "")[:200]})
    print(json.dumps({"prompts": args.prompts or "packaged", "rows": len(rows), "leak": leak, "answer_right": right,
                      "leak_free_and_right": clean_right, "examples": examples}, indent=1))


if __name__ == "__main__":
    main()
