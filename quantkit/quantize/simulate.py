"""What the accuracy budget's alternatives to static int8 would compute for one MatMul, in numpy.

The sensitivity step has, for every quantized op, the float input it receives in the quantized model
and the float op's exact output on it. For a MatMul (or Gemm) with a constant weight that is enough to
emulate each alternative scheme on the same input, without building any model:

  dynamic      input to uint8 per tensor over [min(0, x), max(0, x)] at run time (DynamicQuantizeMatMul),
               weight int8 symmetric per output column
  per_token    input to int8 steps per row, max|row| / 127 (quantize/per_token.py), same weight
  split        static int8 over the calibrated range of the channels other than the input's outliers, which
               stay float with their weight rows (quantize/outlier_split.py); weight int8 per output column
               with those rows zeroed
  weight_only  weight in symmetric 8-bit blocks of WEIGHT_ONLY_INT8_BLOCK along K; MatMulNBits at accuracy
               level 4 (the only level static int8 runs take) also rounds the input to int8 per block of K

so each op's own noise is known under every alternative, and the search can give each op the cheapest
one that really helps it (an FFN down-projection whose few outlier tokens ruin per-tensor ranges needs
per-token steps, not float activations).
"""

from __future__ import annotations

import numpy as np

from quantkit.quantize import blockwise as bw
from quantkit.quantize import qparams as qp
from quantkit.quantize.outlier_split import Split, split_weight
from quantkit.quantize.per_token import TINY
from quantkit.quantize.plan import SchemeName
from quantkit.quantize.scheme import WEIGHT_ONLY_INT8_BLOCK

SIMULATED = (SchemeName.SPLIT.value, SchemeName.DYNAMIC.value, SchemeName.PER_TOKEN.value, SchemeName.WEIGHT_ONLY.value)


class Weights:
    """One op's weight, as each alternative stores it (computed once, reused for every batch). `split`:
    the op's outlier-channel split and the activation type of static int8, when the op can have one."""

    def __init__(self, w: np.ndarray, split: tuple[Split, qp.QType, bool] | None = None) -> None:
        self.rows = 0  # rows emulated so far
        w = np.asarray(w, np.float32)
        self.int8 = qp.dequantize(*qp.quantize_weight(w, 1), axis=1)
        self.blocks = bw.quantize_blockwise(w, bits=8, block=WEIGHT_ONLY_INT8_BLOCK).dequantize()
        self.split = None
        if split is not None:
            how, qtype, symmetric = split
            rest, kept = split_weight(w, how.channels)
            rest_dq = qp.dequantize(*qp.quantize_weight(rest, 1), axis=1)
            self.split = (how.channels, *how.qparams(qtype, symmetric), qtype, rest_dq, kept)

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x @ W as each alternative computes it (no bias: it adds the same to all)."""
        x = np.asarray(x, np.float32)
        self.rows += x.size // max(x.shape[-1], 1)
        out = {SchemeName.DYNAMIC.value: _matmul(_per_tensor_uint8(x), self.int8),
               SchemeName.PER_TOKEN.value: _matmul(_per_row_int8(x), self.int8),
               SchemeName.WEIGHT_ONLY.value: _matmul(_per_block_int8(x, WEIGHT_ONLY_INT8_BLOCK), self.blocks)}
        if self.split is not None:
            channels, scale, zp, qtype, rest, kept = self.split
            xq = qp.dequantize(qp.quantize(x, scale, zp, qtype), scale, zp)
            out[SchemeName.SPLIT.value] = _matmul(xq, rest) + _matmul(x[..., channels], kept)
        return out


def _matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w for x of any rank, as one 2-D product: numpy's stacked matmul over a (batch, seq, K)
    input does not reach BLAS and runs ~40x slower than the same product on (batch * seq, K)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _per_tensor_uint8(x: np.ndarray) -> np.ndarray:
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zp = float(np.clip(np.rint(-lo / scale), 0, 255))
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * np.float32(scale)


def _per_row_int8(x: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.float32(TINY))
    return np.rint(x / scale) * scale


def _per_block_int8(x: np.ndarray, block: int) -> np.ndarray:
    """Each row's blocks of `block` values to int8 steps of max|block| / 127 (MatMulNBits at accuracy level 4)."""
    k = x.shape[-1]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (-k) % block)])
    blocks = padded.reshape(*padded.shape[:-1], -1, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    out = np.clip(np.rint(blocks * inverse), -127, 127) * (amax / np.float32(127))
    return out.reshape(padded.shape)[..., :k]
