"""Sparse weights stored so their zeros cost (close to) nothing, in a file onnxruntime loads as is.

ONNX has `sparse_initializer` (COO), but its indices are int64: 8 bytes per kept weight, more
than a dense int8 or int4 weight costs. Instead mostly-`fill` initializers (the code of zero: 0
for int8, 8 for symmetric int4 nibbles) are stored as a bitmask of the other positions (1 bit per
element) plus the other values, and rebuilt by a chain of standard ops whose inputs are all
initializers:

    mask  = (bytes / 2^j) mod 2 for j in 0..7          (one bit per element)
    index = CumSum(mask) - 1                           (position of each element among the kept)
    dense = Where(mask, Gather(values, index), fill)   (nibbles re-packed, then one Slice and
                                                        Reshape per tensor)

Tensors of one kind (same dtype, fill, packing) share one chain: their codes are concatenated up
to MAX_CODES, which keeps the ~20 decode nodes from costing more than the zeros save and bounds
the memory onnxruntime needs to rebuild them. onnxruntime's constant folding (on at its default
optimization level) evaluates the chains once when the session is created, so the running graph
holds the same dense initializers as before. All arithmetic is int32 (opset 11 ops only);
nibble-packed int4 (MatMulNBits, GatherBlockQuantized) is unpacked to codes, masked per code, and
re-packed by the chain.

The float32 block scales of the int4 weights are stored as 8-bit codes on a per-tensor log grid
(second-level quantization of the scales, as in QLoRA's double quantization) when that grid is
fine enough, else as float16; see `compact_scales`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.graph.ir_edit import Editor, const_array

MIN_ELEMENTS = 2048  # smaller tensors are not worth storing sparse
MIN_FILL = 0.35  # store sparse when at least this fraction of the elements is the fill value
MAX_CODES = 1 << 24  # codes rebuilt by one decode chain (its int32 intermediates: 64 MB each at load)
SCALE_REL_ERROR = 2.0 ** -7  # largest relative change of a block scale stored on the 8-bit log grid
NIBBLE_INPUTS = {("com.microsoft", "MatMulNBits"): 1, ("com.microsoft", "GatherBlockQuantized"): 0}
SCALE_INPUTS = {("com.microsoft", "MatMulNBits"): 2, ("com.microsoft", "GatherBlockQuantized"): 2}


@dataclass
class Encoded:
    """Codes (bytes or nibbles) in sparse form: the kept ones where mask is set, fill elsewhere."""

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


def _mode(c: np.ndarray) -> tuple[int | float, int]:
    values, counts = np.unique(c, return_counts=True)
    return values[np.argmax(counts)].item(), int(counts.max())


def encode(array: np.ndarray, nibbles: bool) -> Encoded | None:
    """The sparse form of `array`, or None when too few codes share one value."""
    c = codes(array, nibbles)
    fill, count = _mode(c)
    return encode_codes(c, fill, nibbles) if count >= MIN_FILL * len(c) else None


def encode_codes(c: np.ndarray, fill: int | float, nibbles: bool) -> Encoded:
    """The sparse form of the flat codes `c` with the given fill value."""
    keep = c != fill
    kept = c[keep]
    if nibbles:
        kept = np.concatenate([kept, np.zeros(len(kept) % 2, kept.dtype)]).reshape(-1, 2)
        kept = (kept[:, 0] | (kept[:, 1] << 4)).astype(np.uint8)
    return Encoded(np.packbits(keep, bitorder="little"), kept, fill, len(c), nibbles)


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


@dataclass
class Member:
    """One initializer that a decode chain rebuilds."""

    value: ir.Value
    array: np.ndarray
    codes: np.ndarray
    fill: int | float
    nibbles: bool

    @property
    def key(self) -> tuple:
        return self.nibbles, self.array.dtype.str, self.fill

    def record(self) -> dict:
        kept = int(np.count_nonzero(self.codes != self.fill))
        values = (kept + 1) // 2 if self.nibbles else kept * self.array.itemsize
        return {"tensor": self.value.name, "dense_bytes": int(self.array.nbytes),
                "stored_bytes": int((len(self.codes) + 7) // 8 + values),
                "fill_fraction": round(1 - kept / len(self.codes), 4)}


def _member(value: ir.Value, nibbles: set[str]) -> Member | None:
    """The initializer as a chain member, or None when storing it sparse does not pay."""
    array = const_array(value)
    if array is None or array.size < MIN_ELEMENTS or array.dtype.kind not in "iuf" or not value.uses():
        return None
    packed = value.name in nibbles
    if packed and array.dtype != np.uint8:
        return None
    c = codes(array, packed)
    fill, count = _mode(c)
    m = Member(value, array, c, fill, packed)
    if count < MIN_FILL * len(c) or m.record()["stored_bytes"] >= 0.9 * array.nbytes:
        return None
    return m


def _chunks(members: list[Member]) -> list[list[Member]]:
    """Members of one kind, concatenated in order up to MAX_CODES codes per chain."""
    out: list[list[Member]] = []
    by_key: dict[tuple, list[Member]] = {}
    for m in members:
        chunk = by_key.get(m.key)
        if chunk is None or sum(len(x.codes) for x in chunk) + len(m.codes) > MAX_CODES:
            chunk = by_key[m.key] = []
            out.append(chunk)
        chunk.append(m)
    return out


class _Chain:
    """Emits the nodes that rebuild one chunk of members, before the first reader of any."""

    def __init__(self, editor: Editor, base: str, shared: dict):
        self.editor, self.base, self.shared = editor, base, shared
        self.nodes: list[ir.Node] = []

    def const(self, suffix: str, array, own: bool = False) -> ir.Value:
        """A constant: the chunk's own data (mask, values, offsets, shapes) gets its own
        initializer; the small shared constants one per distinct value for all chains."""
        array = np.asarray(array)
        if own:
            return self.editor.initializer(f"{self.base}_{suffix}", array)
        key = (suffix, array.dtype.str, array.shape, array.tobytes())
        if key not in self.shared:
            self.shared[key] = self.editor.initializer(f"sparse_decode_{suffix}", array)
        return self.shared[key]

    def op(self, op_type: str, inputs, attributes=None) -> ir.Value:
        tag = f"{self.base}_{len(self.nodes)}"
        node = self.editor.node(op_type, inputs, attributes, name=tag, output=tag)
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

    def flat(self, e: Encoded, dtype: ir.DataType) -> ir.Value:
        """The chunk's dense elements (bytes for nibble-packed tensors), flat."""
        n = self.const("count", np.array([e.count], np.int64), own=True)
        zero = self.const("zero", np.array([0], np.int64))
        mask_int = self.op("Slice", [self.unpack(self.const("mask", e.mask, own=True), 8), zero, n])
        mask = self.op("Cast", [mask_int], {"to": ir.DataType.BOOL})
        index = self.op("Sub", [self.op("CumSum", [mask_int, self.const("axis0", np.int64(0))]),
                                self.const("one", np.int32(1))])
        stored = self.const("values", e.values, own=True)
        values = self.unpack(stored, 2) if e.nibbles else stored
        gathered = self.op("Gather", [values, index])
        fill = np.array(e.fill, np.int32 if e.nibbles else e.values.dtype)
        dense = self.op("Where", [mask, gathered, self.const("fill", fill)])
        if not e.nibbles:
            return dense
        pairs = self.op("Reshape", [dense, self.const("pairs", np.array([-1, 2], np.int64))])
        packed = self.op("MatMul", [self.op("Cast", [pairs], {"to": ir.DataType.FLOAT}),
                                    self.const("weights", np.array([[1.0], [16.0]], np.float32))])
        as_bytes = self.op("Cast", [packed], {"to": dtype})
        return self.op("Reshape", [as_bytes, self.const("flat", np.array([-1], np.int64))])

    def member(self, flat: ir.Value, i: int, start: int, stop: int, shape: tuple[int, ...]) -> ir.Value:
        """Elements start:stop of the chunk in the member's shape."""
        begin = self.const(f"{i}_b", np.array([start], np.int64), own=True)
        end = self.const(f"{i}_e", np.array([stop], np.int64), own=True)
        part = self.op("Slice", [flat, begin, end])
        return self.op("Reshape", [part, self.const(f"{i}_shape", np.array(shape, np.int64), own=True)])


