"""Per-node weight quantization error: each quantized node's float weight, rounded under the scheme
it got, compared with itself. Cheap (one pass over the weights, no inference) and honest about
what it is: how much the weights moved, not how much the model's output moved (that is
sensitivity, which needs a run per layer).

    weight_sqnr_db = 10 log10(sum w^2 / sum (w - dequant(quant(w)))^2)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from quantkit.config import QuantConfig
from quantkit.graph.ir_edit import const_array, k_major_weight
from quantkit.quantize import blockwise as bw
from quantkit.quantize import qparams as qp
from quantkit.quantize.plan import OpKind, make_plan
from quantkit.quantize.weight_only import bits_for


def _int8(w: np.ndarray, axis: int | None) -> np.ndarray:
    q, scale, zp = qp.quantize_weight(w, axis)
    return qp.dequantize(q, scale, zp, axis)


def _rounded(op, quant: QuantConfig, memo: qp.WeightMemo | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(float weight, the weight after quantization, the scheme's name) for one planned op; with the
    run's `memo`, a static int8 weight's codes are the ones the rewrite stored (GPTQ's, when chosen)."""
    node = op.node
    channel = "per-channel" if op.weight_axis is not None else "per-tensor"
    if quant.activations == "none" and node.op_type not in ("Conv", "ConvTranspose"):
        bits = bits_for(node, quant)
        w = const_array(node.inputs[0]).T if op.kind == OpKind.EMBEDDING else k_major_weight(node)
        deq = bw.quantize_blockwise(w, bits, quant.block_size, quant.symmetric).dequantize()
        sym = "symmetric" if quant.symmetric else "asymmetric"
        return w, deq, f"int{bits} blocks of {quant.block_size}, {sym}, round to nearest"
    if quant.activations == "dynamic" and op.kind != OpKind.EMBEDDING:
        w = k_major_weight(node)
        axis = 1 if quant.per_channel else None
        return w, _int8(w, axis), f"int8 {'per-channel' if axis is not None else 'per-tensor'}"
    w = const_array(node.inputs[op.weight_index])
    tensor = node.inputs[op.weight_index].const_value
    if memo is not None and tensor is not None:
        q, scale, zp = memo.quantize(tensor, op.weight_axis)
        return w, qp.dequantize(q, scale, zp, op.weight_axis), f"int8 {channel}"
    return w, _int8(w, op.weight_axis), f"int8 {channel}"


def db(signal: float, error: float) -> float | None:
    """None when the weight is reproduced exactly (infinite SQNR has no JSON form)."""
    if error == 0.0 or signal == 0.0:
        return None
    return 10 * math.log10(signal / error)


def sqnr_db(w: np.ndarray, deq: np.ndarray) -> float | None:
    """Summed a slice of rows at a time, so the float64 temporaries stay small for embedding-sized
    weights."""
    w, deq = np.asarray(w).reshape(len(w), -1) if np.ndim(w) else np.reshape(w, (1, 1)), np.asarray(deq)
    deq = deq.reshape(w.shape)
    err = signal = 0.0
    step = max(1, (1 << 21) // max(w.shape[1], 1))
    for i in range(0, len(w), step):
        a = w[i:i + step].astype(np.float64)
        err += float(np.sum((a - deq[i:i + step].astype(np.float64)) ** 2))
        signal += float(np.sum(a**2))
    return db(signal, err)


def weight_errors(model: ir.Model, quant: QuantConfig, left_float: set[str],
                  measured: dict[str, tuple] | None = None, memo: qp.WeightMemo | None = None) -> list[dict]:
    """Worst first, for every weighted node the plan quantizes and that did not end up float.
    `measured`: node -> (scheme, blockwise.RoundingError) taken while the rewrite rounded it (the
    weight is not read and rounded a second time); other nodes are rounded here, static int8 ones
    from the run's `memo` of stored codes when given."""
    rows: list[dict[str, Any]] = []
    for op in make_plan(model, quant).ops:
        name = op.node.name or ""
        if not op.weighted or name in left_float:
            continue
        if name and name in (measured or {}):
            scheme, err = measured[name]
            rows.append({"node": name, "op_type": op.node.op_type, "scheme": scheme,
                         "weight_sqnr_db": db(err.signal, err.error), "weights": err.count})
            continue
        w, deq, scheme = _rounded(op, quant, memo)
        rows.append({"node": name, "op_type": op.node.op_type, "scheme": scheme,
                     "weight_sqnr_db": sqnr_db(w, deq), "weights": int(np.size(w))})
    rows.sort(key=lambda r: math.inf if r["weight_sqnr_db"] is None else r["weight_sqnr_db"])
    return rows
