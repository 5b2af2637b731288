"""Weight-only quantization: int4 (or int8) weights, float activations, no calibration needed
except for data-aware rounding (GPTQ).

  MatMul / Gemm      -> com.microsoft.MatMulNBits (blockwise along K, packed), or with
                        --format qdq a standard DequantizeLinear(int4, block_size) -> MatMul
  embedding Gather   -> com.microsoft.GatherBlockQuantized, or DequantizeLinear -> Gather
  Conv / ConvTranspose: onnxruntime has no int4 convolution: int8 per-channel weights behind a
                        DequantizeLinear, and the report says so
"""

from __future__ import annotations

import fnmatch

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
from quantkit.quantize import blockwise as bw
from quantkit.quantize import qparams as qp
from quantkit.quantize.gptq import gptq_blockwise
from quantkit.quantize.plan import EMBEDDING, Plan, Skipped
from quantkit.quantize.qdq import RewriteResult, dequantized_initializer

MS_DOMAIN = "com.microsoft"
CONV_FALLBACK = "int4 has no convolution kernel in onnxruntime: weights stored int8 behind a DequantizeLinear"


def restrict_plan(plan: Plan) -> Plan:
    kept = []
    for op in plan.ops:
        if not op.weighted:
            plan.skipped.append(Skipped(op.node.name or "", op.node.op_type,
                                        "weight-only quantization: activation x activation MatMul stays float"))
            continue
        if op.node.op_type == "Gemm" and op.node.inputs[2:3] and op.node.inputs[2] is not None and not op.bias:
            plan.skipped.append(Skipped(op.node.name or "", "Gemm", "Gemm with alpha/beta != 1 or a non-vector C"))
            continue
        kept.append(op)
    plan.ops = kept
    return plan


def bits_for(node: ir.Node, config: QuantConfig) -> int:
    if config.weights == "int8":
        return 8
    for p in config.keep_int8:
        if fnmatch.fnmatchcase(node.name or "", p) or fnmatch.fnmatchcase(node.op_type, p):
            return 8
    return 4


def _qdq_blocked(graph: ir.Graph, base: str, qb: bw.Blockwise, axis: int, rows_first: bool, before: ir.Node) -> ir.Value:
    """DequantizeLinear(int4/uint4 or int8/uint8, blocked along `axis`) of a Blockwise weight, laid
    out (K, N) when rows_first (blocks along axis 0) or (N, K) otherwise (blocks along axis 1)."""
    codes = qb.q.reshape(qb.q.shape[0], -1)[:, : qb.k]  # (N, K)
    scales, zps = qb.scales, qb.zero_points  # (N, kb)
    if rows_first:
        codes, scales, zps = codes.T, scales.T, zps.T
    if qb.symmetric:  # signed codes around 0, no zero point input
        signed = codes.astype(np.int16) - zps.max()
        dtype = ir.DataType.INT4 if qb.bits == 4 else ir.DataType.INT8
        q = ir.tensor(signed.astype(np.int8), dtype=dtype, name=unique_name(graph, f"{base}_q{qb.bits}"))
        zp_v = None
    else:
        dtype = ir.DataType.UINT4 if qb.bits == 4 else ir.DataType.UINT8
        q = ir.tensor(codes.astype(np.uint8), dtype=dtype, name=unique_name(graph, f"{base}_q{qb.bits}"))
        zn = unique_name(graph, f"{base}_zero_point")
        zp_v = ir.Value(name=zn, shape=ir.Shape(zps.shape), type=ir.TensorType(dtype),
                        const_value=ir.tensor(zps.astype(np.uint8), dtype=dtype, name=zn))
        graph.register_initializer(zp_v)
    qv = ir.Value(name=q.name, shape=ir.Shape(q.shape), type=ir.TensorType(dtype), const_value=q)
    graph.register_initializer(qv)
    s = add_initializer(graph, f"{base}_scale", scales.astype(np.float32))
    inputs = [qv, s] + ([zp_v] if zp_v is not None else [])
    dq = ir.node("DequantizeLinear", inputs, {"axis": 0 if rows_first else 1, "block_size": qb.block},
                 name=unique_name(graph, f"{base}_DequantizeLinear"))
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(before, dq)
    return dq.outputs[0]


