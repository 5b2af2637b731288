"""ONNX Runtime's dynamic quantizer as the peer baseline for `quantkit --activations dynamic`.

    python benchmarks/ort_dynamic.py MODEL OUT [--per-tensor] [--no-preprocess]

int8 weights (per-channel unless --per-tensor), activations quantized at run time, after
quant_pre_process as ONNX Runtime's documentation recommends (--no-preprocess skips it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--per-tensor", action="store_true")
    ap.add_argument("--no-preprocess", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pre = args.model
        if not args.no_preprocess:
            pre = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(args.model), str(pre))
        _quantize(pre, args)


def _quantize(pre: Path, args) -> None:
    quantize_dynamic(str(pre), str(args.output), weight_type=QuantType.QInt8, per_channel=not args.per_tensor)


if __name__ == "__main__":
    main()
