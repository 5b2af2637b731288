"""Calibration time of `--smoothquant --bias-correction --method auto` (static int8), of the same
with the default min/max ranges, and of `--weights int4 --algorithm gptq --smoothquant` on the
benchmark encoder, for one or more quantkit source trees (e.g. the code before and after the
single statistics pass).

    python benchmarks/stats_pass.py [--tree before=/tmp/qk-before] [--tree after=.] [--runs 3]
                                    [--configs static,minmax,gptq]

Each tree runs `python -m quantkit quantize` in its own process (PYTHONPATH set to the tree, run
from inside it) on the encoder's 256 calibration samples, batch 8, with --no-speed-guard. The calibration window is read
from the status lines on stderr, timestamped as they arrive: from the first statistics step
("smoothquant: ..." / "calibrating ..." / "statistics: ...") to "quantized N node(s)". It holds
every statistics pass, SmoothQuant's alpha search, range selection and the rewrite, so trees that
split the work differently are measured alike. Best of --runs runs (the machine is shared and
timing noise reaches +-30%); wall time of the whole command is reported too. The output model's
SHA-256 shows whether the trees wrote the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _encoder import make

HERE = Path(__file__).resolve().parent
START = re.compile(r"^quantkit: (smoothquant|calibrating|statistics|gptq)")
END = re.compile(r"^quantkit: quantized \d+ node")
# one status line per streamed pass over the calibration data, in both the old and the new code
PASS = re.compile(r"^quantkit: (smoothquant: collecting|calibrating \d+ |gptq: collecting)")
CONFIGS = {
    "static": ("--smoothquant", "--bias-correction", "--method", "auto"),
    "minmax": ("--smoothquant", "--bias-correction"),
    "gptq": ("--weights", "int4", "--algorithm", "gptq", "--smoothquant"),
}


def run_once(tree: Path, model: Path, calib: Path, out: Path, options: tuple[str, ...]) -> tuple:
    """(calibration window s, wall s, sha256 of the written model, passes over the data)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(model), "--calib", str(calib), "-o", str(out),
           *options, "--no-speed-guard", "--force"]
    t0 = time.perf_counter()
    # run from inside the tree: `python -m` puts the working directory first on sys.path
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = end = None
    lines, passes = [], 0
    for line in proc.stderr:
        now = time.perf_counter()
        lines.append(line)
        if start is None and START.match(line):
            start = now
        if END.match(line):
            end = now
        passes += bool(PASS.match(line))
    if proc.wait() != 0 or start is None or end is None:
        raise SystemExit(f"{tree}: quantize failed or printed no calibration status:\n{''.join(lines[-20:])}")
    return end - start, time.perf_counter() - t0, hashlib.sha256(out.read_bytes()).hexdigest()[:16], passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", metavar="LABEL=PATH",
                    help="a quantkit source tree to time (repeatable) [default: this checkout]")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--configs", default="static,minmax,gptq")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in (args.tree or [f"this checkout={HERE.parent}"])]
    d = make()
    print(f"| options | tree | passes over the data | calibration s (best of {args.runs}) | wall s (best) "
          "| model sha256 |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            results: dict[str, list] = {label: [] for label, _ in trees}
            for i in range(args.runs):  # interleaved, so load changes hit every tree alike
                for label, path in trees:
                    out = Path(tmp) / f"{config}_{i}_{abs(hash(label))}.onnx"
                    results[label].append(run_once(Path(path).resolve(), d / "model.onnx", d / "calib.npz", out,
                                                   CONFIGS[config]))
            for label, _ in trees:
                r = results[label]
                passes = "/".join(str(p) for p in sorted({x[3] for x in r}))
                print(f"| `{' '.join(CONFIGS[config])}` | {label} | {passes} | {min(x[0] for x in r):.2f} | "
                      f"{min(x[1] for x in r):.1f} | {', '.join(sorted({x[2] for x in r}))} |", flush=True)


if __name__ == "__main__":
    main()
