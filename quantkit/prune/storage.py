"""Sparse weights stored so their zeros cost (close to) nothing, in a file onnxruntime loads as is.

ONNX has `sparse_initializer` (COO), but its indices are int64: 8 bytes per kept weight, more
than a dense int8 or int4 weight costs. Instead a mostly-`fill` initializer (the code of zero: 0
for int8, 8 for symmetric int4 nibbles) is stored as a bitmask of the other positions (1 bit per
element) plus the other values, and rebuilt by a chain of standard ops whose inputs are all
initializers:

    mask  = (bytes / 2^j) mod 2 for j in 0..7          (one bit per element)
    index = CumSum(mask) - 1                           (position of each element among the kept)
    dense = Where(mask, Gather(values, index), fill)   (then reshaped, nibbles re-packed)

onnxruntime's constant folding (on at its default optimization level) evaluates the chain once
when the session is created, so the running graph holds the same dense initializer as before.
All arithmetic is int32 (opset 11 ops only); nibble-packed int4 (MatMulNBits, GatherBlockQuantized)
is unpacked to codes, masked per code, and re-packed by the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor, const_array

MIN_ELEMENTS = 2048  # smaller tensors are not worth the ~20 decode nodes
MIN_FILL = 0.35  # store sparse when at least this fraction of the elements is the fill value
NIBBLE_INPUTS = {("com.microsoft", "MatMulNBits"): 1, ("com.microsoft", "GatherBlockQuantized"): 0}
SCALE_INPUTS = {("com.microsoft", "MatMulNBits"): 2, ("com.microsoft", "GatherBlockQuantized"): 2}


@dataclass
class Encoded:
    """One tensor in its sparse form: codes (bytes or nibbles) where mask is set, fill elsewhere."""

    mask: np.ndarray  # uint8, bits packed little-endian, one per code
    values: np.ndarray  # uint8/int8... or nibble pairs packed in uint8
    fill: int | float
    count: int  # number of codes (elements, or nibbles)
    nibbles: bool


def codes(array: np.ndarray, nibbles: bool) -> np.ndarray:
    """The flat codes of a tensor: its elements, or the two 4-bit halves of each byte (low first)."""
    flat = array.reshape(-1)
    if not nibbles:
        return flat
    return np.stack([flat & 0x0F, flat >> 4], axis=1).reshape(-1)


def encode(array: np.ndarray, nibbles: bool) -> Encoded | None:
    """The sparse form of `array`, or None when too few codes share one value."""
    c = codes(array, nibbles)
    values, counts = np.unique(c, return_counts=True)
    fill = values[np.argmax(counts)]
    if counts.max() < MIN_FILL * len(c):
        return None
    keep = c != fill
    kept = c[keep]
    if nibbles:
        kept = np.concatenate([kept, np.zeros(len(kept) % 2, kept.dtype)]).reshape(-1, 2)
        kept = (kept[:, 0] | (kept[:, 1] << 4)).astype(np.uint8)
    return Encoded(np.packbits(keep, bitorder="little"), kept, fill.item(), len(c), nibbles)


def decode(e: Encoded, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The numpy twin of the decode chain (what onnxruntime computes), for tests."""
    mask = np.unpackbits(e.mask, bitorder="little")[:e.count].astype(bool)
    kept = codes(e.values, True) if e.nibbles else e.values
    out = np.full(e.count, e.fill, dtype=np.int32 if e.nibbles else dtype)
    out[mask] = kept[:mask.sum()]
    if e.nibbles:
        pairs = out.reshape(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).reshape(shape)
    return out.reshape(shape)


