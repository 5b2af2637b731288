"""The one edit layer: the helpers every pass and rewrite uses to change a graph.

Names come from one authority per edit: an `Editor` scans the graph it is made for and hands out
names not taken in it. Nothing is cached on the graph, so clones (the speed guard's candidates)
never see each other's names and the same placement always gets the same tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array behind an initializer, or None for anything computed at run time."""
    if value is None or value.const_value is None:
        return None
    if value.is_graph_input():  # an initializer that is also an input can be overridden by the user
        return None
    return value.const_value.numpy()


@dataclass(frozen=True)
class ConstSpec:
    """What a constant is, without its values: reading those of a weight kept on disk costs a
    read of the whole tensor, and deciding what to quantize needs only its type and shape."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def const_spec(value: ir.Value | None) -> ConstSpec | None:
    """The dtype and shape of an initializer (None exactly where const_array is None)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    t = value.const_value
    return ConstSpec(np.dtype(t.dtype.numpy()), tuple(int(d) for d in t.shape.numpy()))


def k_major_weight(node: ir.Node) -> np.ndarray:
    """A MatMul/Gemm weight as (K, N): MatMul's B, or Gemm's B transposed back when transB=1."""
    w = const_array(node.inputs[1])
    if w is None:
        raise ValueError(f"{node.op_type} {node.name!r} has no constant weight")
    return w.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1 else w


def bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    """For a MatMul, the Add right after it that adds a constant vector (torch's Linear bias):
    the Add and the index of its bias input."""
    users = node.outputs[0].uses()
    if len(users) != 1 or node.outputs[0].is_graph_output():
        return None
    add = next(iter(users)).node
    if add.op_type != "Add":
        return None
    other = 1 - next(iter(users)).idx
    b = const_array(add.inputs[other])
    return (add, other) if b is not None and b.ndim == 1 else None


def taken_names(graph: ir.Graph) -> set[str]:
    """Every value name in the graph and its subgraphs (initializers, inputs, node outputs)."""
    taken = set(graph.initializers)
    taken.update(v.name for v in graph.inputs if v.name)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        taken.update(o.name for o in node.outputs if o.name)
        if node.name:
            taken.add(node.name)
    return taken


def drop_unused(model: ir.Model) -> None:
    """Remove nodes and initializers nothing reads any more (e.g. float weights replaced by
    quantized copies); the graph's inputs and outputs are kept."""
    RemoveUnusedNodesPass()(model)


def with_outputs(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of the model whose outputs are exactly the tensors `names`, without the nodes they
    do not need (onnxruntime infers the types the copy's outputs lack)."""
    probe = model.clone()
    values = ir.convenience.create_value_mapping(probe.graph)
    probe.graph.outputs.clear()
    probe.graph.outputs.extend(values[n] for n in names)
    drop_unused(probe)
    return probe


class Editor:
    """Edits one graph; owns the names it hands out."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.taken = taken_names(graph)

    def name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`... whichever is free first."""
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray | ir.TensorProtocol,
                    dtype: ir.DataType | None = None) -> ir.Value:
        """A new initializer holding `array` (its dtype kept unless `dtype` says, e.g. INT4)."""
        name = self.name(base)
        tensor = ir.tensor(array, dtype=dtype, name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def node(self, op_type: str, inputs, attributes=None, *, domain: str = "", name: str,
             output: str | None = None) -> ir.Node:
        """A new node named from `name`, its (single) output named from `output` when given."""
        new = ir.node(op_type, inputs, attributes or {}, domain=domain, name=self.name(name))
        if output is not None:
            new.outputs[0].name = self.name(output)
        return new

    def replace_node(self, node: ir.Node, new: ir.Node) -> ir.Node:
        """Put `new` where `node` was: same output name, type and shape, every reader rewired."""
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], [new], node.outputs[:1], new.outputs[:1])
        return new

    def dequantized(self, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None,
                    before: ir.Node) -> ir.Value:
        """q (int8/uint8/int32) stored as an initializer behind a DequantizeLinear placed before
        `before`; returns the float output."""
        qv = self.initializer(f"{base}_quantized", q)
        s = self.initializer(f"{base}_scale", scale.astype(np.float32))
        z = self.initializer(f"{base}_zero_point", zp)
        attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
        dq = self.node("DequantizeLinear", [qv, s, z], attrs, name=f"{base}_DequantizeLinear",
                       output=f"{base}_dequantized")
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = ir.Shape(q.shape)
        self.graph.insert_before(before, dq)
        return dq.outputs[0]
