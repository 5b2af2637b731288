"""A generated language-model-shaped ONNX model with external data, written one tensor at a time
(the generator itself never holds more than one weight), for measuring quantkit's peak memory.

    input_ids [B, S] int64 -> Gather(embedding [V, D])
      -> L x (h + MatMul(Relu(MatMul(h, up [D, F])), down [F, D]))
      -> Reshape [-1, D] -> Gemm(proj [D, D] transB, bias) -> Reshape [B, S, D]
      -> MatMul(head [D, V]) -> logits [B, S, V]

Also runnable: `python tests/large_model.py OUT_DIR --layers 8 --dim 1024` writes OUT_DIR/model.onnx
(+ model.onnx.data) and OUT_DIR/calib.npz.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096  # page-aligned offsets: onnxruntime can map them instead of copying


def _external(name: str, array: np.ndarray, data, location: str) -> onnx.TensorProto:
    pos = data.tell()
    pad = -pos % ALIGN
    data.write(b"\0" * pad)
    offset = pos + pad
    data.write(np.ascontiguousarray(array).tobytes())
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


def write_lm(folder: Path, layers: int = 8, dim: int = 1024, ffn: int | None = None, vocab: int = 8192,
             seed: int = 0) -> Path:
    """Write folder/model.onnx and folder/model.onnx.data; returns the model path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ffn = ffn or 4 * dim
    rng = np.random.default_rng(seed)
    path = folder / "model.onnx"
    location = path.name + ".data"
    inits, nodes = [], []

    def weight(name, shape, fan_in):
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.7 / np.sqrt(fan_in))
        inits.append(_external(name, w, data, location))

    with open(folder / location, "wb") as data:
        weight("embedding", (vocab, dim), 1)
        nodes.append(helper.make_node("Gather", ["embedding", "input_ids"], ["h0"], name="embed"))
        h = "h0"
        for i in range(layers):
            weight(f"layers.{i}.up", (dim, ffn), dim)
            weight(f"layers.{i}.down", (ffn, dim), ffn)
            nodes += [
                helper.make_node("MatMul", [h, f"layers.{i}.up"], [f"u{i}"], name=f"layers.{i}.up_proj"),
                helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"layers.{i}.act"),
                helper.make_node("MatMul", [f"r{i}", f"layers.{i}.down"], [f"d{i}"], name=f"layers.{i}.down_proj"),
                helper.make_node("Add", [h, f"d{i}"], [f"h{i + 1}"], name=f"layers.{i}.residual"),
            ]
            h = f"h{i + 1}"
        weight("proj.weight", (dim, dim), dim)
        inits.append(onnx.numpy_helper.from_array(np.zeros(dim, np.float32), "proj.bias"))
        inits.append(onnx.numpy_helper.from_array(np.array([-1, dim], np.int64), "flat_shape"))
        weight("lm_head", (dim, vocab), dim)
    nodes += [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"),
        helper.make_node("Concat", ["ids_shape", "dim_c"], ["out_shape"], name="out_shape", axis=0),
        helper.make_node("Reshape", [h, "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "proj.weight", "proj.bias"], ["pf"], name="proj", transB=1),
        helper.make_node("Reshape", ["pf", "out_shape"], ["p"], name="unflatten"),
        helper.make_node("MatMul", ["p", "lm_head"], ["logits"], name="lm_head"),
    ]
    inits.append(onnx.numpy_helper.from_array(np.array([dim], np.int64), "dim_c"))
    graph = helper.make_graph(
        nodes, "large_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_data(path: Path, samples: int, seq: int, vocab: int = 8192, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, input_ids=rng.integers(0, vocab, (samples, seq), dtype=np.int64))
    return path


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith("model.onnx"))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    a = p.parse_args()
    write_lm(a.out, a.layers, a.dim, vocab=a.vocab)
    write_data(a.out / "calib.npz", 16, 32, a.vocab)
    print(model_bytes(a.out))
