"""Run a command as a child process and measure its wall time and peak RSS. The peak comes from
the rusage that wait4 returns for that one child: exact, not a sampled approximation."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict | None = None, memory_limit_gb: float | None = None) -> Measured:
    """Run to completion; with memory_limit_gb the child gets that address-space limit, so a tool
    that would exhaust the machine fails instead (and the failure is what gets reported)."""

    def limit():
        if memory_limit_gb:
            import resource

            n = int(memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env={**os.environ, **(env or {})}, cwd=ROOT, preexec_fn=limit)
        _, status, ru = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Measured(seconds, ru.ru_maxrss / 1024.0, proc.returncode, out.read(), err.read())


def python() -> str:
    return sys.executable


def quantkit_cmd(*args) -> list[str]:
    return [python(), "-m", "quantkit", *map(str, args)]
