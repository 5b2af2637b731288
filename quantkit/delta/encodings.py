"""Per-tensor encodings of a model update: pure numpy, no graph, no onnxruntime.

Every encoder takes the float delta `d = new - base` (any shape) and returns an `Encoded`: the
method name, a few JSON parameters and the arrays that go into the payload. `decode` turns it
back into a float64 delta of the tensor's shape. `exact` is the one lossless encoding: it works
on the bit patterns of base and new, so it also carries integer tensors (int8/int4 weights of
quantized models) and small float tensors (biases, norms, scales) bit for bit.

Error bounds (what the unit tests check):
  int8/int4  blockwise symmetric, |err| <= max|d in block| / (2 * qmax) per element (qmax 127 / 7)
  sign       d ~ scale_row * sign(d), scale_row = mean |d| over the row (the L2-optimal scale)
  topk       exact at the k kept indices (or int8 values: within max|kept| / 254), zero elsewhere
  lowrank    ||err||_F = sqrt(sum of the dropped singular values squared) of d as a matrix
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLOCK = 64  # elements sharing one scale in int8/int4 blocks
LOSSY = ("int8", "int4", "sign", "topk", "lowrank")
METHODS = ("unchanged", "exact", *LOSSY)


@dataclass
class Encoded:
    method: str
    params: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows are the first axis (output channels of Linear/Conv weights), columns the rest."""
    if len(shape) < 2:
        return 1, int(np.prod(shape, dtype=np.int64))
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))


# ---- blockwise int8 / int4 ----------------------------------------------------------------

def _blocks(d: np.ndarray, block: int) -> np.ndarray:
    flat = d.reshape(-1)
    pad = (-flat.size) % block
    return np.concatenate([flat, np.zeros(pad, flat.dtype)]).reshape(-1, block)


