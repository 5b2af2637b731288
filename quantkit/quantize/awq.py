"""Activation-aware weight scaling (AWQ, Lin et al., 2023) for blockwise int4: pure numpy.

Input channels that carry large activations matter more for the layer's output than the others,
but blockwise rounding treats every weight of a block alike. Scaling input channel k of the weight
by s_k (and the activation by 1/s_k, which leaves X W unchanged in exact arithmetic) gives the
important rows more of each block's range. With a_k = mean |x_k| over the calibration data,

    s = a^alpha / sqrt(max(a^alpha) * min(a^alpha)),  alpha in ALPHAS,

and alpha is chosen per input tensor (shared by every layer reading it, since they share the one
1/s on the activation) to minimize the activation-weighted rounding error

    sum_k a_k^2 * sum_n (W_kn - Q(W s)_kn / s_k)^2

of all those layers. alpha = 0 (s = 1) is plain round-to-nearest, so the search never does worse
than RTN by this measure. The graph gets one Mul(x, 1/s) per scaled input (quantize/weight_only.py).
"""

from __future__ import annotations

import numpy as np

from quantkit.calibrate.observers import Observer, register
from quantkit.quantize import blockwise as bw

ALPHAS = tuple(i / 10 for i in range(11))


@register("abs_mean")
class AbsMeanObserver(Observer):
    """Mean |x| per channel of the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.total: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        flat = np.abs(np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1]))
        s = flat.sum(axis=0, dtype=np.float64)
        self.total = s if self.total is None else self.total + s
        self.rows += len(flat)

    def mean(self) -> np.ndarray | None:
        return None if self.total is None or not self.rows else self.total / self.rows


def scales_for(act: np.ndarray, alpha: float) -> np.ndarray:
    a = np.maximum(np.asarray(act, np.float64), 1e-8) ** alpha
    return (a / np.sqrt(a.max() * a.min())).astype(np.float32)


def weighted_error(w: np.ndarray, s: np.ndarray, act: np.ndarray, bits: int, block: int, symmetric: bool) -> float:
    """sum_k act_k^2 * ||W_k - Q(W s)_k / s_k||^2 for one (K, N) weight."""
    deq = bw.quantize_blockwise(w * s[:, None], bits, block, symmetric).dequantize() / s[:, None]
    return float((np.asarray(act, np.float64) ** 2 @ ((w - deq).astype(np.float64) ** 2)).sum())


def search(weights: list[np.ndarray], act: np.ndarray, bits: int, block: int,
           symmetric: bool) -> tuple[float, np.ndarray]:
    """The alpha (and scales) with the least summed error over the layers sharing this input."""
    best = (np.inf, 0.0)
    for alpha in ALPHAS:
        s = scales_for(act, alpha)
        err = sum(weighted_error(w, s, act, bits, block, symmetric) for w in weights)
        if err < best[0]:
            best = (err, alpha)
    return best[1], scales_for(act, best[1])
