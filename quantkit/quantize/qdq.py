"""Static int8 in QDQ form: the one place that edits the graph for quantization.

For each planned op: the float activation input and the output go through
QuantizeLinear -> DequantizeLinear, the weight is stored as int8 behind a DequantizeLinear, the bias
as int32 with scale = input_scale * weight_scale. onnxruntime's graph optimizer fuses these groups
into integer kernels (QLinearConv, QGemm, QLinearMatMul / MatMulIntegerToFloat).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import onnx_ir as ir

from quantkit.calibrate.collect import RANGE_KINDS, Statistics, StatRequest
from quantkit.calibrate.observers import Observer
from quantkit.calibrate.ranges import Levels, observer_kind, select_range
from quantkit.config import Activations, QuantConfig, Rounding
from quantkit.graph.ir_edit import Editor, bias_add, const_array, drop_unused
from quantkit.quantize import embedding
from quantkit.quantize import qparams as qp
from quantkit.quantize.hessian_rounding import HessianRounding
from quantkit.quantize.plan import Plan, QuantizedOp, SchemeName, activation_tensors
from quantkit.quantize.scheme import ActivationQParams, Findings, RewriteResult, Scheme


def insert_qdq(edit: Editor, value: ir.Value, scale: np.ndarray, zp: np.ndarray) -> None:
    """value -> Q -> DQ, with every consumer of value (and no graph output) reading DQ's output."""
    graph, base = edit.graph, value.name
    s = edit.initializer(f"{base}_scale", np.asarray(scale, dtype=np.float32))
    z = edit.initializer(f"{base}_zero_point", np.asarray(zp))
    q = edit.node("QuantizeLinear", [value, s, z], name=f"{base}_QuantizeLinear", output=f"{base}_quantized")
    q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(np.asarray(zp).dtype))
    q.outputs[0].shape = value.shape
    dq = edit.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{base}_DequantizeLinear",
                   output=f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = value.shape
    for use in list(value.uses()):
        if use.node is not q:
            use.node.replace_input_with(use.idx, dq.outputs[0])
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(next(iter(graph)), [q, dq])


