"""Dynamic int8: weights stored int8 (symmetric, per output column), activations quantized at run
time by onnxruntime's DynamicQuantizeMatMul kernel (com.microsoft). No calibration data needed.

MatMul and Gemm with constant weights are rewritten; Conv stays float (onnxruntime's dynamic
ConvInteger path is slower than float Conv on CPU), and so do activation x activation MatMuls.
"""

from __future__ import annotations

import onnx_ir as ir

from quantkit.graph.ir_edit import Editor
from quantkit.quantize import embedding
from quantkit.quantize.plan import OpKind, QuantizedOp, SchemeName
from quantkit.quantize.scheme import RewriteResult, Scheme

MS_DOMAIN = "com.microsoft"


class DynamicScheme(Scheme):
    name = SchemeName.DYNAMIC

    def refuse(self, op: QuantizedOp) -> str | None:
        node = op.node
        if op.kind == OpKind.EMBEDDING:
            return None
        if not op.weighted:
            return "dynamic int8 quantizes weights; activation x activation MatMul stays float"
        if node.op_type in ("Conv", "ConvTranspose"):
            return "dynamic int8 has no fast convolution kernel in onnxruntime; use static int8 for conv nets"
        if node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0 or (
                len(node.inputs) > 2 and node.inputs[2] is not None and not op.bias)):
            return "Gemm with alpha/beta != 1 or a non-vector C has no DynamicQuantizeMatMul form"
        return None

    def rewrite(self, model: ir.Model, ops: list[QuantizedOp], edit: Editor) -> RewriteResult:
        result = RewriteResult()
        if MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        cache: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        tables: dict[str, tuple[ir.Value, ir.Value]] = {}
        for op in ops:
            node = op.node
            if op.kind == OpKind.EMBEDDING:  # weight-only, one scale per row, as in static mode
                embedding.quantize_table(edit, node, tables, self.memo)
                result.quantized_nodes.append(node.name or "")
                continue
            new = self._matmul(edit, op, cache)
            result.quantized_nodes.append(node.name or new.outputs[0].name)
        return result

    def _matmul(self, edit: Editor, op: QuantizedOp, cache: dict) -> ir.Node:
        """MatMul/Gemm -> DynamicQuantizeMatMul with int8 (K, N) weights, shared by nodes that
        read the same weight the same way."""
        node, w_in = op.node, op.node.inputs[1]
        key = f"{w_in.name}/{node.op_type}/{node.attributes.get_int('transB', 0)}"
        if key not in cache:
            transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1  # read as (K, N)
            q, scale, zp = self.memo.quantize(w_in.const_value, 1 if self.config.per_channel else None, transposed)
            cache[key] = (edit.initializer(f"{w_in.name}_quantized", q), edit.initializer(f"{w_in.name}_scale", scale),
                          edit.initializer(f"{w_in.name}_zero_point", zp))
        inputs = [node.inputs[0], *cache[key]]
        if node.op_type == "Gemm" and op.bias:
            inputs.append(node.inputs[2])
        new = edit.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=f"{node.name or 'matmul'}_dynamic_int8")
        op.node = edit.replace_node(node, new)
        return new
