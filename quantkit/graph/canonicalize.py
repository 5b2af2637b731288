"""Bring graphs from any exporter to one form before planning:
Constant nodes become initializers, BatchNormalization after Conv is folded into the Conv,
HardSwish spelled x * Clip(x + 3, 0, 6) / 6 becomes x * HardSigmoid(x) (graph/hardswish.py),
dead nodes are removed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
)

from quantkit.graph.hardswish import fuse_hardswish
from quantkit.graph.ir_edit import Editor, const_array

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                 "ConvInteger", "DynamicQuantizeLinear", "MatMulNBits", "QGemm"}


def lift_constants(model: ir.Model) -> int:
    before = sum(1 for n in model.graph if n.op_type == "Constant")
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    return before - sum(1 for n in model.graph if n.op_type == "Constant")


def fold_batchnorm(model: ir.Model) -> int:
    """Conv -> BatchNormalization (inference form, Conv output used only by it) becomes one Conv:
    W' = W * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps) + beta."""
    graph = model.graph
    edit = Editor(graph)
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain != "" or len(bn.outputs) != 1:
            continue
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain != "":
            continue
        conv_out = conv.outputs[0]
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            continue
        w = const_array(conv.inputs[1])
        params = [const_array(v) for v in bn.inputs[1:5]]
        if w is None or any(p is None for p in params) or w.dtype != np.float32:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        b = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and b is None:
            continue
        factor = gamma / np.sqrt(var + eps)
        new_w = (w.astype(np.float64) * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        new_b = ((bias - mean) * factor + beta).astype(np.float32)
        w_val = edit.initializer(f"{conv.inputs[1].name}_bnfolded", new_w)
        b_val = edit.initializer(f"{conv.name or conv_out.name}_bias_bnfolded", new_b)
        conv.replace_input_with(1, w_val)
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, b_val)
        bn_out = bn.outputs[0]
        if bn_out.is_graph_output():
            name = bn_out.name
            bn_out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
            bn_out.name = None
            conv_out.name = name
        else:
            bn_out.replace_all_uses_with(conv_out)
        graph.remove(bn, safe=True)
        folded += 1
    return folded


def _transposed(src: ir.TensorProtocol) -> ir.LazyTensor:
    """src.T computed when read and never kept: a weight left on disk stays there until quantized."""
    shape = ir.Shape(list(reversed(src.shape.numpy())))
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(src.numpy().T)), src.dtype, shape)


def fold_weight_transposes(model: ir.Model) -> int:
    """Transpose of a 2-D initializer (exporters write Linear layers as MatMul(x, Transpose(W)))
    becomes a transposed initializer, so the MatMul reads a constant weight."""
    edit, folded = Editor(model.graph), 0
    for node in list(model.graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get_ints("perm", None) if src is not None else None
        if src is None or const_array_shape(src) is None or (perm is not None and list(perm) != [1, 0]):
            continue
        value = ir.Value(name=edit.name(f"{src.name}_transposed"), type=src.type,
                         shape=ir.Shape(list(reversed(src.shape.numpy()))) if src.shape else None,
                         const_value=_transposed(src.const_value))
        model.graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def const_array_shape(v: ir.Value) -> tuple | None:
    """The shape of a 2-D float initializer the user cannot override, else None."""
    t = v.const_value
    if t is None or v.is_graph_input() or len(t.shape) != 2 or not t.dtype.is_floating_point():
        return None
    return tuple(t.shape.numpy())


def already_quantized(model: ir.Model) -> list[str]:
    return sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS})


def canonicalize(model: ir.Model) -> list[str]:
    """Run the passes in place; return one note per change for the report."""
    notes = []
    lifted = lift_constants(model)
    if lifted:
        notes.append(f"lifted {lifted} Constant node(s) to initializers")
    identities = sum(1 for n in model.graph if n.op_type == "Identity")
    IdentityEliminationPass()(model)
    removed = identities - sum(1 for n in model.graph if n.op_type == "Identity")
    if removed:
        notes.append(f"removed {removed} Identity node(s)")
    transposed = fold_weight_transposes(model)
    if transposed:
        notes.append(f"folded {transposed} Transpose node(s) of weights into transposed initializers")
    folded = fold_batchnorm(model)
    if folded:
        notes.append(f"folded {folded} BatchNormalization node(s) into the preceding Conv")
    hardswish = fuse_hardswish(model)
    if hardswish:
        notes.append(f"rewrote {hardswish} HardSwish spelled x * Clip(x + 3, 0, 6) / 6 as x * HardSigmoid(x) "
                     "(onnxruntime fuses it into the Conv before it)")
    RemoveUnusedNodesPass()(model)
    return notes
