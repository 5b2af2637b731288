"""Learned rounding (AdaRound, Nagel et al. 2020) for int4 blocks, before end-to-end training.

Each MatMulNBits weight keeps its block scales; what it learns is, per weight, which of two
neighbouring codes it takes: the code it came with (RTN or GPTQ) and the next one towards the float
weight w (GPTQ's codes may sit more than one step from w/s, where AdaRound's floor/ceil pair could
not reach them):

    code = clamp(base + h(V), 0, 2^bits - 1),   w_q = (code - zp) * s
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)        (rectified sigmoid)

starting near the current codes (h = 0.5 +- START), minimizing the layer's output error on
calibration inputs in closed form through their Gram matrix G = X^T X (an iteration costs one
N x K x K product whatever the number of tokens):

    rec = tr((w_q - w)^T G (w_q - w)) / tr(w^T G w)
    loss = rec / rec_start + lam * mean(1 - |2 h(V) - 1|^beta)

The regularizer is off for the first WARMUP of the iterations, then beta anneals from 20 to 2 and
pushes every h(V) to 0 or 1; the codes are then rounded hard. A layer keeps the codes it came with
when the learned ones do not reconstruct its output better (the measured error only goes down).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantkit.finetune.graph import QuantGraph

ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2  # share of the iterations before the rounding regularizer starts
BETA = (20.0, 2.0)
START = 0.45  # h starts at 0.5 +- START on the side of the current code: near it, still free to move
DAMP = 0.01  # of the Gram's mean diagonal, as GPTQ: a few thousand tokens under-determine a 1536-wide input
LAMBDA = 100.0  # on the reconstruction error relative to the starting codes (~1): every h(V) ends at 0 or 1
LR = 0.3  # on V (logits): 100 iterations reach what 300 at 0.1 do


@dataclass
class Layer:
    """One MatMulNBits weight to round: its trained initializer's name, the float weight in the
    latent layout (N, k_blocks, block) and the Gram matrix of its input (K padded to k_blocks * block)."""

    name: str
    w: torch.Tensor
    gram: torch.Tensor


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_h(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest."""
    p = torch.clamp((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def latent_layout(w_kn: np.ndarray, blocks: int, block: int) -> torch.Tensor:
    """A float (K, N) MatMul weight as MatMulNBits lays out its codes: (N, k_blocks, block), K padded with 0."""
    k, n = w_kn.shape
    out = np.zeros((n, blocks * block), np.float32)
    out[:, :k] = w_kn.T
    return torch.from_numpy(out.reshape(n, blocks, block))


def reconstruction(dw: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(dw^T G dw) for dw (N, Kp): the summed squared output error over the calibration tokens."""
    return torch.sum((dw @ gram) * dw)


class _Rounder:
    def __init__(self, g: QuantGraph, layer: Layer, current: torch.Tensor) -> None:
        t = g.trained[layer.name]
        self.scale = g.scale(t.scale).detach()[..., None]
        self.zp, self.qmin, self.qmax = t.zero_point[..., None], t.qmin, t.qmax
        self.w, self.gram = layer.w, layer.gram
        # the pair {current, current -+ 1 towards w}: base is its lower code, up = 1 where current is the upper
        up = (current > self.w / self.scale + self.zp).float()
        self.base = current - up
        self.v = torch.nn.Parameter(_inverse_h(0.5 + START * (2 * up - 1)))
        self.norm = float(reconstruction(self.w.reshape(len(self.w), -1), self.gram))

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.base + h, self.qmin, self.qmax)

    def rec(self, codes: torch.Tensor) -> torch.Tensor:
        dw = ((codes - self.zp) * self.scale - self.w).reshape(len(self.w), -1)
        return reconstruction(dw, self.gram) / self.norm


def round_layer(g: QuantGraph, layer: Layer, iters: int, lam: float = LAMBDA, lr: float = LR) -> dict:
    """Learn the rounding of one layer and write the hard codes into g's latent weight (when they beat
    the layer's current codes). Returns the relative reconstruction errors before and after."""
    with torch.no_grad():
        current, _ = g.fake_weight(layer.name)
    r = _Rounder(g, layer, current)
    with torch.no_grad():
        start = float(r.rec(current))
    opt = torch.optim.Adam([r.v], lr=lr)
    warm = int(iters * WARMUP)
    for i in range(iters):
        h = rectified_sigmoid(r.v)
        dw = ((r.codes(h) - r.zp) * r.scale - r.w).reshape(len(r.w), -1)
        with torch.no_grad():
            grad = 2.0 * (dw @ r.gram) / (r.norm * max(start, 1e-12))
        loss = torch.sum(dw * grad)  # d/d(dw) of tr(dw^T G dw) / (norm * start), one product per iteration
        if i >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * (i - warm) / max(iters - warm, 1))) / 2
            loss = loss + lam * torch.mean(1 - torch.abs(2 * h - 1) ** beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = r.codes((r.v >= 0).float())
        learned = float(r.rec(hard))
        if learned < start:
            g.learn.weight(layer.name).copy_((hard - r.zp) * r.scale)
    return {"name": layer.name, "before": start, "after": min(learned, start), "learned": learned}


def layers_of(g: QuantGraph, fp32_weights: dict[str, np.ndarray], grams: dict[str, np.ndarray]) -> list[Layer]:
    """The MatMulNBits weights of g with a float weight and an input Gram matrix, keyed by the
    MatMulNBits node's output (the float model's MatMul computes the same value)."""
    out = []
    for node in g.nodes:
        if node.op_type != "MatMulNBits" or node.outputs[0].name not in fp32_weights:
            continue
        name, t = node.inputs[1].name, g.trained[node.inputs[1].name]
        w = fp32_weights[node.outputs[0].name]
        gram = grams.get(node.inputs[0].name)
        blocks = g.learn.weight(name).shape[1]
        if gram is None or w.shape != (t.size, g.learn.weight(name).shape[0]):
            continue
        padded = np.zeros((blocks * t.block,) * 2, np.float32)
        padded[:t.size, :t.size] = gram
        out.append(Layer(name, latent_layout(w, blocks, t.block), torch.from_numpy(padded)))
    return out


def learn_rounding(g: QuantGraph, layers: Iterable[Layer], iters: int,
                   on_layer: Callable[[dict], None] = lambda r: None) -> list[dict]:
    results = []
    for layer in layers:
        results.append(round_layer(g, layer, iters))
        on_layer(results[-1])
    return results


def _gram_rows(x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """A layer input's rows (tokens): the real ones only when x is laid out (batch, sequence, K)."""
    if positions is not None and x.ndim == 3 and x.shape[:2] == positions.shape:
        return x[positions.astype(bool)]
    return x.reshape(-1, x.shape[-1])


def _float_weight(node) -> np.ndarray | None:
    """The (K, N) weight of a MatMul or Gemm (alpha 1, A not transposed) with a constant B."""
    ins = node.inputs
    if node.op_type not in ("MatMul", "Gemm") or len(ins) < 2 or ins[1] is None or ins[1].const_value is None:
        return None
    w = ins[1].const_value.numpy()
    if node.op_type == "MatMul":
        return w if w.ndim == 2 else None
    a = {k: v.value for k, v in node.attributes.items()}
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or w.ndim != 2:
        return None
    return w.T if a.get("transB", 0) else w


def fp32_layers(g: QuantGraph, fp32_path: Path, feeds: list[dict[str, np.ndarray]],
                positions: list[np.ndarray | None], workdir: Path, threads: int | None = None) -> list[Layer]:
    """The layers to round: the float model's weights of the MatMuls that g's MatMulNBits replaced
    (same output name) and the Gram matrices of their inputs in the float model over `feeds` (real
    tokens only, damped). One onnxruntime pass; layers the float model does not match are skipped."""
    import onnx_ir as ir

    from quantkit import runtime

    model = ir.load(fp32_path)
    weights = {n.outputs[0].name: w for n in model.graph if (w := _float_weight(n)) is not None}
    wanted = {n.inputs[0].name for n in g.nodes if n.op_type == "MatMulNBits" and n.outputs[0].name in weights}
    values = [v for n in model.graph for v in n.outputs if v.name in wanted]
    values += [v for v in model.graph.inputs if v.name in wanted]
    if not values:
        return []
    model.graph.outputs.clear()
    model.graph.outputs.extend(values)
    sess = runtime.session(model, workdir, tag="fp32 layer inputs", threads=threads)
    names = [v.name for v in values]
    grams: dict[str, Any] = {}
    for feed, pos in zip(feeds, positions):
        for name, x in zip(names, sess.run(names, feed)):
            rows = _gram_rows(np.asarray(x, np.float64), pos)
            grams[name] = grams.get(name, 0.0) + rows.T @ rows
    for name, gram in grams.items():
        gram[np.diag_indices_from(gram)] += DAMP * float(np.mean(np.diag(gram)))
        grams[name] = gram.astype(np.float32)
    return layers_of(g, weights, grams)
