"""Unstructured and 2:4 sparsity: single weights zeroed, chosen by magnitude, Wanda or SparseGPT.

Every weight layer is seen in row form R [outputs, K] (a MatMul's W^T, a Conv's W flattened per
output channel, an embedding table row per token). Each output row loses the same fraction of
its K inputs (Wanda's comparison group); 2:4 zeroes two of every four consecutive inputs.

- magnitude: score |R|.
- wanda: |R| x RMS of the input channel over the calibration data (Sun et al., 2023).
- sparsegpt: column by column through K, the pruned weights' error is pushed into the not yet
  visited columns through the inverse Hessian H = X^T X (Frantar & Alistarh, 2023), masks chosen
  per block of 128 columns (adaptive mask selection); MatMul / Gemm / 1x1 Conv only, other layers
  fall back to wanda.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import const_array
from quantkit.prune.refit import Gram

BLOCK = 128
DAMP = 0.01


@dataclass
class Layer:
    node: ir.Node
    weight: ir.Value
    channels: int  # input channels whose statistics score the weights (0: none, e.g. a table)
    axis: int  # channel axis of the node's input tensor

    @property
    def input_name(self) -> str:
        return self.node.inputs[0].name

    def rows(self) -> np.ndarray:
        w = const_array(self.weight)
        op = self.node.op_type
        if op == "MatMul" or (op == "Gemm" and self.node.attributes.get_int("transB", 0) == 0):
            return w.T
        return w.reshape(len(w), -1)  # Gemm transB, Conv [O, C*kh*kw], Gather table [V, D]

    def write(self, rows: np.ndarray) -> None:
        w = const_array(self.weight)
        op = self.node.op_type
        if op == "MatMul" or (op == "Gemm" and self.node.attributes.get_int("transB", 0) == 0):
            new = rows.T
        else:
            new = rows.reshape(w.shape)
        self.weight.const_value = ir.tensor(np.ascontiguousarray(new.astype(w.dtype)), name=self.weight.name)

    @property
    def taps(self) -> int:
        w = const_array(self.weight)
        return int(np.prod(w.shape[2:])) if self.node.op_type == "Conv" else 1


def sparse_layers(model: ir.Model) -> tuple[list[Layer], list[dict]]:
    """The layers whose weights can be zeroed, and the weighted nodes left alone (with why)."""
    layers, skipped = [], []
    for node in model.graph:
        op, w = node.op_type, None
        if node.domain not in ("", "ai.onnx") or op not in ("MatMul", "Gemm", "Conv", "Gather"):
            continue
        idx = 0 if op == "Gather" else 1
        w = const_array(node.inputs[idx]) if len(node.inputs) > idx else None
        if w is None or w.dtype.kind != "f" or w.ndim < 2:
            continue
        if len(node.inputs[idx].uses()) != 1:
            skipped.append({"layer": node.name, "reason": "weight shared with another node"})
            continue
        if op == "Gather":
            layers.append(Layer(node, node.inputs[0], 0, -1))
        elif op == "Conv":
            groups = node.attributes.get_int("group", 1)
            layers.append(Layer(node, node.inputs[1], w.shape[1] * groups if groups == 1 else 0, 1 - w.ndim))
        elif op == "MatMul" and w.ndim == 2:
            layers.append(Layer(node, node.inputs[1], w.shape[0], -1))
        elif op == "Gemm" and node.attributes.get_int("transA", 0) == 0:
            layers.append(Layer(node, node.inputs[1], w.shape[1 if node.attributes.get_int("transB", 0) else 0], -1))
    return layers, skipped


def scores(rows: np.ndarray, rms: np.ndarray | None, taps: int) -> np.ndarray:
    """|w|, times the input channel's RMS for Wanda (each channel spans `taps` kernel positions)."""
    s = np.abs(rows.astype(np.float64))
    return s if rms is None else s * np.repeat(rms, taps)[None, :]


