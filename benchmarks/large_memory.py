"""Peak memory of whole quantkit runs on a generated model with external data, against the model's
own bytes, and against ONNX Runtime's MatMulNBits quantizer (RTN) on the same file.

    python benchmarks/large_memory.py [--layers 20 --dim 1024 --vocab 8192] [--in-memory] [--gptq]

The model (tests/large_model.py): a Gather embedding, `layers` x (MatMul up, Relu, MatMul down,
residual), a Gemm and a MatMul head, weights in model.onnx.data; random weights. Data: 8 sequences
of 8 token ids. --in-memory also runs quantkit's in-memory pipeline on the same file (the path models
under quantize/streaming.MIN_BYTES take) for the before/after comparison. Each run is its own
process; peak RSS is the kernel's wait4 figure for it (benchmarks/_measure.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from large_model import model_bytes, write_data, write_lm  # noqa: E402

from _measure import python, run_measured  # noqa: E402

MODES = {
    "int4": ["--weights", "int4"],
    "dynamic int8": ["--activations", "dynamic"],
    "static int8 (4 calibration samples)": ["--calib", "{data}", "--calib-samples", "4"],
}
GPTQ = {"int4 GPTQ (4 calibration samples)": ["--weights", "int4", "--algorithm", "gptq", "--calib", "{data}",
                                              "--calib-samples", "4"]}
IN_MEMORY = ("import sys; from quantkit.quantize import streaming; streaming.MIN_BYTES = 1 << 60; "
             "from quantkit.cli import main; sys.argv = ['quantkit'] + sys.argv[1:]; main()")


def _row(label: str, r, size: int, report: Path | None) -> str:
    if r.returncode != 0:
        return f"| {label} | failed (exit {r.returncode}) | | | |"
    inside = ""
    if report is not None and report.exists():
        mem = json.loads(report.read_text())["memory"]
        inside = f"{mem['peak_rss_bytes'] / 2**20:.0f}"
    return f"| {label} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} | {r.peak_rss_mb * 2**20 / size:.2f}x | {inside} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--gptq", action="store_true", help="also GPTQ (one calibration pass per group of Grams: slow)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="large-memory-") as tmp:
        folder = Path(tmp)
        write_lm(folder, a.layers, a.dim, vocab=a.vocab)
        data = write_data(folder / "data.npz", 8, 8, a.vocab)
        size = model_bytes(folder)
        print(f"model: {size / 2**20:.0f} MiB ({a.layers} layers, dim {a.dim}, vocab {a.vocab})\n")
        print("| run | seconds | peak RSS MiB | peak / model | report's memory.peak_rss MiB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, flags in {**MODES, **(GPTQ if a.gptq else {})}.items():
            flags = [f.replace("{data}", str(data)) for f in flags]
            for path, launcher in [("streamed", ["-m", "quantkit"])] + ([("in-memory", ["-c", IN_MEMORY])]
                                                                       if a.in_memory else []):
                report = folder / "r.json"
                report.unlink(missing_ok=True)
                cmd = [python(), *launcher, "quantize", str(folder / "model.onnx"), *flags, "--eval", str(data),
                       "--batch-size", "4", "-o", str(folder / "q.onnx"), "--report", str(report), "--force", "-q"]
                r = run_measured(cmd, memory_limit_gb=16)
                print(_row(f"quantkit {label}, {path}", r, size, report), flush=True)
        r = run_measured([python(), str(ROOT / "benchmarks/ort_nbits.py"), str(folder / "model.onnx"),
                          str(folder / "ort.onnx"), "--algo", "rtn"], memory_limit_gb=16)
        print(_row("onnxruntime MatMulNBits RTN", r, size, None))


if __name__ == "__main__":
    main()
