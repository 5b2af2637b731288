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
    k, n = w.shape
    lazy = max(LAZY // block, 1) * block  # lazy batches hold whole quantization blocks
    W = np.zeros((n, -(-k // block) * block), np.float64)  # (N, K padded): GPTQ works on rows of W^T
    W[:, :k] = w.T
    H = np.zeros((W.shape[1], W.shape[1]))
    H[:k, :k] = hessian
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * np.mean(np.diag(H)) * np.eye(len(H))
    # upper Cholesky factor of H^-1
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    kb = W.shape[1] // block
    codes = np.zeros((n, kb, block), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zps = np.zeros((n, kb), np.uint8)
    for i1 in range(0, W.shape[1], lazy):
        i2 = min(i1 + lazy, W.shape[1])
        W1 = W[:, i1:i2].copy()
        err1 = np.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            b, j = divmod(col, block)
            if j == 0:
                s, z = bw.block_params(W1[:, i : i + block].astype(np.float32), bits, symmetric)
                scales[:, b], zps[:, b] = s, z
            q = bw.quantize_codes(W1[:, i : i + 1].astype(np.float32), scales[:, b], zps[:, b], bits)[:, 0]
            codes[:, b, j] = q
            dq = (q.astype(np.float64) - zps[:, b]) * scales[:, b]
            e = (W1[:, i] - dq) / h1[i, i]
            W1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return bw.Blockwise(codes, scales, zps, k, bits, block, symmetric)
