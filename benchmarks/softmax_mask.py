"""onnxruntime's Softmax on additively masked attention scores, and with quantkit's floor (quantize/lower.py).

    python benchmarks/softmax_mask.py [--seq 50] [--masked 30] [--runs 20]

Scores of shape (8, 12, seq, seq) as a 12-head encoder makes them, the last `--masked` keys of every
row pushed to float32 min as torch.onnx exports of BERT-family models do for padding. Timed at one
thread, best of 7 rounds of `--runs` calls each: plain Softmax on unmasked scores, on masked scores, and
masked with the floor Max(x, ReduceMax(x) - 80) in front; the largest difference of the floored
result from the plain one is printed too.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def _model(floor: bool) -> bytes:
    shape = ["batch", 12, "seq", "seq"]
    nodes = [helper.make_node("Softmax", ["x2" if floor else "x"], ["y"], axis=-1)]
    inits = []
    if floor:
        nodes[:0] = [helper.make_node("ReduceMax", ["x", "axes"], ["m"], keepdims=1),
                     helper.make_node("Sub", ["m", "c"], ["f"]), helper.make_node("Max", ["x", "f"], ["x2"])]
        inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
                 helper.make_tensor("c", TensorProto.FLOAT, [], [80.0])]
    g = helper.make_graph(nodes, "softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _best_ms(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(runs):
            sess.run(None, {"x": x})
        best = min(best, (time.perf_counter() - t) / runs)
    return round(best * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=50)
    ap.add_argument("--masked", type=int, default=30, help="padding keys per row")
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 12, a.seq, a.seq)) * 3).astype(np.float32)
    masked = x.copy()
    masked[..., a.seq - a.masked:] += np.finfo(np.float32).min
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    plain = ort.InferenceSession(_model(False), so, providers=["CPUExecutionProvider"])
    floored = ort.InferenceSession(_model(True), so, providers=["CPUExecutionProvider"])
    diff = float(np.abs(plain.run(None, {"x": masked})[0] - floored.run(None, {"x": masked})[0]).max())
    ms = {"Softmax, no mask": _best_ms(plain, x, a.runs), "Softmax, masked": _best_ms(plain, masked, a.runs),
          "floor + Softmax, masked": _best_ms(floored, masked, a.runs)}
    print(json.dumps({"onnxruntime": ort.__version__, "shape": list(x.shape), "ms": ms,
                      "masked_over_floored": round(ms["Softmax, masked"] / ms["floor + Softmax, masked"], 1),
                      "max_abs_difference": diff}, indent=1))


if __name__ == "__main__":
    main()