class _Chain:
    """Emits the decode nodes of one tensor before its first reader."""

    def __init__(self, editor: Editor, graph: ir.Graph, base: str, shared: dict):
        self.editor, self.graph, self.base, self.shared = editor, graph, base, shared
        self.nodes: list[ir.Node] = []

    def const(self, suffix: str, array) -> ir.Value:
        """A small constant, one initializer per distinct value for all chains (fewer names in
        the file); the per-tensor data (mask, values, shape) gets its own."""
        array = np.asarray(array)
        if suffix in ("mask", "values", "count", "shape"):
            return self.editor.initializer(f"{self.base}_{suffix}", array)
        key = (suffix, array.dtype.str, array.shape, array.tobytes())
        if key not in self.shared:
            self.shared[key] = self.editor.initializer(f"sparse_decode_{suffix}", array)
        return self.shared[key]

    def op(self, op_type: str, inputs, attributes=None) -> ir.Value:
        node = self.editor.node(op_type, inputs, attributes, name=f"{self.base}_{len(self.nodes)}",
                                output=f"{self.base}_{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs[0]

    def unpack(self, packed: ir.Value, parts: int) -> ir.Value:
        """[m] uint8 -> [m * parts] int32 digits in base 256 ** (1 / parts), lowest first."""
        radix = 2 if parts == 8 else 16
        as_int = self.op("Cast", [packed], {"to": ir.DataType.INT32})
        col = self.op("Unsqueeze", [as_int, self.const("axis1", np.array([1], np.int64))])
        shifted = self.op("Div", [col, self.const(f"pow{parts}", (radix ** np.arange(parts)).astype(np.int32))])
        digits = self.op("Mod", [shifted, self.const(f"radix{parts}", np.int32(radix))])
        return self.op("Reshape", [digits, self.const("flat", np.array([-1], np.int64))])

    def build(self, e: Encoded, shape: tuple[int, ...], dtype: ir.DataType) -> ir.Value:
        n = self.const("count", np.array([e.count], np.int64))
        zero = self.const("zero", np.array([0], np.int64))
        mask_int = self.op("Slice", [self.unpack(self.const("mask", e.mask), 8), zero, n])
        mask = self.op("Cast", [mask_int], {"to": ir.DataType.BOOL})
        index = self.op("Sub", [self.op("CumSum", [mask_int, self.const("axis0", np.int64(0))]),
                                self.const("one", np.int32(1))])
        values = self.unpack(self.const("values", e.values), 2) if e.nibbles else self.const("values", e.values)
        gathered = self.op("Gather", [values, index])
        fill = np.array(e.fill, np.int32 if e.nibbles else e.values.dtype)
        dense = self.op("Where", [mask, gathered, self.const("fill", fill)])
        if e.nibbles:
            pairs = self.op("Reshape", [dense, self.const("pairs", np.array([-1, 2], np.int64))])
            packed = self.op("MatMul", [self.op("Cast", [pairs], {"to": ir.DataType.FLOAT}),
                                        self.const("weights", np.array([[1.0], [16.0]], np.float32))])
            dense = self.op("Cast", [packed], {"to": dtype})
        return self.op("Reshape", [dense, self.const("shape", np.array(shape, np.int64))])


def _nibble_tensors(graph: ir.Graph) -> set[str]:
    out = set()
    for node in graph:
        i = NIBBLE_INPUTS.get((node.domain, node.op_type))
        if i is not None and node.inputs[i] is not None:
            out.add(node.inputs[i].name)
    return out


def _half_scales(graph: ir.Graph, editor: Editor) -> list[dict]:
    """The float32 block scales of int4 weights stored as float16 and cast back when the model
    loads (a relative change of at most 2^-11 per scale, far below the int4 step): with half of
    the int4 codes gone, the scales would otherwise be a third of what is left."""
    records: list[dict] = []
    for node in list(graph):
        i = SCALE_INPUTS.get((node.domain, node.op_type))
        v = node.inputs[i] if i is not None and len(node.inputs) > i else None
        s = const_array(v)
        if s is None or s.dtype != np.float32 or s.size < 64 or len(v.uses()) != 1 \
                or not np.all(np.isfinite(s.astype(np.float16))):
            continue
        half = editor.initializer(f"{v.name}_fp16", s.astype(np.float16))
        tag = f"h{len(records)}"
        cast = editor.node("Cast", [half], {"to": ir.DataType.FLOAT}, name=tag, output=tag)
        graph.insert_before(node, cast)
        node.replace_input_with(i, cast.outputs[0])
        graph.initializers.pop(v.name)
        records.append({"tensor": v.name, "dense_bytes": int(s.nbytes), "stored_bytes": int(s.nbytes // 2),
                        "fill_fraction": None})
    return records


def store_sparse(model: ir.Model) -> list[dict]:
    """Every large mostly-fill initializer of the graph replaced by its decode chain (and the
    block scales of int4 weights halved); returns per tensor its dense and stored bytes."""
    graph, editor = model.graph, Editor(model.graph)
    nibbles, records = _nibble_tensors(graph), _half_scales(graph, editor)
    shared: dict = {}
    for value in list(graph.initializers.values()):
        array = const_array(value)
        if array is None or array.size < MIN_ELEMENTS or array.dtype.kind not in "iuf" or not value.uses():
            continue
        packed = value.name in nibbles
        if packed and array.dtype != np.uint8:
            continue
        e = encode(array, packed)
        if e is None or e.mask.nbytes + e.values.nbytes >= 0.9 * array.nbytes:
            continue
        chain = _Chain(editor, graph, f"s{len(records)}", shared)  # short names: ~20 nodes per tensor
        dense = chain.build(e, array.shape, value.const_value.dtype)
        order = {id(n): i for i, n in enumerate(graph)}
        first = min((u.node for u in value.uses()), key=lambda n: order[id(n)])
        value.replace_all_uses_with(dense)
        graph.insert_before(first, chain.nodes)
        graph.initializers.pop(value.name)
        kept = int(np.unpackbits(e.mask, bitorder="little")[:e.count].sum())
        records.append({"tensor": value.name, "dense_bytes": int(array.nbytes),
                        "stored_bytes": int(e.mask.nbytes + e.values.nbytes),
                        "fill_fraction": round(1 - kept / e.count, 4)})
    return records


def summarize(records: list[dict]) -> dict:
    """The report's view of the sparse storage: totals and each tensor."""
    dense = sum(r["dense_bytes"] for r in records)
    stored = sum(r["stored_bytes"] for r in records)
    return {"format": "bitmask + kept values, rebuilt by standard ops that onnxruntime constant-folds at load",
            "tensors": len(records), "dense_bytes": dense, "stored_bytes": stored, "by_tensor": records}
