"""Constant parameters computed at run time (a bias reshaped to [1, C, 1, 1] by a Reshape of two
initializers, as Paddle exports it) folded into initializers, so pruning can slice them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor, const_array

FOLDABLE = ("Reshape", "Unsqueeze", "Squeeze", "Identity")


def _value(node: ir.Node, args: list[np.ndarray]) -> np.ndarray | None:
    x = args[0]
    if node.op_type == "Identity":
        return x
    if node.op_type == "Reshape":
        shape = [x.shape[i] if d == 0 and node.attributes.get_int("allowzero", 0) == 0 else int(d)
                 for i, d in enumerate(args[1].tolist())]
        return x.reshape(shape)
    axes = args[1].tolist() if len(args) > 1 else node.attributes.get_ints("axes", None)
    if node.op_type == "Squeeze":
        return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
    out = x
    for a in sorted(a % (x.ndim + len(axes)) for a in axes):
        out = np.expand_dims(out, a)
    return out


def fold_constant_shapes(model: ir.Model) -> int:
    """Replace every Reshape/Unsqueeze/Squeeze/Identity of initializers by an initializer."""
    editor, folded = Editor(model.graph), 0
    for node in list(model.graph):
        if node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        args = [const_array(v) for v in node.inputs if v is not None]
        if not args or any(a is None for a in args):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        value = editor.initializer(f"{out.name}_folded", np.ascontiguousarray(_value(node, args)))
        out.replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded
