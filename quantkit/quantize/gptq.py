"""GPTQ (Frantar et al., 2022): round a weight column by column, pushing each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian H = 2 X^T X / n of the
layer's calibration inputs. Blockwise scales are chosen from the updated weights as each block
starts. Pure numpy; one Python iteration per input row of the weight (not per element).
"""

from __future__ import annotations

import numpy as np

from quantkit.quantize import blockwise as bw

DAMP = 0.01  # fraction of the mean diagonal added to H, as in the paper
LAZY = 128  # columns updated together before the rest of the matrix is touched


def gptq_blockwise(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block: int = 32,
                   symmetric: bool = True) -> bw.Blockwise:
    """w: (K, N) MatMul weight; hessian: (K, K). Returns the same layout as quantize_blockwise."""
    return gptq_many([w], hessian, bits, block, symmetric)[0]


def gptq_many(ws: list[np.ndarray], hessian: np.ndarray, bits: int = 4, block: int = 32,
              symmetric: bool = True) -> list[bw.Blockwise]:
    """Weights (K, N_i) that read the same input (an attention's q, k and v projections): GPTQ
    rounds each output column on its own against the same H^-1, so their columns are rounded as
    one (K, sum N_i) weight: one inverse and one pass of the column loop instead of one each."""
    w = np.concatenate(ws, axis=1) if len(ws) > 1 else ws[0]
    qb = _gptq(w, hessian, bits, block, symmetric)
    out, j = [], 0
    for part in ws:
        n = part.shape[1]
        out.append(bw.Blockwise(qb.q[j:j + n], qb.scales[j:j + n], qb.zero_points[j:j + n], qb.k, bits, block,
                                symmetric))
        j += n
    return out


def _gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, symmetric: bool) -> bw.Blockwise:
    k, n = w.shape
    lazy = max(LAZY // block, 1) * block  # lazy batches hold whole quantization blocks
    W = np.zeros((n, -(-k // block) * block), np.float64)  # (N, K padded): GPTQ works on rows of W^T
    W[:, :k] = w.T
    H = np.zeros((W.shape[1], W.shape[1]))
    H[:k, :k] = hessian
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices_from(H)] += DAMP * np.mean(np.diag(H))
    hinv = upper_factor_of_inverse(H)
    del H
    kb = W.shape[1] // block
    codes = np.zeros((n, kb, block), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zps = np.zeros((n, kb), np.uint8)
    for i1 in range(0, W.shape[1], lazy):
        i2 = min(i1 + lazy, W.shape[1])
        W1 = W[:, i1:i2].copy()
        err1 = np.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for b1 in range(0, i2 - i1, block):
            _round_block(W1, err1, h1, b1, block, (i1 + b1) // block, bits, symmetric, (codes, scales, zps))
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return bw.Blockwise(codes, scales, zps, k, bits, block, symmetric)


def upper_factor_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H^-1 (the upper Cholesky factor of H^-1, which GPTQ's column
    updates read), without inverting H: with J the order reversal, R = J chol(J H J) J is upper and
    H = R R^T, so H^-1 = R^-T R^-1 and U = R^-1. One Cholesky and one triangular inverse, a third
    of the work of inv() followed by cholesky()."""
    r = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    return _inverse_upper(np.ascontiguousarray(r))


def _inverse_upper(r: np.ndarray) -> np.ndarray:
    """Inverse of an upper triangular matrix, by halves: [[A, B], [0, C]]^-1 =
    [[A^-1, -A^-1 B C^-1], [0, C^-1]] (matrix products, which BLAS runs fast)."""
    n = len(r)
    if n <= 128:
        return np.triu(np.linalg.inv(r))
    h = n // 2
    a, c = _inverse_upper(r[:h, :h]), _inverse_upper(r[h:, h:])
    out = np.zeros_like(r)
    out[:h, :h], out[h:, h:] = a, c
    out[:h, h:] = -(a @ r[:h, h:]) @ c
    return out


def _round_block(W1: np.ndarray, err1: np.ndarray, h1: np.ndarray, b1: int, block: int, b: int, bits: int,
                 symmetric: bool, out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """One quantization block (columns b1..b1+block of the lazy batch W1): its scales from the
    updated weights, then column by column the rounding and the error pushed onto the block's
    remaining columns; the columns after the block get the block's errors in one product (the
    same sums as updating them column by column, a quarter of the memory traffic)."""
    codes, scales, zps = out
    b2 = b1 + block
    s, z = bw.block_params(W1[:, b1:b2].astype(np.float32), bits, symmetric)
    scales[:, b], zps[:, b] = s, z
    for i in range(b1, b2):
        q = bw.quantize_codes(W1[:, i : i + 1].astype(np.float32), s, z, bits)[:, 0]
        codes[:, b, i - b1] = q
        dq = (q.astype(np.float64) - z) * s
        e = (W1[:, i] - dq) / h1[i, i]
        W1[:, i:b2] -= np.outer(e, h1[i, i:b2])
        err1[:, i] = e
    if b2 < W1.shape[1]:
        W1[:, b2:] -= err1[:, b1:b2] @ h1[b1:b2, b2:]
