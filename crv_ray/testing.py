"""A deterministic reply double for the scripted engine (tests and dry runs of the pipeline mechanics).

Behaviour is steered by tags in the problem text, e.g. "[label=easy]", "[critic=garbage]", "[verify=fail1]",
"[student=right]", so one input file can force each branch of the role logic through the real Ray Data stages.
Reasoning-model behaviour: "[critic=cutoff]" (a critic cut off inside <think>), "[rethink=think]" (an agent that
thinks, then writes a rewrite in <think> format between <rewrite> markers), "[rethink=leak]" (a rewrite that copies
the prompt's scaffolding back). `counted_replies` also records every call in a named Ray actor (`CallLog`).
"""

from __future__ import annotations

import re
import time
import zlib

from crv_ray.answers import extract_final_answer


def _tag(row: dict, key: str) -> str | None:
    m = re.search(rf"\[{key}=([a-z0-9_]+)\]", row.get("problem") or "")
    return m.group(1) if m else None


def _with_answer(cot: str, answer: str) -> str:
    body = re.sub(r"\\boxed\{[^{}]*\}", "", cot).rstrip()
    return f"{body}\n\nThe final answer is \\boxed{{{answer}}}."


def _off_by_one(answer: str) -> str:
    try:
        return str(int(float(answer)) + 1)
    except ValueError:
        return answer + "1"


def _default_label(row: dict) -> str:
    # Untagged problems (e.g. synthetic ones) get a label spread by id, so every pair type shows up.
    return ("easy", "medium", "hard")[zlib.crc32(row["problem_id"].encode()) % 3]


def tagged_replies(stage: str, row: dict, messages: list[dict]) -> str:
    gold = row["answer"]
    if _tag(row, "hang") and stage.startswith("critic"):
        time.sleep(int(_tag(row, "hang")))  # a stuck engine, for the watchdog
    if stage.startswith("critic"):
        if _tag(row, "critic") == "garbage":
            return "I am not sure what to say."
        if _tag(row, "critic") == "cutoff":  # a reasoning critic with too small a max_tokens
            return "<think>\nOkay, let me look at this chain of thought. The student is a small model, so the"
        if _tag(row, "critic") == "garbage_once" and stage == "critic_a0":
            return "Hmm."
        return f"Label: {_tag(row, 'label') or _default_label(row)}"
    if stage.startswith("rethink"):
        steps = row["cot"].split("\n\n")
        if (_tag(row, "label") or _default_label(row)) == "easy":
            steps.insert(max(len(steps) - 1, 0), "Let me check this intermediate step carefully.")
        else:
            steps = steps[-2:] if len(steps) > 2 else steps
        if _tag(row, "rethink") == "leak":  # the scaffolding copied back, as a small model does
            return (f"The original reasoning is: {steps[0]}\n\nThe gold answer is: {gold}.\n\n"
                    + _with_answer("\n\n".join(steps), gold))
        if _tag(row, "rethink") == "think":  # a reasoning agent: its own thinking, then a think-format rewrite
            reasoning = "\n\n".join(s for s in steps if "\\boxed" not in s)
            return ("<think>\nThe student needs more steps. I should keep the answer format.\n</think>\n\n"
                    f"<rewrite>\n<think>\n{reasoning}\n</think>\n\nThe final answer is \\boxed{{{gold}}}.\n</rewrite>")
        return "Here is the rewritten reasoning:\n\n" + _with_answer("\n\n".join(steps), gold)
    if stage == "judge_original":  # an original with no readable final answer (input.on_no_answer=judge)
        verdict = _tag(row, "judge") or ("pass" if gold in row["cot"][-200:] else "fail")
        if verdict == "pass":
            return f"VERDICT: PASS\nREASON: the solution concludes with {gold}."
        return "VERDICT: FAIL\nREASON: the solution never states the gold answer."
    if stage.startswith("verify"):
        rnd = int(stage.rsplit("r", 1)[1])
        if _tag(row, "verify") == "fail1" and rnd == 1:
            return "VERDICT: FAIL\nREASON: step 2 skips the subtraction."
        if _tag(row, "verify") == "never":
            return "VERDICT: FAIL\nREASON: the reasoning is not convincing."
        return "VERDICT: PASS\nREASON: every step is correct."
    if stage == "inject":
        cot = messages[-1]["content"]
        pred = extract_final_answer(cot) or gold
        return _with_answer(row["cot"], _off_by_one(pred))
    if stage == "student":
        if _tag(row, "student") == "right":
            return f"Easy. \\boxed{{{gold}}}"
        if _tag(row, "student") == "none":  # a sample that never states an answer: no negative
            return "Let me think about how the numbers relate to each other"
        return f"I think it is \\boxed{{{_off_by_one(gold)}}}"
    raise ValueError(f"no scripted reply for stage {stage}")