def rewrite(model: ir.Model, plan: Plan, config: QuantConfig,
            hessians: dict[str, np.ndarray] | None = None) -> RewriteResult:
    graph = model.graph
    result = RewriteResult()
    qdq_format = config.format == "qdq"
    if not qdq_format and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    for op in plan.ops:
        node = op.node
        name = node.name or node.outputs[0].name
        if node.op_type in ("Conv", "ConvTranspose"):
            w = const_array(node.inputs[1])
            q, scale, zp = qp.quantize_weight(w, op.weight_axis)
            node.replace_input_with(1, dequantized_initializer(graph, node.inputs[1].name, q, scale, zp, op.weight_axis, node))
            result.quantized_nodes.append(name)
            result.notes.append(f"{name}: {CONV_FALLBACK}")
            continue
        bits = bits_for(node, config)
        if op.kind == EMBEDDING:
            table = const_array(node.inputs[0])  # (rows, cols): blocks along cols
            qb = bw.quantize_blockwise(table.T, bits, config.block_size, config.symmetric)
            if qdq_format:
                node.replace_input_with(0, _qdq_blocked(graph, node.inputs[0].name, qb, 1, False, node))
            else:
                data = add_initializer(graph, f"{node.inputs[0].name}_q{bits}",
                              bw.pack(qb.q.reshape(qb.q.shape[0], -1)[:, : qb.k], bits))
                ins = [data, node.inputs[1], add_initializer(graph, f"{node.inputs[0].name}_scales", qb.scales)]
                if not config.symmetric:
                    ins.append(add_initializer(graph, f"{node.inputs[0].name}_zero_points", bw.pack(qb.zero_points, bits)))
                new = ir.node("GatherBlockQuantized", ins, {"gather_axis": 0, "quantize_axis": 1,
                              "block_size": config.block_size, "bits": bits}, domain=MS_DOMAIN,
                              name=unique_name(graph, f"{name}_int{bits}"))
                op.node = replace_node(graph, node, new)
            result.quantized_nodes.append(name)
            continue
        w = k_major_weight(node)
        h = (hessians or {}).get(op.inputs[0].name) if config.algorithm == "gptq" else None
        qb = gptq_blockwise(w, h, bits, config.block_size, config.symmetric) if h is not None \
            else bw.quantize_blockwise(w, bits, config.block_size, config.symmetric)
        if h is not None:
            result.gptq.append(name)
        k, n = w.shape
        if qdq_format:
            trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            node.replace_input_with(1, _qdq_blocked(graph, node.inputs[1].name, qb, 1 if trans_b else 0,
                                                    not trans_b, node))
            result.quantized_nodes.append(name)
            continue
        ins = [node.inputs[0], add_initializer(graph, f"{node.inputs[1].name}_q{bits}", bw.pack(qb.q, bits)),
               add_initializer(graph, f"{node.inputs[1].name}_scales", qb.scales.reshape(-1))]
        ins.append(None if config.symmetric else
                   add_initializer(graph, f"{node.inputs[1].name}_zero_points", bw.pack(qb.zero_points, bits).reshape(-1)))
        if node.op_type == "Gemm" and op.bias:
            ins += [None, node.inputs[2]]  # no g_idx, then the bias
        while ins[-1] is None:
            ins.pop()
        new = ir.node("MatMulNBits", ins, {"K": k, "N": n, "bits": bits, "block_size": config.block_size,
                      "accuracy_level": config.accuracy_level}, domain=MS_DOMAIN,
                      name=unique_name(graph, f"{name}_int{bits}"))
        op.node = replace_node(graph, node, new)
        result.quantized_nodes.append(name)
    drop_unused_initializers(graph)
    return result