def _store_chunk(graph: ir.Graph, editor: Editor, chunk: list[Member], base: str, shared: dict) -> None:
    """Replace the chunk's initializers by one decode chain, placed before their first reader."""
    first = chunk[0]
    e = encode_codes(np.concatenate([m.codes for m in chunk]), first.fill, first.nibbles)
    chain = _Chain(editor, base, shared)
    flat = chain.flat(e, first.value.const_value.dtype)
    start = 0
    order = {id(n): i for i, n in enumerate(graph)}
    readers = [u.node for m in chunk for u in m.value.uses()]
    for i, m in enumerate(chunk):
        stop = start + m.array.size
        m.value.replace_all_uses_with(chain.member(flat, i, start, stop, m.array.shape))
        graph.initializers.pop(m.value.name)
        start = stop
    graph.insert_before(min(readers, key=lambda n: order[id(n)]), chain.nodes)


def store_sparse(model: ir.Model) -> list[dict]:
    """Every large mostly-fill initializer of the graph replaced by a decode chain (and the
    block scales of int4 weights compacted); returns per tensor its dense and stored bytes."""
    graph, editor = model.graph, Editor(model.graph)
    nibbles, records = _nibble_tensors(graph), compact_scales(graph, editor)
    members = [m for m in (_member(v, nibbles) for v in list(graph.initializers.values())) if m is not None]
    shared: dict = {}
    for i, chunk in enumerate(_chunks(members)):
        records += [m.record() for m in chunk]
        _store_chunk(graph, editor, chunk, f"s{i}", shared)  # short names: they are stored once per node
    return records


