"""ONNX Runtime's dynamic quantizer as the peer baseline for `quantkit --activations dynamic`.

    python benchmarks/ort_dynamic.py MODEL OUT [--per-tensor]

int8 weights (per-channel unless --per-tensor), activations quantized at run time, after
quant_pre_process as ONNX Runtime's documentation recommends.
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
    args = ap.parse_args()
    pre = Path(tempfile.mkdtemp()) / "preprocessed.onnx"
    quant_pre_process(str(args.model), str(pre))
    quantize_dynamic(str(pre), str(args.output), weight_type=QuantType.QInt8, per_channel=not args.per_tensor)


if __name__ == "__main__":
    main()
