"""Streaming range observers: each sees one batch at a time and keeps O(1) state per tensor.

An observer is registered by name; `--method NAME` looks it up. A new method is a class with
`update(array)` and `range() -> (lo, hi)`.
"""

from __future__ import annotations

import numpy as np

OBSERVERS: dict[str, type[Observer]] = {}


def register(name: str):
    def wrap(cls):
        OBSERVERS[name] = cls
        cls.name = name
        return cls

    return wrap


class Observer:
    name = "base"

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    @property
    def seen(self) -> bool:
        raise NotImplementedError


@register("minmax")
class MinMaxObserver(Observer):
    """Running min and max over every element seen. Non-finite values are counted, not used:
    an -inf in an attention mask would otherwise make the range unusable."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.nonfinite = 0
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        self.count += x.size
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - finite.sum())
            x = x[finite]
            if x.size == 0:
                return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(self) -> tuple[float, float]:
        if not self.seen:
            return 0.0, 0.0
        return self.lo, self.hi


def make_observer(method: str) -> Observer:
    return OBSERVERS[method]()
