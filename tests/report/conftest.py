from __future__ import annotations

from pathlib import Path

import pytest
from report_rundir import build_run_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished run directory: refine outputs, SFT and CogPO metrics, eval summary (see report_rundir)."""
    d = tmp_path / "run"
    build_run_dir(d)
    return d
