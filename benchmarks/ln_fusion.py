"""onnxruntime's SkipLayerNormalization against the Add + LayerNormalization it replaces, on CPU.

    python benchmarks/ln_fusion.py [--hidden 384] [--tokens 400] [--runs 500]

onnxruntime fuses a residual Add into the LayerNormalization after it only when it can prove both Add
inputs have the same shape. A model written with inferred intermediate shapes (ONNX value_info) lets it
prove that; the user's exported model usually does not. This measures what the fusion costs, one thread,
best of 5 rounds of `--runs` calls, the same inputs for both (the fusion disabled by name for the other).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(hidden: int) -> bytes:
    shape = ["batch", "seq", hidden]
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "r"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-12)], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.ones(hidden, np.float32), "g"),
         numpy_helper.from_array(np.zeros(hidden, np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _best_ms(sess: ort.InferenceSession, feed: dict, runs: int) -> float:
    for _ in range(20):
        sess.run(None, feed)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        best = min(best, (time.perf_counter() - t) / runs)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=400, help="batch x sequence (8 x 50 in the MiniLM benchmark)")
    ap.add_argument("--runs", type=int, default=500)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    feed = {n: rng.normal(size=(1, a.tokens, a.hidden)).astype(np.float32) for n in ("x", "r")}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ms = {}
    variants = (("SkipLayerNormalization (fused)", []), ("Add + LayerNormalization", ["SkipLayerNormFusion"]))
    for label, disabled in variants:
        sess = ort.InferenceSession(_model(a.hidden), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)
        ms[label] = round(_best_ms(sess, feed, a.runs), 4)
    fused, plain = ms.values()
    print(json.dumps({"onnxruntime": ort.__version__, "tokens": a.tokens, "hidden": a.hidden, "ms": ms,
                      "fused_over_plain": round(fused / plain, 2)}, indent=1))


if __name__ == "__main__":
    main()
