"""ONNX Runtime's MatMulNBits quantizer as the peer baseline for `quantkit --weights int4`.

    python benchmarks/ort_nbits.py MODEL OUT [--algo rtn|hqq|gptq] [--block-size 32] [--calib CALIB.npz]

rtn is its default (round to nearest, DefaultWeightOnlyQuantConfig); hqq its data-free
optimizer (HQQWeightOnlyQuantConfig); gptq its data-aware option (GPTQWeightOnlyQuantConfig, which
needs Intel Neural Compressor installed and calibration data). MatMul only, as by default: its
embedding tables stay float unless asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization import matmul_nbits_quantizer as mnq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--algo", default="rtn", choices=["rtn", "hqq", "gptq"])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--calib", type=Path)
    args = ap.parse_args()
    if args.algo == "rtn":
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=args.block_size, is_symmetric=True, accuracy_level=4)
    elif args.algo == "hqq":
        cfg = mnq.HQQWeightOnlyQuantConfig(block_size=args.block_size, bits=4)
    else:
        import numpy as np

        data = np.load(args.calib)
        names = [i.name for i in onnx.load(str(args.model), load_external_data=False).graph.input]
        feeds = [{k: data[k][i : i + 8] for k in names} for i in range(0, len(data[names[0]]), 8)]
        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(feeds), block_size=args.block_size)
    # the path, not a loaded proto: the quantizer loads it the same way, and its GPTQ needs the path of
    # a model over 2 GB (it saves an augmented copy beside it, data file named at random: removed after)
    before = set(args.model.parent.iterdir())
    quant = mnq.MatMulNBitsQuantizer(str(args.model), block_size=args.block_size, is_symmetric=True,
                                     accuracy_level=4, algo_config=cfg)
    try:
        quant.process()
    finally:
        for leftover in set(args.model.parent.iterdir()) - before:
            leftover.unlink()
    big = quant.model.model.ByteSize() > 1_500_000_000  # protobuf cannot hold 2 GiB: weights beside it
    quant.model.save_model_to_file(str(args.output), use_external_data_format=big)


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


if __name__ == "__main__":
    main()
