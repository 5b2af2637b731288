"""int4 weight-only, quantkit vs ONNX Runtime's MatMulNBits quantizer, on the BERT-style encoder:
size, accuracy kept and speed, measured in this one run.

    python benchmarks/compare_int4.py [--threads 1] [--block-size 32]

quantkit: `--weights int4` with round-to-nearest, with GPTQ (`--algorithm gptq`, 256 calibration
samples), and RTN written as standard opset-21 DequantizeLinear (`--format qdq`). ONNX Runtime:
MatMulNBitsQuantizer with its default RTN, its HQQ optimizer, and its GPTQ option
(benchmarks/ort_nbits.py). All with symmetric blocks of --block-size and scored by the same code
on the 360 held-out samples; speed at batch 1 (sequence 128) and batch 8 with --threads threads.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _encoder import make
from _evaluate import feeds, score
from _measure import python, quantkit_cmd, run_measured

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=32)
    args = ap.parse_args()
    d = make()
    model, calib, evald = d / "model.onnx", d / "calib.npz", d / "eval.npz"
    one = {k: v[:1] for k, v in next(feeds(model, evald, batch=1))[0].items()}
    bs = str(args.block_size)
    print("| tool | cosine (pooled) | SQNR dB | accuracy % (fp32) | size ratio | speedup batch 1 | speedup batch 8 "
          "| quantize s | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qk = quantkit_cmd("quantize", model, "--weights", "int4", "--block-size", bs, "--eval", calib, "-q",
                          "--no-speed-guard")
        runs = {
            "quantkit int4 RTN": qk + ["-o", tmp / "qk_rtn.onnx"],
            "quantkit int4 GPTQ": qk + ["--algorithm", "gptq", "--calib", calib, "-o", tmp / "qk_gptq.onnx"],
            "quantkit int4 RTN, --format qdq": qk + ["--format", "qdq", "-o", tmp / "qk_qdq.onnx"],
            "quantkit int4 RTN, MatMul only (ONNX Runtime's scope)": qk + ["--exclude", "Gather,Gemm",
                                                                           "-o", tmp / "qk_mm.onnx"],
            "quantkit int4 GPTQ, MatMul only": qk + ["--exclude", "Gather,Gemm", "--algorithm", "gptq", "--calib",
                                                     calib, "-o", tmp / "qk_mm_gptq.onnx"],
            "onnxruntime MatMulNBits RTN": [python(), str(HERE / "ort_nbits.py"), str(model), str(tmp / "ort_rtn.onnx"),
                                            "--block-size", bs],
            "onnxruntime MatMulNBits HQQ": [python(), str(HERE / "ort_nbits.py"), str(model), str(tmp / "ort_hqq.onnx"),
                                            "--algo", "hqq", "--block-size", bs],
            "onnxruntime MatMulNBits GPTQ": [python(), str(HERE / "ort_nbits.py"), str(model),
                                             str(tmp / "ort_gptq.onnx"), "--algo", "gptq", "--calib", str(calib),
                                             "--block-size", bs],
        }
        for tool, cmd in runs.items():
            out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else Path(cmd[3])
            m = run_measured([str(c) for c in cmd])
            if m.returncode != 0:
                last = (m.stderr.strip().splitlines() or ["?"])[-1][:100]
                print(f"| {tool} | failed: {last} | | | | | | {m.seconds:.1f} | {m.peak_rss_mb:.0f} |")
                continue
            s8 = score(model, out, evald, threads=args.threads)
            s1 = score(model, out, evald, threads=args.threads, latency_feed=one)
            p, lg = s8["pooled"], s8["logits"]
            print(f"| {tool} | {p['cosine_mean']:.5f} | {p['sqnr_db']:.1f} | {lg['accuracy_quantized']:.2f} "
                  f"({lg['accuracy_fp32']:.2f}) | {s8['bytes_fp32'] / s8['bytes_quantized']:.2f}x | "
                  f"{s1['speedup']:.2f}x | {s8['speedup']:.2f}x | {m.seconds:.1f} | {m.peak_rss_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
