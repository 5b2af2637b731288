"""Static int8 with the input's outlier channels in float (LLM.int8()'s decomposition, with calibrated
ranges): for a MatMul y = x W whose input has a few channels far larger than the rest (the GELU output
before a BERT encoder's FFN down-projection: one neuron 10-20x the others on a few tokens),

    y = x_rest W_rest + x_S W_S

where S are those channels. x_rest is quantized statically over the range of the other channels only
(one channel no longer sets the step of all 1,536), W_rest is W with the rows of S set to zero, stored
int8 per output column; x_S W_S (k of K rows, k <= MAX_CHANNELS) stays float. In the graph:

    x -> QuantizeLinear -> DequantizeLinear -> MatMul(W_rest int8) [-> Add(bias)] -> Add -> ...
    x -> Gather(S, last axis) -> MatMul(W_S float) ----------------------------------'

Quantizing all of x clips the outlier channels to the range, which costs nothing: their rows of W_rest
are zero. onnxruntime fuses the QDQ MatMul into its integer kernel (MatMulIntegerToFloat) as for plain
static int8, so the split runs at static int8's speed plus a k-wide float MatMul. On all-MiniLM-L6-v2's
first down-projection the op's own SQNR goes from 29 dB (static) to 41 dB with one channel kept float,
above per-token dynamic int8's 37 dB.

The accuracy budget offers it as the first alternative to static int8 for MatMuls whose input has
outlier channels and no other reader (a shared input has one range for all its readers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.calibrate.collect import Statistics, StatRequest
from quantkit.calibrate.observers import ChannelRangeObserver
from quantkit.config import Activations, QuantConfig
from quantkit.graph.ir_edit import Editor, bias_add, const_array
from quantkit.quantize import qparams as qp
from quantkit.quantize.plan import Plan, QuantizedOp, SchemeName
from quantkit.quantize.qdq import insert_qdq
from quantkit.quantize.scheme import ActivationQParams, Findings, RewriteResult, Scheme

CHANNEL_RANGE = "channel_range"
OUTLIER_RATIO = 4.0  # a channel is an outlier when its largest magnitude is this many times the median channel's
MAX_CHANNELS = 16  # ...of at most this many (and 1/8 of the channels), the largest first


@dataclass(frozen=True)
class Split:
    channels: np.ndarray  # indices into the input's last axis kept float, ascending (int64)
    range: tuple[float, float]  # the calibrated range of the other channels, 0 included

    def qparams(self, qtype: qp.QType, symmetric: bool) -> tuple[np.float32, np.ndarray]:
        scale, zp = qp.qparams(self.range[0], self.range[1], qtype, symmetric=symmetric)
        return np.float32(scale), np.asarray(zp, dtype=qtype.dtype)


def choose(ch_min: np.ndarray, ch_max: np.ndarray) -> Split | None:
    """The outlier channels of an input from its per-channel ranges, or None when it has none."""
    magnitude = np.maximum(np.abs(ch_min), np.abs(ch_max)).astype(np.float64)
    if magnitude.size < 8:
        return None
    floor = OUTLIER_RATIO * float(np.median(magnitude))
    order = np.argsort(-magnitude, kind="stable")[:min(MAX_CHANNELS, magnitude.size // 8)]
    picked = order[magnitude[order] > floor]
    if picked.size == 0:
        return None
    rest = np.ones(magnitude.size, bool)
    rest[picked] = False
    lo, hi = min(float(ch_min[rest].min()), 0.0), max(float(ch_max[rest].max()), 0.0)
    return Split(np.sort(picked).astype(np.int64), (lo, hi))


def split_weight(w: np.ndarray, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W_rest, W_S): W with the rows of the kept channels zeroed, and those rows."""
    rest = np.array(w, dtype=np.float32, copy=True)
    rest[channels] = 0.0
    return rest, np.ascontiguousarray(w[channels], dtype=np.float32)


