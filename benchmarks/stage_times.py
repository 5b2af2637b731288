"""Where a `quantkit quantize` run spends its time, for two versions of quantkit side by side.

    python benchmarks/stage_times.py --model minilm --code /path/to/old/checkout /path/to/this/checkout
                                     [--repeats 3] [--cache DIR] [--load N]

Each repeat runs the default command (`quantkit quantize MODEL --calib CALIB --threads 1`, as
benchmarks/real_models.py's "quantkit static") once per checkout, alternating, each in its own process
with that checkout as its working directory and first on PYTHONPATH, and reads the report's
`stage_seconds`, `seconds`, the placement candidates the search scored and the ops it moved. Alternating
makes machine load hit both versions alike; the table gives per stage the median over the repeats, whether
the written files were byte-identical across repeats (the placement must not depend on timing) and whether
they are the first checkout's. `--load N` runs N busy-looping processes beside the runs for their whole
duration (each spins one core), so that "the same bytes whatever the load" is checked by a rerunnable command:
the placement's figures and the speed guard's timings then come from a machine with more work than cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _measure import ROOT, quantkit_cmd, run_measured

DEFAULT_CACHE = Path(os.environ.get("QUANTKIT_REAL_CACHE", ROOT / "benchmarks" / ".cache" / "real"))


def _run(code: Path, model: Path, calib: Path, out: Path) -> dict:
    report = out.with_suffix(".json")
    env = {**os.environ, "PYTHONPATH": str(code)}
    m = run_measured(quantkit_cmd("quantize", model, "--calib", calib, "--threads", 1, "-o", out, "--report",
                                  report, "--force", "-q"), env=env, cwd=code)
    if m.returncode != 0:
        raise SystemExit(f"{code}: quantkit failed: {m.stderr.strip().splitlines()[-1:]}")
    r = json.loads(report.read_text())
    # the placement's parts (the report's placement.seconds, since stop 28): "search (15 candidates)" -> "search"
    placement = r.get("placement") or {}
    parts = {f"  placement: {k.split(' (')[0]}": v for k, v in (placement.get("seconds") or {}).items()}
    return {**r["stage_seconds"], **parts, "total (report)": r["seconds"], "process wall": m.seconds,
            "process CPU": m.cpu_seconds, "candidates scored": len(placement.get("trials", [])),
            "ops moved off static int8": len(placement.get("moved", {})),
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


@contextmanager
def busy(n: int) -> Iterator[None]:
    """n processes spinning one core each while the block runs; stopped (and reaped) at its end."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--code", nargs=2, type=Path, required=True, help="two quantkit checkouts: before, after")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes to run beside the runs")
    args = ap.parse_args()
    d = (args.cache or DEFAULT_CACHE) / args.model
    rows: dict[Path, list[dict]] = {c: [] for c in args.code}
    with tempfile.TemporaryDirectory() as tmp, busy(args.load):
        for i in range(args.repeats):
            for j, code in enumerate(args.code):
                rows[code].append(_run(code.resolve(), d / "model.onnx", d / "calib.npz", Path(tmp) / f"{j}_{i}.onnx"))
    load = os.getloadavg()[0]
    stages = list(dict.fromkeys(k for c in args.code for k in rows[c][0] if k != "sha256"))
    beside = f", {args.load} busy-looping processes beside them" if args.load else ""
    print(f"### {args.model}: stage seconds, median of {args.repeats} alternating runs{beside} (load average "
          f"{load:.1f} after)\n")
    print("| stage | " + " | ".join(str(c) for c in args.code) + " |")
    print("| --- |" + " ---: |" * len(args.code))
    for s in stages:
        print(f"| {s} | " + " | ".join(f"{statistics.median(r.get(s, math.nan) for r in rows[c]):.2f}"
                                      for c in args.code) + " |")
    same = ["yes" if len({r["sha256"] for r in rows[c]}) == 1 else "NO" for c in args.code]
    print("| same bytes every repeat | " + " | ".join(same) + " |")
    first = rows[args.code[0]][0]["sha256"]
    print("| same bytes as the first checkout | " + " | ".join(
        "yes" if rows[c][0]["sha256"] == first else "no" for c in args.code) + " |")
    # which run wrote what: with a NO above, the odd run out
    print("| files (sha256, first 8 hex, per repeat) | " + " | ".join(
        " ".join(r["sha256"][:8] for r in rows[c]) for c in args.code) + " |")


if __name__ == "__main__":
    main()
