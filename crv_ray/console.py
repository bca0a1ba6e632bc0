"""Console output of the `crv-ray` command: Ray messages a user cannot act on are dropped; `crv-ray -v` shows all.

Two such messages cannot be fixed where they start:
- "has constructor arguments in the object store and max_restarts > 0", once per actor of every Ray Data pool: Ray
  Data itself hands each actor its DataContext and UDF as object refs and lets actors restart
  (ray-project/ray#53727). The driver's C++ core worker writes it straight to file descriptor 2.
- "N PYTHON worker processes have been started ... the maximum expected startup concurrency": the pools hold more
  actors than the machine has cores, by design (their tokenizer actors mostly sleep). Raising Ray's startup
  concurrency instead (worker_maximum_startup_concurrency) makes the raylet start one worker per logical CPU at
  once, and on a 2-core machine it then times out waiting for its own dashboard agent and dies. The raylet's
  warning reaches the driver's stdout.

So, once Ray is up, the command's stdout and stderr pass through a filter thread that drops lines matching
`UNACTIONABLE` and forwards everything else at once (a progress bar's "\r" updates included). Library
use (tests, notebooks) is never filtered: only `crv_ray.cli.main` turns it on.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import re
import select
import sys
import threading

UNACTIONABLE = (
    re.compile(rb"has constructor arguments in the object store and max_restarts > 0"),
    re.compile(rb"worker processes have been started on node: .*maximum expected startup concurrency"),
)

_LINE_END = re.compile(rb"(?<=\n)|(?<=\r)(?!\n)")
_PARTIAL_WAIT_S = 0.05

_enabled = False
_filters: list["LineFilter"] = []
_fault_file = None


class LineFilter:
    """Replace file descriptor `fd` with a pipe whose lines are forwarded to the original, except those matching
    `patterns`. `stop()` restores the descriptor and forwards what is left."""

    def __init__(self, fd: int, patterns=UNACTIONABLE):
        self.fd = fd
        self.patterns = patterns
        self.dropped = 0
        self._saved = os.dup(fd)
        self._broken = False
        read_fd, write_fd = os.pipe()
        self._read_fd = read_fd
        os.dup2(write_fd, fd)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, name=f"crv-console-filter-{fd}", daemon=True)
        self._thread.start()

    def _drop(self, line: bytes) -> bool:
        if any(p.search(line) for p in self.patterns):
            self.dropped += 1
            return True
        return False

    def _write(self, data: bytes) -> None:
        while data and not self._broken:
            try:
                n = os.write(self._saved, data)
            except OSError:  # the reader went away (e.g. `| head`): keep draining so writers never block
                self._broken = True
                return
            data = data[n:]

    def _pump(self) -> None:
        pending = b""  # the start of a line whose end has not arrived
        while True:
            # An unbuffered print writes a line and its newline separately: a partial line waits a moment for its
            # end before it is judged; one that stays partial (a prompt) goes out as it is.
            ready, _, _ = select.select([self._read_fd], [], [], _PARTIAL_WAIT_S if pending else None)
            if not ready:
                self._write(b"" if self._drop(pending) else pending)
                pending = b""
                continue
            try:
                data = os.read(self._read_fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                self._write(b"" if not pending or self._drop(pending) else pending)
                return
            pending += data
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
            if cut < 0:
                continue
            done, pending = pending[:cut + 1], pending[cut + 1:]
            # "\r" ends a piece too: a progress bar's updates pass as they come
            self._write(b"".join(p for p in _LINE_END.split(done) if p and not self._drop(p)))

    def stop(self, timeout_s: float = 2.0) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(self._saved, self.fd)  # closes the pipe's write end held at fd: the pump sees EOF
        self._thread.join(timeout_s)
        if not self._thread.is_alive():  # else a child process still holds the write end: leave the pump be
            os.close(self._read_fd)
        os.close(self._saved)


def enable(verbose: bool) -> None:
    """Called by the CLI: filter Ray's unactionable messages once Ray is up, unless `verbose`."""
    global _enabled
    _enabled = not verbose


def after_ray_init() -> None:
    """Install the filters (once) if the CLI asked for them. After ray.init, so that Ray's own processes keep the
    real descriptors."""
    if not _enabled or _filters:
        return
    for fd in (1, 2):
        _filters.append(LineFilter(fd))
    if faulthandler.is_enabled():  # a crash's traceback must reach the terminal, not a pipe nobody may read
        global _fault_file
        _fault_file = os.fdopen(os.dup(_filters[-1]._saved), "w")
        faulthandler.enable(file=_fault_file, all_threads=True)
    atexit.register(stop)


def stop() -> None:
    while _filters:
        _filters.pop().stop()


def stderr_is_terminal() -> bool:
    """Whether the user's stderr is a terminal (asked of the original descriptor once the filter holds fd 2)."""
    for f in _filters:
        if f.fd == 2:
            return os.isatty(f._saved)
    return os.isatty(2)


def disable() -> None:
    """Stop filtering (restoring stdout and stderr) and filter no later Ray start."""
    global _enabled
    _enabled = False
    stop()
