"""The trained state written back into the same ONNX graph: codes and scales replace the
initializers they were read from, in their original dtypes and layouts (MatMulNBits and
GatherBlockQuantized codes packed again), so the graph's structure is the one that was trained."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from quantkit.finetune.graph import QuantGraph
from quantkit.quantize import blockwise as bw


def _put(graph: ir.Graph, name: str, array: np.ndarray) -> None:
    value = graph.initializers[name]
    old = value.const_value
    array = np.asarray(array).reshape(old.shape.numpy())
    if old.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        tensor = ir.tensor(array.astype(np.int8 if old.dtype == ir.DataType.INT4 else np.uint8), dtype=old.dtype,
                           name=name)
    else:
        tensor = ir.tensor(array.astype(old.dtype.numpy()), name=name)
    value.const_value = tensor


def _packed(codes: torch.Tensor, bits: int, kind: str) -> np.ndarray:
    q = codes.detach().numpy().astype(np.uint8)
    if kind == "gather":
        q = q.reshape(q.shape[0], -1)
    return bw.pack(q, bits)


def write_back(g: QuantGraph, model: ir.Model) -> int:
    """Codes and scales of `g` into `model`'s initializers; returns how many were replaced."""
    graph, done = model.graph, 0
    with torch.no_grad():
        for name in g.learn.scales:
            _put(graph, name, g.scale(name).numpy().astype(np.float32))
            done += 1
        for name in g.learn.floats:
            _put(graph, name, g.learn.plain(name).numpy())
            done += 1
        for name, t in g.trained.items():
            q, _ = g.fake_weight(name)
            if t.kind in ("nbits", "gather"):
                gather_cols = t.size if t.kind == "gather" else None
                packed = _packed(q, int(np.log2(t.qmax + 1)), t.kind)
                if gather_cols is not None:
                    packed = packed[:, : -(-gather_cols * int(np.log2(t.qmax + 1)) // 8)]
                _put(graph, name, packed)
            elif t.kind == "bias":
                s = (g.scale(t.tied[0]).double() * g.scale(t.tied[1]).double()).float()
                _put(graph, name, q.numpy().astype(np.int64))
                _put(graph, t.scale, np.broadcast_to(s.numpy(), graph.initializers[t.scale].const_value.shape.numpy()))
            else:
                _put(graph, name, q.numpy().astype(np.int64))
            done += 1
    return done
