"""Channel groups: the tensors that share one channel axis between weight layers.

A group starts at a producer layer's output (Conv, MatMul or Gemm with a constant weight) and
follows the channel through ops that carry it one to one (activations, bias adds, BatchNorm,
depthwise convs, pooling, gating multiplies) up to the consumer layers that contract it (a
Conv's input channels, a MatMul's K). Removing channel c means removing output c of every
producer, entry c of every per-channel constant on the way and input c of every consumer.
Anything else that touches the group (a residual Add, a Reshape, a graph output, a grouped
conv) makes the whole group unsafe; it is left whole with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import const_array

UNARY = {"Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "LeakyRelu", "Elu", "Selu",
         "Softplus", "Clip", "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Mish"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "PRelu"}
POOLS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool"}


@dataclass
class Group:
    """One channel space: C channels on axis `axis` (negative, counted from the end)."""

    channels: int
    axis: int
    producers: list[ir.Node] = field(default_factory=list)
    consumers: list[ir.Node] = field(default_factory=list)
    carriers: list[ir.Node] = field(default_factory=list)  # BatchNorm, depthwise Conv: sliced weights
    constants: list[ir.Value] = field(default_factory=list)  # per-channel operands of elementwise ops
    tensors: list[ir.Value] = field(default_factory=list)
    reason: str | None = None  # why the group cannot be pruned

    @property
    def name(self) -> str:
        return self.producers[0].name if self.producers else "?"


def _weight(node: ir.Node) -> np.ndarray | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    return const_array(node.inputs[1])


def _single_use(value: ir.Value | None) -> bool:
    return value is not None and len(value.uses()) == 1


def layer_axis(node: ir.Node) -> int | None:
    """The (negative) channel axis of a weight layer's output, or None if it is not one we prune."""
    w = _weight(node)
    if w is None or node.domain not in ("", "ai.onnx") or not _single_use(node.inputs[1]):
        return None
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1 and w.ndim >= 3:
        return 1 - w.ndim
    if node.op_type == "MatMul" and w.ndim == 2:
        return -1
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) == 0:
        return -1
    return None


def _channel_axes(node: ir.Node) -> tuple[int, int]:
    """The (output, input) channel axes of a Conv / MatMul / Gemm weight."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1):
        return 0, 1
    return 1, 0


def _out_channels(node: ir.Node) -> int:
    return _weight(node).shape[_channel_axes(node)[0]]


def in_channels(node: ir.Node) -> int:
    return _weight(node).shape[_channel_axes(node)[1]]


def _depthwise(node: ir.Node, c: int) -> bool:
    w = _weight(node)
    return (node.op_type == "Conv" and w is not None and _single_use(node.inputs[1])
            and node.attributes.get_int("group", 1) == c and w.shape[0] == c and w.shape[1] == 1)


def _channel_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < -axis:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


class _Walk:
    """Breadth-first over the tensors of one group, in both directions."""

    def __init__(self, start: ir.Node, graph: ir.Graph):
        self.graph_outputs = {id(v) for v in graph.outputs}
        axis = layer_axis(start)
        self.group = Group(_out_channels(start), axis, producers=[start])
        self.seen: set[int] = set()
        self.nodes: set[int] = {id(start)}
        self.todo = [start.outputs[0]]

    def run(self) -> Group:
        while self.todo and self.group.reason is None:
            value = self.todo.pop()
            if id(value) in self.seen:
                continue
            self.seen.add(id(value))
            self.group.tensors.append(value)
            self._visit(value)
        return self.group

    def fail(self, why: str) -> None:
        if self.group.reason is None:
            self.group.reason = why

    def _visit(self, value: ir.Value) -> None:
        if id(value) in self.graph_outputs:
            return self.fail(f"tensor {value.name} is a graph output")
        producer = value.producer()
        if producer is None:
            return self.fail(f"tensor {value.name} is a graph input or constant")
        self._node(producer, value)
        for use in value.uses():
            self._node(use.node, value)

    def _node(self, node: ir.Node, via: ir.Value) -> None:
        if id(node) in self.nodes:
            return
        g = self.group
        role = self._role(node, via)
        if isinstance(role, str):
            return self.fail(role)
        self.nodes.add(id(node))
        kind, joins = role
        {"producer": g.producers, "consumer": g.consumers, "carrier": g.carriers, "elementwise": []}[kind].append(node)
        self.todo.extend(joins)

    def _role(self, node: ir.Node, via: ir.Value):
        """('producer'|'consumer'|'carrier'|'elementwise', tensors joining the group) or a reason."""
        g, op = self.group, node.op_type
        label = f"{op} {node.name}"
        if node.domain not in ("", "ai.onnx"):
            return f"touched by {node.domain}.{label}"
        produced = via.producer() is node
        if op in ("Conv", "MatMul", "Gemm") and layer_axis(node) == g.axis:
            if produced and _out_channels(node) == g.channels:
                return "producer", []
            if not produced and node.inputs[0] is via and in_channels(node) == g.channels:
                return "consumer", []
        if op == "Conv" and _depthwise(node, g.channels) and g.axis == 1 - _weight(node).ndim:
            return "carrier", [node.inputs[0], node.outputs[0]]
        rank = len(via.shape) if via.shape is not None else None
        nchw = rank is not None and g.axis == 1 - rank
        if op == "BatchNormalization" and nchw and len(node.outputs) == 1 and all(
                const_array(v) is not None and _single_use(v) for v in node.inputs[1:5]):
            return "carrier", [node.inputs[0], node.outputs[0]]
        if op in POOLS and nchw and node.inputs[0] is via and len(node.outputs) == 1:
            return "elementwise", [node.inputs[0], node.outputs[0]]
        if op in UNARY or op in BINARY:
            return self._elementwise(node, label)
        return f"consumed by {label}"

    def _elementwise(self, node: ir.Node, label: str):
        g = self.group
        joins = [node.outputs[0]]
        for operand in node.inputs:
            if operand is None:
                continue
            const = const_array(operand)
            if const is not None:
                if const.ndim >= -g.axis and const.shape[g.axis] == g.channels and const.size > 1:
                    if not _single_use(operand):
                        return f"per-channel constant of {label} is shared"
                    if const.size != g.channels:
                        return f"constant of {label} varies along more than the channel axis"
                    g.constants.append(operand)
                elif const.size != 1:
                    return f"constant of {label} does not broadcast per channel"
                continue
            dim = _channel_dim(operand, g.axis)
            if dim == 1:
                continue  # broadcast along the channel axis (e.g. a spatial gate)
            # two computed tensors summed on the pruned axis: a residual connection
            if node.op_type in ("Add", "Sub") and id(operand) not in self.seen \
                    and any(id(v) in self.seen for v in node.inputs if v is not None):
                return f"residual {label} adds another branch on the pruned axis"
            joins.append(operand)
        return "elementwise", joins


def find_groups(model: ir.Model) -> list[Group]:
    """Every channel group of the graph, prunable or not (those have `reason` set)."""
    groups: list[Group] = []
    covered: set = set()
    for node in model.graph:
        if id(node) in covered or layer_axis(node) is None:
            continue
        group = _Walk(node, model.graph).run()
        covered.update(id(p) for p in group.producers)
        groups.append(group)
    return groups
