"""Big-student loading: with `fsdp.load: sharded` each rank builds the model on the meta device, shards it and reads
only its slices of the safetensors files, so its peak memory during the load is about its shard, not the model;
the loaded weights are the file's. Two CPU processes (gloo) on a ~66M-parameter model built from a config."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Many mid-sized tensors: a rank's transient during the load is a couple of slices of one tensor.
SHAPE = dict(hidden_size=512, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=2048, vocab_size=8000, tie_word_embeddings=False)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class _AnonPeak:
    """Peak anonymous RSS (process memory, not the page cache of the mmapped safetensors file, which VmHWM would
    count) over a block, sampled every millisecond from a thread; torch's copies release the GIL."""

    def __enter__(self):
        import threading

        self.before = self.peak = _rss_kib("RssAnon") * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_kib("RssAnon") * 1024)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib("RssAnon") * 1024)
        self.delta = self.peak - self.before


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from crv_ray.train.config import FSDPConfig
    from crv_ray.train.distributed import setup_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # One load of a small model of the same architecture first: imports and one-time set-up (~90 MB) are not
    # the weights' and must not count.
    setup_model(str(Path(model_dir).with_name("small")), FSDPConfig(load="sharded"), None, chunk_size=64, seed=0)
    result = {}
    with _AnonPeak() as peak:
        model = setup_model(model_dir, FSDPConfig(load="sharded"), None, chunk_size=64, seed=0)
    result["peak_bytes"] = peak.delta
    result["local_shard_bytes"] = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        ref = load_file(str(Path(model_dir) / "model.safetensors"))
        got = {k.removeprefix("lm."): v for k, v in full.items()}
        result["same_keys"] = sorted(got) == sorted(ref)
        result["max_abs_diff"] = max(float((got[k] - ref[k].float()).abs().max()) for k in ref)
        rotary = model.lm.model.rotary_emb
        result["inv_freq_ok"] = bool(torch.allclose(rotary.inv_freq, rotary.original_inv_freq))
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_two_ranks(target, tmp_path: Path, timeout_s: float) -> list[dict]:
    """`target(rank, port, model_dir, out_json)` in two spawned gloo processes on `tmp_path / "model"`; their
    results, rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, port, str(tmp_path / "model"), str(tmp_path / f"r{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]


def test_each_rank_holds_about_its_shard_while_loading(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 60e6 < model_bytes / 4 < 80e6  # parameters
    model.save_pretrained(tmp_path / "model")  # fp32 safetensors, one file
    LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": 1, "vocab_size": 256})).save_pretrained(
        tmp_path / "small")
    del model
    results = _run_two_ranks(_worker, tmp_path, timeout_s=600)
    print({"model_bytes": model_bytes, "ranks": results})
    for r in results:
        # The shard is half the model; reading it adds a couple of one tensor's slices at a time. (The `full`
        # path materialises the whole model on every rank before sharding: at least model_bytes.)
        assert 0.45 * model_bytes < r["local_shard_bytes"] < 0.55 * model_bytes
        assert r["peak_bytes"] < 1.2 * r["local_shard_bytes"] < 0.65 * model_bytes, results
    assert results[0]["same_keys"] and results[0]["max_abs_diff"] == 0.0
    assert results[0]["inv_freq_ok"]


def _tied_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from crv_ray.train.config import FSDPConfig
    from crv_ray.train.distributed import setup_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    result = {}
    for load in ("full", "sharded"):
        model = setup_model(model_dir, FSDPConfig(load=load), None, chunk_size=64, seed=0)
        lm = model.lm
        result[f"{load}_tied"] = lm.lm_head.weight is lm.model.embed_tokens.weight
        with torch.no_grad():
            result[load] = model(ids, torch.ones_like(ids), ids).tolist()
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def test_tied_embeddings_load_sharded_as_in_full(tmp_path):
    """A tied lm_head (Qwen2.5 0.5B-3B, SmolLM2) is the embedding matrix: a sharded load must keep it tied, or the
    head is never loaded (SFT starts at loss ln(vocab), and CogPO's policy disagrees with its reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {**SHAPE, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": True}
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(tmp_path / "model")
    r = _run_two_ranks(_tied_worker, tmp_path, timeout_s=300)[0]
    assert r["full_tied"] and r["sharded_tied"]
    full, sharded = torch.tensor(r["full"]), torch.tensor(r["sharded"])
    assert torch.allclose(full, sharded, atol=1e-5), (full - sharded).abs().max()
