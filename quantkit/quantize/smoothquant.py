"""SmoothQuant: move activation outliers into the weights before quantizing.

For a LayerNormalization whose output X feeds MatMuls with constant weights W (Q/K/V, FFN-in),
per input channel j:  s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha),  X' = X / s,  W' = diag(s) W,
so X' W' = X W exactly in float while X' has flatter channels to quantize. 1/s is folded into the
LayerNorm's scale and bias when the MatMuls are its only readers; otherwise (post-norm BERT, where
the LayerNorm output also feeds the residual) a Mul by 1/s is inserted in front of the MatMuls.

alpha is searched per group from ALPHAS when not given: the value (or no smoothing at all) with the
smallest relative output error of fake-quantized X' W' on sampled calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import onnx_ir as ir

from quantkit.calibrate.collect import Statistics, StatRequest
from quantkit.calibrate.observers import ChannelObserver, GramObserver
from quantkit.graph.ir_edit import Editor, const_array
from quantkit.quantize import qparams as qp

ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Group:
    norm: ir.Node
    source: ir.Value  # the LayerNorm output
    consumers: list[ir.Node]  # MatMuls reading it with a constant (K, N) weight


def find_groups(model: ir.Model) -> list[Group]:
    groups = []
    for node in model.graph:
        if node.op_type != "LayerNormalization" or node.domain != "":
            continue
        out = node.outputs[0]
        mms = [u.node for u in out.uses() if u.node.op_type == "MatMul" and u.idx == 0
               and (w := const_array(u.node.inputs[1])) is not None and w.ndim == 2 and w.dtype == np.float32]
        if mms:
            groups.append(Group(node, out, mms))
    return groups


def _fake_quant_error(x: np.ndarray, lo: float, hi: float, ws: list[np.ndarray], refs: list[np.ndarray]) -> float:
    scale, zp = qp.qparams(lo, hi, qp.UINT8, symmetric=False)
    xq = qp.dequantize(qp.quantize(x, scale, zp, qp.UINT8), scale, zp)
    err = 0.0
    for w, ref in zip(ws, refs):
        q_w, s_w, z_w = qp.quantize_weight(w, 1)
        wq = qp.dequantize(q_w, s_w, z_w, axis=1)
        err += float(np.sum((xq @ wq - ref) ** 2) / max(np.sum(ref**2), 1e-30))
    return err


def choose_scales(obs: ChannelObserver, weights: list[np.ndarray],
                  alpha: float | None) -> tuple[np.ndarray | None, float | None, float]:
    """Smoothing factors s (None: smoothing does not help), the alpha used, and the error."""
    x = obs.sample
    refs = [x @ w for w in weights]
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    unsmoothed = _fake_quant_error(x, float(obs.ch_min.min()), float(obs.ch_max.max()), weights, refs)
    best: tuple[np.ndarray | None, float | None, float] = (None, None, unsmoothed)
    for a in (alpha,) if alpha is not None else ALPHAS:
        s = np.power(np.maximum(obs.absmax, 1e-5), a) / np.power(np.maximum(w_absmax, 1e-5), 1 - a)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        err = _fake_quant_error(x / s, float((obs.ch_min / s).min()), float((obs.ch_max / s).max()),
                                [w * s[:, None] for w in weights], refs)
        if alpha is not None or err < best[2]:
            best = (s, a, err)
    return best


def requests(groups: list[Group], channel_axes: dict[str, int] | None = None) -> list[StatRequest]:
    """Per-channel ranges and sampled rows of every group's LayerNorm output (and its channel
    means where bias correction will want those of the smoothed tensor)."""
    return [StatRequest(g.source.name, "channel", (channel_axes or {}).get(g.source.name)) for g in groups]


def smooth(model: ir.Model, groups: list[Group], stats: Statistics, alpha: float | None) -> tuple[list[dict], dict]:
    """Choose and apply the smoothing of every group. Returns the report entries and, for each
    MatMul input that now carries X / s, the (original tensor, s) it derives from."""
    edit = Editor(model.graph)
    out, scaled = [], {}
    for g in groups:
        obs = cast(ChannelObserver, stats.get(g.source.name, "channel"))
        weights = [const_array(mm.inputs[1]) for mm in g.consumers]
        s, a, err = choose_scales(obs, weights, alpha)
        entry = {"layernorm": g.norm.name, "matmuls": [mm.name for mm in g.consumers], "alpha": a,
                 "relative_error": err}
        entry["applied"] = apply(model, g, s, edit) if s is not None else "no alpha beat no smoothing"
        if s is not None:
            scaled[g.consumers[0].inputs[0].name] = (g.source.name, s)
        out.append(entry)
    return out, scaled


def scaled_gram(obs: GramObserver, s: np.ndarray) -> GramObserver:
    """X^T X of X / s from that of X: (X diag(1/s))^T (X diag(1/s)) = G / (s s^T), exactly."""
    out = GramObserver()
    out.gram = obs.gram / np.outer(s.astype(np.float64), s.astype(np.float64))
    out.rows = obs.rows
    return out


def _const(edit: Editor, base: str, array: np.ndarray) -> ir.Value:
    return edit.initializer(base, np.asarray(array, np.float32))


def apply(model: ir.Model, group: Group, s: np.ndarray, edit: Editor | None = None) -> str:
    """Rewrite the group in place; returns how 1/s was applied ('folded' or 'mul')."""
    graph = model.graph
    edit = edit or Editor(graph)
    for mm in group.consumers:
        w = const_array(mm.inputs[1])
        mm.replace_input_with(1, _const(edit, f"{mm.inputs[1].name}_smoothed", w * s[:, None]))
    readers = group.source.uses()
    if len(readers) == len(group.consumers) and not group.source.is_graph_output():
        ln = group.norm
        gamma = const_array(ln.inputs[1])
        beta = const_array(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
        if gamma is not None and gamma.shape == s.shape and (beta is None or beta.shape == s.shape):
            ln.replace_input_with(1, _const(edit, f"{ln.inputs[1].name}_smoothed", gamma / s))
            if beta is not None:
                ln.replace_input_with(2, _const(edit, f"{ln.inputs[2].name}_smoothed", beta / s))
            return "folded into the LayerNorm"
    inv = _const(edit, f"{group.source.name}_smooth_inv", 1.0 / s)
    mul = edit.node("Mul", [group.source, inv], name=f"{group.norm.name or 'ln'}_smooth",
                    output=f"{group.source.name}_smoothed")
    mul.outputs[0].type, mul.outputs[0].shape = group.source.type, group.source.shape
    graph.insert_after(group.norm, mul)
    for mm in group.consumers:
        mm.replace_input_with(0, mul.outputs[0])
    return "Mul inserted (the LayerNorm output has other readers)"
