"""The Gram matrix of a convolution's input patches (im2col rows): the Hessian X^T X that output-aware
rounding of the convolution's weight needs (quantize/gptq_channel.py).

A convolution is a matrix product per group: each output position reads a patch of Cin/group
channels x kernel taps, in the weight's own (Cin/group, kh, kw) order. The observer sums, per group,
patches^T patches over every output position of every sample: (group, K, K) in float64 with
K = Cin/group * kh * kw. Pure numpy; at most about PATCH_BYTES of patches are held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantkit.calibrate.observers import Observer, register

KIND = "patch_gram"
MAX_GRAM_BYTES = 256 << 20  # a convolution whose Hessians need more is rounded to nearest instead
PATCH_BYTES = 64 << 20  # patches of at most this size are formed at once
MIN_ROWS = 256  # positions a batch contributes, at least (8 K when that is more)
GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class ConvGeometry:
    """A 1-D or 2-D convolution's window, as its kernel reads an NC(H)W input (1-D as height 1)."""

    channels: int  # input channels
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    group: int

    @property
    def k(self) -> int:
        """Columns of one group's patch: Cin/group x kernel taps."""
        return self.channels // self.group * self.kernel[0] * self.kernel[1]

    @property
    def gram_bytes(self) -> int:
        return 8 * self.group * self.k * self.k

    def key(self) -> str:
        """The observer kind that gathers this geometry's Hessians (one per distinct window on a tensor)."""
        nums = [self.channels, *self.kernel, *self.strides, *self.pads, *self.dilations, self.group]
        return f"{KIND}:" + ",".join(str(n) for n in nums)

    @classmethod
    def parse(cls, arg: str) -> ConvGeometry:
        n = [int(v) for v in arg.split(",")]
        return cls(n[0], (n[1], n[2]), (n[3], n[4]), (n[5], n[6], n[7], n[8]), (n[9], n[10]), n[11])

    @classmethod
    def of(cls, node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry | None:
        """The geometry of a Conv with explicit padding and a 3-D or 4-D weight; None otherwise."""
        if node.op_type != "Conv" or len(weight_shape) not in (3, 4):
            return None
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        dims = len(weight_shape) - 2
        group = node.attributes.get_int("group", 1)

        def ints(name: str, default: int) -> list[int]:
            got = node.attributes.get_ints(name, None)
            return list(got) if got is not None else [default] * (2 * dims if name == "pads" else dims)

        kernel, strides, dil, pads = list(weight_shape[2:]), ints("strides", 1), ints("dilations", 1), ints("pads", 0)
        if len(strides) != dims or len(dil) != dims or len(pads) != 2 * dims:
            return None
        if dims == 1:  # as a 2-D window of height 1
            kernel, strides, dil, pads = [1, *kernel], [1, *strides], [1, *dil], [0, pads[0], 0, pads[1]]
        return cls(weight_shape[1] * group, (kernel[0], kernel[1]), (strides[0], strides[1]),
                   (pads[0], pads[1], pads[2], pads[3]), (dil[0], dil[1]), group)


def sample_positions(total: int, rows: int | None) -> np.ndarray:
    """Indices of `rows` of `total` positions (all when rows is None or not fewer), sorted and the
    same on every run: the golden-ratio sequence frac(i * 0.618...) spreads them over every output
    row and column of every sample, where a fixed stride would alias with the image width (a step of
    120 over rows of 160 visits 4 columns)."""
    if rows is None or rows >= total:
        return np.arange(total)
    idx = np.floor(np.mod(np.arange(rows) * GOLDEN, 1.0) * total).astype(np.int64)
    return np.unique(idx)


def _positions(n: int, ho: int, wo: int, rows: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample, output row, output column) of every output position, or of about `rows` of them."""
    idx = sample_positions(n * ho * wo, rows)
    pos = idx % (ho * wo)
    return idx // (ho * wo), pos // wo, pos % wo


def patches(x: np.ndarray, geo: ConvGeometry, rows: int | None = None) -> np.ndarray:
    """Samples' patches: x (N, C, H, W) or (N, C, W) -> (group, positions, K), K ordered as the
    weight's (Cin/group, kh, kw); all N * output positions, or about `rows` of them (sample_positions)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3:
        x = x[:, :, None, :]
    t, left, b, r = geo.pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    n_idx, oh, ow = _positions(len(x), ho, wo, rows)
    moved = np.ascontiguousarray(xp.transpose(0, 2, 3, 1))  # (N, H, W, C): a position's channels together
    taps = [moved[n_idx, oh * sh + i * dh, ow * sw + j * dw] for i in range(kh) for j in range(kw)]
    cols = np.stack(taps, axis=2)  # (positions, C, taps)
    cols = cols.reshape(len(n_idx), geo.group, geo.k)
    return np.ascontiguousarray(cols.transpose(1, 0, 2))


@register(KIND)
class PatchGramObserver(Observer):
    """Per group, the sum of patches^T patches over the positions seen (float64, group x K x K).
    A batch contributes at most rows_per_batch() positions, spread over it: a K x K matrix needs a
    few times K rows per batch, not the 30 000 output positions of an early layer's batch."""

    def __init__(self, arg: str = "") -> None:
        super().__init__()
        self.geometry = ConvGeometry.parse(arg) if arg else None
        self.gram: np.ndarray | None = None
        self.rows = 0

    def rows_per_batch(self) -> int:
        geo = self.geometry
        assert geo is not None
        return min(max(MIN_ROWS, 8 * geo.k), max(geo.k, PATCH_BYTES // (4 * geo.group * geo.k)))

    def update(self, x: np.ndarray) -> None:
        self.count += int(np.size(x))
        if self.geometry is None or np.ndim(x) not in (3, 4) or np.shape(x)[1] != self.geometry.channels:
            return
        p = patches(x, self.geometry, self.rows_per_batch())
        # products in float32, summed over batches in float64
        g = (p[0].T @ p[0])[None] if len(p) == 1 else np.matmul(p.transpose(0, 2, 1), p)
        if self.gram is None:
            self.gram = g.astype(np.float64)
        else:
            np.add(self.gram, g, out=self.gram)
        self.rows += p.shape[1]

    def hessians(self) -> np.ndarray | None:
        """(group, K, K): 2 X^T X / n per group, as GPTQ's layer-wise objective has it."""
        return None if self.gram is None else 2.0 * self.gram / max(self.rows, 1)
