"""NNCF's post-training quantization of an ONNX model (`nncf.quantize` on the ModelProto), as the
NNCF documentation shows it, as a peer baseline.

    python benchmarks/nncf_onnx.py MODEL CALIB.npz OUT [--transformer] [--subset-size N]

Calibration items are single samples (batch 1, as NNCF recommends) read from the .npz keyed by
input name; subset_size defaults to all of them. --transformer passes model_type=TRANSFORMER, which
NNCF recommends for transformer models. Defaults otherwise (performance preset, CPU target).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--transformer", action="store_true")
    ap.add_argument("--subset-size", type=int)
    args = ap.parse_args()
    import nncf

    model = onnx.load(str(args.model))
    names = [i.name for i in model.graph.input]
    with np.load(args.calib) as z:
        arrays = {n: z[n] for n in names}
    n = len(next(iter(arrays.values())))
    items = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if args.transformer else {}
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=args.subset_size or n, **kwargs)
    onnx.save(q, str(args.output))


if __name__ == "__main__":
    main()
