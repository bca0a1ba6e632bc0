"""The run report from a real-format run directory: collected numbers, every figure present as a decodable PNG,
the eval table equal to eval/summary.json, "not available" notes for missing inputs, escaping of data."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from statistics import mean

import pytest
from report_rundir import ALL_FIGURES, EVIL_LABEL, PROBLEMS, build_run_dir
from PIL import Image

from crv_ray.cli import default_config_path, main
from crv_ray.config import load_config
from crv_ray.report import collect, write_report
from crv_ray.stages import write_run_report


class Page(HTMLParser):
    """Figures (id, img src, alt, caption), section notes, and eval-table cells of a report page."""

    def __init__(self, html: str):
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.notes: dict[str, list[str]] = {}
        self.eval_rows: list[dict] = []
        self._section = None
        self._fig = None
        self._text_into = None
        self._cell = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id")
        elif tag == "figure":
            self._fig = self.figures[a["id"]] = {"section": self._section, "caption": ""}
        elif tag == "img" and self._fig is not None:
            self._fig.update(src=a["src"], alt=a["alt"])
        elif tag == "figcaption":
            self._text_into = ("caption", self._fig)
        elif tag == "p" and a.get("class") == "na":
            self.notes.setdefault(self._section, []).append("")
            self._text_into = ("note", None)
        elif tag == "tr" and "data-model" in a:
            self.eval_rows.append({"benchmark": a["data-benchmark"], "model": a["data-model"], "cells": {}})
        elif tag == "td" and "data-key" in a:
            self._cell = self.eval_rows[-1]["cells"][a["data-key"]] = {"value": a["data-value"], "text": ""}

    def handle_endtag(self, tag):
        if tag in ("figcaption", "p"):
            self._text_into = None
        elif tag == "figure":
            self._fig = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._text_into is not None:
            kind, fig = self._text_into
            if kind == "caption":
                fig["caption"] += data
            else:
                self.notes[self._section][-1] += data
        if self._cell is not None:
            self._cell["text"] += data


def png_size(src: str) -> tuple[int, int]:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    assert img.format == "PNG"
    return img.size


def test_collect_reads_every_input(run_dir: Path):
    d = collect(run_dir)
    manifest = json.loads((run_dir / "refine" / "manifest.json").read_text())
    assert d["header"]["config_hash"] == manifest["config_hash"]
    assert d["header"]["reconciliation"]["rows_in"] == 9 and d["header"]["reconciliation"]["errors_rows"] == 1
    assert d["labels"]["counts"] == {"easy": 3, "medium": 2, "hard": 2, EVIL_LABEL: 1}  # label order, then others
    assert [(r["round"], r["rethought"], r["passed"]) for r in d["rounds"]["rounds"]] == [(1, 5, 3), (2, 2, 1)]
    assert d["negatives"]["counts"] == manifest["negatives"] and d["negatives"]["total"] == 5
    assert list(d["pairs"]["counts"]) == ["small", "medium", "large"]
    assert d["pairs"]["total"] == manifest["reconciliation"]["pairs_rows"]

    # CoT lengths in characters, recomputed here from the problems the run directory was built from.
    by_label = {r["label"]: r for r in d["lengths"]["by_label"]}
    assert d["lengths"]["unit"] == "characters"
    easy_verified = [p for p in PROBLEMS if p[0] == "easy" and any(ok for _, ok in p[3])]
    assert by_label["easy"]["rows"] == 3 and by_label["easy"]["aligned_rows"] == 2
    assert by_label["easy"]["aligned_original_mean"] == mean(len(p[2]) for p in easy_verified)
    assert by_label["easy"]["aligned_mean"] == mean(len(next(c for c, ok in p[3] if ok)) for p in easy_verified)
    hard = [p for p in PROBLEMS if p[0] == "hard"]
    assert by_label["hard"]["rewrite_rows"] == 2
    assert by_label["hard"]["rewrite_mean"] == mean(len(next(c for c, ok in p[3] if ok)) for p in hard)
    assert by_label["hard"]["rewrite_mean"] < by_label["hard"]["rewrite_original_mean"]  # simplified
    medium = by_label["medium"]
    assert medium["aligned_mean"] == medium["aligned_original_mean"] and medium["rewrite_rows"] == 0

    assert d["sft"]["loss"]["SFT loss"] == [(s, pytest.approx(2.5 - 0.3 * s)) for s in range(1, 5)]
    margins = d["cogpo"]["margins"]
    assert list(margins) == ["small", "medium", "large", "all pairs"]
    assert [s for s, _ in margins["small"]] == [1, 3]  # step 2 had no small pair: absent, not 0
    assert [s for s, _ in margins["large"]] == [1, 2, 3]
    assert d["eval"]["models"] == ["base", "sft", "cogpo"]
    assert d["eval"]["pass1"]["cogpo"] == [0.33, 0.0875]


def test_report_has_every_figure_as_png(run_dir: Path):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text()
    page = Page(html)
    assert set(page.figures) == ALL_FIGURES
    assert page.notes == {}  # every input is there
    for fig_id, fig in page.figures.items():
        w, h = png_size(fig["src"])
        assert w > 200 and h > 150, fig_id
        assert fig["caption"].strip() and fig["alt"].startswith(fig["caption"].strip()), fig_id
    captions = {f["caption"] for f in page.figures.values()}
    assert {"Critic labels", "Verifier pass rate per round", "Mean CoT length per critic label (characters)",
            "Negatives by source", "Preference pairs by gap", "SFT loss", "CogPO loss", "CogPO reward margin per gap",
            "CogPO reward accuracy per gap", "pass@1 per benchmark"} == captions
    assert page.figures["fig-sft-loss"]["section"] == "training"
    assert "60% (3/5)" in page.figures["fig-rounds"]["alt"] and "50% (1/2)" in page.figures["fig-rounds"]["alt"]
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained, no JS
    manifest = json.loads((run_dir / "refine" / "manifest.json").read_text())
    assert manifest["config_hash"] in html and manifest["packages"]["pyarrow"] in html
    orig_correct = manifest["stages"]["check_original"]["original_correct"]
    assert f'<td class="k">check_original.original_correct</td><td>{orig_correct}</td>' in html


def test_eval_table_matches_summary(run_dir: Path):
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    page = Page(write_report(run_dir).read_text())
    # Grouped per benchmark in summary order, models as base, sft, (dpo), cogpo.
    assert [(r["benchmark"], r["model"]) for r in page.eval_rows] == [
        ("gsm8k", "base"), ("gsm8k", "sft"), ("gsm8k", "cogpo"),
        ("math500", "base"), ("math500", "sft"), ("math500", "cogpo")]
    expected = {(r["benchmark"], r["model"]): r for r in summary["results"]}
    for row in page.eval_rows:
        want = expected[(row["benchmark"], row["model"])]
        for key in ("greedy_pass@1", "pass@1", "maj@k", "no_answer_rate"):
            cell = row["cells"][key]
            if want[key] is None:
                assert cell == {"value": "", "text": "n/a"}
            else:
                assert float(cell["value"]) == want[key]
                assert cell["text"] == f"{want[key] * 100:.1f}%"
        assert float(row["cells"]["mean_response_tokens"]["value"]) == want["mean_response_tokens"]
    assert "base 11.0%, sft 22.5%, cogpo 33.0%" in page.figures["fig-eval-pass1"]["alt"]


def test_missing_inputs_give_notes(tmp_path: Path):
    run = tmp_path / "half"
    build_run_dir(run, sft=False, cogpo=False, eval_summary=False)
    page = Page(write_report(run).read_text())
    assert set(page.figures) == ALL_FIGURES - {"fig-sft-loss", "fig-cogpo-loss", "fig-cogpo-margins",
                                               "fig-cogpo-accuracies", "fig-eval-pass1"}
    assert page.notes["training"] == ["not available: no sft/metrics.jsonl (SFT has not run)",
                                      "not available: no cogpo/metrics.jsonl (CogPO has not run)"]
    assert page.notes["eval"] == ["not available: no eval/summary.json (the eval stage has not run)"]

    # No pairs at all: CogPO is reported as skipped, pairs and negatives say why they are empty.
    manifest_path = run / "refine" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["reconciliation"]["pairs_rows"], m["pairs_by_gap"], m["negatives"] = 0, {}, {}
    manifest_path.write_text(json.dumps(m))
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text("{not json")
    # Unreadable files name themselves in the note.
    (run / "refine" / "trace" / "shard-99999.parquet").write_bytes(b"not parquet")
    (run / "sft").mkdir()
    (run / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    page = Page(write_report(run).read_text())
    assert page.notes["lengths"][0].startswith(
        "not available: refine/trace/shard-99999.parquet is not readable Parquet")
    assert page.notes["training"][0].startswith("not available: sft/metrics.jsonl is not JSON lines with a step each")
    assert page.notes["training"][1] == "not available: CogPO was skipped: refine produced no preference pairs"
    assert page.notes["pairs"] == ["not available: refine built no preference pairs"]
    assert page.notes["negatives"] == ["not available: no row got a negative CoT"]
    assert page.notes["eval"][0].startswith("not available: eval/summary.json is not valid JSON")

    # An empty run directory still gives a page, one note per section.
    empty = tmp_path / "empty"
    empty.mkdir()
    page = Page(write_report(empty).read_text())
    assert page.figures == {}
    why = "not available: no refine/manifest.json (refine has not finished)"
    assert {k: v for k, v in page.notes.items() if k in ("header", "labels", "rounds", "negatives", "pairs")} == {
        k: [why] for k in ("header", "labels", "rounds", "negatives", "pairs")}
    assert page.notes["lengths"] == ["not available: no trace shards in refine/trace/"]


def test_data_is_escaped(run_dir: Path):
    summary_path = run_dir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["results"][0]["model"] = 'base<img src=x onerror="alert(2)">'
    summary["results"][1]["model"] = "sft $x^2$ & co"  # "$" must not start matplotlib mathtext either
    summary_path.write_text(json.dumps(summary))
    html = write_report(run_dir).read_text()
    assert EVIL_LABEL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "base&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in html
    assert "sft $x^2$ &amp; co" in html
    page = Page(html)
    assert {r["model"] for r in page.eval_rows} >= {'base<img src=x onerror="alert(2)">', "sft $x^2$ & co"}
    assert "sft $x^2$ & co 22.5%" in page.figures["fig-eval-pass1"]["alt"]


def test_cli_report(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert set(Page(out.read_text()).figures) == ALL_FIGURES
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_run_report_failure_is_a_warning(run_dir: Path, tmp_path: Path, capsys):
    cfg = load_config(default_config_path(), [f"run_dir={run_dir}"])
    assert write_run_report(cfg) == {"report": run_dir / "report.html"}
    assert f"[run] report -> {run_dir / 'report.html'}" in capsys.readouterr().out
    cfg = load_config(default_config_path(), [f"run_dir={tmp_path / 'never-created'}"])
    assert write_run_report(cfg) == {}
    out = capsys.readouterr().out
    assert "[run] warning: no report written: FileNotFoundError: run directory" in out