CALL_LOG = "crv_ray_scripted_call_log"


class CallLog:
    """Every scripted call as (stage, problem_id); start it as a named Ray actor with `start_call_log()`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def add(self, stage: str, problem_id: str) -> None:
        self.calls.append((stage, problem_id))

    def get(self) -> list[tuple[str, str]]:
        return list(self.calls)


def start_call_log():
    import ray

    return ray.remote(CallLog).options(name=CALL_LOG).remote()


def counted_replies(stage: str, row: dict, messages: list[dict]) -> str:
    """`tagged_replies`, recording each call in the CallLog actor (scripted stages run in Ray workers)."""
    import ray

    ray.get(ray.get_actor(CALL_LOG).add.remote(stage, row["problem_id"]))
    return tagged_replies(stage, row, messages)


class S3Server:
    """A real S3 API server (moto's server mode, the `test` extra) on a free localhost port, with one bucket.

    `.endpoint` (http://127.0.0.1:PORT), `.bucket`, `.env` (the AWS_* variables pyarrow, Ray Data and Ray Train
    read), `.uri(path)` -> "s3://<bucket>/<path>". Start with `start()`, stop with `stop()` (ends only its process).
    """

    def __init__(self, bucket: str = "crv-ray-test") -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.port = port
        self.bucket = bucket
        # moto accepts any keys. The secret is redacted wherever crv-ray prints (crv_ray.redact): a value no other
        # text contains.
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "crv-ray-test-key",
                    "AWS_SECRET_ACCESS_KEY": "crv-ray-moto-secret-5e1f", "AWS_DEFAULT_REGION": "us-east-1"}
        self._proc = None

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        import subprocess
        import sys
        import urllib.request

        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {self.endpoint} (is moto[server] installed? "
                                       "pip install -e '.[test]')")
                time.sleep(0.2)
        # Create the bucket through the S3 API (moto resets nothing between calls: one bucket for the session).
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT"),
                               timeout=5).close()
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except Exception:
                self._proc.kill()
        self._proc = None


# Multi-node tests: each node's `ray start` sets these for the Ray workers it starts (they inherit its environment).
NODE_LOG_ENV = "CRV_RAY_TEST_NODE_LOG"  # a file: one line per scripted call made on that node
HOLD_CRITIC_ENV = "CRV_RAY_TEST_HOLD_CRITIC"  # a file: while it exists, critic calls on that node do not return


def node_logged_replies(stage: str, row: dict, messages: list[dict]) -> str:
    """`tagged_replies`, appending "stage<TAB>problem_id" to the node's CRV_RAY_TEST_NODE_LOG file before replying
    (so a call in progress is visible); while the node's CRV_RAY_TEST_HOLD_CRITIC file exists, its critic calls
    wait, so that node holds its rows (until a test kills it)."""
    import os

    path = os.environ.get(NODE_LOG_ENV)
    if path:
        with open(path, "a") as f:  # one short append per call: lines of concurrent workers do not interleave
            f.write(f"{stage}\t{row['problem_id']}\n")
    hold = os.environ.get(HOLD_CRITIC_ENV)
    while stage.startswith("critic") and hold and os.path.exists(hold):
        time.sleep(0.5)
    return tagged_replies(stage, row, messages)
