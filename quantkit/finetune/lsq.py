"""What trains (LSQ-style): latent float weights behind the fake quantizers, and scales.

A scale is trained as s = s0 * exp(t) with t starting at 0: updates are relative (Adam's steps on
t are a fraction of the scale whatever its magnitude) and the sign of s never flips (symmetric
int4 blocks use negative scales). Zero points stay as placed: activation ranges move by their
scale, around the zero point the calibration chose. Everything else in the graph is a constant
that needs no gradient.
"""

from __future__ import annotations

import numpy as np
import torch


class Learnable(torch.nn.Module):
    """Latent weights and log-scales, keyed by the ONNX initializer they replace."""

    def __init__(self) -> None:
        super().__init__()
        self.latent = torch.nn.ParameterList()
        self.log_scale = torch.nn.ParameterList()
        self.float_params = torch.nn.ParameterList()
        self._base: list[torch.Tensor] = []
        self.weights: dict[str, int] = {}
        self.scales: dict[str, int] = {}
        self.floats: dict[str, int] = {}
        self.weight_scales: set[str] = set()

    def add_weight(self, name: str, init: torch.Tensor) -> None:
        if name not in self.weights:
            self.weights[name] = len(self.latent)
            self.latent.append(torch.nn.Parameter(init.detach().clone().float()))

    def add_scale(self, name: str, init: torch.Tensor, weight: bool = False) -> None:
        """A scale that trains as s0 * exp(t); `weight`: a weight quantizer's (else an activation range)."""
        if weight:
            self.weight_scales.add(name)
        if name not in self.scales:
            self.scales[name] = len(self.log_scale)
            self._base.append(init.detach().clone().float())
            self.log_scale.append(torch.nn.Parameter(torch.zeros_like(self._base[-1])))

    def add_float(self, name: str, init: torch.Tensor) -> None:
        """A float initializer the graph uses as is (no quantizer): trained directly."""
        if name not in self.floats:
            self.floats[name] = len(self.float_params)
            self.float_params.append(torch.nn.Parameter(init.detach().clone().float()))

    def plain(self, name: str) -> torch.Tensor:
        return self.float_params[self.floats[name]]

    def weight(self, name: str) -> torch.Tensor:
        return self.latent[self.weights[name]]

    def scale(self, name: str) -> torch.Tensor:
        i = self.scales[name]
        return self._base[i] * torch.exp(self.log_scale[i])

    def param_groups(self, lr: float, scale_lr: float, weight_scale_lr: float) -> list[dict]:
        """Adam groups: latent and float weights at lr, activation ranges at scale_lr, weight scales at
        weight_scale_lr."""
        weight = [self.log_scale[i] for n, i in self.scales.items() if n in self.weight_scales]
        ranges = [self.log_scale[i] for n, i in self.scales.items() if n not in self.weight_scales]
        groups = ({"params": [*self.latent, *self.float_params], "lr": lr}, {"params": ranges, "lr": scale_lr},
                  {"params": weight, "lr": weight_scale_lr})
        return [g for g in groups if g["params"]]

    def count(self) -> dict[str, int]:
        return {"weights": sum(p.numel() for p in self.latent), "scales": sum(p.numel() for p in self.log_scale),
                "float": sum(p.numel() for p in self.float_params)}

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.parameters(), saved):
                p.copy_(s)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """An initializer's array in torch; low-bit (ml_dtypes int4) arrays as int8, bool kept."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf" or a.dtype.itemsize == 0 or str(a.dtype) in ("int4", "uint4"):
        a = a.astype(np.int8 if str(a.dtype).startswith("int") else np.uint8)
    if a.dtype == np.uint16 or a.dtype == np.uint32 or a.dtype == np.uint64:
        a = a.astype(np.int64)
    return torch.from_numpy(np.array(a, order="C", copy=True))  # (ascontiguousarray would make 0-d arrays 1-d)
