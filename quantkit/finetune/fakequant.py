"""Fake quantization in torch that rounds and clips as onnxruntime's kernels do.

  QuantizeLinear    q = saturate(round_half_even(x / scale) + zero_point)   (torch.round is half-even)
  DequantizeLinear  x = (q - zero_point) * scale
  MatMulNBits       w = (code - zero_point) * scale per block of `block` rows of K; with
                    accuracy_level 4 the kernel also quantizes A to int8 per block of K
                    (round(a * 127 / max|a|)), which is emulated here so training sees that noise too
  DynamicQuantizeMatMul  A to uint8 per tensor over [min(0, a), max(0, a)] at run time

Rounding is straight-through (the gradient of round is taken as 1); clamping passes no gradient
outside the range, so a learnable scale gets LSQ's gradient: round(x/s) - x/s inside the range,
the clip bound outside it.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as float) of x: what QuantizeLinear stores."""
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def along(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along `axis` of a rank-`rank` tensor."""
    if t.dim() != 1 or rank == 0:
        return t
    shape = [1] * rank
    shape[axis % rank] = -1
    return t.reshape(shape)


def blocked(t: torch.Tensor, axis: int, block: int, size: int) -> torch.Tensor:
    """Blocked DequantizeLinear: each scale (or zero point) repeated over its `block` entries of `axis`."""
    return t.repeat_interleave(block, dim=axis).narrow(axis, 0, size)


def block_fake_quant(wb: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Blocks (N, k_blocks, block) of latent weights with (N, k_blocks) scales: MatMulNBits' codes."""
    return fake_quant(wb, scale[..., None], zero_point[..., None], 0, 2**bits - 1)


def int8_blocks_of_a(a: torch.Tensor, block: int) -> torch.Tensor:
    """MatMulNBits accuracy_level 4: A quantized symmetrically to int8 per block of K (last axis)."""
    k = a.shape[-1]
    pad = (-k) % block
    ap = torch.nn.functional.pad(a, (0, pad)) if pad else a
    ab = ap.reshape(*ap.shape[:-1], -1, block)
    amax = ab.detach().abs().amax(dim=-1, keepdim=True)
    nonzero = amax > 0
    scale = torch.where(nonzero, amax / 127.0, torch.ones_like(amax))
    # the kernel multiplies by 127 / amax rather than dividing by the scale: values that are exact
    # multiples of a step (dequantized inputs) land on the other side of .5 otherwise
    # (a tensor numerator: torch computes scalar / tensor as reciprocal * scalar, one ulp off)
    inverse = torch.where(nonzero, torch.full_like(amax, 127.0) / torch.where(nonzero, amax, torch.ones_like(amax)),
                          torch.zeros_like(amax))
    out = torch.clamp(round_ste(ab * inverse), -127, 127) * scale
    return out.reshape(ap.shape)[..., :k]


def dynamic_uint8(a: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: uint8 over [min(0, a), max(0, a)], zero point rounded and saturated."""
    lo = torch.clamp(a.detach().min(), max=0.0)
    hi = torch.clamp(a.detach().max(), min=0.0)
    scale = (hi - lo) / torch.full_like(hi, 255.0)  # a true division, as the kernel does
    if float(scale) == 0.0:
        return a
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return fake_quant(a, scale, zp, 0, 255)