class SplitScheme(Scheme):
    name = SchemeName.SPLIT

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.symmetric = config.activations == Activations.INT8
        self.qtype = qp.QTYPES[Activations.INT8.value if self.symmetric else Activations.UINT8.value]
        self.candidates: set[str] = set()  # inputs it asked statistics for (read by one MatMul only)
        self.splits: dict[str, Split] = {}  # input tensor -> its split, once the statistics are in
        self._rest: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}  # (weight, input) -> int8 W_rest..., W_S

    def refuse(self, op: QuantizedOp) -> str | None:
        # judged from the plan's values, not the node's current inputs: the accuracy search asks about
        # ops already rewritten to static int8
        if not op.weighted or op.node.op_type != "MatMul" or not op.inputs:
            return "the outlier-channel split rewrites MatMuls with a constant 2-D weight"
        x = op.inputs[0].name
        if x in self.splits:
            return None
        if x in self.candidates:
            return "its input has no outlier channels"
        return "its input has other readers or no per-channel statistics"

    def requests(self, plan: Plan) -> list[StatRequest]:
        for op in plan.ops:
            if op.weighted and op.node.op_type == "MatMul" and op.inputs and len(op.inputs[0].uses()) == 1 \
                    and not op.inputs[0].is_graph_output() and (w := const_array(op.node.inputs[1])) is not None \
                    and w.ndim == 2:
                self.candidates.add(op.inputs[0].name)
        return [StatRequest(name, CHANNEL_RANGE) for name in sorted(self.candidates)]

    def emulation(self, x: str) -> tuple[Split, qp.QType, bool] | None:
        """What quantize/simulate.py needs to emulate the split of an op reading `x` (None: it has none)."""
        split = self.splits.get(x)
        return None if split is None else (split, self.qtype, self.symmetric)

    def use(self, stats: Statistics) -> Findings:
        for name in sorted(self.candidates):
            obs = stats.get(name, CHANNEL_RANGE)
            if isinstance(obs, ChannelRangeObserver) and obs.ch_min is not None and obs.ch_max is not None \
                    and not obs.nonfinite and (found := choose(obs.ch_min, obs.ch_max)) is not None:
                self.splits[name] = found
        return Findings()

    def rewrite(self, model: ir.Model, ops: list[QuantizedOp], edit: Editor) -> RewriteResult:
        result = RewriteResult()
        for op in ops:
            x = op.inputs[0]
            split = self.splits[x.name]
            scale, zp = split.qparams(self.qtype, self.symmetric)
            result.activations[x.name] = ActivationQParams(float(scale), int(zp), self.qtype.name, split.range)
            self._split(edit, op, split, scale, zp)
            result.quantized_nodes.append(op.key)
        kept = sum(len(self.splits[op.inputs[0].name].channels) for op in ops)
        result.notes.append(f"{len(ops)} MatMul(s) static int8 with {kept} outlier input channel(s) kept float "
                            "(outlier-channel split)")
        model.graph.sort()
        return result

    def _weights(self, w_in: ir.Value, x: str, channels: np.ndarray) -> tuple[np.ndarray, ...]:
        """(int8 W_rest, its scales, zero points, float W_S), made once per weight and input for the run."""
        key = (w_in.name, x)
        if key not in self._rest:
            rest, kept = split_weight(const_array(w_in), channels)
            self._rest[key] = (*qp.quantize_weight(rest, 1), kept)
        return self._rest[key]

    def _split(self, edit: Editor, op: QuantizedOp, split: Split, scale: np.float32, zp: np.ndarray) -> None:
        node, x, w_in = op.node, op.inputs[0], op.node.inputs[1]
        q, w_scale, w_zp, w_kept = self._weights(w_in, x.name, split.channels)
        base = op.key
        if node.inputs[0] is x:  # (were x already behind another scheme's QDQ, that one would stand)
            insert_qdq(edit, x, np.asarray(scale), zp)
        node.replace_input_with(1, edit.dequantized(f"{w_in.name}_split", q, w_scale, w_zp, 1, node))
        channels = edit.initializer(f"{base}_outlier_channels", split.channels)
        gather = edit.node("Gather", [x, channels], {"axis": -1}, name=f"{base}_outlier_Gather",
                           output=f"{x.name}_outlier_channels")
        side = edit.node("MatMul", [gather.outputs[0], edit.initializer(f"{w_in.name}_outlier_rows", w_kept)],
                         name=f"{base}_outlier_MatMul", output=f"{base}_outlier_product")
        found = bias_add(node)
        last = found[0] if found is not None else node  # after the bias Add, which folds into the integer kernel
        out = last.outputs[0]
        total = edit.node("Add", [out, side.outputs[0]], name=f"{base}_outlier_Add", output=f"{out.name}_with_outliers")
        total.outputs[0].type, total.outputs[0].shape = out.type, out.shape
        graph_output = out.is_graph_output()
        out.replace_all_uses_with(total.outputs[0], replace_graph_outputs=True)
        total.replace_input_with(0, out)  # the sum itself still reads the product
        if graph_output:  # the graph output keeps its name, now on the sum
            name = out.name
            out.name = edit.name(f"{name}_before_outliers")
            total.outputs[0].name = name
        edit.graph.insert_after(last, [gather, side, total])
