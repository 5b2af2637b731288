"""onnxruntime CPU kernels for one weighted MatMul of the shape an encoder's FFN down-projection has
(batch 8 x 50 tokens, K=1536, N=384; --m/--k/--n to change): fp32 MatMul, DequantizeLinear -> MatMul,
DynamicQuantizeMatMul (int8, per column), MatMulNBits at 8 and 4 bits, blocks of 32 and 128, accuracy
levels 0 and 4. One thread, best of 5 x 5 runs, interleaved; SQNR of each against fp32.

    python benchmarks/matmul_kernels.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inits, k: int) -> bytes:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10).SerializeToString()


def _nbits(w: np.ndarray, bits: int, block: int, level: int) -> bytes:
    k, n = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.T.reshape(n, k // block, block)
    scale = np.abs(blocks).max(-1) / qmax
    q = (np.clip(np.rint(blocks / scale[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    return _model([node], [numpy_helper.from_array(q, "B"),
                           numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "S")], k)


def models(w: np.ndarray) -> dict[str, bytes]:
    k, n = w.shape
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.rint(w / scale).astype(np.int8)
    qi = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"),
          numpy_helper.from_array(np.zeros(n, np.int8), "Wz")]
    out = {
        "fp32 MatMul": _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")], k),
        "DequantizeLinear -> MatMul": _model([helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=1),
                                              helper.make_node("MatMul", ["x", "Wd"], ["y"])], qi, k),
        "DynamicQuantizeMatMul": _model([helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "Ws", "Wz"], ["y"],
                                                          domain="com.microsoft")], qi, k),
    }
    for bits in (8, 4):
        for block in (32, 128):
            for level in (0, 4):
                out[f"MatMulNBits {bits}-bit block {block} level {level}"] = _nbits(w, bits, block, level)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=400)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=384)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((a.k, a.n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((a.m, a.k)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sessions = {name: ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]) for name, m in models(w).items()}
    ref = sessions["fp32 MatMul"].run(None, {"x": x})[0]
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(5):
        for name, s in sessions.items():
            t = time.perf_counter()
            for _ in range(5):
                s.run(None, {"x": x})
            best[name] = min(best[name], (time.perf_counter() - t) / 5 * 1e3)
    print(f"| kernel ({a.m}x{a.k} @ {a.k}x{a.n}, 1 thread) | ms | speedup vs fp32 | SQNR dB |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in sessions.items():
        y = s.run(None, {"x": x})[0]
        err = float(((y - ref) ** 2).sum())
        sqnr = "inf" if err == 0 else f"{10 * np.log10(float((ref ** 2).sum()) / err):.1f}"
        print(f"| {name} | {best[name]:.2f} | {best['fp32 MatMul'] / best[name]:.2f}x | {sqnr} |")


if __name__ == "__main__":
    main()
