"""jobs/bench_refine.py's summary: rows/s from median walls and the marginal rate, per repeat and overall."""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "jobs" / "bench_refine.py"
_spec = importlib.util.spec_from_file_location("bench_refine", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _run(wall: float, rss: float = 100.0) -> dict:
    return {"wall_s": wall, "peak_rss_mb": rss}


def test_summary_uses_median_walls_and_prints_each_repeat():
    runs = {(100, "crv"): [_run(40), _run(50), _run(44, 300)], (100, "baseline"): [_run(20), _run(18), _run(22)],
            (1000, "crv"): [_run(70), _run(80), _run(74)], (1000, "baseline"): [_run(50), _run(38), _run(40)]}
    lines = bench.summary(runs, [100, 1000])
    assert lines[1].split() == ["100", "2.27", "5.00", "0.45", "300", "100"]  # medians 44 and 20
    assert lines[2].split() == ["1000", "13.51", "25.00", "0.54", "100", "100"]  # medians 74 and 40
    # Per repeat: 900 rows over the difference of that repeat's walls.
    assert lines[3] == "run 1 marginal N=100->1000: crv 30.00 rows/s, script 30.00 rows/s, ratio 1.00"
    assert lines[4] == "run 2 marginal N=100->1000: crv 30.00 rows/s, script 45.00 rows/s, ratio 0.67"
    assert lines[5] == "run 3 marginal N=100->1000: crv 30.00 rows/s, script 50.00 rows/s, ratio 0.60"
    assert lines[6] == "marginal N=100->1000 (median walls): crv 30.00 rows/s, script 45.00 rows/s, ratio 0.67"


def test_summary_of_one_run_has_no_per_repeat_lines():
    runs = {(100, s): [_run(10)] for s in bench.SIDES} | {(1000, s): [_run(40)] for s in bench.SIDES}
    lines = bench.summary(runs, [100, 1000])
    assert len(lines) == 4 and lines[-1] == "marginal N=100->1000: crv 30.00 rows/s, script 30.00 rows/s, ratio 1.00"
