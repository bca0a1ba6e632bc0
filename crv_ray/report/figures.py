"""The report's figures: matplotlib (object API, Agg canvas, no pyplot state) rendered to PNG data URIs.

Each figure is a dict {id, title, src, alt}: `src` is a `data:image/png;base64,...` URI so the HTML works offline;
`alt` states the plotted numbers in words, for screen readers and for tests.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib as mpl
from matplotlib import ticker
from matplotlib.figure import Figure

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
# Data strings (labels, model names) are text, never TeX: "$" in a name must not start mathtext.
_RC = {"text.parse_math": False, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
       "axes.prop_cycle": mpl.cycler(color=_COLORS)}


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if pct:
        return f"{v * 100:.1f}%"
    return f"{v:g}" if isinstance(v, int) or float(v).is_integer() else f"{v:.3g}"


def _short(name: str, n: int = 24) -> str:
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def _xticks(ax, labels: list[str]) -> None:
    """Category tick labels, shortened, and slanted when they would collide (the full names are in the tables)."""
    short = [_short(str(k)) for k in labels]
    slant = any(len(k) > 15 for k in short)
    ax.set_xticks(range(len(short)), short, rotation=25 if slant else 0, ha="right" if slant else "center")


def _pct_axis(ax, values) -> None:
    """Rates as percentages, scaled to the data (small models score a few percent) but never above 100%."""
    top = max([v for v in values if v is not None] or [0])
    ax.set_ylim(0, min(1.08, max(top * 1.25, 0.05)))
    ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))


def _render(fig: Figure, fig_id: str, title: str, alt: str) -> dict:
    # The title goes in the HTML figcaption (searchable text), not into the image.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return {"id": fig_id, "title": title, "alt": alt,
            "src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}


def bar_chart(fig_id: str, title: str, counts: dict[str, float], ylabel: str,
              notes: dict[str, str] | None = None, pct: bool = False) -> dict:
    """One bar per key, each annotated with its value (or with notes[key])."""
    notes = notes or {}
    keys = list(counts)
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(max(3.5, 1.0 + 0.9 * len(keys)), 3.0))
        ax = fig.subplots()
        vals = [counts[k] if counts[k] is not None else 0 for k in keys]
        bars = ax.bar(range(len(keys)), vals, color=[_COLORS[i % len(_COLORS)] for i in range(len(keys))])
        ax.bar_label(bars, labels=[notes.get(k, _fmt(counts[k], pct)) for k in keys], padding=2, fontsize=8)
        _xticks(ax, keys)
        ax.set_ylabel(ylabel)
        if pct:
            _pct_axis(ax, vals)
        else:
            ax.margins(y=0.15)
            ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        alt = f"{title}: " + ", ".join(f"{k} {notes.get(k, _fmt(counts[k], pct))}" for k in keys)
        return _render(fig, fig_id, title, alt)


def grouped_bar_chart(fig_id: str, title: str, categories: list[str], series: dict[str, list[float | None]],
                      ylabel: str, pct: bool = False) -> dict:
    """Bars grouped by category, one colour per series; None values are left out (and labelled n/a in alt)."""
    n = max(len(series), 1)
    width = 0.8 / n
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(max(4.5, 1.5 + 0.45 * n * len(categories)), 3.2))
        ax = fig.subplots()
        for i, (name, vals) in enumerate(series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(vals) if v is not None]
            ys = [v for v in vals if v is not None]
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, labels=[_fmt(v, pct) for v in ys], padding=2, fontsize=7)
        _xticks(ax, categories)
        ax.set_ylabel(ylabel)
        if pct:
            _pct_axis(ax, [v for vals in series.values() for v in vals])
        else:
            ax.margins(y=0.15)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        alt = f"{title}: " + "; ".join(
            f"{c}: " + ", ".join(f"{name} {_fmt(vals[j], pct)}" for name, vals in series.items())
            for j, c in enumerate(categories))
        return _render(fig, fig_id, title, alt)


def line_chart(fig_id: str, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               pct: bool = False) -> dict:
    """One line per series of (x, y) points; a single point still shows, as a marker."""
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(5.5, 3.0))
        ax = fig.subplots()
        for name, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.4,
                        label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if pct:
            ax.set_ylim(-0.05, 1.05)
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        alt = f"{title}: " + "; ".join(
            f"{name}: {len(pts)} points" + (f", last {_fmt(pts[-1][1], pct)} at step {pts[-1][0]:g}" if pts else "")
            for name, pts in series.items())
        return _render(fig, fig_id, title, alt)


def section_figures(data: dict) -> dict[str, list[dict]]:
    """The figures of each report section from `collect()`'s data (sections with a `missing` reason get none)."""
    figs: dict[str, list[dict]] = {}
    labels = data["labels"]
    if "counts" in labels:
        c, total = labels["counts"], labels["total"]
        figs["labels"] = [bar_chart("fig-labels", "Critic labels", c, "rows",
                                    notes={k: f"{v} ({v / total:.0%})" for k, v in c.items()})]
    rounds = data["rounds"]
    if "rounds" in rounds:
        rs = [r for r in rounds["rounds"] if r.get("rethought")]
        figs["rounds"] = [bar_chart("fig-rounds", "Verifier pass rate per round",
                                    {f"round {r['round']}": r["pass_rate"] for r in rs}, "passed / rethought",
                                    notes={f"round {r['round']}": f"{r['pass_rate']:.0%} ({r['passed']}/{r['rethought']})"
                                           for r in rs}, pct=True)]
    lengths = data["lengths"]
    if "by_label" in lengths:
        rows = [r for r in lengths["by_label"] if r["aligned_rows"]]
        if rows:
            cats = [f"{r['label']} (n={r['aligned_rows']})" for r in rows]
            figs["lengths"] = [grouped_bar_chart(
                "fig-lengths", f"Mean CoT length per critic label ({lengths['unit']})", cats,
                {"original CoT": [r["aligned_original_mean"] for r in rows],
                 "aligned CoT (SFT target)": [r["aligned_mean"] for r in rows]}, lengths["unit"])]
    for key, title, ylabel in (("negatives", "Negatives by source", "rows"),
                               ("pairs", "Preference pairs by gap", "pairs")):
        if "counts" in data[key]:
            figs[key] = [bar_chart(f"fig-{key}", title, data[key]["counts"], ylabel)]
    if "loss" in data["sft"]:
        figs["sft"] = [line_chart("fig-sft-loss", "SFT loss", data["sft"]["loss"], "optimizer step", "loss")]
    cogpo, train = data["cogpo"], []
    if "loss" in cogpo:
        train.append(line_chart("fig-cogpo-loss", "CogPO loss", cogpo["loss"], "optimizer step", "loss"))
        if cogpo["margins"]:
            train.append(line_chart("fig-cogpo-margins", "CogPO reward margin per gap", cogpo["margins"],
                                    "optimizer step", "chosen - rejected reward"))
        if cogpo["accuracies"]:
            train.append(line_chart("fig-cogpo-accuracies", "CogPO reward accuracy per gap", cogpo["accuracies"],
                                    "optimizer step", "chosen reward > rejected", pct=True))
    if train:
        figs["cogpo"] = train
    ev = data["eval"]
    if "rows" in ev:
        figs["eval"] = [grouped_bar_chart("fig-eval-pass1", "pass@1 per benchmark", ev["benchmarks"], ev["pass1"],
                                          "pass@1", pct=True)]
    return figs
