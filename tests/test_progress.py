"""Console progress: the non-terminal line (rate, ETA) and following a training run's metrics file."""

import json
import time

from crv_ray.progress import Progress, follow_metrics, rate_line, training_postfix


def test_rate_line_counts_rate_and_eta():
    assert rate_line("refine critic_a0", 40, 160, 20.0, "problems") == \
        "refine critic_a0: 40/160 problems, 2.00 problems/s, ETA 1m00s [0m20s]"
    assert rate_line("x", 160, 160, 3700.0) == "x: 160/160 rows, 0.04 rows/s [1h01m]"  # done: no ETA
    assert rate_line("x", 0, None, 0.0) == "x: 0 rows, 0.00 rows/s [0m00s]"


def test_progress_prints_a_line_at_most_every_interval(capsys):
    p = Progress("stage", 10, unit="problems", every_s=0.0, terminal=False)
    p.update(5)
    p.every_s = 3600.0
    p.update(7)  # within the interval: nothing more
    p.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[progress] stage: 5/10 problems, ")
    assert "ETA" in lines[0]


def test_follow_metrics_shows_new_steps_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("crv_ray.console.stderr_is_terminal", lambda: False)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # a resumed run's earlier steps
    with follow_metrics(path, "[cogpo] train", total_steps=4, poll_s=0.05, every_s=0.0):
        with path.open("a") as f:
            f.write(json.dumps({"step": 2, "loss": 0.6931, "tokens_per_s": 1234.5, "rewards/accuracies": 0.5}) + "\n")
            f.write('{"step": 3, "loss"')  # a line still being written
        time.sleep(0.3)
        with path.open("a") as f:
            f.write(': 0.5}\n')
        time.sleep(0.3)
    out = capsys.readouterr().out
    assert "[progress] [cogpo] train: 2/4 steps" in out and "loss 0.6931, 1,234 tok/s, acc 0.50" in out
    assert "3/4 steps" in out and "loss 0.5000" in out
    assert "1/4 steps" not in out and "loss 9.0" not in out


def test_training_postfix_skips_missing_fields():
    assert training_postfix({"step": 3}) == ""
    assert training_postfix({"loss": 1.23456}) == "loss 1.2346"
