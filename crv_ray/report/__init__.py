"""`crv-ray report`: one self-contained HTML page with the run's plots and tables (see collect, figures, html)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from crv_ray.report.collect import collect
from crv_ray.report.figures import section_figures
from crv_ray.report.html import render
from crv_ray.run_paths import RunPaths
from crv_ray.storage import AnyPath, as_path


def write_report(run_dir: str | AnyPath, out: str | AnyPath | None = None) -> AnyPath:
    """Write `<run_dir>/report.html` (or `out`) from whatever the run directory holds; returns its path."""
    data = collect(run_dir)
    # Versions the refine stage ran with (manifest), plus the plotting library this page was drawn with.
    packages = dict((data["header"] or {}).get("packages") or {})
    packages["matplotlib (report)"] = importlib.metadata.version("matplotlib")
    html = render(data, section_figures(data), packages)
    path = as_path(out) if out is not None else RunPaths(run_dir).report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


__all__ = ["collect", "write_report"]
