"""A weight-only convolution stack in onnxruntime: float weights, int8 weights behind DequantizeLinear,
and int8 weights decoded by Cast/Mul (quantkit's lowering, quantize/lower.py).

    python benchmarks/conv_weight_decode.py [--channels 64] [--layers 6] [--runs 10]

`--layers` 3x3 convolutions of `--channels` channels on a (8, C, 24, 80) input (the size of a text
recognizer's early feature maps), weights symmetric int8 per output channel. Timed at one thread,
interleaved, best of 5 rounds of the median of `--runs` calls; prints each variant's milliseconds and
the largest relative difference between the two int8 variants' outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(kind: str, weights: list[tuple[np.ndarray, np.ndarray, np.ndarray]], shape: list[int]) -> bytes:
    nodes, inits, x = [], [], "x"
    for i, (w, q, s) in enumerate(weights):
        c = w.shape[0]
        if kind == "float":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
        elif kind == "dequantize":
            inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s, f"s{i}"),
                      numpy_helper.from_array(np.zeros(c, np.int8), f"z{i}")]
            nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=0))
        else:  # cast-mul
            inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s.reshape(c, 1, 1, 1), f"s{i}")]
            nodes += [helper.make_node("Cast", [f"q{i}"], [f"c{i}"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"w{i}"])]
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"y{i}"], pads=[1, 1, 1, 1]))
        x = f"y{i}"
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    c, shape = args.channels, [8, args.channels, 24, 80]
    weights = []
    for _ in range(args.layers):
        w = (rng.normal(size=(c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        s = (np.abs(w).reshape(c, -1).max(axis=1) / 127).astype(np.float32)
        weights.append((w, np.clip(np.rint(w / s[:, None, None, None]), -127, 127).astype(np.int8), s))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    kinds = ("float", "dequantize", "cast-mul")
    sessions = {k: ort.InferenceSession(_model(k, weights, shape), so) for k in kinds}
    x = {"x": rng.normal(size=shape).astype(np.float32)}
    outs = {k: s.run(None, x)[0] for k, s in sessions.items()}
    best = dict.fromkeys(kinds, float("inf"))
    for _ in range(5):
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, x)
                times[k].append((time.perf_counter() - t) * 1000)
        for k in kinds:
            best[k] = min(best[k], float(np.median(times[k])))
    diff = float(np.abs(outs["cast-mul"] - outs["dequantize"]).max() / np.abs(outs["dequantize"]).max())
    print(json.dumps({"ms": best, "dequantize_vs_float": best["dequantize"] / best["float"],
                      "cast_mul_vs_float": best["cast-mul"] / best["float"], "max_relative_difference": diff,
                      "shape": shape, "layers": args.layers}, indent=1))


if __name__ == "__main__":
    main()
