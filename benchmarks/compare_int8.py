"""int8, quantkit vs ONNX Runtime, on three models: accuracy kept, size, speed, quantization time
and peak memory, all measured in this one run.

    python benchmarks/compare_int8.py [--models digits_cnn,mobilenet,encoder] [--threads 1]

Models: the bundled digits CNN; a MobileNetV3-style CNN (depthwise convs, HardSwish, BatchNorm;
benchmarks/_mobilenet.py); a BERT-style encoder (6 layers, hidden 384, 12 heads, float32-min
additive mask; benchmarks/_encoder.py). The last two are trained on first use and cached.
Tools, each in its own process on the same model and the same 256 calibration samples:
  quantkit static      `quantkit quantize --calib` (defaults: per-channel, uint8 activations,
                       minmax, speed guard on; --threads passed so it times what is measured here)
  quantkit dynamic     `quantkit quantize --activations dynamic`
  onnxruntime static   quantize_static, QDQ, per-channel, MinMax, after quant_pre_process
  onnxruntime dynamic  quantize_dynamic, per-channel, after quant_pre_process
All results are scored by the same code (benchmarks/_evaluate.py) on the held-out set: cosine to
fp32 (the encoder's mean-pooled output, the CNNs' logits), top-1 accuracy, size ratio and speedup
over fp32 at batch 8 (sequence 128) with --threads intra-op threads, interleaved medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _evaluate import score
from _measure import ROOT, python, quantkit_cmd, run_measured

HERE = Path(__file__).resolve().parent


def model_dir(name: str) -> Path:
    if name == "encoder":
        from _encoder import make

        return make()
    if name == "mobilenet":
        from _mobilenet import make

        return make()
    return ROOT / "sample_models" / name


def tools(model: Path, calib: Path, tmp: Path, threads: int) -> dict[str, tuple[list[str], Path]]:
    out = {k: tmp / f"{k.replace(' ', '_')}.onnx" for k in
           ("quantkit static", "quantkit dynamic", "onnxruntime static", "onnxruntime dynamic")}
    return {
        "quantkit static": (quantkit_cmd("quantize", model, "--calib", calib, "-o", out["quantkit static"],
                                         "--threads", threads, "--report", tmp / "qk.json", "-q"),
                            out["quantkit static"]),
        "quantkit dynamic": (quantkit_cmd("quantize", model, "--activations", "dynamic", "--eval", calib,
                                          "-o", out["quantkit dynamic"], "--threads", threads, "-q"),
                             out["quantkit dynamic"]),
        "onnxruntime static": ([python(), str(HERE / "ort_static.py"), str(model), str(calib),
                                str(out["onnxruntime static"])], out["onnxruntime static"]),
        "onnxruntime dynamic": ([python(), str(HERE / "ort_dynamic.py"), str(model), str(out["onnxruntime dynamic"])],
                                out["onnxruntime dynamic"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_cnn,mobilenet,encoder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("| model | tool | cosine | accuracy % (fp32) | size ratio | speedup | quantize s | peak RSS MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        d = model_dir(name)
        model, calib, evald = d / "model.onnx", d / "calib.npz", d / "eval.npz"
        key = "pooled" if name == "encoder" else "logits"
        with tempfile.TemporaryDirectory() as tmp:
            for tool, (cmd, out) in tools(model, calib, Path(tmp), args.threads).items():
                m = run_measured(cmd)
                if m.returncode != 0:
                    last = (m.stderr.strip().splitlines() or ["?"])[-1][:90]
                    print(f"| {name} | {tool} | failed: {last} | | | | {m.seconds:.1f} | {m.peak_rss_mb:.0f} |")
                    continue
                s = score(model, out, evald, threads=args.threads)
                acc = s["logits"]
                print(f"| {name} | {tool} | {s[key]['cosine_mean']:.5f} | {acc['accuracy_quantized']:.2f} "
                      f"({acc['accuracy_fp32']:.2f}) | {s['bytes_fp32'] / s['bytes_quantized']:.2f}x | "
                      f"{s['speedup']:.2f}x | {m.seconds:.1f} | {m.peak_rss_mb:.0f} |")
                if tool == "quantkit static":
                    guard = json.loads((Path(tmp) / "qk.json").read_text())["speed_guard"]
                    if guard and guard["dropped"]:
                        print(f"| | (speed guard left float: {', '.join(guard['dropped'])}) | | | | | | |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
