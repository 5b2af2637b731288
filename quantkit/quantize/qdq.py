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
from quantkit.graph.canonicalize import const_array, unique_name
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


def _const(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _insert_qdq(graph: ir.Graph, value: ir.Value, scale: np.ndarray, zp: np.ndarray) -> None:
    """value -> Q -> DQ, with every consumer of value (and no graph output) reading DQ's output."""
    base = value.name
    s = _const(graph, f"{base}_scale", np.asarray(scale, dtype=np.float32))
    z = _const(graph, f"{base}_zero_point", np.asarray(zp))
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


def _dequantized_const(graph: ir.Graph, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                       axis: int | None, before: ir.Node) -> ir.Value:
    qv = _const(graph, f"{base}_quantized", q)
    s = _const(graph, f"{base}_scale", scale.astype(np.float32))
    z = _const(graph, f"{base}_zero_point", zp)
    attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    dq = ir.node("DequantizeLinear", [qv, s, z], attrs, name=unique_name(graph, f"{base}_DequantizeLinear"))
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape(q.shape)
    graph.insert_before(before, dq)
    return dq.outputs[0]


def rewrite(model: ir.Model, plan: Plan, ranges: dict[str, tuple[float, float]],
            config: QuantConfig) -> RewriteResult:
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
    originals = set()
    for op in plan.ops:
        node = op.node
        if not op.weighted:
            result.quantized_nodes.append(node.name or "")
            continue
        w_in = node.inputs[1]
        key = (w_in.name, op.weight_axis)
        if key not in weight_cache:
            w = const_array(w_in)
            lo, hi = qp.weight_ranges(w, op.weight_axis)
            scale, zp = qp.qparams(lo, hi, qp.INT8, symmetric=True)
            q = qp.quantize(w, scale, zp, qp.INT8, axis=op.weight_axis)
            dq = _dequantized_const(graph, w_in.name, q, scale, zp, op.weight_axis, node)
            weight_cache[key] = (dq, scale)
        dq, w_scale = weight_cache[key]
        originals.add(w_in)
        node.replace_input_with(1, dq)

        if op.bias:
            b_in = node.inputs[2]
            x_scale = result.activations[op.inputs[0].name].scale
            qb = qp.quantize_bias(const_array(b_in), x_scale, w_scale)
            if qb is None:
                result.float_bias.append(node.name or "")
            else:
                q, b_scale = qb
                zp = np.zeros(q.shape, dtype=np.int32)
                bdq = _dequantized_const(graph, f"{b_in.name}", q, b_scale, zp, 0, node)
                originals.add(b_in)
                node.replace_input_with(2, bdq)
        result.quantized_nodes.append(node.name or "")

    # float originals nobody reads any more would only bloat the file
    for v in originals:
        if not v.uses() and not v.is_graph_output() and v.name in graph.initializers:
            graph.initializers.pop(v.name)
    graph.sort()
    return result
