"""Static int8 in QDQ form: the one place that edits the graph for quantization.

For each planned op: the float activation input and the output go through
QuantizeLinear -> DequantizeLinear, the weight is stored as int8 behind a DequantizeLinear, the bias
as int32 with scale = input_scale * weight_scale. onnxruntime's graph optimizer fuses these groups
into integer kernels (QLinearConv, QGemm, QLinearMatMul / MatMulIntegerToFloat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from quantkit.config import QuantConfig
from quantkit.graph.canonicalize import add_initializer, const_array, drop_unused_initializers, unique_name
from quantkit.quantize import qparams as qp
from quantkit.quantize.plan import Plan


@dataclass
class ActivationQParams:
    scale: float
    zero_point: int
    qtype: str
    range: tuple[float, float]


@dataclass
class RewriteResult:
    activations: dict[str, ActivationQParams] = field(default_factory=dict)
    quantized_nodes: list[str] = field(default_factory=list)
    float_bias: list[str] = field(default_factory=list)  # nodes whose bias stayed float (int32 overflow)
    bias_corrected: list[str] = field(default_factory=list)
    gptq: list[str] = field(default_factory=list)  # weight-only nodes rounded with GPTQ
    notes: list[str] = field(default_factory=list)


def _insert_qdq(graph: ir.Graph, value: ir.Value, scale: np.ndarray, zp: np.ndarray) -> None:
    """value -> Q -> DQ, with every consumer of value (and no graph output) reading DQ's output."""
    base = value.name
    s = add_initializer(graph, f"{base}_scale", np.asarray(scale, dtype=np.float32))
    z = add_initializer(graph, f"{base}_zero_point", np.asarray(zp))
    q = ir.node("QuantizeLinear", [value, s, z], name=unique_name(graph, f"{base}_QuantizeLinear"))
    q.outputs[0].name = unique_name(graph, f"{base}_quantized")
    q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(np.asarray(zp).dtype))
    q.outputs[0].shape = value.shape
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=unique_name(graph, f"{base}_DequantizeLinear"))
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
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


def dequantized_initializer(graph: ir.Graph, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                       axis: int | None, before: ir.Node) -> ir.Value:
    qv = add_initializer(graph, f"{base}_quantized", q)
    s = add_initializer(graph, f"{base}_scale", scale.astype(np.float32))
    z = add_initializer(graph, f"{base}_zero_point", zp)
    attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    dq = ir.node("DequantizeLinear", [qv, s, z], attrs, name=unique_name(graph, f"{base}_DequantizeLinear"))
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape(q.shape)
    graph.insert_before(before, dq)
    return dq.outputs[0]


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
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            dw = dw.T
        if mean_in.shape != (dw.shape[0],):
            return None
        return mean_in @ dw
    return None


def _bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    """For a MatMul, the Add right after it that adds a constant vector (torch's Linear bias)."""
    users = node.outputs[0].uses()
    if len(users) != 1 or node.outputs[0].is_graph_output():
        return None
    add = next(iter(users)).node
    if add.op_type != "Add":
        return None
    other = 1 - next(iter(users)).idx
    b = const_array(add.inputs[other])
    return (add, other) if b is not None and b.ndim == 1 else None


def _correct_bias(graph: ir.Graph, op, w: np.ndarray, w_dq: np.ndarray, mean_in: np.ndarray) -> bool:
    """Shift the node's bias (creating one for Conv/Gemm if absent) by minus the mean error."""
    node = op.node
    shift = weight_error_shift(node, w, w_dq, mean_in)
    if shift is None:
        return False
    if node.op_type == "MatMul":
        found = _bias_add(node)
        if found is None:
            return False
        add, idx = found
        b = const_array(add.inputs[idx])
        add.replace_input_with(idx, add_initializer(graph, f"{add.inputs[idx].name}_biascorr", (b - shift).astype(np.float32)))
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
    node.replace_input_with(2, add_initializer(graph, f"{base}_biascorr", (b - shift).astype(np.float32)))
    op.bias = node.op_type != "Gemm" or (node.attributes.get_float("alpha", 1.0) == 1.0
                                         and node.attributes.get_float("beta", 1.0) == 1.0)
    return True


def rewrite(model: ir.Model, plan: Plan, ranges: dict[str, tuple[float, float]],
            config: QuantConfig, channel_means: dict[str, np.ndarray] | None = None) -> RewriteResult:
    graph = model.graph
    result = RewriteResult()
    act_type = qp.QTYPES[config.activations]
    symmetric = config.activations == "int8"

    # activations first, so weights and biases can use their scales
    for value in plan.activation_tensors():
        lo, hi = ranges[value.name]
        scale, zp = qp.qparams(lo, hi, act_type, symmetric=symmetric)
        result.activations[value.name] = ActivationQParams(float(scale), int(zp), act_type.name, (lo, hi))
    for value in plan.activation_tensors():
        a = result.activations[value.name]
        _insert_qdq(graph, value, np.float32(a.scale), np.asarray(a.zero_point, dtype=act_type.dtype))

    weight_cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]] = {}
    for op in plan.ops:
        node = op.node
        if not op.weighted:
            result.quantized_nodes.append(node.name or "")
            continue
        w_in = node.inputs[op.weight_index]
        key = (w_in.name, op.weight_axis)
        w = const_array(w_in)
        if key not in weight_cache:
            q, scale, zp = qp.quantize_weight(w, op.weight_axis)
            dq = dequantized_initializer(graph, w_in.name, q, scale, zp, op.weight_axis, node)
            weight_cache[key] = (dq, scale, qp.dequantize(q, scale, zp, op.weight_axis))
        dq, w_scale, w_dq = weight_cache[key]
        node.replace_input_with(op.weight_index, dq)
        if not op.inputs:  # embedding table: weight-only
            result.quantized_nodes.append(node.name or "")
            continue
        mean_in = (channel_means or {}).get(op.inputs[0].name)
        if mean_in is not None and _correct_bias(graph, op, w, w_dq, mean_in):
            result.bias_corrected.append(node.name or "")

        if op.bias:
            b_in = node.inputs[2]
            x_scale = result.activations[op.inputs[0].name].scale
            qb = qp.quantize_bias(const_array(b_in), x_scale, w_scale)
            if qb is None:
                result.float_bias.append(node.name or "")
            else:
                q, b_scale = qb
                zp = np.zeros(q.shape, dtype=np.int32)
                bdq = dequantized_initializer(graph, f"{b_in.name}", q, b_scale, zp, 0, node)
                node.replace_input_with(2, bdq)
        result.quantized_nodes.append(node.name or "")

    # float originals nobody reads any more would only bloat the file
    drop_unused_initializers(graph)
    graph.sort()
    return result
