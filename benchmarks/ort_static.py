"""ONNX Runtime's own static quantizer, run the way its documentation shows, as the peer baseline.

    python benchmarks/ort_static.py MODEL CALIB.npz OUT [--method MinMax|Percentile|Entropy]
                                    [--batch-size 8] [--calib-samples N] [--per-tensor]

QDQ format, uint8 activations, int8 weights, per-channel unless --per-tensor: the same scheme
quantkit writes by default. As ONNX Runtime's documentation recommends, the model first goes
through onnxruntime.quantization's quant_pre_process (symbolic shape inference and graph
optimization); --no-preprocess skips that.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from quantkit.calibrate.data import DataSource
from quantkit.load.onnx import input_specs, load_onnx


class StreamedReader(CalibrationDataReader):
    """Feeds batches streamed from disk with quantkit's reader, so both tools get their data the
    same way and the peak memory compared is the calibrator's own."""

    def __init__(self, path: Path, specs, batch: int, limit: int | None):
        self.batches = DataSource(path, specs).batches(batch, limit)
        self.names = {s.name for s in specs}

    def get_next(self):
        b = next(self.batches, None)
        return None if b is None else {k: v for k, v in b.items() if k in self.names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--method", default="MinMax", choices=["MinMax", "Percentile", "Entropy"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--per-tensor", action="store_true")
    ap.add_argument("--no-preprocess", action="store_true")
    args = ap.parse_args()
    model = args.model
    if not args.no_preprocess:
        import tempfile

        from onnxruntime.quantization.shape_inference import quant_pre_process

        model = Path(tempfile.mkdtemp()) / "preprocessed.onnx"
        quant_pre_process(str(args.model), str(model))
    specs = input_specs(load_onnx(args.model))
    quantize_static(
        str(model), str(args.output),
        StreamedReader(args.calib, specs, args.batch_size, args.calib_samples),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        per_channel=not args.per_tensor, calibrate_method=getattr(CalibrationMethod, args.method),
    )


if __name__ == "__main__":
    main()
