"""Static int8 weights rounded against the calibration inputs (quantize/gptq_channel.py) instead of to
nearest: which statistics that needs and the codes it gives, for the static scheme (quantize/qdq.py).

Per planned Conv, MatMul or Gemm with a constant weight quantized per channel: the Hessian of its
input (a convolution's im2col patches per group, calibrate/patches.py; a MatMul's or Gemm's input
rows, the "gram" observer) is gathered in the calibration pass the activation ranges take anyway.
The Hessians held at once are bounded (MAX_TOTAL_BYTES); layers past the bound, or whose Hessian is
too large alone, keep rounding to nearest and the report says how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quantkit.calibrate.collect import Statistics, StatRequest
from quantkit.calibrate.observers import GramObserver
from quantkit.calibrate.patches import MAX_GRAM_BYTES, ConvGeometry, PatchGramObserver
from quantkit.graph.ir_edit import const_array
from quantkit.quantize import blockwise as bw
from quantkit.quantize import qparams as qp
from quantkit.quantize.gptq_channel import Rounded, round_weight
from quantkit.quantize.plan import QuantizedOp

MAX_TOTAL_BYTES = 1 << 30  # all Hessians of one run together (float64)
HOW = "int8 per-channel, GPTQ against the calibration inputs"


@dataclass
class _Layer:
    op: QuantizedOp
    layout: str  # gptq_channel.round_weight's: conv, kn or nk
    request: StatRequest


@dataclass
class HessianRounding:
    """The layers to round, then their codes by node (for the report; the rewrite reads them from the memo)."""

    layers: list[_Layer] = field(default_factory=list)
    by_node: dict[str, tuple[Rounded, int]] = field(default_factory=dict)  # op key -> (codes, weight axis)
    errors: dict[str, bw.RoundingError] = field(default_factory=dict)  # op key -> its weight's rounding error
    skipped: int = 0  # layers left to nearest rounding by the memory bound
    max_bytes: int = MAX_TOTAL_BYTES  # the Hessians held at once (streamed models: a share of the model's size)

    def requests(self, ops: list[QuantizedOp]) -> list[StatRequest]:
        self.layers, self.skipped, used, seen = [], 0, 0, set()
        for op in ops:
            found = _layer(op)
            if found is None or found.op.node.inputs[op.weight_index].name in seen:
                continue
            size = _bytes(found)
            if size > MAX_GRAM_BYTES or used + size > self.max_bytes:
                self.skipped += 1
                continue
            seen.add(found.op.node.inputs[op.weight_index].name)
            used += size if found.request not in [x.request for x in self.layers] else 0
            self.layers.append(found)
        return list(dict.fromkeys(x.request for x in self.layers))

    def use(self, stats: Statistics, memo: qp.WeightMemo) -> list[str]:
        """Round every layer whose Hessian the statistics hold and hand the codes to `memo` (which
        every int8 scheme of the run reads); the Hessians are dropped after."""
        for layer in self.layers:
            h = _hessians(stats, layer.request)
            w_in = layer.op.node.inputs[layer.op.weight_index]
            w = const_array(w_in)
            if h is None or w is None:
                continue
            rounded = round_weight(w, h, layer.layout)
            memo.put(w_in.const_value, layer.op.weight_axis, (rounded.q, rounded.scale, rounded.zero_point))
            self.by_node[layer.op.key] = (rounded, layer.op.weight_axis)
        for r in {x.request for x in self.layers}:
            obs = stats.get(r.tensor, r.kind)
            if isinstance(obs, (GramObserver, PatchGramObserver)):
                obs.gram = None
        if not self.by_node:
            return []
        before = sum(r.error_rtn for r, _ in self.by_node.values())
        after = sum(r.error for r, _ in self.by_node.values())
        note = (f"int8 weights of {len(self.by_node)} layer(s) rounded with GPTQ against the calibration inputs "
                f"(per-channel scales unchanged): their summed calibration output error is "
                f"{after / before if before > 0 else 1.0:.0%} of rounding to nearest")
        skipped = [f"{self.skipped} layer(s) kept rounding to nearest: their input Hessians would exceed "
                   f"{self.max_bytes >> 20} MB"] if self.skipped else []
        return [note, *skipped]

    def weight_error(self, node: str, w: np.ndarray) -> tuple[str, bw.RoundingError] | None:
        """The rounded weight's SQNR figures for the report (weight error, not output error)."""
        found = self.by_node.get(node)
        if found is None:
            return None
        if node not in self.errors:  # every candidate build of the run asks again
            r, axis = found
            w64 = w.astype(np.float64)
            deq = qp.dequantize(r.q, r.scale, r.zero_point, axis).astype(np.float64)
            self.errors[node] = bw.RoundingError(float(np.sum(w64**2)), float(np.sum((w64 - deq) ** 2)), int(w.size))
        return HOW, self.errors[node]


def _layer(op: QuantizedOp) -> _Layer | None:
    """The rounding of one planned op, or None when it has no per-channel constant weight read by a
    plain product of its first input."""
    node = op.node
    if not op.weighted or not op.inputs or op.weight_axis is None or op.weight_index != 1:
        return None
    w_in = node.inputs[1]
    w = const_array(w_in)
    if w is None or w.dtype != np.float32:
        return None
    x = node.inputs[0]
    shape = w.shape
    if node.op_type == "Conv":
        geo = ConvGeometry.of(node, shape)
        return None if geo is None else _Layer(op, "conv", StatRequest(x.name, geo.key()))
    if len(shape) != 2:
        return None
    if node.op_type == "MatMul":
        return _Layer(op, "kn", StatRequest(x.name, "gram"))
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        return _Layer(op, "nk" if node.attributes.get_int("transB", 0) else "kn", StatRequest(x.name, "gram"))
    return None


def _bytes(layer: _Layer) -> int:
    kind = layer.request.kind
    if kind == "gram":
        w = const_array(layer.op.node.inputs[1])
        k = 0 if w is None else w.shape[1] if layer.layout == "nk" else w.shape[0]
        return 8 * k * k
    return ConvGeometry.parse(kind.partition(":")[2]).gram_bytes


def _hessians(stats: Statistics, r: StatRequest) -> np.ndarray | None:
    obs = stats.get(r.tensor, r.kind)
    if isinstance(obs, PatchGramObserver):
        return obs.hessians()
    if isinstance(obs, GramObserver):
        h = obs.hessian()
        return None if h is None else h[None]
    return None
