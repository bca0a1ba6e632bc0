"""Progress on the console: rows done, rows/s and ETA for refine stages; step, loss and tokens/s for training.

On a terminal a tqdm bar; otherwise (logs, CI, `ray job logs`) one line every `every_s` seconds, since a bar's
carriage returns make a log unreadable.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from crv_ray import console


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def rate_line(what: str, done: int, total: int | None, elapsed_s: float, unit: str = "rows") -> str:
    """'refine critic_a0: 40/160 rows, 2.1 rows/s, ETA 0m57s' (pure, for the non-terminal form and tests)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    head = f"{what}: {done}/{total} {unit}" if total else f"{what}: {done} {unit}"
    eta = f", ETA {_fmt_s((total - done) / rate)}" if total and rate > 0 and done < total else ""
    return f"{head}, {rate:.2f} {unit}/s{eta} [{_fmt_s(elapsed_s)}]"


class Progress:
    def __init__(self, what: str, total: int | None, unit: str = "rows", every_s: float = 30.0,
                 terminal: bool | None = None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.t0 = self._last = time.time()
        self._bar = None
        if console.stderr_is_terminal() if terminal is None else terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit[:-1] if unit.endswith("s") else unit,
                             file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, done: int, postfix: str | None = None) -> None:
        """Set the count done so far (absolute, so that callers can recount)."""
        if self._bar is not None:
            self._bar.update(done - self.done)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
        self.done = done
        now = time.time()
        if self._bar is None and now - self._last >= self.every_s:
            self._last = now
            line = rate_line(self.what, done, self.total, now - self.t0, self.unit)
            print(f"[progress] {line}" + (f" ({postfix})" if postfix else ""), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------ training: follow rank 0's metrics.jsonl
def training_postfix(entry: dict) -> str:
    parts = []
    if entry.get("loss") is not None:
        parts.append(f"loss {entry['loss']:.4f}")
    if entry.get("tokens_per_s") is not None:
        parts.append(f"{entry['tokens_per_s']:,.0f} tok/s")
    if entry.get("rewards/accuracies") is not None:
        parts.append(f"acc {entry['rewards/accuracies']:.2f}")
    return ", ".join(parts)


@contextlib.contextmanager
def follow_metrics(path: Path, what: str, total_steps: int | None, poll_s: float = 2.0,
                   every_s: float = 30.0) -> Iterator[None]:
    """While the block runs (a Ray Train fit whose workers' output the console does not show), read the steps rank 0
    appends to `path` and show step, loss and tokens/s."""
    stop = threading.Event()
    bar = Progress(what, total_steps, unit="steps", every_s=every_s)
    start = path.stat().st_size if path.exists() else 0  # a resumed run appends; show only new steps

    def run() -> None:
        pos, buf = start, b""
        while not stop.wait(poll_s):
            if not path.exists():
                continue
            if path.stat().st_size < pos:  # rewritten (a fresh run): read from the top
                pos, buf = 0, b""
            with path.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if "step" in entry:
                        bar.update(int(entry["step"]), training_postfix(entry))

    t = threading.Thread(target=run, name="crv-train-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=poll_s + 1)
        bar.close()