def weight_error_shift(node: ir.Node, w: np.ndarray, w_dq: np.ndarray, mean_in: np.ndarray) -> np.ndarray | None:
    """The mean output error that quantizing the weight adds, per output channel, given the
    per-channel mean of the input: E[(W_q - W) x] = (W_q - W) E[x] (padding ignored)."""
    dw = (w_dq.astype(np.float64) - w.astype(np.float64))
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        cout, cin_g = dw.shape[0], dw.shape[1]
        if mean_in.shape != (cin_g * groups,):
            return None
        per_in = dw.reshape(cout, cin_g, -1).sum(axis=2)  # (Cout, Cin/g)
        means = mean_in.reshape(groups, cin_g)[np.arange(cout) // (cout // groups)]
        return (per_in * means).sum(axis=1)
    if node.op_type in ("Gemm", "MatMul"):
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1:
            dw = dw.T
        if mean_in.shape != (dw.shape[0],):
            return None
        return mean_in @ dw
    return None


def _correct_bias(edit: Editor, op: QuantizedOp, w: np.ndarray, w_dq: np.ndarray, mean_in: np.ndarray) -> bool:
    """Shift the node's bias (creating one for Conv/Gemm if absent) by minus the mean error."""
    node = op.node
    shift = weight_error_shift(node, w, w_dq, mean_in)
    if shift is None:
        return False
    if node.op_type == "MatMul":
        found = bias_add(node)
        if found is None:
            return False
        add, idx = found
        b = const_array(add.inputs[idx])
        corrected = edit.initializer(f"{add.inputs[idx].name}_biascorr", (b - shift).astype(np.float32))
        add.replace_input_with(idx, corrected)
        return True
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if has_bias and const_array(node.inputs[2]) is None:
        return False
    b = const_array(node.inputs[2]) if has_bias else np.zeros(shift.shape, np.float32)
    if b.shape != shift.shape:
        return False
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    base = node.inputs[2].name if has_bias else f"{node.name or node.outputs[0].name}_bias"
    node.replace_input_with(2, edit.initializer(f"{base}_biascorr", (b - shift).astype(np.float32)))
    op.bias = node.op_type != "Gemm" or (node.attributes.get_float("alpha", 1.0) == 1.0
                                         and node.attributes.get_float("beta", 1.0) == 1.0)
    return True


class StaticScheme(Scheme):
    """Static int8: activation ranges from calibration, QDQ around every planned op."""

    name = SchemeName.STATIC

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.act_type = qp.QTYPES[config.activations.value]
        self.levels = Levels(254, True) if config.activations == Activations.INT8 else Levels(255, False)
        self.range_kind = observer_kind(config.method)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.chosen: dict[str, str] = {}  # tensor -> the range method that won
        self.channel_means: dict[str, np.ndarray] = {}
        self.observers: dict[str, Observer] = {}
        self.range_seconds = 0.0
        self.rounding = HessianRounding()  # GPTQ codes of the weights (--weight-rounding gptq)

    def requests(self, plan: Plan) -> list[StatRequest]:
        """A range on every QDQ tensor; per-channel input means for bias correction."""
        axes = {op.inputs[0].name: 1 if op.node.op_type == "Conv" else -1
                for op in plan.ops if op.scheme == self.name and op.weighted and op.inputs} \
            if self.config.bias_correction else {}
        ranges = [StatRequest(v.name, self.range_kind, axes.get(v.name)) for v in plan.activation_tensors(self.name)]
        mine = [op for op in plan.ops if op.scheme == self.name]
        return ranges + (self.rounding.requests(mine) if self.config.weight_rounding == Rounding.GPTQ else [])

    def use(self, stats: Statistics) -> Findings:
        """Mask-like tensors stay float; every other tensor gets its range."""
        observers = {t: o for (t, k), o in stats.observers.items() if k in RANGE_KINDS}
        found = Findings(masks={n: why for n, o in observers.items() if (why := o.mask_like())})
        if found.masks:
            found.notes.append(f"{len(found.masks)} tensor(s) with mask-like ranges stay float (see float_tensors)")
        t0 = time.perf_counter()
        for name, obs in observers.items():
            self.observers[name] = obs
            if name not in found.masks:
                self.ranges[name], self.chosen[name] = select_range(obs, self.config.method, self.levels,
                                                                     self.config.percentile)
            if (mean := obs.channel_mean()) is not None:
                self.channel_means[name] = mean
        self.range_seconds += time.perf_counter() - t0
        found.notes += self.rounding.use(stats, self.memo)
        return found

    def rewrite(self, model: ir.Model, ops: list[QuantizedOp], edit: Editor) -> RewriteResult:
        result = RewriteResult()
        symmetric = self.config.activations == Activations.INT8
        # activations first, so weights and biases can use their scales
        tensors = activation_tensors(ops)
        ranges = _passed_through(ops, {v.name for v in tensors}, self.ranges)
        for value in tensors:
            lo, hi = ranges[value.name]
            scale, zp = qp.qparams(lo, hi, self.act_type, symmetric=symmetric)
            result.activations[value.name] = ActivationQParams(float(scale), int(zp), self.act_type.name, (lo, hi))
        for value in tensors:
            a = result.activations[value.name]
            insert_qdq(edit, value, np.float32(a.scale), np.asarray(a.zero_point, dtype=self.act_type.dtype))
        weights: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray, np.ndarray]] = {}
        tables: dict[str, tuple[ir.Value, ir.Value]] = {}
        for op in ops:
            if op.weighted and not op.inputs:  # embedding table: weight-only, rows dequantized after the lookup
                embedding.quantize_table(edit, op.node, tables, self.memo)
            elif op.weighted:
                self._weight(edit, op, weights, result)
            result.quantized_nodes.append(op.node.name or "")
        model.graph.sort()
        return result

    def _weight(self, edit: Editor, op: QuantizedOp, cache: dict, result: RewriteResult) -> None:
        """int8 weight behind a DequantizeLinear (shared by nodes reading the same weight on the
        same axis), then bias correction and the int32 bias."""
        node = op.node
        w_in = node.inputs[op.weight_index]
        w = const_array(w_in)
        key = (w_in.name, op.weight_axis)
        if key not in cache:
            q, scale, zp = self.memo.quantize(w_in.const_value, op.weight_axis)
            measured = self.rounding.weight_error(op.key, w)
            if measured is not None:
                result.gptq.append(op.key)
                if node.name:  # the report keys its weight_error rows by node name
                    result.weight_error[node.name] = measured
            dq = edit.dequantized(w_in.name, q, scale, zp, op.weight_axis, node)
            # the float dequantized copy is made only when bias correction needs it: kept for
            # every weight it would hold the model's size again
            cache[key] = (dq, scale, (q, zp))
        dq, w_scale, (q, zp) = cache[key]
        node.replace_input_with(op.weight_index, dq)
        mean_in = self.channel_means.get(op.inputs[0].name)
        if mean_in is not None and _correct_bias(edit, op, w, qp.dequantize(q, w_scale, zp, op.weight_axis), mean_in):
            result.bias_corrected.append(node.name or "")
        if op.bias:
            b_in = node.inputs[2]
            qb = qp.quantize_bias(const_array(b_in), result.activations[op.inputs[0].name].scale, w_scale)
            if qb is None:
                result.float_bias.append(node.name or "")
            else:
                q, b_scale = qb
                node.replace_input_with(2, edit.dequantized(f"{b_in.name}", q, b_scale,
                                                            np.zeros(q.shape, dtype=np.int32), 0, node))

    def report(self, rw: RewriteResult) -> tuple[dict | None, dict]:
        calibration = {"method": self.config.method, "range_seconds": self.range_seconds,
                       "methods_chosen": dict(Counter(self.chosen.values()))}
        activations = {k: {**asdict(v), "method": self.chosen[k], "observed": list(self.observers[k].range()),
                           "nonfinite": self.observers[k].nonfinite} for k, v in rw.activations.items()}
        return calibration, activations


