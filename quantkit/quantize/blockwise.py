"""Blockwise low-bit weight quantization and onnxruntime's packed layouts: pure numpy.

A weight W of shape (K, N) (MatMul's B) is quantized per column n in blocks of `block` rows:
  scale[n, b], zero_point[n, b]  for rows b*block .. (b+1)*block - 1
  q = clip(round(w / scale) + zero_point, 0, 2^bits - 1),  w ~ (q - zero_point) * scale
Symmetric blocks use the fixed zero point 2^(bits-1) (8 for 4 bits) and map the block's
largest-magnitude value w_e exactly onto the most negative code: scale = w_e / -2^(bits-1) (negative
when w_e > 0). That spends all 16 codes, where max|w| / 7 would leave one unused; values of the
other sign can exceed the range by at most one step at the very end; on a +a/-a tie w_e is -a, as in
onnxruntime's kernel. Asymmetric blocks map
[min, max] of the block onto [0, 2^bits - 1].

Packing (MatMulNBits, GatherBlockQuantized): codes are laid out per column (N, k_blocks, block)
and two 4-bit codes share a byte, the first in the low nibble.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Blockwise:
    q: np.ndarray  # uint8 codes, (N, k_blocks, block), rows past K padded with the zero point
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray  # uint8 (N, k_blocks)
    k: int
    bits: int
    block: int
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """Back to a float (K, N) weight."""
        w = (self.q.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return w.reshape(self.q.shape[0], -1)[:, : self.k].T.copy()


def _extreme(wb: np.ndarray, axis: int = -1) -> np.ndarray:
    """The largest-magnitude value of each block along `axis`; on a +a/-a tie the negative one, as
    onnxruntime's blockwise kernel (MLAS) picks it: |max| > |min| ? max : min."""
    hi, lo = wb.max(axis=axis), wb.min(axis=axis)
    return np.where(hi > -lo, hi, lo)


def block_params(wb: np.ndarray, bits: int, symmetric: bool, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points for blocks of float weights laid along `axis`."""
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        extreme = _extreme(wb, axis)
        scale = extreme / -mid
        zp = np.full(scale.shape, mid, np.uint8)
    else:
        lo = np.minimum(wb.min(axis=axis), 0.0)
        hi = np.maximum(wb.max(axis=axis), 0.0)
        scale = (hi - lo) / qmax
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(-lo / safe), 0, qmax).astype(np.uint8)
    scale = np.where(scale != 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale works
    return scale, zp


def quantize_codes(wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    q = wb / np.expand_dims(scale, axis)  # one temporary, rounded, shifted and clipped in place
    np.rint(q, out=q)
    q += np.expand_dims(zp, axis)
    np.clip(q, 0, 2**bits - 1, out=q)
    return q.astype(np.uint8)


@dataclass
class RoundingError:
    """sum w^2 and sum (w - dequant(quant(w)))^2 over a weight: its weight SQNR."""

    signal: float = 0.0
    error: float = 0.0
    count: int = 0  # weights measured (padding excluded)

    def add(self, wb: np.ndarray, q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> None:
        """One tile of blocks (nb, block, nc): float32 weights, their codes, (nb, nc) scales and zero
        points. The dequantized value is computed in float32 exactly as Blockwise.dequantize does;
        w - dequant is then exact in float32 (a code never lands more than a factor 2 from its
        weight: Sterbenz). Squares are summed in float32 within a block (32 terms: relative error
        ~1e-6 at worst) and the block sums in float64."""
        deq = q.astype(np.float32)
        deq -= zp[:, None, :]
        deq *= scale[:, None, :]
        np.subtract(wb, deq, out=deq)
        self.error += float(np.einsum("ijk,ijk->ik", deq, deq).sum(dtype=np.float64))
        self.signal += float(np.einsum("ijk,ijk->ik", wb, wb).sum(dtype=np.float64))

    def merge(self, other: RoundingError) -> None:
        self.signal += other.signal
        self.error += other.error
        self.count += other.count


CHUNK_ELEMENTS = 1 << 22  # weights quantized a tile of blocks at a time: float temporaries stay ~16 MB
# tiles run on this many threads: numpy releases the GIL inside each whole-array operation
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

TILE_COLUMNS = 2048
COPY_BLOCK = 128
Tile = tuple[int, int, int, int]  # block rows b0..b1, columns j0..j1


def _tiles(k: int, n: int, block: int) -> list[Tile]:
    """Tiles of at most TILE_COLUMNS columns (their codes are transposed into the (N, k_blocks,
    block) layout: a narrow tile keeps those scattered writes within the cache) and as many block
    rows as CHUNK_ELEMENTS allows."""
    kb = -(-k // block)
    cols = min(n, TILE_COLUMNS)
    step = max(1, CHUNK_ELEMENTS // max(block * cols, 1))
    return [(b, min(b + step, kb), j, min(j + cols, n)) for j in range(0, n, cols) for b in range(0, kb, step)]


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for 2-D arrays; a transposing copy (src stored column-major) goes 128 x 128 at
    a time so both sides stay in the cache (numpy's own strided copy is ~10x slower)."""
    if src.flags.c_contiguous or src.shape[0] <= COPY_BLOCK:
        dst[...] = src
        return
    for r in range(0, src.shape[0], COPY_BLOCK):
        for c in range(0, src.shape[1], COPY_BLOCK):
            dst[r:r + COPY_BLOCK, c:c + COPY_BLOCK] = src[r:r + COPY_BLOCK, c:c + COPY_BLOCK]


def _tile(w: np.ndarray, t: Tile, block: int) -> np.ndarray:
    """The tile's weights as (nb, block, nc) float32, zero-padded along K past the last row."""
    b0, b1, j0, j1 = t
    r0, r1 = b0 * block, min(b1 * block, w.shape[0])
    part = w[r0:r1, j0:j1]
    if r1 - r0 < (b1 - b0) * block or part.dtype != np.float32 or not part.flags.c_contiguous:
        full = np.zeros(((b1 - b0) * block, j1 - j0), np.float32)
        _copy(full[: r1 - r0], part.astype(np.float32, copy=False))
        part = full
    return part.reshape(b1 - b0, block, j1 - j0)


def _each(work, tiles: list[Tile]) -> list:
    if WORKERS == 1 or len(tiles) == 1:
        return [work(t) for t in tiles]
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(work, tiles))


