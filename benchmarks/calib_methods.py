"""Calibration methods, quantkit vs ONNX Runtime's calibrators, on the same model and data.

    python benchmarks/calib_methods.py [--models encoder,digits_cnn] [--ort-memory-limit-gb 16]

For each model and method, both tools run in their own process on the same 256 calibration
samples (batch 8): quantkit `--method minmax|percentile|entropy` (plus its `mse` and `auto`; run
with --no-speed-guard, since the subject here is calibration) and
onnxruntime.quantization.quantize_static with CalibrationMethod MinMax, Percentile (99.999, its
default) and Entropy. Reported: wall time and peak RSS of the whole process; quantkit's own
calibration time (the streamed pass through the model with every needed tensor exposed and
observed, plus range selection; session creation excluded, as it is from the forward figure)
next to the plain fp32 forward time over the same data (both the best of two runs: the machine is
shared and timing noise reaches +-30%); and the accuracy of each
result scored by the same code on the held-out set. ONNX Runtime runs under an address-space limit
so that a calibrator that keeps every intermediate tensor fails instead of swapping the machine;
such a failure is reported as such. The encoder is the BERT-style model of benchmarks/_encoder.py
(trained on first use, then cached in benchmarks/.cache/).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _evaluate import forward_seconds, score
from _measure import ROOT, python, quantkit_cmd, run_measured

HERE = Path(__file__).resolve().parent
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def model_dir(name: str) -> Path:
    if name == "encoder":
        from _encoder import make

        return make()
    return ROOT / "sample_models" / name


def _figures(name: str, s: dict) -> str:
    """Accuracy kept: for the encoder the pooled output's cosine and the logits accuracy."""
    key = "pooled" if name == "encoder" else "logits"
    acc = s["logits"].get("accuracy_quantized")
    return f"{s[key]['cosine_mean']:.5f} | {acc:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="encoder,digits_cnn")
    ap.add_argument("--ort-memory-limit-gb", type=float, default=16.0)
    args = ap.parse_args()
    for name in args.models.split(","):
        d = model_dir(name)
        model, calib, evald = d / "model.onnx", d / "calib.npz", d / "eval.npz"
        fwd = min(forward_seconds(model, calib) for _ in range(2))
        base = score(model, model, evald)
        print(f"\n### {name}\n")
        print(f"fp32 forward over the 256 calibration samples: {fwd:.2f} s; fp32 accuracy "
              f"{base['logits']['accuracy_fp32']:.2f}%\n")
        print("| method | tool | samples | wall s | calibration pass + ranges s (x fp32 forward) | peak RSS MB | "
              f"cosine ({'pooled' if name == 'encoder' else 'logits'}) | accuracy % |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            runs = [(m, n) for m in ("minmax", "percentile", "entropy", "mse", "auto") for n in (256,)]
            if name == "encoder":
                runs.insert(3, ("entropy", 32))
            for method, n in runs:
                out, rep = tmp / f"qk_{method}_{n}.onnx", tmp / f"qk_{method}_{n}.json"
                # timing on a shared 2-core machine is noisy: best of two runs (peak RSS: the larger)
                runs_m, passes = [], []
                for _ in range(2):
                    m = run_measured(quantkit_cmd("quantize", model, "--calib", calib, "--calib-samples", n,
                                                  "-o", out, "--method", method, "--report", rep, "-q",
                                                  "--no-speed-guard", "--force"))
                    if m.returncode != 0:
                        break
                    c = json.loads(rep.read_text())["calibration"]
                    runs_m.append(m)
                    passes.append(c.get("pass_seconds", 0.0) + c["range_seconds"])
                if m.returncode != 0:
                    print(f"| {method} | quantkit | {n} | failed: {m.stderr.strip()[-120:]} |")
                    continue
                cal = min(passes)
                ratio = cal / (fwd * n / 256)
                wall = min(r.seconds for r in runs_m)
                print(f"| {method} | quantkit | {n} | {wall:.1f} | {cal:.2f} ({ratio:.2f}x) | "
                      f"{max(r.peak_rss_mb for r in runs_m):.0f} | {_figures(name, score(model, out, evald))} |")
                if method in ORT_METHODS and n == 256:
                    out = tmp / f"ort_{method}.onnx"
                    cmd = [python(), str(HERE / "ort_static.py"), str(model), str(calib), str(out),
                           "--method", ORT_METHODS[method]]
                    m = run_measured(cmd, memory_limit_gb=args.ort_memory_limit_gb)
                    if m.returncode != 0:
                        err = m.stderr.lower()
                        last = (f"out of memory under the {args.ort_memory_limit_gb:g} GB limit"
                                if "alloc" in err or "memoryerror" in err or "bad_alloc" in err
                                else (m.stderr.strip().splitlines() or ["killed"])[-1][:100])
                        print(f"| {method} | onnxruntime | {n} | {m.seconds:.1f} | - | {m.peak_rss_mb:.0f} | "
                              f"failed: {last} | |")
                        continue
                    print(f"| {method} | onnxruntime | {n} | {m.seconds:.1f} | - | {m.peak_rss_mb:.0f} | "
                          f"{_figures(name, score(model, out, evald))} |")


if __name__ == "__main__":
    main()
