"""Quantization parameters and (de)quantization: pure numpy, no graph, no runtime.

Conventions follow ONNX QuantizeLinear/DequantizeLinear:
  q = saturate(round_half_to_even(x / scale) + zero_point)
  x ~= (q - zero_point) * scale
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QType:
    name: str
    dtype: type
    qmin: int
    qmax: int


UINT8 = QType("uint8", np.uint8, 0, 255)
# symmetric int8 uses [-127, 127] so q(-x) == -q(x) and the zero point is exactly 0
INT8 = QType("int8", np.int8, -127, 127)
INT8_FULL = QType("int8", np.int8, -128, 127)
INT32 = QType("int32", np.int32, -(2**31) + 1, 2**31 - 1)

QTYPES = {"uint8": UINT8, "int8": INT8}

# A scale of 0 would make QuantizeLinear divide by zero; an all-zero tensor gets this scale
# instead, which quantizes every value to the zero point exactly.
_MIN_SCALE = np.float32(1e-12)
_EXACT_IN_FLOAT32 = 2**24  # integers of smaller magnitude are exact in float32


def qparams(lo, hi, qtype: QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping [lo, hi] onto qtype's range.

    lo/hi may be scalars or arrays (one entry per channel). The range is widened to include 0 so
    that zero (padding, ReLU output) is represented exactly.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        # symmetric is centred on 0: zero point 0 for int8, 128 for uint8
        half = (qtype.qmax - qtype.qmin) / 2.0
        scale = amax / half
        zero_point = np.full(scale.shape, (qtype.qmax + qtype.qmin + 1) // 2 if qtype.qmin == 0 else 0)
    else:
        scale = (hi - lo) / float(qtype.qmax - qtype.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.round(qtype.qmin - lo / safe)
        zero_point = np.clip(zero_point, qtype.qmin, qtype.qmax)
    scale = np.where(scale > 0, scale, _MIN_SCALE).astype(np.float32)
    return scale, np.asarray(zero_point).astype(qtype.dtype)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x, scale, zero_point, qtype: QType, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear: round half to even (np.rint), add zero point, saturate. Types up to 16 bits
    are computed in float32, which holds their integers exactly (the same codes as in int64, at a
    fraction of the memory traffic)."""
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(scale, x.ndim, axis).astype(np.float32)
    if qtype.qmax - qtype.qmin < _EXACT_IN_FLOAT32:
        q = np.rint(x / s)
        q += _broadcast(zero_point, x.ndim, axis).astype(np.float32)
        np.clip(q, qtype.qmin, qtype.qmax, out=q)
        return q.astype(qtype.dtype)
    zp = _broadcast(zero_point, x.ndim, axis).astype(np.int64)
    q = np.rint(x / s).astype(np.int64) + zp
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.dtype)


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """DequantizeLinear. For codes of up to 16 bits in float32: (q - zp) is exact there, and one
    float32 product rounds like the float64 product of the wide path cast down."""
    q = np.asarray(q)
    s = _broadcast(scale, q.ndim, axis).astype(np.float32)
    if q.dtype.itemsize <= 2:
        return (q.astype(np.float32) - _broadcast(zero_point, q.ndim, axis).astype(np.float32)) * s
    zp = _broadcast(zero_point, q.ndim, axis).astype(np.int64)
    return ((q.astype(np.int64) - zp) * s).astype(np.float32)


def weight_ranges(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (axis None) or per-channel min/max of a weight tensor."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return np.float32(w.min(initial=0.0)), np.float32(w.max(initial=0.0))
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return moved.min(axis=1, initial=0.0), moved.max(axis=1, initial=0.0)


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 weights, one scale per tensor (axis None) or per slice along `axis`:
    returns (q, scale, zero_point)."""
    lo, hi = weight_ranges(w, axis)
    scale, zp = qparams(lo, hi, INT8, symmetric=True)
    return quantize(w, scale, zp, INT8, axis=axis), scale, zp


class WeightMemo:
    """`quantize_weight` of constant weights, remembered by tensor object for one run: the accuracy
    search and the speed guard rebuild the same model tens of times from weights that do not change
    (a clone shares its tensors). Each tensor stays referenced while cached, so its id cannot pass to
    another object. `transposed` marks a Gemm weight read as (K, N)."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, int | None, bool], tuple[object, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    def put(self, tensor, axis: int | None, codes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Codes chosen otherwise (GPTQ) on the same per-channel grid: every scheme of the run that
        stores this weight int8 along `axis` gets them (static, dynamic, per-token, weight-only int8)."""
        self._done[(id(tensor), axis, False)] = (tensor, codes)

    def quantize(self, tensor, axis: int | None, transposed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (id(tensor), axis, transposed)
        if key not in self._done:
            w = tensor.numpy()
            self._done[key] = (tensor, quantize_weight(np.ascontiguousarray(w.T if transposed else w), axis))
        return self._done[key][1]


def quantize_bias(bias: np.ndarray, input_scale, weight_scale) -> tuple[np.ndarray, np.ndarray] | None:
    """int32 bias with scale input_scale * weight_scale, as integer kernels expect.

    Returns None when a value would not fit int32 (a tiny weight scale), so the caller keeps
    that bias in float.
    """
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    if np.any(np.abs(q) > INT32.qmax):
        return None
    return q.astype(np.int32), scale