def quantize_blockwise(w: np.ndarray, bits: int = 4, block: int = 32, symmetric: bool = True) -> Blockwise:
    """Round-to-nearest blockwise quantization of a (K, N) weight."""
    return _quantize(w, bits, block, symmetric, measure=False)[0]


def quantize_measured(w: np.ndarray, bits: int = 4, block: int = 32,
                      symmetric: bool = True) -> tuple[Blockwise, RoundingError]:
    """quantize_blockwise, and the rounding error of the same codes, in the same pass."""
    return _quantize(w, bits, block, symmetric, measure=True)


def _quantize(w: np.ndarray, bits: int, block: int, symmetric: bool, measure: bool):
    """Blocks never span columns, so tiles of blocks are quantized independently: the same result
    in any order or on any thread, with bounded temporaries. Within a tile the blocks lie along its
    middle axis and reductions run across rows, contiguous along N."""
    k, n = w.shape
    kb = -(-k // block)
    codes = np.empty((n, kb, block), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.uint8)

    def work(t: Tile) -> RoundingError:
        b0, b1, j0, j1 = t
        wb = _tile(w, t, block)
        scale, zp = block_params(wb, bits, symmetric, axis=1)
        q = quantize_codes(wb, scale, zp, bits, axis=1)
        _copy(codes.reshape(n, kb * block)[j0:j1, b0 * block:b1 * block], q.reshape(-1, j1 - j0).T)
        scales[j0:j1, b0:b1], zps[j0:j1, b0:b1] = scale.T, zp.T
        err = RoundingError()
        if measure:
            err.add(wb, q, scale, zp)
        return err

    total = RoundingError(count=k * n if measure else 0)
    for err in _each(work, _tiles(k, n, block)):
        total.merge(err)
    return Blockwise(codes, scales, zps, k, bits, block, symmetric), total


def rounding_error(w: np.ndarray, qb: Blockwise) -> RoundingError:
    """The error of codes rounded elsewhere (GPTQ) against the float (K, N) weight."""
    total = RoundingError(count=qb.k * qb.q.shape[0])
    for t in _tiles(qb.k, qb.q.shape[0], qb.block):
        b0, b1, j0, j1 = t
        q = qb.q[j0:j1, b0:b1].transpose(1, 2, 0)
        total.add(_tile(w, t, qb.block), q, qb.scales[j0:j1, b0:b1].T, qb.zero_points[j0:j1, b0:b1].T)
    return total


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last axis: 4-bit pairs into one byte, low nibble first."""
    if bits == 8:
        return codes.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"only 4- and 8-bit packing is supported, not {bits}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]
