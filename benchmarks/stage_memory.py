"""Where a `quantkit quantize` run reaches its peak memory: resident memory sampled while the run goes, per stage.

    python benchmarks/stage_memory.py --model ocr_rec [--cache DIR] [--every 0.05] [--code CHECKOUT]

Runs the default command (`quantkit quantize MODEL --calib CALIB --threads 1`, as benchmarks/real_models.py's
"quantkit static") on a prepared real model (benchmarks/_real_data.py), reads the process's VmRSS from /proc every
`--every` seconds and files each sample under the stage the run's last status line named (its first three words:
"calibrating 8/128 samples" and "calibrating 24/128 samples" stay apart, so the growth within a stage shows). Prints
the largest sample per stage, in the order the stages came, and the run's peak (the kernel's own high-water mark,
VmHWM, which a sample can miss). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path

from _measure import ROOT, quantkit_cmd, status_kb

DEFAULT_CACHE = Path(os.environ.get("QUANTKIT_REAL_CACHE", ROOT / "benchmarks" / ".cache" / "real"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ocr_rec")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--every", type=float, default=0.05, help="seconds between samples")
    ap.add_argument("--code", type=Path, default=ROOT, help="the quantkit checkout to run")
    args = ap.parse_args()
    d = (args.cache or DEFAULT_CACHE) / args.model
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"stage_memory_{os.getpid()}.onnx"
    cmd = quantkit_cmd("quantize", d / "model.onnx", "--calib", d / "calib.npz", "--threads", 1, "-o", out, "--force")
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            cwd=args.code)
    stage = ["starting"]
    peaks: dict[str, int] = {}  # insertion order: the order the stages came

    def follow() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("quantkit:"):
                stage[0] = " ".join(line[len("quantkit:"):].split()[:3])

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    high = 0
    try:
        while proc.poll() is None:
            kb = status_kb(proc.pid)
            high = max(high, status_kb(proc.pid, "VmHWM"))
            peaks[stage[0]] = max(peaks.get(stage[0], 0), kb)
            time.sleep(args.every)
    finally:
        reader.join(timeout=5)
        out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise SystemExit(f"quantkit failed (exit {proc.returncode})")
    print(f"### {args.model}: resident memory by stage (largest sample every {args.every:g} s)\n")
    print("| stage (its status line) | MB |")
    print("| --- | ---: |")
    for name, kb in peaks.items():
        print(f"| {name} | {kb / 1024:.0f} |")
    print(f"| **peak (VmHWM)** | **{high / 1024:.0f}** |")


if __name__ == "__main__":
    main()
