"""Peak memory of calibration as the calibration set grows 10x: quantkit vs ONNX Runtime.

    python benchmarks/calib_memory.py [--samples 32] [--factor 10]

Builds a conv net with large activations (benchmarks/_models.py: wide_cnn, 3x64x64 input) and
random calibration images, then runs, each in its own process, `quantkit quantize` and ONNX
Runtime's quantize_static (MinMax, QDQ, per-channel; benchmarks/ort_static.py) with N and
factor x N samples, batch 8. Prints a markdown table of wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _measure import python, quantkit_cmd, run_measured
from _models import image_data, wide_cnn

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--factor", type=int, default=10)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = wide_cnn(tmp / "wide_cnn.onnx")
        for n in (args.samples, args.samples * args.factor):
            data = image_data(tmp / f"calib_{n}.npz", n)
            tools = {
                "quantkit": quantkit_cmd("quantize", model, "--calib", data, "-o", tmp / f"qk_{n}.onnx",
                                         "--batch-size", 8, "-q"),
                "onnxruntime quantize_static (MinMax)": [python(), str(HERE / "ort_static.py"), str(model),
                                                         str(data), str(tmp / f"ort_{n}.onnx")],
            }
            for tool, cmd in tools.items():
                m = run_measured(cmd)
                if m.returncode != 0:
                    raise SystemExit(f"{tool} failed on {n} samples:\n{m.stderr[-2000:]}")
                rows.append((tool, n, m.seconds, m.peak_rss_mb))
    print("| tool | calibration samples | wall time (s) | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: |")
    for tool, n, s, rss in rows:
        print(f"| {tool} | {n} | {s:.1f} | {rss:.0f} |")
    print()
    for tool in dict.fromkeys(r[0] for r in rows):
        small, big = [r for r in rows if r[0] == tool]
        print(f"- {tool}: peak RSS x{big[3] / small[3]:.2f} for {args.factor}x the samples")


if __name__ == "__main__":
    main()