# ops whose output values all lie in their input's range (max pooling picks input values; nearest and linear
# resizing pick or average them): their output QDQ takes the input's scale and zero point, which adds no
# rounding and lets onnxruntime drop the pair and run the op on the int8 tensor itself (its MaxPool/Resize QDQ
# rule asks for equal parameters; a calibrated range of its own differs a little and kept the op float)
PASS_THROUGH = ("MaxPool", "Resize", "Split")  # a Split's parts: onnxruntime splits the int8 tensor only
# when every part keeps the input's parameters (a part then uses the whole input's range, as onnxruntime's own
# quantizer does; a YOLOv8 C2f block splits a convolution's output for its bottlenecks and its Concat)


def _passed_through(ops: list[QuantizedOp], quantized: set[str],
                    ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """`ranges` with each PASS_THROUGH op's output range replaced by its input's (through chains of them)."""
    source: dict[str, str] = {}
    for op in ops:
        node = op.node
        cubic = node.op_type == "Resize" and (m := node.attributes.get("mode")) is not None and m.as_string() == "cubic"
        if node.op_type in PASS_THROUGH and not cubic and op.inputs and op.inputs[0].name in quantized:
            source.update({v.name: op.inputs[0].name for v in op.qdq_outputs if v.name in quantized})
    out = dict(ranges)
    for name in source:
        root = name
        while root in source:
            root = source[root]
        out[name] = ranges[root]
    return out


def rewrite(model: ir.Model, plan: Plan, ranges: dict[str, tuple[float, float]], config: QuantConfig,
            channel_means: dict[str, np.ndarray] | None = None) -> RewriteResult:
    """Static int8 of every op in `plan` with the given ranges (for tests and direct use)."""
    scheme = StaticScheme(config)
    scheme.ranges = dict(ranges)
    scheme.channel_means = dict(channel_means or {})
    for op in plan.ops:
        op.scheme = scheme.name
    result = scheme.rewrite(model, plan.ops, Editor(model.graph))
    drop_unused(model)
    return result