def mask_for(score: np.ndarray, ratio: float, semi: bool) -> np.ndarray:
    """True where a weight is zeroed: the `ratio` lowest scores of each row, or the 2 lowest of
    every 4 consecutive ones."""
    rows, k = score.shape
    if semi:
        order = np.argsort(score.reshape(rows, k // 4, 4), axis=2, kind="stable")[:, :, :2]
        mask = np.zeros((rows, k // 4, 4), dtype=bool)
        np.put_along_axis(mask, order, True, axis=2)
        return mask.reshape(rows, k)
    n = int(round(k * ratio))
    mask = np.zeros((rows, k), dtype=bool)
    if n:
        order = np.argsort(score, axis=1, kind="stable")[:, :n]
        np.put_along_axis(mask, order, True, axis=1)
    return mask


def sparsegpt(rows: np.ndarray, hessian: np.ndarray, ratio: float, semi: bool) -> np.ndarray:
    """SparseGPT on R [outputs, K] with H [K, K]: the pruned rows (zeros in place) with the kept
    weights updated to make up for them."""
    w = rows.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    k = w.shape[1]
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        err = _sparsegpt_block(w, u, i1, i2, ratio, semi)
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w


def _sparsegpt_block(w: np.ndarray, u: np.ndarray, i1: int, i2: int, ratio: float, semi: bool) -> np.ndarray:
    """Prune columns i1:i2 of w in place, updating the rest of the block; returns the scaled errors."""
    w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
    d = np.diag(u1)
    mask = np.zeros(w1.shape, dtype=bool) if semi else mask_for(w1 ** 2 / d[None, :] ** 2, ratio, False)
    err = np.zeros_like(w1)
    for i in range(i2 - i1):
        if semi and i % 4 == 0:
            mask[:, i:i + 4] = mask_for(w1[:, i:i + 4] ** 2 / d[None, i:i + 4] ** 2, 0.5, True)
        col = w1[:, i].copy()
        q = np.where(mask[:, i], 0.0, col)
        e = (col - q) / u1[i, i]
        w1[:, i:] -= np.outer(e, u1[i, i:])
        w1[:, i] = q
        err[:, i] = e
    return err


def _hessian(layer: Layer, gram: Gram | None) -> np.ndarray | None:
    """X^T X of the layer's inputs when SparseGPT applies (a plain x w: no kernel taps, no groups)."""
    if gram is None or gram.matrix is None or layer.taps != 1:
        return None
    if layer.node.op_type == "Conv" and layer.node.attributes.get_int("group", 1) != 1:
        return None
    return gram.matrix[:-1, :-1]


def sparsify(layers: list[Layer], stats: dict[str, Gram], ratio: float, semi: bool, method: str) -> list[dict]:
    """Zero the weights of every layer in place; returns per layer the achieved sparsity."""
    records: list[dict] = []
    for layer in layers:
        rows = layer.rows()
        if semi and rows.shape[1] % 4:
            records.append({"layer": layer.node.name, "skipped": f"K = {rows.shape[1]} is not a multiple of 4"})
            continue
        gram = stats.get(layer.input_name) if layer.channels else None
        hessian = _hessian(layer, gram) if method == "sparsegpt" else None
        if hessian is not None:
            used, new = "sparsegpt", sparsegpt(rows, hessian, ratio, semi)
        else:
            used = "magnitude" if gram is None or method == "magnitude" else "wanda"
            rms = gram.rms() if used == "wanda" else None
            new = np.where(mask_for(scores(rows, rms, layer.taps), ratio, semi), 0.0, rows)
        layer.write(new)
        records.append({"layer": layer.node.name, "op_type": layer.node.op_type, "method": used,
                        "weights": int(new.size), "ratio": float(np.mean(new == 0))})
    return records


def prune_sparse(model: ir.Model, ratio: float, semi: bool, method: str, batches, workdir) -> dict:
    """Zero `ratio` of the weights of every MatMul / Gemm / Conv / Gather table (2:4: two of every
    four) in place. Returns the report records."""
    from quantkit.prune.stats import grams

    layers, skipped = sparse_layers(model)
    requests = {la.input_name: (la.channels, la.axis) for la in layers if la.channels and method != "magnitude"}
    stats = grams(model, requests, batches(), workdir, full=method == "sparsegpt") if requests else {}
    records = sparsify(layers, stats, ratio, semi, method)
    skipped += [{"layer": r["layer"], "reason": r["skipped"]} for r in records if "skipped" in r]
    return {"layers": [r for r in records if "skipped" not in r], "skipped": skipped}
