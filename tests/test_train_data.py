"""Training data: chat-template masking, validation errors, length policy, batch plan; config validation."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from crv_ray.models.builtin import resolve_model
from crv_ray.train.config import CogPOConfig, SFTConfig, TrainConfig, stage_hash
from crv_ray.train.batching import TokenizedRows, padding_fraction, plan_epoch
from crv_ray.train.data import (chat_tokenize, list_parquet_files, load_tokenizer, resolve_beta, tokenize_to_file,
                                validate_files)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return resolve_model("builtin:tiny", cache_dir=tmp_path_factory.getbasetemp() / "cache")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


# --- config ------------------------------------------------------------------------------------------------

def test_config_defaults_and_typos():
    cfg = TrainConfig()
    assert (cfg.sft.epochs, cfg.sft.lr, cfg.cogpo.epochs, cfg.cogpo.lr) == (3, 2e-5, 1, 1e-6)
    assert cfg.cogpo.gap_betas == {"small": 1.0, "medium": 0.5, "large": 0.2}
    assert cfg.sft.max_length == 8192 and cfg.sft.truncation == "drop"
    with pytest.raises(ValidationError, match="lerning_rate"):
        TrainConfig.model_validate({"sft": {"lerning_rate": 1.0}})
    with pytest.raises(ValidationError, match="max_prompt_length"):
        SFTConfig(max_length=100, max_prompt_length=100)
    with pytest.raises(ValidationError, match="gap_betas"):
        CogPOConfig(gap_betas={"small": 0.0})


def test_stage_hash_ignores_stop_after_steps_and_max_failures():
    a = TrainConfig()
    assert a.sft.max_failures == a.cogpo.max_failures == 2  # a dead worker restarts the group by default
    b = TrainConfig.model_validate({"sft": {"stop_after_steps": 3, "max_failures": 0}})
    c = TrainConfig.model_validate({"sft": {"lr": 1e-4}})
    assert stage_hash(a, "sft", data="x") == stage_hash(b, "sft", data="x")
    assert stage_hash(a, "sft", data="x") == stage_hash(TrainConfig(fsdp={"load": "full"}), "sft", data="x")
    assert stage_hash(a, "sft", data="x") != stage_hash(TrainConfig(strategy="deepspeed"), "sft", data="x")
    assert stage_hash(a, "sft", data="x") != stage_hash(c, "sft", data="x")
    assert stage_hash(a, "sft", data="x") != stage_hash(a, "sft", data="y")


# --- tokenization ------------------------------------------------------------------------------------------

def test_chat_template_mask_covers_response_only(tokenizer):
    ids, prompt_len = chat_tokenize(tokenizer, "What is 2 + 3?", "The answer is 5.")
    assert tokenizer.decode(ids[:prompt_len]) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids[prompt_len:]) == "The answer is 5.<|im_end|>\n"
    rows = TokenizedRows.from_table(pa.table({"input_ids": pa.array([ids], pa.list_(pa.int32())),
                                              "prompt_len": pa.array([prompt_len], pa.int32())}))
    batch = rows.collate(np.array([0]), pad_id=0)
    mask = batch["loss_mask"][0]
    assert mask[:prompt_len].sum() == 0 and bool(mask[prompt_len:].all())
    assert rows.loss_tokens[0] == len(ids) - prompt_len


def test_resolve_beta():
    cfg = CogPOConfig(default_beta=0.7)
    assert resolve_beta(0.3, "small", cfg) == (0.3, "column")
    assert resolve_beta(None, "small", cfg) == (1.0, "gap_betas")
    assert resolve_beta(float("nan"), "large", cfg) == (0.2, "gap_betas")
    assert resolve_beta(None, None, cfg) == (0.7, "default_beta")
    # loss: dpo is one beta for every pair, whatever the pair's beta column or gap say.
    dpo = CogPOConfig(default_beta=0.7, loss="dpo")
    assert [resolve_beta(b, g, dpo) for b, g in [(0.3, "small"), (None, "large"), (None, None)]] == [(0.7, "dpo")] * 3
    # ipo and simpo keep CogPO's per-pair beta.
    assert resolve_beta(None, "large", CogPOConfig(loss="simpo")) == (0.2, "gap_betas")


# --- validation errors -------------------------------------------------------------------------------------

def test_missing_column_names_file_and_column(tmp_path):
    f = _write(tmp_path / "a.parquet", prompt=["p"], answer=["r"])
    with pytest.raises(ValueError, match=r"a\.parquet.*missing column.*'response'"):
        validate_files([f], "sft")


def test_empty_response_names_row(tmp_path):
    f = _write(tmp_path / "a.parquet", prompt=["p", "q", "r"], response=["ok", "  ", "fine"])
    with pytest.raises(ValueError, match=r"a\.parquet: column 'response' is empty or null in row 1"):
        validate_files([f], "sft")
    g = _write(tmp_path / "b.parquet", prompt=["p"], chosen=[None], rejected=["x"])
    with pytest.raises(ValueError, match=r"b\.parquet: column 'chosen'.*row 0"):
        validate_files([g], "pairs")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_beta_names_row(tmp_path, bad):
    f = _write(tmp_path / "p.parquet", prompt=["p", "q"], chosen=["a", "b"], rejected=["c", "d"], beta=[0.5, bad])
    with pytest.raises(ValueError, match=r"p\.parquet: column 'beta' must be > 0.*row 1"):
        validate_files([f], "pairs")


def test_unknown_gap_without_beta(tmp_path):
    f = _write(tmp_path / "p.parquet", prompt=["p"], chosen=["a"], rejected=["c"], gap=["huge"])
    with pytest.raises(ValueError, match="unknown gap 'huge'"):
        validate_files([f], "pairs", CogPOConfig().gap_betas)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_parquet_files(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="no .parquet files"):
        list_parquet_files(tmp_path)
    with pytest.raises(ValueError, match="student model path .*no-model"):
        load_tokenizer(tmp_path / "no-model")


def test_directory_of_parquet_files(tmp_path):
    d = tmp_path / "sft"
    d.mkdir()
    _write(d / "part-1.parquet", prompt=["p"], response=["r"])
    _write(d / "part-0.parquet", prompt=["p", "q"], response=["r", "s"])
    assert [f.name for f in list_parquet_files(d)] == ["part-0.parquet", "part-1.parquet"]
    assert validate_files(list_parquet_files(d), "sft") == 3


# --- length policy (Ray Data) ------------------------------------------------------------------------------

_PROMPTS = ["What is 1 + 1?", "What is 2 + 2?", "Long question " + "apples " * 40, "What is 3 + 3?"]
_RESPONSES = ["2", "The answer is 4 because " + "we add the apples " * 20, "x", "6"]


@pytest.mark.parametrize("policy, statuses", [
    ("drop", ["ok", "dropped_length", "dropped_prompt", "ok"]),
    ("truncate_response", ["ok", "truncated", "dropped_prompt", "ok"]),
])
def test_length_policy(tokenizer, policy, statuses):
    from crv_ray.train.data import tokenize_sft_batch

    cfg = SFTConfig(max_length=48, max_prompt_length=32, truncation=policy)
    out = tokenize_sft_batch(tokenizer, pa.table({"prompt": _PROMPTS, "response": _RESPONSES}), cfg)
    assert out.column("status").to_pylist() == statuses
    lengths = [len(x) for x in out.column("input_ids").to_pylist()]
    assert lengths[1] == (48 if policy == "truncate_response" else 0) and lengths[2] == 0


def test_tokenize_to_file_counts(tmp_path, tiny_model, ray_started):
    f = _write(tmp_path / "sft.parquet", prompt=_PROMPTS, response=_RESPONSES)
    cfg = SFTConfig(max_length=48, max_prompt_length=32, truncation="truncate_response")
    report = tokenize_to_file("sft", f, tiny_model, cfg, tmp_path / "out")
    assert report.rows_in == 4 and report.dropped_prompt_too_long == 1
    assert (report.dropped_too_long, report.truncated, report.rows_kept) == (0, 1, 3)
    rows = TokenizedRows(tmp_path / "out" / "tokenized.arrow")
    assert len(rows) == 3 and rows.lengths.max() == 48
    assert report.tokens_kept == int(rows.seq_lengths.sum())


def test_small_datasets_tokenize_in_process_exactly_as_ray_data_does(tmp_path, tiny_model, ray_started):
    f = _write(tmp_path / "sft.parquet", prompt=_PROMPTS * 5, response=_RESPONSES * 5)
    cfg = SFTConfig(max_length=48, max_prompt_length=32, truncation="truncate_response")
    tables = {}
    for name, limit in (("ray", 0), ("local", 4096)):
        report = tokenize_to_file("sft", f, tiny_model, cfg, tmp_path / name, batch_size=3, in_process_max_rows=limit)
        assert (report.rows_in, report.rows_kept) == (20, 15)
        tables[name] = pa.ipc.open_file(str(tmp_path / name / "tokenized.arrow")).read_all()
    assert tables["ray"].equals(tables["local"])


def test_pairs_keep_their_own_reference_log_probs(tmp_path, tiny_model):
    from crv_ray.train.data import carries_reference

    cols = {"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["y", "x"]}
    ref = {"ref_chosen_logp": [-1.5, -2.0], "ref_rejected_logp": [-3.0, -4.0]}
    (tmp_path / "both").mkdir()
    pq.write_table(pa.table({**cols, **ref}), tmp_path / "both" / "a.parquet")
    report = tokenize_to_file("pairs", tmp_path / "both", tiny_model, CogPOConfig(), tmp_path / "out")
    table = pa.ipc.open_file(str(tmp_path / "out" / "tokenized.arrow")).read_all()
    assert report.rows_kept == 2 and table.column("ref_chosen_logp").to_pylist() == [-1.5, -2.0]
    # Without the columns the workers compute them (nothing carried); an online reference or simpo ignore them.
    pq.write_table(pa.table(cols), tmp_path / "plain.parquet")
    assert not carries_reference([tmp_path / "plain.parquet"], CogPOConfig())
    assert not carries_reference([tmp_path / "both" / "a.parquet"], CogPOConfig(reference="online"))
    assert not carries_reference([tmp_path / "both" / "a.parquet"], CogPOConfig(loss="simpo"))
    pq.write_table(pa.table(cols), tmp_path / "both" / "b.parquet")
    with pytest.raises(ValueError, match="b.parquet.*do not"):
        carries_reference(sorted((tmp_path / "both").glob("*.parquet")), CogPOConfig())


def test_pairs_beta_from_gap_table_unless_a_beta_column_says_otherwise(tmp_path, tiny_model, ray_started):
    from crv_ray.train.data import describe_beta_sources

    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "chosen": ["x", "y", "z", "w"],
                             "rejected": ["w", "z", "y", "x"], "gap": ["small", "large", None, "medium"],
                             "beta": pa.array([None, None, None, 0.9], pa.float64())}), f)
    cfg = CogPOConfig(gap_betas={"small": 2.0, "medium": 0.4, "large": 0.1}, default_beta=0.7, reference="online")
    report = tokenize_to_file("pairs", f, tiny_model, cfg, tmp_path / "out")
    assert report.beta_sources == {"gap_betas": 2, "default_beta": 1, "column": 1}
    table = pa.ipc.open_file(str(tmp_path / "out" / "tokenized.arrow")).read_all()
    assert "beta_source" not in table.column_names
    assert table.column("beta").to_pylist() == pytest.approx([2.0, 0.1, 0.7, 0.9])
    line = describe_beta_sources(report)
    assert "2 from train.cogpo.gap_betas" in line and "1 from the pairs' own beta column" in line


# --- batch plan --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [True, False])
def test_plan_covers_every_row_once_and_is_deterministic(group):
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=101)
    kw = dict(world_size=2, micro_batch_size=3, grad_accum=2, seed=7, group_by_length=group, window_steps=4)
    plan = plan_epoch(lengths, epoch=0, **kw)
    assert len(plan) == math.ceil(101 / 12)
    assert all(len(step) == 2 and all(len(acc) == 2 for acc in step) for step in plan)
    rows = np.concatenate([idx for step in plan for acc in step for idx in acc])
    assert sorted(rows.tolist()) == list(range(101))
    assert all(len(idx) <= 3 for step in plan for acc in step for idx in acc)
    again = plan_epoch(lengths, epoch=0, **kw)
    assert all(np.array_equal(a, b) for s1, s2 in zip(plan, again) for x, y in zip(s1, s2) for a, b in zip(x, y))
    other = plan_epoch(lengths, epoch=1, **kw)
    assert not np.array_equal(plan[0][0][0], other[0][0][0])


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(1).integers(10, 2000, size=400)
    kw = dict(world_size=2, micro_batch_size=4, grad_accum=1, seed=0, epoch=0, window_steps=16)
    grouped = padding_fraction(plan_epoch(lengths, group_by_length=True, **kw), lengths[:, None])
    random_ = padding_fraction(plan_epoch(lengths, group_by_length=False, **kw), lengths[:, None])
    assert grouped < 0.1 < random_


def test_stage_entry_points_name_bad_paths(tmp_path, tiny_model):
    from crv_ray.train.api import run_cogpo, run_sft

    with pytest.raises(ValueError, match="student model path .*no-model"):
        run_sft(TrainConfig(), tmp_path / "no-model", tmp_path / "sft.parquet", tmp_path / "out")
    with pytest.raises(ValueError, match="sft dataset path .*missing-sft.parquet.* does not exist"):
        run_sft(TrainConfig(), tiny_model, tmp_path / "missing-sft.parquet", tmp_path / "out")
    f = _write(tmp_path / "pairs.parquet", prompt=["p"], chosen=["a"])
    with pytest.raises(ValueError, match=r"pairs\.parquet.*missing column.*rejected"):
        run_cogpo(TrainConfig(), tiny_model, f, tmp_path / "out")