def encode_blockwise(d: np.ndarray, bits: int, block: int = BLOCK) -> Encoded:
    qmax = 127 if bits == 8 else 7  # symmetric: q(-x) == -q(x)
    b = _blocks(d.astype(np.float64), block)
    scale = (np.abs(b).max(axis=1) / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.clip(np.rint(b / safe[:, None]), -qmax, qmax).astype(np.int8)
    if bits == 4:
        q = pack_nibbles(q.reshape(-1))
    return Encoded(f"int{bits}", {"block": block}, {"q": q, "scale": scale})


def decode_blockwise(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    block, scale = enc.params["block"], enc.arrays["scale"]
    n = int(np.prod(shape, dtype=np.int64))
    q = enc.arrays["q"]
    if enc.method == "int4":
        q = unpack_nibbles(q, scale.size * block)
    d = q.reshape(-1, block).astype(np.float64) * scale[:, None].astype(np.float64)
    return d.reshape(-1)[:n].reshape(shape)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Values in [-8, 7] two per byte, the first in the low nibble (offset binary: q + 8)."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.concatenate([u, np.full(1, 8, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(packed.size * 2, np.int8)
    out[0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[1::2] = (packed >> 4).astype(np.int8) - 8
    return out[:n]


# ---- 1-bit sign with a scale per row (BitDelta) --------------------------------------------

def encode_sign(d: np.ndarray) -> Encoded:
    rows, cols = as_matrix(d.shape)
    m = d.reshape(rows, cols).astype(np.float64)
    scale = np.abs(m).mean(axis=1).astype(np.float32)  # argmin_s ||m - s sign(m)||^2 = mean |m|
    return Encoded("sign", {}, {"bits": np.packbits(m.reshape(-1) >= 0), "scale": scale})


def decode_sign(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    rows, cols = as_matrix(shape)
    bits = np.unpackbits(enc.arrays["bits"], count=rows * cols).reshape(rows, cols)
    signs = bits.astype(np.float64) * 2.0 - 1.0
    return (signs * enc.arrays["scale"].astype(np.float64)[:, None]).reshape(shape)


# ---- top-k sparse: gaps between sorted indices as varints ----------------------------------

def encode_topk(d: np.ndarray, density: float, values: str = "fp32") -> Encoded:
    """The k = density * size entries of largest magnitude. Values in float32 (exact at the kept
    indices) or int8 with one scale per tensor (|err| <= max|kept| / 254 there, half the bytes)."""
    flat = d.reshape(-1)
    k = max(1, min(flat.size, round(density * flat.size)))
    idx = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k]) if k < flat.size else np.arange(flat.size)
    gaps = np.diff(idx, prepend=-1).astype(np.uint64)  # >= 1; small numbers the lossless stage codes well
    arrays = {"gaps": varint_encode(gaps)}
    if values == "int8":
        top = float(np.abs(flat[idx]).max())
        scale = np.array([top / 127 if top > 0 else 1.0], np.float32)
        arrays["values"] = np.clip(np.rint(flat[idx] / float(scale[0])), -127, 127).astype(np.int8)
        arrays["scale"] = scale
    else:
        arrays["values"] = flat[idx].astype(np.float32)
    return Encoded("topk", {"k": int(k), "density": density, "values": values}, arrays)


def decode_topk(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(int(np.prod(shape, dtype=np.int64)), np.float64)
    idx = np.cumsum(varint_decode(enc.arrays["gaps"]).astype(np.int64)) - 1
    vals = enc.arrays["values"].astype(np.float64)
    if enc.params.get("values") == "int8":
        vals = vals * float(enc.arrays["scale"][0])
    out[idx] = vals
    return out.reshape(shape)


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128: 7 bits per byte, low group first, the high bit set on every byte but the last."""
    v = values.astype(np.uint64)
    nbytes = np.ones(v.size, np.int64)
    for i in range(1, 10):
        nbytes += v >= (np.uint64(1) << np.uint64(7 * i))
    groups = np.stack([(v >> np.uint64(7 * i)) & np.uint64(0x7F) for i in range(int(nbytes.max(initial=1)))], axis=1)
    pos = np.arange(groups.shape[1])[None, :]
    cont = (pos < (nbytes[:, None] - 1)).astype(np.uint64) << np.uint64(7)
    keep = pos < nbytes[:, None]
    return (groups | cont)[keep].astype(np.uint8)


def varint_decode(data: np.ndarray) -> np.ndarray:
    b = data.astype(np.uint64)
    last = (b & np.uint64(0x80)) == 0
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    pos = np.arange(b.size) - np.repeat(starts, ends - starts + 1)
    parts = (b & np.uint64(0x7F)) << (np.uint64(7) * pos.astype(np.uint64))
    return np.add.reduceat(parts, starts) if b.size else np.zeros(0, np.uint64)


# ---- low rank: truncated SVD of the delta as a matrix --------------------------------------

def top_singular(m: np.ndarray, rank: int, power_iters: int = 4, seed: int = 0, exact_up_to: int = 2048):
    """U S V^T truncated to `rank`. Exact SVD for matrices up to `exact_up_to` on the short side;
    above, a randomized range finder with power iterations (Halko et al.), as PowerSGD does."""
    if min(m.shape) <= exact_up_to:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], rank + 8)))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(m @ (m.T @ q))
    u, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def encode_lowrank(d: np.ndarray, rank: int, factors=None) -> Encoded:
    """`factors`: a (u, s, vt) of d as a matrix already computed to at least this rank, so that
    several ranks of one tensor cost one decomposition."""
    rows, cols = as_matrix(d.shape)
    r = max(1, min(rank, rows, cols))
    u, s, vt = factors if factors is not None else top_singular(d.reshape(rows, cols).astype(np.float64), r)
    u, s, vt = u[:, :r], s[:r], vt[:r]
    return Encoded("lowrank", {"rank": int(r)}, {"a": (u * s).astype(np.float32), "b": vt.astype(np.float32)})


def decode_lowrank(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    return (enc.arrays["a"].astype(np.float64) @ enc.arrays["b"].astype(np.float64)).reshape(shape)


# ---- exact: bit patterns, for integer tensors and anything that must not move --------------

def _bits(a: np.ndarray) -> np.ndarray:
    """The same bytes as an unsigned integer array of the same width (bool as uint8)."""
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype != np.bool_ else a.view(np.uint8)


def encode_exact(base: np.ndarray, new: np.ndarray) -> Encoded:
    """Integers: wrapping difference (small where weights moved by a few steps). Floats: xor of
    the bit patterns (zero where unchanged, shared sign/exponent bits where close)."""
    b, n = _bits(np.ascontiguousarray(base)), _bits(np.ascontiguousarray(new))
    if np.issubdtype(base.dtype, np.integer) or base.dtype == np.bool_:
        return Encoded("exact", {"op": "sub"}, {"d": (n - b).reshape(-1)})
    return Encoded("exact", {"op": "xor"}, {"d": (n ^ b).reshape(-1)})


def reconstruct_exact(base: np.ndarray, enc: Encoded) -> np.ndarray:
    b = _bits(np.ascontiguousarray(base)).reshape(-1)
    d = enc.arrays["d"]
    out = (b + d) if enc.params["op"] == "sub" else (b ^ d)
    return out.astype(b.dtype).view(base.dtype).reshape(base.shape)


# ---- one entry point per direction ---------------------------------------------------------

def encode(d: np.ndarray, method: str, density: float = 0.01, rank: int = 8, values: str = "fp32") -> Encoded:
    if method == "int8":
        return encode_blockwise(d, 8)
    if method == "int4":
        return encode_blockwise(d, 4)
    if method == "sign":
        return encode_sign(d)
    if method == "topk":
        return encode_topk(d, density, values)
    if method == "lowrank":
        return encode_lowrank(d, rank)
    raise ValueError(f"not a lossy delta encoding: {method!r}")


def decode(enc: Encoded, shape: tuple[int, ...]) -> np.ndarray:
    """The float64 delta an `Encoded` stands for (not for `exact`, which needs the base)."""
    if enc.method in ("int8", "int4"):
        return decode_blockwise(enc, shape)
    if enc.method == "sign":
        return decode_sign(enc, shape)
    if enc.method == "topk":
        return decode_topk(enc, shape)
    if enc.method == "lowrank":
        return decode_lowrank(enc, shape)
    if enc.method == "unchanged":
        return np.zeros(shape, np.float64)
    raise ValueError(f"{enc.method!r} has no float delta")


def reconstruct(base: np.ndarray, enc: Encoded) -> np.ndarray:
    """The new tensor: base + decoded delta, in the base's dtype."""
    if enc.method == "unchanged":
        return base.copy()
    if enc.method == "exact":
        return reconstruct_exact(base, enc)
    return (base.astype(np.float64) + decode(enc, base.shape)).astype(base.dtype)
