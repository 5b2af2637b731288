"""Blockwise low-bit weight quantization and onnxruntime's packed layouts: pure numpy.

A weight W of shape (K, N) (MatMul's B) is quantized per column n in blocks of `block` rows:
  scale[n, b], zero_point[n, b]  for rows b*block .. (b+1)*block - 1
  q = clip(round(w / scale) + zero_point, 0, 2^bits - 1),  w ~ (q - zero_point) * scale
Symmetric blocks use the fixed zero point 2^(bits-1) (8 for 4 bits) and map the block's
largest-magnitude value w_e exactly onto the most negative code: scale = w_e / -2^(bits-1) (negative
when w_e > 0). That spends all 16 codes, where max|w| / 7 would leave one unused; values of the
other sign can exceed the range by at most one step at the very end. Asymmetric blocks map
[min, max] of the block onto [0, 2^bits - 1].

Packing (MatMulNBits, GatherBlockQuantized): codes are laid out per column (N, k_blocks, block)
and two 4-bit codes share a byte, the first in the low nibble.
"""

from __future__ import annotations

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


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """(K, N) -> (N, k_blocks, block), zero-padded along K."""
    k, n = w.shape
    k_blocks = -(-k // block)
    padded = np.zeros((k_blocks * block, n), np.float32)
    padded[:k] = w
    return padded.T.reshape(n, k_blocks, block)


def _extreme(wb: np.ndarray) -> np.ndarray:
    """The largest-magnitude value of each block (the first one in the block on a +a/-a tie), from
    max and min, which vectorize far better than argmax of |w|."""
    hi, lo = wb.max(axis=-1), wb.min(axis=-1)
    extreme = np.where(hi > -lo, hi, lo)
    tie = np.flatnonzero((hi == -lo) & (hi != 0))
    if tie.size:
        rows = wb.reshape(-1, wb.shape[-1])[tie]
        first = np.take_along_axis(rows, np.abs(rows).argmax(axis=-1)[:, None], axis=-1)[:, 0]
        extreme.reshape(-1)[tie] = first
    return extreme


def block_params(wb: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points for blocks (..., block) of float weights."""
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        extreme = _extreme(wb)
        scale = extreme / -mid
        zp = np.full(scale.shape, mid, np.uint8)
    else:
        lo = np.minimum(wb.min(axis=-1), 0.0)
        hi = np.maximum(wb.max(axis=-1), 0.0)
        scale = (hi - lo) / qmax
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(-lo / safe), 0, qmax).astype(np.uint8)
    scale = np.where(scale != 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale works
    return scale, zp


def quantize_codes(wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    q = wb / scale[..., None]  # one temporary, rounded, shifted and clipped in place
    np.rint(q, out=q)
    q += zp[..., None]
    np.clip(q, 0, 2**bits - 1, out=q)
    return q.astype(np.uint8)


CHUNK_ELEMENTS = 1 << 22  # columns are quantized a slice at a time: float temporaries stay ~16 MB


def quantize_blockwise(w: np.ndarray, bits: int = 4, block: int = 32, symmetric: bool = True) -> Blockwise:
    """Round-to-nearest blockwise quantization of a (K, N) weight. Blocks never span columns, so
    slices of columns are quantized independently (the same result, bounded temporaries)."""
    k, n = w.shape
    kb = -(-k // block)
    codes = np.empty((n, kb, block), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for j in range(0, n, step):
        wb = _blocks(np.asarray(w[:, j:j + step], np.float32), block)
        scale, zp = block_params(wb, bits, symmetric)
        codes[j:j + step], scales[j:j + step], zps[j:j + step] = quantize_codes(wb, scale, zp, bits), scale, zp
    return Blockwise(codes, scales, zps, k, bits, block, symmetric)


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
