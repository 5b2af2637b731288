"""Weights inside control flow (If branches, Loop and Scan bodies) stored as int8.

onnxruntime can only expose main-graph tensors as outputs, so activations inside a subgraph
cannot be calibrated; their weights still dominate the file size of models built around a loop
(recurrent decoders, iterative refiners). Each constant weight of a MatMul, Gemm or Conv inside a
subgraph becomes symmetric int8 per output channel, dequantized in place by a DequantizeLinear in
the same subgraph: the file shrinks about 4x for those weights, the compute stays float.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.quantize.qparams import quantize_weight

WEIGHTED = ("MatMul", "Gemm", "Conv")
MIN_ELEMENTS = 256  # smaller constants (biases, shapes) are not worth a DequantizeLinear


@dataclass
class SubgraphWeight:
    node: str
    op_type: str
    graph: str
    per_channel_axis: int


def _subgraphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """Every graph nested in `graph`'s nodes, at any depth (not `graph` itself)."""
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                inner = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                inner = list(attr.value)
            else:
                continue
            for g in inner:
                yield g
                yield from _subgraphs(g)


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for g in [model.graph, *_subgraphs(model.graph)]:
        names.update(v.name for v in g.inputs if v.name)
        names.update(g.initializers)
        for node in g:
            names.update(v.name for v in node.outputs if v.name)
    return names


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The weight behind an initializer (of any enclosing graph) or a Constant node."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


def _weight_axis(node: ir.Node, w: np.ndarray) -> int | None:
    """The output-channel axis of the weight: Conv [M, C, k...] axis 0; MatMul [K, N] axis 1;
    Gemm by transB."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return w.ndim - 1 if w.ndim >= 2 else None


class _Names:
    def __init__(self, taken: set[str]):
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _const_node(graph: ir.Graph, before: ir.Node, array: np.ndarray, name: str) -> ir.Value:
    node = ir.node("Constant", inputs=[], attributes={"value": ir.tensor(array, name=name)}, outputs=[
        ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))])
    graph.insert_before(before, node)
    return node.outputs[0]


def quantize_weights(model: ir.Model) -> list[SubgraphWeight]:
    """Rewrite constant weights inside subgraphs to int8 + DequantizeLinear; returns what changed."""
    names = _Names(_all_names(model))
    done = []
    for graph in list(_subgraphs(model.graph)):
        for node in list(graph):
            if node.op_type not in WEIGHTED or len(node.inputs) < 2:
                continue
            w = _constant(node.inputs[1])
            if w is None or w.dtype != np.float32 or w.size < MIN_ELEMENTS or w.ndim < 2:
                continue
            axis = _weight_axis(node, w)
            q, scale, zp = quantize_weight(w, axis)
            base = (node.name or node.op_type).replace("/", "_").strip("_")
            wq = _const_node(graph, node, q, names(f"{base}_weight_int8"))
            sc = _const_node(graph, node, np.asarray(scale, np.float32), names(f"{base}_weight_scale"))
            z = _const_node(graph, node, np.asarray(zp, np.int8), names(f"{base}_weight_zero_point"))
            out = ir.Value(name=names(f"{base}_weight_dequantized"), shape=ir.Shape(w.shape),
                           type=ir.TensorType(ir.DataType.FLOAT))
            dq = ir.node("DequantizeLinear", inputs=[wq, sc, z], attributes={"axis": axis} if axis is not None else {},
                         outputs=[out])
            graph.insert_before(node, dq)
            old = node.inputs[1]
            node.replace_input_with(1, out)
            _drop_if_unused(old)
            done.append(SubgraphWeight(node.name or "", node.op_type, graph.name or "",
                                       axis if axis is not None else -1))
    return done


def _drop_if_unused(value: ir.Value) -> None:
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
        producer.graph.remove(producer, safe=True)
    elif value.graph is not None and value.name in value.graph.initializers and not value.is_graph_input():
        value.graph.initializers.pop(value.name)
