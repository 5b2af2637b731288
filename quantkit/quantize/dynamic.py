"""Dynamic int8: weights stored int8 (symmetric, per output column), activations quantized at run
time by onnxruntime's DynamicQuantizeMatMul kernel (com.microsoft). No calibration data needed.

MatMul and Gemm with constant weights are rewritten; Conv stays float (onnxruntime's dynamic
ConvInteger path is slower than float Conv on CPU), and so do activation x activation MatMuls.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantkit.config import QuantConfig
from quantkit.graph.canonicalize import (
    add_initializer,
    const_array,
    drop_unused_initializers,
    k_major_weight,
    replace_node,
    unique_name,
)
from quantkit.quantize import qparams as qp
from quantkit.quantize.plan import EMBEDDING, Plan, Skipped
from quantkit.quantize.qdq import RewriteResult, dequantized_initializer

MS_DOMAIN = "com.microsoft"


def restrict_plan(plan: Plan) -> Plan:
    """Keep the ops this scheme can rewrite; the others stay float, with the reason."""
    kept = []
    for op in plan.ops:
        node = op.node
        if op.kind == EMBEDDING:
            kept.append(op)
            continue
        if not op.weighted:
            reason = "dynamic int8 quantizes weights; activation x activation MatMul stays float"
        elif node.op_type in ("Conv", "ConvTranspose"):
            reason = "dynamic int8 has no fast convolution kernel in onnxruntime; use static int8 for conv nets"
        elif node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0 or (
                len(node.inputs) > 2 and node.inputs[2] is not None and not op.bias)):
            reason = "Gemm with alpha/beta != 1 or a non-vector C has no DynamicQuantizeMatMul form"
        else:
            kept.append(op)
            continue
        plan.skipped.append(Skipped(node.name or "", node.op_type, reason))
    plan.ops = kept
    return plan


def rewrite(model: ir.Model, plan: Plan, config: QuantConfig) -> RewriteResult:
    graph = model.graph
    result = RewriteResult()
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    cache: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for op in plan.ops:
        node = op.node
        if op.kind == EMBEDDING:  # weight-only, one scale per row, as in static mode
            table = const_array(node.inputs[0])
            q, scale, zp = qp.quantize_weight(table, 0)
            node.replace_input_with(0, dequantized_initializer(graph, node.inputs[0].name, q, scale, zp, 0, node))
            result.quantized_nodes.append(node.name or "")
            continue
        w_in = node.inputs[1]
        key = f"{w_in.name}/{node.op_type}/{node.attributes.get_int('transB', 0)}"
        if key not in cache:
            w = np.ascontiguousarray(k_major_weight(node))  # (K, N)
            axis = 1 if config.per_channel else None
            q, scale, zp = qp.quantize_weight(w, axis)
            cache[key] = (add_initializer(graph, f"{w_in.name}_quantized", q), add_initializer(graph, f"{w_in.name}_scale", scale),
                          add_initializer(graph, f"{w_in.name}_zero_point", zp))
        wq, s, z = cache[key]
        inputs = [node.inputs[0], wq, s, z]
        if node.op_type == "Gemm" and op.bias:
            inputs.append(node.inputs[2])
        new = ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN,
                      name=unique_name(graph, f"{node.name or 'matmul'}_dynamic_int8"))
        op.node = replace_node(graph, node, new)
        result.quantized_nodes.append(node.name or new.outputs[0].name)
    drop_unused_initializers(graph)
    return result
