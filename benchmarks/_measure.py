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
    stopped: str = ""  # why the launcher stopped the command early (time or memory limit), else ""


def run_measured(cmd: list[str], env: dict | None = None, memory_limit_gb: float | None = None,
                 cwd: Path | None = None, timeout: float | None = None, rss_limit_gb: float | None = None) -> Measured:
    """Run to completion; with memory_limit_gb the command gets that address-space limit, so a
    tool that would exhaust the machine fails instead (and the failure is what gets reported).
    cwd (default: the repository root) is where the command runs and may leave stray files.
    timeout / rss_limit_gb: the launcher kills the command after that many seconds or once its
    resident memory passes that size (Measured.stopped says which)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, usage = (Path(tmp) / n for n in ("out", "err", "usage.json"))
        launcher = [sys.executable, __file__, str(usage), str(out), str(err), str(memory_limit_gb or 0),
                    str(timeout or 0), str(rss_limit_gb or 0), *map(str, cmd)]
        t = time.perf_counter()
        subprocess.run(launcher, env={**os.environ, **(env or {})}, cwd=cwd or ROOT, check=True)
        seconds = time.perf_counter() - t
        u = json.loads(usage.read_text())
        return Measured(seconds, u["maxrss_kb"] / 1024.0, u["returncode"], out.read_text(), err.read_text(),
                        u.get("cpu_seconds", 0.0), u.get("stopped", ""))


def python() -> str:
    return sys.executable


def quantkit_cmd(*args) -> list[str]:
    return [python(), "-m", "quantkit", *map(str, args)]


def status_kb(pid: int, field: str = "VmRSS") -> int:
    """A memory field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: its high-water mark); 0 once the
    process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _wait(proc, timeout: float, rss_kb: int):
    """wait4 for the child, killing it past `timeout` seconds or `rss_kb` resident KiB (0: no limit)."""
    t0, stopped = time.perf_counter(), ""
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, ru, stopped
        if not stopped and timeout and time.perf_counter() - t0 > timeout:
            stopped = f"stopped after {timeout:.0f} s"
        if not stopped and rss_kb and status_kb(proc.pid) > rss_kb:
            stopped = f"stopped at {rss_kb / 2**20:.1f} GiB resident"
        if stopped:
            proc.kill()
            _, status, ru = os.wait4(proc.pid, 0)
            return status, ru, stopped
        time.sleep(0.2)


def _launch(usage: str, out: str, err: str, limit_gb: str, timeout: str, rss_gb: str, *cmd: str) -> None:
    n = int(float(limit_gb) * 2**30)

    def limit():
        if n:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(list(cmd), stdout=o, stderr=e, preexec_fn=limit)
        status, ru, stopped = _wait(proc, float(timeout), int(float(rss_gb) * 2**20))
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    Path(usage).write_text(json.dumps({"maxrss_kb": ru.ru_maxrss, "returncode": proc.returncode,
                                       "cpu_seconds": ru.ru_utime + ru.ru_stime, "stopped": stopped}))


if __name__ == "__main__":
    _launch(*sys.argv[1:])
