"""Benchmark: the refine driver's peak RSS from 1,000 to 100,000 rows (scripted reply double, so only crv-ray's own
driver work is measured: ingest, per-shard commits, the manifest built from per-shard summaries).

Each N runs in its own process, whose peak RSS (getrusage) is the driver's alone: the stages run in Ray workers.

    python jobs/bench_driver_rss.py                   # N = 1000 10000 100000
    python jobs/bench_driver_rss.py --n 1000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _sample_peaks(peaks: dict[str, float]) -> None:
    # Private (anonymous) memory and mapped object-store pages separately: RSS counts both.
    while True:
        for key, mb in _status_mb().items():
            peaks[key] = max(peaks.get(key, 0.0), mb)
        time.sleep(0.2)


def child(n: int, run_dir: str) -> None:
    import threading

    import yaml

    from crv_ray.config import load_config_dict
    from crv_ray.refine.runner import run_refine

    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "tiny_scripted.yaml").read_text())
    raw.update(run_dir=run_dir)
    raw["input"]["synthetic"]["n"] = n
    raw["refine"]["shard_size"] = 1000
    raw["refine"]["watchdog_s"] = 1800
    peaks: dict[str, float] = {}
    threading.Thread(target=_sample_peaks, args=(peaks,), daemon=True).start()
    t0 = time.time()
    res = run_refine(load_config_dict(raw))
    rec = res.manifest["reconciliation"]
    print("RESULT " + json.dumps({"n": n, "wall_s": round(time.time() - t0, 1), "trace_rows": rec["trace_rows"],
                                  "balanced": rec["balanced"],
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "peak_anon_mb": peaks.get("RssAnon", 0.0),
                                  "peak_shmem_mb": peaks.get("RssShmem", 0.0)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            p = subprocess.run([sys.executable, __file__, "--child", str(n), f"{tmp}/run-{n}"], capture_output=True,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"N={n} failed:\n{p.stderr[-4000:]}")
            rows.append(json.loads(line[-1][7:]))
            print(f"N={n}: {rows[-1]}", flush=True)
    print(f"\nrefine driver peak RSS (scripted engine, shard_size 1000, {os.cpu_count()} CPUs)")
    print("peak RSS: getrusage; private: peak RssAnon; object store: peak RssShmem (object-store pages the driver "
          "mapped)")
    print(f"{'N':>8} {'wall s':>8} {'rows/s':>8} {'peak RSS MB':>12} {'vs first':>9} {'private MB':>11} "
          f"{'vs first':>9} {'object store MB':>16}")
    for r in rows:
        print(f"{r['n']:>8} {r['wall_s']:>8.0f} {r['n'] / r['wall_s']:>8.0f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_mb'] / rows[0]['peak_rss_mb'] - 1:>+9.1%} {r['peak_anon_mb']:>11.0f} "
              f"{r['peak_anon_mb'] / rows[0]['peak_anon_mb'] - 1:>+9.1%} {r['peak_shmem_mb']:>16.0f}")


if __name__ == "__main__":
    main()
