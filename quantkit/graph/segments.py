"""Running a model in consecutive segments, each exposing the tensors asked of it.

The sensitivity step (quantize/budget.py) looks at every quantized op's tensors, a chunk of ops at a
time so that one batch of them fits in memory. Exposing a chunk's tensors from the graph inputs reruns
every node before the chunk, so a model cut into many chunks (a CNN's feature maps fill the budget after
a few ops) reran its early layers once per chunk. A Pipeline instead gives segment k only the nodes no
earlier segment computed: its inputs are the tensors earlier segments passed on (those that nodes still
to come read), kept for the current batch only and dropped once nothing later reads them.

A segment is built while the first batch runs, so the arrays passed on to it say its inputs' types.
A tensor an earlier segment computed but did not keep (or kept as a sequence, a list) is computed again
from what was kept. Graphs with subgraphs (If/Loop bodies may read any outer tensor) keep nothing: their
segments are built the old way, from the graph inputs.
Nodes computed from initializers only (a weight's DequantizeLinear, Constants) are recomputed by every
segment that needs them, as in the whole model: passed on, onnxruntime could not fuse what reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import drop_unused, with_outputs

_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                     "Multinomial"})  # computed once per run: the whole model's draws are passed on


@dataclass
class Segment:
    session: Any
    inputs: list[str]  # what the session reads: graph inputs fed per batch, tensors earlier segments kept
    outputs: list[str]  # what it computes: asked tensors, then tensors passed on
    kept: list[str]  # of the outputs, those later segments read
    asked: list[str]  # the tensors asked of this segment (computed here, or kept by earlier ones, or fed)
    freed: list[str] = field(default_factory=list)  # kept tensors nothing after this segment reads


class Pipeline:
    """Segments of one model, run in order on a batch: `add` builds the next segment (during the first
    batch), `run` runs segment i on a batch given what the earlier ones kept of it (`kept`, updated)."""

    def __init__(self, model: ir.Model, session: Callable[[ir.Model], Any]) -> None:
        self.model = model
        self.session = session
        self.nodes = list(model.graph)
        self.produced = {v.name: v for n in self.nodes for v in n.outputs if v.name}
        # the inputs a feed gives: an initializer also listed as an input is read from the model
        self.graph_inputs = {v.name for v in model.graph.inputs if v.name and v.const_value is None}
        self.segmented = not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                 for n in model.graph.all_nodes() for a in n.attributes.values())
        self.done: set[int] = set()  # ids of the nodes earlier segments computed
        # recomputed by every segment needing them, never passed on: nodes of initializers only, and every
        # DequantizeLinear (onnxruntime fuses it into what reads it; the int8 tensor it reads is passed on)
        self.constant = self._constant_nodes() | {id(n) for n in self.nodes if n.op_type == "DequantizeLinear"}
        self.segments: list[Segment] = []

    def add(self, names: list[str], kept: Mapping[str, np.ndarray]) -> int:
        """A segment computing the tensors `names` (those the model computes or is fed) from what earlier
        segments `kept` of the current batch (their arrays type its inputs). Returns its index."""
        names = [n for n in names if n in self.produced or n in self.graph_inputs]
        nodes, boundary = self._nodes(names, kept)
        ids = {id(n) for n in nodes}
        self.done |= ids
        later = [v.name for n in nodes if id(n) not in self.constant  # a constant's is recomputed where needed
                 for v in n.outputs if v.name and not self._spent(v.name)] \
            if self.segmented else []  # with subgraphs every segment runs from the graph inputs: none is read
        computed = [n for n in names if n in self.produced and id(self.produced[n].producer()) in ids]
        outputs = list(dict.fromkeys([*computed, *later]))
        sess = self.session(self._cut(nodes, boundary, outputs, kept)) if outputs else None
        inputs = [i.name for i in sess.get_inputs()] if sess is not None else []
        freed = [k for k in [*kept, *later] if self._spent(k)]
        self.segments.append(Segment(sess, inputs, outputs, later, names, freed))
        return len(self.segments) - 1

    def run(self, i: int, feed: Mapping[str, np.ndarray], kept: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Segment i on one batch: the asked tensors; `kept` gains what later segments read and loses
        what none does any more."""
        s = self.segments[i]
        values = dict(zip(s.outputs, s.session.run(s.outputs, {n: kept[n] if n in kept else feed[n]
                                                                for n in s.inputs}))) if s.session else {}
        asked = {n: values[n] if n in values else kept[n] if n in kept else feed[n] for n in s.asked}
        kept.update((n, values[n]) for n in s.kept)
        for n in s.freed:
            kept.pop(n, None)
        return asked

    def _nodes(self, names: list[str], kept: Mapping[str, np.ndarray]) -> tuple[list[ir.Node], list[str]]:
        """The nodes a segment runs and the tensors it reads from earlier segments: every node the asked
        tensors need, up to the tensors earlier segments kept of the current batch. A tensor an earlier
        segment computed but did not keep (or kept as a sequence, a list: it cannot type an input) is
        computed again from what was kept; with subgraphs nothing is kept, so all runs from the inputs."""
        usable = {n for n, a in kept.items() if isinstance(a, np.ndarray)}
        want: set[int] = set()
        stack = [p for n in names if n not in kept and n in self.produced and
                 (p := self.produced[n].producer()) is not None]
        while stack:
            node = stack.pop()
            if id(node) in want:
                continue
            want.add(id(node))
            stack.extend(p for v in node.inputs if v is not None and v.name not in usable
                         and (p := v.producer()) is not None)
        nodes = [n for n in self.nodes if id(n) in want]
        boundary = sorted({v.name for n in nodes for v in n.inputs if v is not None and v.name in usable
                           and id(self.produced[v.name].producer()) not in want})
        return nodes, boundary

    def _spent(self, name: str) -> bool:
        """Whether every node reading the tensor has been computed (one that is recomputed where needed,
        with every node reading its outputs)."""
        return all(id(u.node) in self.done and (id(u.node) not in self.constant
                                                or all(self._spent(o.name) for o in u.node.outputs if o.name))
                   for u in self.produced[name].uses())

    def _constant_nodes(self) -> set[int]:
        """Ids of the nodes computed from initializers only (a weight's DequantizeLinear, a Constant): fed
        to a segment as a computed input, onnxruntime would no longer fold or fuse them (DQ -> MatMul is its
        integer MatMul), and the segment's tensors would differ from the whole model's."""
        constant: set[int] = set()
        for node in self.nodes:
            if node.op_type not in _RANDOM and all(v is None or id(v.producer()) in constant or (
                    v.producer() is None and v.const_value is not None and not v.is_graph_input())
                    for v in node.inputs):
                constant.add(id(node))
        return constant

    def _cut(self, nodes: list[ir.Node], boundary: list[str], outputs: list[str],
             kept: Mapping[str, np.ndarray]) -> ir.Model:
        """A copy holding `nodes` only, reading the `boundary` tensors as graph inputs."""
        if not boundary:  # from the graph inputs: the nodes the outputs need, as the old way made it
            return with_outputs(self.model, outputs)
        copy = self.model.clone()
        index = {id(n): i for i, n in enumerate(self.nodes)}
        cloned = list(copy.graph)
        keep = {id(cloned[index[id(n)]]) for n in nodes}
        values = ir.convenience.create_value_mapping(copy.graph)
        copy.graph.outputs.clear()  # first: a kept tensor may be a graph output, whose uses cannot be replaced
        fed = []
        for name in boundary:
            a = kept[name]
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                             shape=ir.Shape([None] * a.ndim))
            values[name].replace_all_uses_with(value)
            fed.append(value)
        copy.graph.outputs.extend(values[n] for n in outputs)
        copy.graph.remove([n for n in reversed(cloned) if id(n) not in keep], safe=True)
        used = {v.name for n in copy.graph for v in n.inputs if v is not None}
        inputs = [v for v in copy.graph.inputs if v.name in used] + fed
        copy.graph.inputs.clear()
        copy.graph.inputs.extend(inputs)
        drop_unused(copy)
        return copy
