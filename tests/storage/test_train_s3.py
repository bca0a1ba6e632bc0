"""SFT on Ray Train (2 gloo workers, tiny model) with the base model, the data and the stage folder on S3 (a real
S3 API server): checkpoints go to the bucket through Ray Train's storage_filesystem, a stopped run resumes from its
S3 checkpoint, and metrics, the data report and the exported model land in the bucket; then the reference log-probs
of that exported model, read from the bucket, are written there."""

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

    # Reference log-probs of the exported model (read from S3 by the Ray Data actors) over pairs on S3, written to S3.
    import torch
    from transformers import AutoModelForCausalLM

    from crv_ray.train.api import run_ref_logps
    from crv_ray.train.data import chat_tokenize, list_parquet_files, load_tokenizer

    storage.write_table(pa.table({"prompt": prompts[:6], "chosen": responses[:6],
                                  "rejected": [r.replace("answer is", "answer is not") for r in responses[:6]]}),
                        root / "pairs.parquet")
    ref = run_ref_logps(TrainConfig.model_validate({"cogpo": SFT}), out, root / "pairs.parquet", root / "ref")
    assert str(ref) == f"{root}/ref" and json.loads((ref / "_crv_ray_complete.json").read_text())["rows"] == 6
    row = pa.concat_tables([storage.read_table(f) for f in list_parquet_files(ref)]).to_pylist()[2]
    local = storage.local_copy(out)
    lm, tok = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval(), load_tokenizer(local)
    ids, plen = chat_tokenize(tok, row["prompt"], row["chosen"])
    with torch.no_grad():
        logps = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].double(), -1)
    expected = float(logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][plen - 1:].sum())
    assert row["ref_chosen_logp"] == pytest.approx(expected, rel=1e-4)
