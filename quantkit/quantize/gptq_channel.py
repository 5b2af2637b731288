"""Output-aware rounding of int8 weights with one scale per output channel (GPTQ, Frantar et al. 2022).

Rounding each weight to nearest minimises the weight error; what matters is the layer's output
error on real inputs, ||X (W - W_q)^T||^2 = sum over output rows r of d_r^T H d_r with H = X^T X. GPTQ
rounds a row's columns one at a time and moves each column's rounding error onto the columns not yet
rounded through the Cholesky factor of H^-1, so the later columns absorb it.

Here the grid is the one static int8 already uses: symmetric int8 in [-127, 127], scale = max|w| / 127
per output channel, unchanged (the int32 bias, the kernels and every scale stay exactly as with
rounding to nearest; only the codes move). Rows of the same group share one Hessian (a MatMul's
output columns, a convolution's output channels of one group: a depthwise convolution has one 9 x 9
Hessian per channel, all rounded together). Every output row is independent, so each row keeps the
GPTQ codes only where they give a smaller d^T H d than rounding to nearest on the calibration
Hessian: never worse than RTN on the data it was fitted on. Pure numpy, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit.quantize import qparams as qp
from quantkit.quantize.gptq import DAMP, LAZY, upper_factor_of_inverse

QMIN, QMAX = qp.INT8.qmin, qp.INT8.qmax


@dataclass
class Rounded:
    """A weight's int8 codes (original layout), its per-channel scales and zero points, and the
    calibration output error of each rounding (sum over rows of d^T H d, H = 2 X^T X / n)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    error_rtn: float
    error: float
    rows_changed: int  # output rows whose GPTQ codes beat rounding to nearest


def _upper_factors(h: np.ndarray) -> np.ndarray:
    """Per group, U upper triangular with U^T U = H^-1 (stacked: (G, K, K)): gptq.py's one Cholesky
    and one triangular inverse for a single large Hessian, the same identity batched for many small
    ones (R = J chol(J H J) J upper with H = R R^T, so U = R^-1)."""
    if len(h) == 1:
        return upper_factor_of_inverse(h[0])[None]
    r = np.linalg.cholesky(h[:, ::-1, ::-1])[:, ::-1, ::-1]
    return np.triu(np.linalg.inv(r))


def _prepared(h: np.ndarray) -> np.ndarray:
    """Damped Hessians. A dead column (input always 0: any code does) gets a unit diagonal and no coupling,
    so U is 0 off its diagonal, no error moves in or out, and it rounds to nearest."""
    h = np.array(h, np.float64)
    diag = np.einsum("gkk->gk", h)
    dead = diag <= 0
    g_idx, k_idx = np.nonzero(dead)
    h[g_idx, k_idx, :] = 0.0
    h[g_idx, :, k_idx] = 0.0
    h[g_idx, k_idx, k_idx] = 1.0
    mean = np.maximum(np.einsum("gkk->gk", h).mean(axis=1), 1e-12)
    idx = np.arange(h.shape[1])
    h[:, idx, idx] += DAMP * mean[:, None]
    return h


def gptq_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w: (G, n, K) rows of G groups; h: (G, K, K) each group's Hessian; scale: (G, n) the fixed
    per-row steps. Returns the int8 codes (G, n, K) GPTQ picks on that grid."""
    u = _upper_factors(_prepared(h))
    W = np.array(w, np.float64)
    s = scale.astype(np.float64)[:, :, None]
    q = np.zeros(W.shape, np.int8)
    k = W.shape[2]
    for i1 in range(0, k, LAZY):
        i2 = min(i1 + LAZY, k)
        err = np.zeros(W.shape[:2] + (i2 - i1,))
        for i in range(i1, i2):
            col = W[:, :, i]
            qi = np.clip(np.rint(col / s[:, :, 0]), QMIN, QMAX)
            q[:, :, i] = qi
            e = (col - qi * s[:, :, 0]) / u[:, i, i][:, None]
            W[:, :, i:i2] -= e[:, :, None] * u[:, None, i, i:i2]
            err[:, :, i - i1] = e
        if i2 < k:
            W[:, :, i2:] -= np.matmul(err, u[:, i1:i2, i2:])
    return q


def row_errors(w: np.ndarray, q: np.ndarray, scale: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row, d^T H d with d = w - q * scale: the calibration output error power of that row."""
    d = np.asarray(w, np.float64) - q.astype(np.float64) * scale.astype(np.float64)[:, :, None]
    return np.sum(np.matmul(d, np.asarray(h, np.float64)) * d, axis=2)


def round_rows(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w (G, n, K), h (G, K, K) -> (codes, scales (G, n), per-row error of RTN, of the codes kept).
    Scales are quantize_weight's per-row max|w| / 127; each row keeps the better of GPTQ and RTN."""
    w = np.asarray(w, np.float32)
    g, n, k = w.shape
    _, scale, _ = qp.quantize_weight(w.reshape(g * n, k), 0)
    scale = scale.reshape(g, n)
    rtn = np.clip(np.rint(w / scale[:, :, None]), QMIN, QMAX).astype(np.int8)
    if not np.isfinite(h).all() or not np.isfinite(w).all():  # nothing to fit: round to nearest
        e = row_errors(w, rtn, scale, np.nan_to_num(h))
        return rtn, scale, e, e
    try:
        gq = gptq_codes(w, h, scale)
    except np.linalg.LinAlgError:  # not positive definite even damped
        e = row_errors(w, rtn, scale, h)
        return rtn, scale, e, e
    e_rtn, e_gq = row_errors(w, rtn, scale, h), row_errors(w, gq, scale, h)
    better = e_gq < e_rtn
    codes = np.where(better[:, :, None], gq, rtn)
    return codes, scale, e_rtn, np.where(better, e_gq, e_rtn)


def round_weight(w: np.ndarray, h: np.ndarray, layout: str) -> Rounded:
    """A whole weight in its graph layout. layout "conv": (Cout, Cin/G, *kernel), rows grouped by
    the G = len(h) groups; "kn": a MatMul's (K, N), rows are its output columns; "nk": a Gemm's
    transposed (N, K). Returns codes in w's layout with per-channel scales along Cout / N."""
    w = np.asarray(w, np.float32)
    if layout == "conv":
        rows = w.reshape(len(h), w.shape[0] // len(h), -1)
    elif layout == "kn":
        rows = np.ascontiguousarray(w.T)[None]
    else:
        rows = w[None]
    codes, scale, e_rtn, e = round_rows(rows, h)
    if layout == "conv":
        q = codes.reshape(w.shape)
    elif layout == "kn":
        q = np.ascontiguousarray(codes[0].T)
    else:
        q = codes[0]
    flat_scale = scale.reshape(-1).astype(np.float32)
    return Rounded(q, flat_scale, np.zeros(flat_scale.shape, np.int8), float(e_rtn.sum()), float(e.sum()),
                   int(np.sum(e < e_rtn)))
