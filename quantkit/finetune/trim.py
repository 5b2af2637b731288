"""Padding trimmed from the training batches of a model that reads an attention mask.

A batch of padded sentences spends most of its positions on padding (60% on the MiniLM benchmark's
training data), which the loss weighs at ~0 (loop.PADDING_WEIGHT) and a model that masks its
attention never lets reach a real token. So the training samples are batched by real length (sorted,
then the batches put in an order drawn with a fixed seed: the same data gives the same batches) and
every (batch, sequence) input is cut after the batch's last real position. A step then computes, for
the real tokens, what it computed on the full length, at a fraction of the cost. Held-out batches
keep their samples and are cut the same way. Trimming is training-only: the graph and the written
model keep the input shapes the user's model had.

Applied when all of these hold, else the batches train as given (the report says why):
- the model reads an `attention_mask` (PADDING_MASK) of 0s and 1s shaped (batch, sequence);
- every input shaped like it (cut together with it) has a dynamic sequence axis in the graph, and
  every input stacks its samples on axis 0 (or is fed whole): a graph with a fixed length may hold
  that length in its constants;
- on the batch of the shortest sentences, the fp32 model (the teacher) gives the same outputs at
  the real positions for the cut batch as for the full one (within PROBE_DB): a model whose real
  tokens see the padding (attention that ignores the mask) trains on the full length;
- the quantized graph takes no range at run time over a whole tensor (WHOLE_TENSOR_RANGES), and it
  runs the cut batch. (The trained graph itself is not compared cut against full: with int4
  weights at accuracy level 4 the int8 rounding of the MatMulNBits inputs turns float rounding
  differences into ~40 dB, as between torch and onnxruntime, without any padding involved.)
Only trailing padding is cut (columns that are padding in every row of the batch, from the end):
left-padded data is batched by length but not cut. Models without such a mask are not trimmed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from quantkit.report.compare import zero_one_mask

# the input whose zeros mark padded tokens (the transformers convention)
PADDING_MASK = "attention_mask"
# the fp32 model's outputs at the real positions for a cut batch and the full one agree to float rounding
# when it masks its padding (onnxruntime: bit for bit on MiniLM; torch ~120 dB); padding that reaches
# real tokens changes them by far more
PROBE_DB = 80.0
# quantized ops whose ranges are taken at run time over the whole tensor: padding would change them
WHOLE_TENSOR_RANGES = {"DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
SEED = 0  # the order of the by-length batches


def is_padding_mask(m) -> bool:
    return zero_one_mask(m) and bool(np.any(m))


def real_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row, one past its last real position (0 for a row of padding only)."""
    real = np.asarray(mask) != 0
    return np.where(real.any(1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)


def plan(specs, feed: dict[str, np.ndarray]) -> tuple[list[str], str | None]:
    """The names of the arrays cut together with the mask (labels too when they are per token), or
    [] and why the batches are not trimmed. `specs`: the graph's inputs (calibrate.data.InputSpec)."""
    m = feed.get(PADDING_MASK)
    if not is_padding_mask(m):
        return [], f"the model reads no '{PADDING_MASK}' of 0s and 1s shaped (batch, sequence)"
    if any(s.batch_axis not in (0, None) for s in specs):
        return [], "an input stacks its samples on an axis other than 0"
    cut = [k for k, v in feed.items() if np.ndim(v) >= 2 and v.shape[:2] == m.shape]
    fixed = [s.name for s in specs if s.name in cut and (s.batch_axis != 0 or (s.shape is not None and s.shape[1]))]
    if fixed:
        return [], f"the graph fixes the sequence length of {', '.join(fixed)}"
    return cut, None


def cut_batch(feed: dict[str, np.ndarray], cut: list[str]) -> dict[str, np.ndarray]:
    """`feed` with the arrays in `cut` ending after the batch's last real position."""
    n = max(1, int(real_lengths(feed[PADDING_MASK]).max()))
    return {k: np.ascontiguousarray(v[:, :n]) if k in cut else v for k, v in feed.items()}


def by_length(feeds: list[dict[str, np.ndarray]], rows: set[str]) -> list[dict[str, np.ndarray]]:
    """The samples of `feeds` (batches of one size; `rows`: the arrays stacked on axis 0, the others
    fed whole) regrouped into batches of similar real length, in an order drawn with SEED. Batches
    whose arrays differ in shape (files of different lengths) are kept as they are."""
    first = feeds[0]
    if any(f[k].shape[1:] != first[k].shape[1:] for f in feeds for k in rows):
        return feeds
    size = len(first[PADDING_MASK])
    samples = {k: np.concatenate([f[k] for f in feeds]) for k in rows}
    order = np.argsort(real_lengths(samples[PADDING_MASK]), kind="stable")
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    whole = {k: v for k, v in first.items() if k not in rows}
    return [{**whole, **{k: v[groups[i]] for k, v in samples.items()}}
            for i in np.random.default_rng(SEED).permutation(len(groups))]


def probe(run: Callable[[dict[str, np.ndarray]], list], feed: dict[str, np.ndarray],
          cut: list[str]) -> tuple[float, list[bool]]:
    """SQNR (dB) of `run`'s outputs on the cut batch against the full one, at the real positions of
    outputs laid out (batch, sequence, ...) and everywhere on the others (-inf when `run` fails on
    the cut batch or gives outputs of other shapes), and which outputs are laid out so: told from
    the full batch, where no other axis can pass for the sequence."""
    short = cut_batch(feed, cut)
    mask, real = feed[PADDING_MASK], short[PADDING_MASK]
    full = [np.asarray(o, np.float64) for o in run(feed)]
    tokens = [a.ndim >= 2 and a.shape[:2] == mask.shape for a in full]
    try:
        got = [np.asarray(o, np.float64) for o in run(short)]
    except Exception:  # any failure on the shorter length (a shape held in a constant...): it cannot be cut
        return -math.inf, tokens
    sig = err = 0.0
    for a, b, token in zip(full, got, tokens):
        w = np.ones(())
        if token:
            a, w = a[:, :real.shape[1]], real.astype(np.float64).reshape(*real.shape, *([1] * (a.ndim - 2)))
        if a.shape != b.shape:
            return -math.inf, tokens
        sig += float(np.sum(w * a**2))
        err += float(np.sum(w * (a - b) ** 2))
    return (math.inf if err == 0 else 10 * math.log10(max(sig, 1e-300) / err)), tokens


def graph_runner(g) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """The trained graph (QuantGraph) as a function of a feed, its outputs as arrays."""
    import torch

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            outs = g(*[torch.from_numpy(np.ascontiguousarray(feed[k])) for k in g.inputs])
        return [o.numpy() for o in outs[:len(g.outputs)]]
    return run
