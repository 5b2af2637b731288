"""Run a command as a child process and measure its wall time and peak RSS.

The peak comes from the rusage that wait4 returns for the child. A forked child inherits its
parent's peak RSS, so the command is started by a small launcher process (this file run as a
script), which forks it from a few MB instead of from the benchmark's own memory.
"""

from __future__ import annotations

import json
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
    cpu_seconds: float = 0.0  # user + system time of the command


def run_measured(cmd: list[str], env: dict | None = None, memory_limit_gb: float | None = None,
                 cwd: Path | None = None) -> Measured:
    """Run to completion; with memory_limit_gb the command gets that address-space limit, so a
    tool that would exhaust the machine fails instead (and the failure is what gets reported).
    cwd (default: the repository root) is where the command runs and may leave stray files."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, usage = (Path(tmp) / n for n in ("out", "err", "usage.json"))
        launcher = [sys.executable, __file__, str(usage), str(out), str(err), str(memory_limit_gb or 0), *map(str, cmd)]
        t = time.perf_counter()
        subprocess.run(launcher, env={**os.environ, **(env or {})}, cwd=cwd or ROOT, check=True)
        seconds = time.perf_counter() - t
        u = json.loads(usage.read_text())
        return Measured(seconds, u["maxrss_kb"] / 1024.0, u["returncode"], out.read_text(), err.read_text(),
                        u.get("cpu_seconds", 0.0))


def python() -> str:
    return sys.executable


def quantkit_cmd(*args) -> list[str]:
    return [python(), "-m", "quantkit", *map(str, args)]


def _launch(usage: str, out: str, err: str, limit_gb: str, *cmd: str) -> None:
    n = int(float(limit_gb) * 2**30)

    def limit():
        if n:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(list(cmd), stdout=o, stderr=e, preexec_fn=limit)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    Path(usage).write_text(json.dumps({"maxrss_kb": ru.ru_maxrss, "returncode": proc.returncode,
                                       "cpu_seconds": ru.ru_utime + ru.ru_stime}))


if __name__ == "__main__":
    _launch(*sys.argv[1:])
