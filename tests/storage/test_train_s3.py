"""SFT on Ray Train (2 gloo workers, tiny model) with the base model, the data and the stage folder on S3 (a real
S3 API server): checkpoints go to the bucket through Ray Train's storage_filesystem, a stopped run resumes from its
S3 checkpoint, and metrics, the data report and the exported model land in the bucket; then CogPO from that exported model, whose
workers write the reference log-probs to the bucket."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from crv_ray import storage
from crv_ray.run_status import train_status
from crv_ray.train.api import MARKER, read_metrics, run_sft
from crv_ray.train.config import TrainConfig

pytestmark = pytest.mark.slow

SFT = {"epochs": 2, "lr": 1e-2, "per_device_batch_size": 2, "grad_accum_steps": 2, "max_length": 64,
       "max_prompt_length": 32, "checkpoint_every_steps": 2, "keep_last_checkpoints": 2, "seed": 3}


def test_sft_checkpoints_resume_and_export_on_s3(s3_server, ray_local, tiny_model_dir):
    root = storage.as_path(s3_server.uri("train-e2e"))
    storage.rmtree(root)
    storage.upload_dir(tiny_model_dir, root / "base")
    prompts = [f"What is {a} + {b}?" for a in range(0, 12, 3) for b in range(0, 40, 9)]
    responses = [f"{p[8:-1]} = {eval(p[8:-1])}. The answer is {eval(p[8:-1])}." for p in prompts]
    storage.write_table(pa.table({"prompt": prompts, "response": responses}), root / "sft.parquet")
    out_dir = root / "sft"

    stopped = TrainConfig.model_validate({"sft": {**SFT, "stop_after_steps": 3}})
    out = run_sft(stopped, root / "base", root / "sft.parquet", out_dir)
    assert str(out) == f"{out_dir}/model" and not out.exists()
    assert [m["step"] for m in read_metrics(out_dir)] == [1, 2, 3]
    ckpts = sorted(p.name for p in (out_dir / "checkpoints").glob("sft-*/checkpoint_step*"))
    assert ckpts == ["checkpoint_step00000002", "checkpoint_step00000003"]
    assert train_status(out_dir)["state"] == "partial"
    report = json.loads((out_dir / "data_report.json").read_text())
    assert report["rows_in"] == report["rows_kept"] == 20 and report["steps_per_epoch"] == 3

    out = run_sft(TrainConfig.model_validate({"sft": SFT}), root / "base", root / "sft.parquet", out_dir)
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # continued at 4 from the S3 checkpoint
    metrics = read_metrics(out_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert json.loads((out / MARKER).read_text())["stage"] == "sft"
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors")) and any((out_dir / "tb").iterdir())
    assert train_status(out_dir)["state"] == "done"

    # CogPO from the exported model on S3, pairs on S3: the workers' reference log-probs are written to the bucket.
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from crv_ray.train.api import run_cogpo
    from crv_ray.train.data import chat_tokenize, load_tokenizer

    storage.write_table(pa.table({"prompt": prompts[:6], "chosen": responses[:6],
                                  "rejected": [r.replace("answer is", "answer is not") for r in responses[:6]]}),
                        root / "pairs.parquet")
    cogpo = {**SFT, "epochs": 1, "checkpoint_every_steps": 100}
    cogpo_dir = root / "cogpo"
    run_cogpo(TrainConfig.model_validate({"cogpo": cogpo, "fsdp": {"mixed_precision": "fp32"}}), out,
              root / "pairs.parquet", cogpo_dir)
    assert read_metrics(cogpo_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    (ref_file,) = (cogpo_dir / "data").glob("*/ref_logps.parquet")
    assert str(ref_file).startswith("s3://")
    ref = storage.read_table(ref_file)
    local = storage.local_copy(out)
    lm, tok = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval(), load_tokenizer(local)
    ids, plen = chat_tokenize(tok, prompts[2], responses[2])
    with torch.no_grad():
        logps = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].double(), -1)
    expected = float(logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][plen - 1:].sum())
    assert ref.num_rows == 6 and ref.column("ref_chosen_logp")[2].as_py() == pytest.approx(expected, rel=1e-4)
