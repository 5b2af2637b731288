"""quantkit vs ONNX Runtime's quantize_static on the bundled sample models: accuracy kept, size,
speed, quantization time and peak memory, all measured in this one run.

    python benchmarks/compare_static.py [--threads 1]

Both tools get the same model, the same 256 calibration images and the same scheme (QDQ, uint8
activations, int8 per-channel weights, MinMax ranges); both results are scored by the same code
(benchmarks/_evaluate.py) on the 360 held-out images with labels.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _evaluate import score
from _measure import ROOT, python, quantkit_cmd, run_measured

HERE = Path(__file__).resolve().parent
MODELS = ["digits_cnn", "digits_transformer"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads when timing")
    args = ap.parse_args()
    print("| model | tool | acc fp32 | acc int8 | cosine | size ratio | speedup | quantize s | peak RSS MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            d = ROOT / "sample_models" / name
            outs = {"quantkit": Path(tmp) / f"{name}.qk.onnx", "onnxruntime": Path(tmp) / f"{name}.ort.onnx"}
            cmds = {
                "quantkit": quantkit_cmd("quantize", d / "model.onnx", "--calib", d / "calib.npz",
                                         "-o", outs["quantkit"], "-q"),
                "onnxruntime": [python(), str(HERE / "ort_static.py"), str(d / "model.onnx"),
                                str(d / "calib.npz"), str(outs["onnxruntime"])],
            }
            for tool, cmd in cmds.items():
                m = run_measured(cmd)
                if m.returncode != 0:
                    print(f"| {name} | {tool} | failed: {m.stderr.strip().splitlines()[-1][:80]} |")
                    continue
                s = score(d / "model.onnx", outs[tool], d / "eval.npz", threads=args.threads)
                o = s["logits"]
                print(f"| {name} | {tool} | {o['accuracy_fp32']:.2f} | {o['accuracy_quantized']:.2f} | "
                      f"{o['cosine_mean']:.5f} | {s['bytes_fp32'] / s['bytes_quantized']:.2f}x | "
                      f"{s['speedup']:.2f}x | {m.seconds:.1f} | {m.peak_rss_mb:.0f} |")


if __name__ == "__main__":
    main()
