"""The CLI drops Ray's unactionable messages from its stdout and stderr (C-level writes included), forwards all else
at once, and shows everything with -v."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OBJECT_STORE = ("[2026-11-27 04:14:04,100 E 2160 2160] core_worker.cc:2465: Actor with class name: 'MapWorker(Map(C))' "
                "and ID: 'b80e' has constructor arguments in the object store and max_restarts > 0. If the arguments "
                "in the object store go out of scope or are lost, the actor restart will fail.")
STARTUP = ("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: c1ec with address: "
           "192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be a result of ...")

SCRIPT = textwrap.dedent(f"""
    import os, sys
    from crv_ray import console
    console.enable(verbose=sys.argv[1] == "verbose")
    console.after_ray_init()
    os.write(2, {OBJECT_STORE!r}.encode() + b"\\n")   # what the core worker's C++ logger does
    print({STARTUP!r}, flush=True)                     # what Ray's error listener prints
    print("[refine] shard 0 committed", flush=True)
    sys.stderr.write("a real warning\\n"); sys.stderr.flush()
    sys.stdout.write("progress 50%\\r"); sys.stdout.flush()  # a partial line passes at once
    print("progress 100%")
""")


def run(mode: str, **env_over) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_over}
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, env=env, timeout=60)
    # bytes decoded by hand: text mode would turn the progress bar's "\r" into a newline
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


@pytest.mark.parametrize("unbuffered", ["", "1"])  # unbuffered: a line and its newline come as two writes
def test_unactionable_ray_lines_are_dropped_everything_else_passes(unbuffered):
    p = run("quiet", PYTHONUNBUFFERED=unbuffered)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "[refine] shard 0 committed\nprogress 50%\rprogress 100%\n"
    assert p.stderr == "a real warning\n"


def test_verbose_shows_everything():
    p = run("verbose")
    assert STARTUP in p.stdout and "[refine] shard 0 committed" in p.stdout
    assert OBJECT_STORE in p.stderr and "a real warning" in p.stderr


def test_cli_restores_the_descriptors_and_filters_nothing_after_it_returns(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from crv_ray import console
        from crv_ray.cli import main
        before = os.fstat(1).st_ino, os.fstat(2).st_ino
        console.enable(verbose=False); console.after_ray_init()   # what init_ray does inside a command
        assert (os.fstat(1).st_ino, os.fstat(2).st_ino) != before
        main(["validate", "--set", "run_dir=x"])
        assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before, "descriptors not restored"
        console.after_ray_init()  # the CLI is done: no filter is installed again
        assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before
        os.write(2, b"has constructor arguments in the object store and max_restarts > 0\\n")
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert '"run_dir": "x"' in p.stdout
    assert p.stderr.endswith("has constructor arguments in the object store and max_restarts > 0\n")