def _nibble_tensors(graph: ir.Graph) -> set[str]:
    out = set()
    for node in graph:
        i = NIBBLE_INPUTS.get((node.domain, node.op_type))
        if i is not None and node.inputs[i] is not None:
            out.add(node.inputs[i].name)
    return out


def log_grid(s: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """Magnitudes |s| as 8-bit codes k with |s| ~ exp(lo + k * step), 256 steps from the smallest
    to the largest; None when a scale is zero or not finite, or when a step would change a scale
    by more than SCALE_REL_ERROR (the grid's worst case is half a step: exp(step / 2) - 1)."""
    a = np.abs(s.astype(np.float64))
    if a.size == 0 or not np.all(np.isfinite(a)) or a.min() <= 0:
        return None
    logs = np.log(a)
    lo, hi = float(logs.min()), float(logs.max())
    step = (hi - lo) / 255
    if np.expm1(step / 2) > SCALE_REL_ERROR:
        return None
    k = np.zeros(s.shape, np.uint8) if step == 0 else np.round((logs - lo) / step).astype(np.uint8)
    return k, lo, step


def log_grid_decode(k: np.ndarray, lo: float, step: float, negative: np.ndarray | None = None) -> np.ndarray:
    """The numpy twin of the scale decode nodes (float32 as onnxruntime computes them)."""
    mag = np.exp(k.astype(np.float32) * np.float32(step) + np.float32(lo))
    return mag if negative is None else mag * (np.float32(1) - np.float32(2) * negative.astype(np.float32))


def _scale_targets(graph: ir.Graph) -> list[tuple[ir.Node, int, ir.Value, np.ndarray]]:
    out = []
    for node in graph:
        i = SCALE_INPUTS.get((node.domain, node.op_type))
        v = node.inputs[i] if i is not None and len(node.inputs) > i else None
        s = const_array(v)
        if s is None or s.dtype != np.float32 or s.size < 64 or len(v.uses()) != 1 \
                or not np.all(np.isfinite(s.astype(np.float16))):
            continue
        out.append((node, i, v, s))
    return out


def compact_scales(graph: ir.Graph, editor: Editor) -> list[dict]:
    """The float32 block scales of int4 weights (signed: a symmetric block's scale takes the sign
    that maps its extreme weight on code -8) stored as an 8-bit code of the magnitude on a per-tensor
    log grid (at most SCALE_REL_ERROR of change, far below the int4 step of 1/8 of the block's
    largest weight) plus one sign bit, else as float16 (at most 2^-11), and rebuilt when the model
    loads: with half of the int4 codes gone, float32 scales would be a fifth of what is left.
    The sign bits of all tensors are unpacked by one shared chain."""
    targets = _scale_targets(graph)
    grids = [log_grid(s) for *_, s in targets]
    chain = _Chain(editor, "hs", {})
    logged = [s for (*_, s), g in zip(targets, grids) if g is not None]
    if logged:
        bits = np.packbits(np.concatenate([x.reshape(-1) < 0 for x in logged]), bitorder="little")
        digits = chain.op("Cast", [chain.unpack(chain.const("signs", bits, own=True), 8)], {"to": ir.DataType.FLOAT})
        signs = chain.op("Add", [chain.op("Mul", [digits, chain.const("m2", np.float32(-2))]),
                                 chain.const("p1", np.float32(1))])
    records: list[dict] = []
    start, first = 0, None
    for (node, i, v, s), grid in zip(targets, grids):
        if grid is None:  # float16
            half = editor.initializer(f"{v.name}_fp16", s.astype(np.float16))
            out, stored = chain.op("Cast", [half], {"to": ir.DataType.FLOAT}), s.nbytes // 2
        else:
            k, lo, step = grid
            codes_v = chain.op("Cast", [editor.initializer(f"{v.name}_log8", k)], {"to": ir.DataType.FLOAT})
            tag = len(records)
            scaled = chain.op("Mul", [codes_v, chain.const(f"{tag}_st", np.float32(step), own=True)])
            mag = chain.op("Exp", [chain.op("Add", [scaled, chain.const(f"{tag}_lo", np.float32(lo), own=True)])])
            sign = chain.member(signs, len(records), start, start + s.size, s.shape)
            out, stored, start = chain.op("Mul", [mag, sign]), k.nbytes + (s.size + 7) // 8 + 8, start + s.size
        first = node if first is None else first
        node.replace_input_with(i, out)
        graph.initializers.pop(v.name)
        records.append({"tensor": v.name, "dense_bytes": int(s.nbytes), "stored_bytes": int(stored),
                        "fill_fraction": None})
    if first is not None:
        graph.insert_before(first, chain.nodes)
    return records


def summarize(records: list[dict]) -> dict:
    """The report's view of the sparse storage: totals and each tensor."""
    dense = sum(r["dense_bytes"] for r in records)
    stored = sum(r["stored_bytes"] for r in records)
    return {"format": "bitmask + kept values, rebuilt by standard ops that onnxruntime constant-folds at load",
            "tensors": len(records), "dense_bytes": dense, "stored_bytes": stored, "by_tensor": records}
