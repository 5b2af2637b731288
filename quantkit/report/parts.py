"""Graph outputs that concatenate several quantities are compared part by part.

A detector often writes one output that concatenates boxes and class scores (YOLOv8: [N, 4 + classes,
anchors], boxes in pixels up to the input size, scores in [0, 1]). Compared whole, the boxes hold
nearly all the power: nudenet's YOLOv8n keeps cosine 0.9996 and 30.9 dB over its output while its
score rows alone are at 16.7 dB and detections lose 8 F1 points. Each part of such an output is
therefore scored on its own, as if it were an output of its own: the placement's budget, the report
and the gates read every part.

A graph output is split when the node producing it is a Concat of two or more tensors whose sizes
along the concatenated axis are known from the graph (the parts are then fixed), and it has at least
three axes: a [batch, classes] output is a classifier's, whose top-1 agreement and labelled accuracy
need every class together. Any other output is one part, under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Part:
    label: str  # the output's name, or "name[:, a:b]" for a slice of a concatenated output
    output: int  # index of the graph output
    axis: int | None = None  # None: the whole output
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Parts:
    """The scored parts of a model's outputs, in output order."""

    parts: tuple[Part, ...]

    @property
    def names(self) -> list[str]:
        return [p.label for p in self.parts]

    @property
    def split_outputs(self) -> list[int]:
        return sorted({p.output for p in self.parts if p.axis is not None})

    def split(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The parts of the outputs `arrays` (one per graph output, in order)."""
        out = []
        for p in self.parts:
            a = arrays[p.output]
            if p.axis is None:
                out.append(a)
            else:
                index = [slice(None)] * a.ndim
                index[p.axis] = slice(p.start, p.stop)
                out.append(a[tuple(index)])
        return out

    @classmethod
    def whole(cls, count: int, names: list[str]) -> Parts:
        return cls(tuple(Part(names[i], i) for i in range(count)))


def output_parts(model: ir.Model, names: list[str]) -> Parts:
    """The parts of the graph outputs `names` (as a session lists them) of `model`."""
    outputs = {v.name: v for v in model.graph.outputs}
    parts: list[Part] = []
    for i, name in enumerate(names):
        pieces = _concat_pieces(outputs.get(name))
        if pieces is None:
            parts.append(Part(name, i))
            continue
        axis, sizes = pieces
        start = 0
        for size in sizes:
            parts.append(Part(f"{name}[{':, ' * axis}{start}:{start + size}]", i, axis, start, start + size))
            start += size
    return Parts(tuple(parts))


def _concat_pieces(value: ir.Value | None) -> tuple[int, list[int]] | None:
    """(axis, sizes) when `value` is a Concat of 2+ tensors with known sizes along a known axis."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    rank = len(value.shape) if value is not None and value.shape is not None else None
    attr = node.attributes.get("axis")
    if rank is None or rank < 3 or attr is None:
        return None
    axis = attr.as_int() % rank
    sizes = []
    for v in node.inputs:
        dim = v.shape[axis] if v is not None and v.shape is not None and len(v.shape) == rank else None
        if not isinstance(dim, int) or dim <= 0:
            return None
        sizes.append(dim)
    return axis, sizes
