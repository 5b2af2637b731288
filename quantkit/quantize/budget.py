"""Accuracy-budgeted placement: which quantized ops must leave static int8 so the model meets a
target, found from measurements on calibration data, never from timings.

1. Sensitivity. The fully quantized model runs on the probe's first 32 samples (fewer once every
   op of a chunk has seen SENSITIVITY_VALUES values per output channel, or its figures stopped
   moving; each op stops being measured on its own) with every quantized op's inputs and output
   exposed; each op is then also run alone, in float, on the very inputs it
   received. The difference is the noise the op adds itself (its input and weight rounding),
   apart from any error that arrived from upstream, weighed per output channel against that
   channel's own power: an op fed by outlier-heavy activations (the GELU output before an
   encoder's FFN down-projection) spreads its rounding over every channel of an output whose power
   sits in one outlier channel, and the next normalization brings those channels back to unit
   scale. The cost is one run of the model per batch and per chunk of ops (chunks sized to hold
   about 256 MB of tensors), plus one tiny single-node session per op.
2. Search. Ops leave static int8 in rank order, each for an alternative, level by level: dynamic
   int8 (int8 weight, activations quantized per run), then weight-only int8 (int8 weight in
   blocks, float activations: the file stays as small at float speed), then float. At the first
   level where the target can be met, the fewest ops that meet it are found by bisection over the
   ranking, each probe one candidate model scored on the same calibration batches: log2(n) + 1
   candidates for n ops, plus at most a few that give the least sensitive chosen ops back one
   level. A candidate stops being scored at the first batch after which it could not meet the
   target even if the rest of the probe came out exactly as fp32's: failing candidates cost a
   batch or two, and every verdict is the one the whole probe would give. The same inputs give
   the same placement.
3. Plans. The result is a mapping node -> scheme that `--plan` writes and `--from-plan` replays
   without any search.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.errors import InputError
from quantkit.graph import segments
from quantkit.graph.ir_edit import const_array
from quantkit.quantize import qparams as qp
from quantkit.quantize import simulate
from quantkit.quantize.plan import SPEED_ONLY_KINDS, OpKind, Plan, QuantizedOp, SchemeName
from quantkit.report.compare import OutputComparison
from quantkit.report.parts import Parts

PLAN_FORMAT = "quantkit-plan-1"
DEFAULT_MIN_COSINE = 0.998  # with no target: every float output keeps this mean cosine on the probe...
# ...and a CTC recognizer's output (per-position class probabilities, mostly blank) the same decoded
# sequence on this share of the samples: the reader keeps the text, and the cosine of a whole
# (positions x classes) map says little about the few positions whose class flips. 96% (searched for at
# 96.8%, at most 4 of the 128 probe samples): at 97% on 128 samples ocr_rec came out all but float (98.8%
# of its held-out lines, 1.02x smaller); at 96% it reads 96.1% of them as fp32 does, 1.45x smaller
DEFAULT_SEQUENCE_AGREEMENT = 0.96
PROBE_SAMPLES = 64
# ...and twice that for a CTC output: its figure is all-or-nothing per sample (the same decoded sequence or
# not), and at 64 samples the default's one allowed mismatch passed placements that decode ~6% of held-out
# lines differently (ocr_rec: 94.1% on the 256 evaluation lines): the search ends on the luckiest candidate
SEQUENCE_PROBE_SAMPLES = 128
SQNR_MARGIN_DB = 1.0  # the search aims this far above --min-sqnr...
COSINE_MARGIN = 0.8  # ...and at 80% of the cosine error (or top-1 disagreement) allowed
# the sensitivity step exposes a chunk of ops' tensors at a time: the first chunk has FIRST_CHUNK ops, later
# ones as many as keep one batch of their tensors (both models) near CHUNK_BYTES (or what the calibration pass
# held already, when more), between 1 and MAX_CHUNK: each chunk reruns the models up to its ops
FIRST_CHUNK, MAX_CHUNK, CHUNK_BYTES = 4, 64, 256 << 20
SENSITIVITY_SAMPLES = 32  # of the probe's at most: each op's noise is a ratio of sums over thousands of values
# ...and fewer when every op of a chunk has seen this many values per output channel already (a convolution's
# feature maps give tens of thousands per sample): each further batch reruns the model up to the chunk
SENSITIVITY_VALUES = 8192
# ...or once its own-noise figures (its static int8's and each alternative's) have moved less than STEADY_DB
# for STEADY_BATCHES batches in a row: an op with a few values per channel per sample (a squeeze-excite
# convolution's 1x1 output, a detector's coarsest head) would otherwise keep every batch of the probe running,
# its figure settled long before (PP-PicoDet layout: 4 squeeze-excite convolutions kept 32 pages running)
STEADY_DB, STEADY_BATCHES = 0.25, 3
# ...and after MAX_OP_BATCHES batches at most, its figure taken as it stands: an op still moving by then has few
# values per channel per sample, and each further batch reruns both models up to its chunk for it (layout:
# 2-3 squeeze-excite convolutions kept 12 more pages running, ~5 s of a 28 s run). Its figure may be a few dB
# off the whole probe's (up to 6 dB there), which can only make the search's guesses less tight: every
# placement the search chooses is measured on the probe, never inferred from these figures
MAX_OP_BATCHES = 8
FLOAT = "float"
SIMULATED_ROWS = 1024  # rows (tokens) of each op's input its alternatives are emulated on: enough to rank them


def op_key(op: QuantizedOp) -> str:
    """A node's stable name in plans: its name, or its first output's when it has none."""
    return op.key


@dataclass(frozen=True)
class Target:
    """What the placement must reach on the probe batches."""

    min_cosine: float | None = None
    min_sqnr: float | None = None
    max_disagreement: float | None = None  # top-1 disagreement, from --max-accuracy-drop (points/100)
    default: bool = False
    max_sequence_disagreement: float | None = None  # CTC-decoded sequences (default budget only)

    @classmethod
    def from_gates(cls, min_cosine: float | None, min_sqnr: float | None, max_accuracy_drop: float | None) -> Target:
        if min_cosine is None and min_sqnr is None and max_accuracy_drop is None:
            return cls(min_cosine=DEFAULT_MIN_COSINE, default=True,
                       max_sequence_disagreement=1 - DEFAULT_SEQUENCE_AGREEMENT)
        drop = None if max_accuracy_drop is None else max_accuracy_drop / 100.0
        return cls(min_cosine, min_sqnr, drop)

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"mean cosine >= {self.min_cosine:g}")
        if self.min_sqnr is not None:
            parts.append(f"SQNR >= {self.min_sqnr:g} dB")
        if self.max_disagreement is not None:
            parts.append(f"top-1 agreement >= {100 * (1 - self.max_disagreement):g}%")
        if self.max_sequence_disagreement is not None:
            parts.append(f"same decoded sequence on >= {100 * (1 - self.max_sequence_disagreement):g}% of samples "
                         "(CTC outputs)")
        return " and ".join(parts) + (" (default budget)" if self.default else "")

    def with_margin(self) -> Target:
        """The target the search aims for: a little above the one asked, since the probe batches
        are a sample and the gates are checked on the evaluation data."""
        def shrunk(x: float | None) -> float | None:
            return None if x is None else x * COSINE_MARGIN

        return Target(None if self.min_cosine is None else 1 - (1 - self.min_cosine) * COSINE_MARGIN,
                      None if self.min_sqnr is None else self.min_sqnr + SQNR_MARGIN_DB,
                      shrunk(self.max_disagreement), self.default, shrunk(self.max_sequence_disagreement))

    def shortfall(self, figures: list[dict]) -> str | None:
        """Why the figures miss the target, or None when they meet it."""
        for f in figures:
            why = self._output_shortfall(f)
            if why is not None:
                return why + (f" at best, after {f['samples_scored']} probe samples" if "samples_scored" in f else "")
        return None

    def _output_shortfall(self, f: dict) -> str | None:
        if f["nonfinite"]:
            return f"output '{f['name']}' has non-finite values"
        if self.min_cosine is not None and f["cosine"] < self.min_cosine:
            return f"output '{f['name']}' cosine {f['cosine']:.5f} < {self.min_cosine:g}"
        if self.min_sqnr is not None and f["sqnr_db"] < self.min_sqnr:
            return f"output '{f['name']}' SQNR {f['sqnr_db']:.1f} dB < {self.min_sqnr:g}"
        if (self.max_disagreement is not None and f.get("top1") is not None
                and 1 - f["top1"] > self.max_disagreement):
            return f"output '{f['name']}' top-1 agreement {100 * f['top1']:.2f}% too low"
        if (self.max_sequence_disagreement is not None and f.get("sequences") is not None
                and 1 - f["sequences"] > self.max_sequence_disagreement):
            return f"output '{f['name']}' same decoded sequence on {100 * f['sequences']:.2f}% of samples, too few"
        return None


@dataclass
class Probe:
    """A few calibration batches, the fp32 model's outputs on them, and per output and batch the
    samples and signal power a perfect candidate would add (for the bound in `score`)."""

    feeds: list[dict[str, np.ndarray]]
    names: list[str]  # the graph outputs each run fetches
    reference: list[list[np.ndarray]]
    rest: list[list[tuple[int, float, int]]] = field(default_factory=list)  # [batch][part]: what comes after it
    parts: Parts | None = None  # what is scored: each output, or each part of a concatenated one (report/parts.py)
    scored: Parts = field(init=False)  # `parts`, or every output whole

    def __post_init__(self) -> None:
        self.scored = self.parts if self.parts is not None else Parts.whole(len(self.names), self.names)

    @classmethod
    def take(cls, fp32_session, batches, limit: int = PROBE_SAMPLES,
             sequence_limit: int = SEQUENCE_PROBE_SAMPLES, parts: Parts | None = None) -> Probe:
        """The first `limit` samples of `batches`, or `sequence_limit` when an output is a CTC output
        (judged on the first `limit`, as the report's comparison judges it). `parts`: what is scored
        (None: every output whole)."""
        feeds: list[dict[str, np.ndarray]] = []
        reference: list[list[np.ndarray]] = []
        n, want = 0, limit
        inputs = {i.name for i in fp32_session.get_inputs()}
        names = [o.name for o in fp32_session.get_outputs()]
        for b in batches:
            feeds.append({k: v for k, v in b.items() if k in inputs})
            reference.append(fp32_session.run(names, feeds[-1]))
            n += len(next(iter(b.values())))
            if n >= want and want == limit and sequence_limit > limit and \
                    cls(feeds, names, reference, parts=parts)._sequences():
                want = sequence_limit
            if n >= want:
                break
        probe = cls(feeds, names, reference, parts=parts)
        probe.rest = probe._perfect_rest()
        return probe

    def _sequences(self) -> bool:
        """Whether an output is scored as decoded CTC sequences."""
        perfect = [OutputComparison(name) for name in self.scored.names]
        for ref, feed in zip(self.reference, self.feeds):
            for c, r in zip(perfect, self.scored.split(ref)):
                c.update(r, r, feed=feed)
        return any(c.samples and c.ctc for c in perfect)

    def _perfect_rest(self) -> list[list[tuple[int, float, int]]]:
        """For each batch, per output: the samples, signal power and positions of the batches after it,
        as the report's comparison counts them (padding and non-finite reference values left out)."""
        perfect = [OutputComparison(name) for name in self.scored.names]
        totals = []
        for ref, feed in zip(self.reference, self.feeds):
            for c, r in zip(perfect, self.scored.split(ref)):
                c.update(r, r, feed=feed)
            totals.append([(c.samples, c.signal, c.positions) for c in perfect])
        end = totals[-1] if totals else [(0, 0.0, 0)] * len(self.scored.names)
        return [[(e[0] - t[0], e[1] - t[1], e[2] - t[2]) for t, e in zip(ts, end)] for ts in totals]

    def score(self, session, target: Target | None = None, reorder: bool = False, parallel: int = 1) -> list[dict]:
        """Per output: mean cosine, SQNR, top-1 agreement (class scores), non-finite count.

        With a target, scoring stops at the first batch after which the target can no longer be
        met even if every remaining probe sample came out exactly like fp32's (the figures then
        are that bound, `samples_scored` says on how many samples, `scored_only` gives the figures
        of those samples alone, the search's estimate of the whole): a candidate that clearly fails
        costs a batch or two, and the decision is the one the whole probe would give. `reorder`
        (the all-static candidate) puts the batches where this session errs most first, so that
        later candidates that fail show it after fewer batches. `parallel` batches run at a time
        (runtime.run_all), and are scored in order: the same figures, at most parallel - 1 batches
        run past an early stop."""
        scored = self.scored
        comparisons = [OutputComparison(name) for name in scored.names]
        per_batch: list[list[OutputComparison]] = []
        for b, (ref, feed, outs) in enumerate(self._runs(session, parallel)):
            ref, outs = scored.split(ref), scored.split(outs)
            for c, r, q in zip(comparisons, ref, outs):
                c.update(r, q, feed=feed)
            if reorder:
                per_batch.append([OutputComparison(name) for name in scored.names])
                for c, r, q in zip(per_batch[-1], ref, outs):
                    c.update(r, q, feed=feed)
            last = b == len(self.feeds) - 1
            if target is not None and not last:
                bound = [_figures(c, *rest) for c, rest in zip(comparisons, self.rest[b])]
                if target.shortfall(bound) is not None:
                    return [{**f, "samples_scored": c.samples, "scored_only": _figures(c)}
                            for f, c in zip(bound, comparisons)]
        if reorder:
            self._hardest_first(per_batch)
        return [_figures(c) for c in comparisons]

    def _runs(self, session, parallel: int):
        """(reference, feed, the session's outputs) per batch, `parallel` batches run at a time."""
        step = max(1, parallel)
        for i in range(0, len(self.feeds), step):
            feeds = self.feeds[i:i + step]
            outs = runtime.run_all([functools.partial(session.run, self.names, f) for f in feeds]) \
                if step > 1 else [session.run(self.names, f) for f in feeds]
            yield from zip(self.reference[i:i + step], feeds, outs)

    def _hardest_first(self, per_batch: list[list[OutputComparison]]) -> None:
        """Batches sorted by their share of the candidate's error (cosine deficit, error power and
        top-1 disagreements, each as a share of its total over the probe), largest first; ties keep
        the probe's order."""
        def parts(c: OutputComparison) -> tuple[float, float, float]:
            return c.samples - c.cos_sum, c.noise, float(c.samples - c.top1_agree) if c.scores else 0.0

        rows = [[parts(c) for c in batch] for batch in per_batch]
        n = len(self.scored.names)
        totals = [[sum(r[o][i] for r in rows) for i in range(3)] for o in range(n)]
        share = [sum(r[o][i] / totals[o][i] for o in range(n) for i in range(3) if totals[o][i] > 0)
                 for r in rows]
        order = sorted(range(len(rows)), key=lambda b: (-share[b], b))
        self.feeds = [self.feeds[b] for b in order]
        self.reference = [self.reference[b] for b in order]
        self.rest = self._perfect_rest()


def _figures(c: OutputComparison, rest_samples: int = 0, rest_signal: float = 0.0, rest_positions: int = 0) -> dict:
    """The target's figures for one output from the report's own comparison (report/compare.py);
    with `rest_*`, the best the output could still reach if that many more samples of that much
    signal matched fp32 exactly (cosine 1, no error, same top class). `positions`: the share of
    positions with the same top class, for per-position class probabilities; for those outputs
    `top1` (what --max-accuracy-drop bounds) is that share too; `sequences`: for a CTC output, the
    share of samples decoded to the same sequence."""
    total = max(c.samples + rest_samples, 1)
    if not c.is_float:  # a non-float output: all or nothing
        same = c.exact == c.samples
        return {"name": c.name, "nonfinite": 0, "cosine": 1.0 if same else 0.0,
                "sqnr_db": math.inf if same else -math.inf, "top1": None, "positions": None, "sequences": None}
    if c.nonfinite:
        sqnr = -math.inf
    else:
        sqnr = math.inf if c.noise == 0 else 10.0 * math.log10(max(c.signal + rest_signal, 1e-300) / c.noise)
    positions = (c.position_agree + rest_positions) / (c.positions + rest_positions) \
        if c.per_position and c.positions else None
    top1 = (c.top1_agree + rest_samples) / total if c.scores else positions
    sequences = (c.sequence_agree + rest_samples) / total if c.ctc else None
    return {"name": c.name, "nonfinite": c.nonfinite, "cosine": (c.cos_sum + rest_samples) / total,
            "sqnr_db": sqnr, "top1": top1, "positions": positions, "sequences": sequences}


# ---------------------------------------------------------------- sensitivity

def sensitivity(fp32: ir.Model, quantized: ir.Model, plan: Plan, probe: Probe, session: Callable[[ir.Model], Any],
                lean_session: Callable[[ir.Model], Any] | None = None,
                splits: Callable[[str], Any] = lambda x: None, memo: qp.WeightMemo | None = None,
                chunk_bytes: int = CHUNK_BYTES, expected_bytes: int = 0) -> list[dict]:
    """Every planned op with the noise it adds itself, ranked (largest first).

    `own_noise`: the op's quantized output against the float op applied to the very inputs it
    received in the quantized model, relative to that output's power: its weight, input and output
    rounding alone (the output after the op's own output QDQ, when it has one), whatever error arrived
    from upstream. `input_sqnr_db`/`output_sqnr_db`: the
    fidelity it receives and passes on against fp32. Ops are measured a chunk at a time, so only
    their tensors of one batch (and the chunks' sessions) are held at once: about `chunk_bytes`
    of them (the caller passes what calibration held already, when that is more than CHUNK_BYTES).
    `expected_bytes`: what one batch of every op's tensors should take (both models), from the
    calibration pass; when it fits `chunk_bytes`, the first chunk takes every op (up to MAX_CHUNK)
    instead of FIRST_CHUNK ops measured only to size the next chunks. Each chunk's tensors come from a
    segment of each model that computes only what earlier chunks' segments did not (graph/segments.py),
    batch by batch, every chunk in turn, until every chunk's ops have seen SENSITIVITY_VALUES values per
    channel, their figures are steady (STEADY_DB) or they were measured on MAX_OP_BATCHES batches; an op done is
    no longer measured while its chunk runs on."""
    outs = {op_key(op): op.node.outputs[0].name for op in plan.ops}
    small = lean_session or session  # many sessions alive at once: no arena kept per session
    ctx = _ChunkContext(segments.Pipeline(fp32, small), segments.Pipeline(quantized, small),
                        {(n.name or n.outputs[0].name): n for n in fp32.graph},  # plan.ops are the rewritten copies
                        small, splits, {v.name for op in plan.ops for v in op.inputs}, memo)
    chunks: list[_Chunk] = []
    for b, feed in enumerate(_head(probe.feeds, SENSITIVITY_SAMPLES)):
        kept: tuple[dict, dict] = ({}, {})  # what each model's segments pass on, this batch only
        if b == 0:
            i, size = 0, MAX_CHUNK if 0 < expected_bytes <= chunk_bytes else FIRST_CHUNK
            while i < len(plan.ops):
                chunks.append(_Chunk(plan.ops[i:i + size], ctx, kept))
                held = chunks[-1].step(ctx, feed, kept)
                i += size
                size = max(1, min(MAX_CHUNK, int(chunk_bytes * len(chunks[-1].ops) / max(held, 1))))
            continue
        last = max((j for j, c in enumerate(chunks) if not c.satisfied()), default=-1)
        if last < 0:
            break
        for c in chunks[:last + 1]:  # a satisfied chunk's segments still run: later ones read what they pass on
            c.step(ctx, feed, kept, measure=not c.satisfied())
    drift: dict[str, list] = {}  # against fp32: signal and error power per channel
    own: dict[str, list] = {}  # against the float op on the same inputs, per channel; key/scheme for alternatives
    for c in chunks:
        drift.update(c.drift)  # a tensor shared by two chunks is measured alike in both
        own.update(c.own)
    return _sensitivity_rows(plan, outs, drift, own)


def _sensitivity_rows(plan: Plan, outs: dict[str, str], drift: dict[str, list], own: dict[str, list]) -> list[dict]:
    rows: list[dict[str, Any]] = []
    for op in plan.ops:
        key = op_key(op)
        received = max((_ratio(drift.get(v.name)) for v in op.inputs), default=0.0)
        rows.append({"node": key, "op_type": op.node.op_type, "kind": op.kind.value,
                     "own_sqnr_db": _finite(_noise_db(_channel_ratio(own.get(key)))),
                     "input_sqnr_db": _finite(_noise_db(received)),
                     "output_sqnr_db": _finite(_noise_db(_ratio(drift.get(outs[key])))),
                     "own_noise": _finite(_channel_ratio(own.get(key))),
                     "alternatives_own_sqnr_db": {a: _finite(_noise_db(_channel_ratio(own[f"{key}/{a}"])))
                                                  for a in simulate.SIMULATED if f"{key}/{a}" in own}})
    # the largest own noise first; ties by name, so the order is the same on every run
    rows.sort(key=lambda r: (-(r["own_noise"] if r["own_noise"] is not None else math.inf), r["node"]))
    return rows


@dataclass
class _ChunkContext:
    ref: segments.Pipeline  # the fp32 model's segments
    q: segments.Pipeline  # the quantized model's
    originals: dict[str, ir.Node]
    small: Callable[[ir.Model], Any]  # session maker for the single-op models
    splits: Callable[[str], Any]
    consumed: set[str]  # tensors planned ops read through QDQ
    memo: qp.WeightMemo | None


class _Chunk:
    """A chunk of ops: its segment of each model, the session recomputing each op alone in float on the
    quantized model's tensors, and its ops' accumulated drift and own noise."""

    def __init__(self, ops: list[QuantizedOp], ctx: _ChunkContext, kept: tuple[dict, dict]) -> None:
        self.ops = ops
        self.outs = outs = {op_key(op): op.node.outputs[0].name for op in ops}
        self.rounded = {op_key(op): name for op in ops if (name := _rounded_output(op, ctx.consumed)) is not None}
        names = sorted({v.name for op in ops for v in op.inputs} | set(outs.values()))
        self.ref_segment = ctx.ref.add(names, kept[0])
        self.q_segment = ctx.q.add(sorted({*names, *self.rounded.values()}), kept[1])
        self.wanted = [n for n in names if n in ctx.ref.produced and n in ctx.q.produced]
        self.q_wanted = self.wanted + sorted(set(self.rounded.values()) & set(ctx.q.produced))
        available = set(self.wanted) | ctx.ref.graph_inputs
        originals = ctx.originals
        self.measured = [k for k in outs if outs[k] in self.wanted and k in originals
                         and all(v.name in available for v in _run_time_inputs(originals[k]))]
        axes = {op_key(op): op.weight_axis for op in ops}
        self.alone = ctx.small(_alone(ctx.ref.model, [originals[k] for k in self.measured],
                                      [axes[k] for k in self.measured], ctx.memo)) if self.measured else None
        self.alone_in = [i.name for i in self.alone.get_inputs()] if self.alone is not None else []
        self.drift = {n: [0.0, 0.0] for n in self.wanted}
        self.own: dict[str, list] = {k: [0.0, 0.0] for k in self.measured}
        self.sims = {k: w for k in self.measured if (w := _simulated(originals[k], ctx.splits)) is not None}
        alone_out = {o.name for o in self.alone.get_outputs()} if self.alone is not None else set()
        self.emulated = [k for k in self.measured if outs[k] + WEIGHT_ONLY_ALONE in alone_out]
        self.seen = dict.fromkeys(self.measured, 0)  # values per output channel each op's own noise was measured on
        # the chunk's tensors each op reads or writes: their drift is accumulated while the op is measured
        self.tensors = {op_key(op): [n for n in (*(v.name for v in op.inputs), outs[op_key(op)]) if n in self.drift]
                        for op in ops}
        self.steady = dict.fromkeys(self.measured, 0)  # batches in a row its own-noise figures moved < STEADY_DB
        self.batches = dict.fromkeys(self.measured, 0)  # batches its own noise was measured on
        self.figures: dict[str, list[float]] = {}  # its own-noise figures (dB) after the last batch

    def satisfied(self) -> bool:
        return bool(self.seen) and all(self._done(k) for k in self.measured)

    def _settle(self, key: str) -> None:
        """After a batch: whether the op's own-noise figures (static int8's, then each alternative's) moved
        less than STEADY_DB from the last batch's."""
        figures = [_noise_db(_channel_ratio(self.own[key]))]
        figures += [_noise_db(_channel_ratio(self.own[f"{key}/{a}"])) for a in simulate.SIMULATED
                    if f"{key}/{a}" in self.own]
        last = self.figures.get(key)
        still = last is not None and len(last) == len(figures) and all(
            a == b or abs(a - b) < STEADY_DB for a, b in zip(last, figures))  # equal: both infinite (no noise)
        self.steady[key] = self.steady[key] + 1 if still else 0
        self.batches[key] += 1
        self.figures[key] = figures

    def step(self, ctx: _ChunkContext, feed: dict[str, np.ndarray], kept: tuple[dict, dict],
             measure: bool = True) -> int:
        """Run the chunk's segments on a batch and (with `measure`) accumulate, for the ops still measuring
        (their tensors' drift, their own noise); returns the bytes the chunk's tensors of the batch took
        (both models)."""
        ref_out, got_out = runtime.run_all([functools.partial(ctx.ref.run, self.ref_segment, feed, kept[0]),
                                            functools.partial(ctx.q.run, self.q_segment, feed, kept[1])])
        if not measure:
            return 0
        ref = {n: ref_out[n] for n in self.wanted}
        got = {n: got_out[n] for n in self.q_wanted}
        active = [k for k in self.measured if not self._done(k)]
        # the first batch measures every tensor's drift (an op with no own-noise figure has only that), later
        # ones the tensors of the ops still measuring
        names = {n for k in active for n in self.tensors[k]} if any(self.seen.values()) else set(self.wanted)
        for n in self.wanted:
            if n in names:
                _accumulate_channels(self.drift[n], ref[n], got[n], -1)
        if self.alone is not None and active:
            self._own(ctx.originals, feed, got, active)
        return sum(a.nbytes for a in ref.values()) + sum(a.nbytes for a in got.values())

    def _done(self, key: str) -> bool:
        return self.seen[key] >= SENSITIVITY_VALUES or self.steady[key] >= STEADY_BATCHES \
            or self.batches[key] >= MAX_OP_BATCHES

    def _own(self, originals: dict[str, ir.Node], feed: dict[str, np.ndarray], got: dict[str, np.ndarray],
             active: list[str]) -> None:
        """Each active op's own noise on the batch: its float recomputation on the quantized model's tensors."""
        outs = self.outs
        assert self.alone is not None
        emulated = [k for k in self.emulated if k in active]
        run = self.alone.run([outs[k] + ALONE for k in active] + [outs[k] + WEIGHT_ONLY_ALONE for k in emulated],
                             {n: got[n] if n in got else feed[n] for n in self.alone_in})
        exact = dict(zip(active, run[:len(active)]))
        for key, y in zip(emulated, run[len(active):]):  # a convolution's weight-only alternative
            _accumulate_channels(self.own.setdefault(f"{key}/{SchemeName.WEIGHT_ONLY.value}", [0.0, 0.0]),
                                 exact[key], y, channel_axis(originals[key]))
        for key, e in exact.items():
            self.seen[key] += e.size // max(e.shape[channel_axis(originals[key]) % e.ndim], 1) if e.ndim else 1
            y = got[self.rounded[key]] if self.rounded.get(key) in got else got[outs[key]]
            _accumulate_channels(self.own[key], e, y, channel_axis(originals[key]))
            x = originals[key].inputs[0].name
            if key in self.sims and self.sims[key].rows < SIMULATED_ROWS:
                for alt, y in self.sims[key].outputs(got[x] if x in got else feed[x]).items():
                    _accumulate_channels(self.own.setdefault(f"{key}/{alt}", [0.0, 0.0]), e, y, -1)
            self._settle(key)


def _rounded_output(op: QuantizedOp, consumed: set[str]) -> str | None:
    """The op's output as the quantized model passes it on, after its output QDQ, when that QDQ is the
    op's alone: static int8 rounds a convolution's output to int8 for its fused kernel even where only
    float ops read it, and that rounding goes when the op leaves static int8. Where a planned op reads
    the tensor (`consumed`), the QDQ stays as that op's input rounding and counts in its noise. None
    when the op's output is not quantized or is not the op's own output (a fused Relu between)."""
    if op.output is None or op.output is not op.node.outputs[0] or op.output.name in consumed:
        return None
    for use in op.node.outputs[0].uses():
        if use.node.op_type == "QuantizeLinear":
            for after in use.node.outputs[0].uses():
                if after.node.op_type == "DequantizeLinear":
                    return after.node.outputs[0].name
    return None


def _head(feeds: list[dict[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    """The first batches holding at least `samples` samples (all of them if they hold fewer)."""
    n = 0
    for i, feed in enumerate(feeds):
        n += len(next(iter(feed.values()))) if feed else 1
        if n >= samples:
            return feeds[:i + 1]
    return feeds


def _simulated(node: ir.Node, splits: Callable[[str], Any]) -> simulate.Weights | None:
    """A MatMul with a constant 2-D weight: its alternatives are emulated in numpy (quantize/simulate.py).
    The weight-only alternative runs at accuracy level 4 (--accuracy-level cannot change with static int8).
    `splits(input name)`: the op's outlier-channel split (outlier_split.SplitScheme.emulation) or None."""
    w = const_array(node.inputs[1]) if node.op_type == "MatMul" and len(node.inputs) == 2 else None
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return None
    return simulate.Weights(w, splits(node.inputs[0].name))


ALONE = "::float_alone"  # suffix of the outputs of the ops recomputed in float on the quantized model's tensors
WEIGHT_ONLY_ALONE = ALONE + "::weight_only"  # ...and of convolutions recomputed with their weight-only weight


def _run_time_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.name and (v.const_value is None or v.is_graph_input())]


def _alone(model: ir.Model, nodes: list[ir.Node], axes: list[int | None] | None = None,
           memo: qp.WeightMemo | None = None) -> ir.Model:
    """The nodes side by side, each alone and in float: constant inputs kept, the others graph
    inputs (fed from the quantized model's tensors), each output renamed with ALONE so that one op
    never reads another's float recomputation. One session for a whole chunk of ops. A convolution
    with a constant weight also runs with its weight as weight-only int8 stores it (per channel along
    its `axes` entry), output renamed with WEIGHT_ONLY_ALONE: that alternative's own noise, emulated
    by onnxruntime itself."""
    values: dict[str, ir.Value] = {}
    inputs: list[ir.Value] = []
    inits: list[ir.Value] = []
    clones, outputs = [], []
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is None or not v.name or v.name in values:
                continue
            # constants are copied into memory: a tensor memory-mapped from external data would make the
            # model unloadable from bytes
            const = ir.tensor(v.const_value.numpy(), name=v.name) if v.const_value is not None else None
            copy = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=const)
            values[v.name] = copy
            (inputs if const is None or v.is_graph_input() else inits).append(copy)
        outs = [ir.Value(name=o.name + ALONE, shape=o.shape, type=o.type) for o in node.outputs]
        ins = [values[v.name] if v is not None and v.name else None for v in node.inputs]
        clones.append(ir.node(node.op_type, inputs=ins, attributes=dict(node.attributes), domain=node.domain,
                              outputs=outs))
        outputs.append(outs[0])
        rounded = _weight_only_conv(node, axes[i] if axes else None, memo)
        if rounded is not None:
            w = ir.Value(name=node.inputs[1].name + WEIGHT_ONLY_ALONE, shape=ins[1].shape, type=ins[1].type,
                         const_value=ir.tensor(rounded, name=node.inputs[1].name + WEIGHT_ONLY_ALONE))
            inits.append(w)
            alt = [ir.Value(name=o.name + WEIGHT_ONLY_ALONE, shape=o.shape, type=o.type) for o in node.outputs]
            clones.append(ir.node(node.op_type, inputs=[ins[0], w, *ins[2:]], attributes=dict(node.attributes),
                                  domain=node.domain, outputs=alt))
            outputs.append(alt[0])
    graph = ir.Graph(inputs, outputs, nodes=clones, initializers=inits, name="alone")
    graph.opset_imports.update(model.opset_imports)
    return ir.Model(graph, ir_version=model.ir_version)


def _weight_only_conv(node: ir.Node, axis: int | None, memo: qp.WeightMemo | None = None) -> np.ndarray | None:
    """A convolution's constant float weight as weight-only int8 stores it (quantize/weight_only.py:
    symmetric int8 behind a DequantizeLinear), dequantized; None for any other node. With the run's `memo`,
    the codes the run stores (GPTQ's, quantize/hessian_rounding.py), else rounded to nearest."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = const_array(node.inputs[1])
    if w is None or w.dtype != np.float32 or node.inputs[1].is_graph_input():
        return None
    q, scale, zp = memo.quantize(node.inputs[1].const_value, axis) if memo is not None else qp.quantize_weight(w, axis)
    return qp.dequantize(q, scale, zp, axis)


def channel_axis(node: ir.Node) -> int:
    """The axis of a node's output that holds its channels: 1 for convolutions (NCHW), the last
    for MatMul, Gemm and embedding lookups."""
    return 1 if node.op_type in ("Conv", "ConvTranspose") else -1


def _accumulate_channels(acc: list, ref: np.ndarray, got: np.ndarray, axis: int) -> None:
    """Per output channel: signal power and error power (summed over every other axis)."""
    ref, got = np.atleast_1d(ref), np.atleast_1d(got)
    axes = tuple(i for i in range(ref.ndim) if i != axis % ref.ndim)
    # squares in float32, sums in float64: finite sums unless a value is non-finite or its square overflows
    with np.errstate(over="ignore", invalid="ignore"):
        power = np.sum(np.square(ref), axis=axes, dtype=np.float64)
    if np.isfinite(power).all():
        diff = got - ref
    else:  # rare: the exact path, in float64, non-finite reference values left out
        finite = np.isfinite(ref)
        ref64 = np.where(finite, ref.astype(np.float64), 0.0)
        diff = np.where(finite, got.astype(np.float64) - ref64, 0.0)
        power = np.sum(np.square(ref64), axis=axes, dtype=np.float64)
    acc[0] = acc[0] + power
    err = np.sum(np.square(diff), axis=axes, dtype=np.float64)
    acc[1] = (acc[1] + err) if np.isfinite(err).all() else math.inf


def _channel_ratio(acc: list | None) -> float:
    """Relative error power averaged over output channels, each against its own power: an op
    whose output is dominated by one outlier channel (an encoder's FFN down-projection) shows
    the error it spreads over every other channel, which the next normalization brings back.
    Channels with almost no signal (below 1e-3 of the mean) are measured against that floor."""
    if acc is None or np.isscalar(acc[1]) and acc[1] == 0:
        return 0.0
    if not np.all(np.isfinite(acc[1])):
        return math.inf
    power, err = np.asarray(acc[0], np.float64), np.asarray(acc[1], np.float64)
    floor = 1e-3 * float(power.mean()) if power.size else 0.0
    if floor <= 0:
        return 0.0 if not err.any() else math.inf
    return float(np.mean(err / np.maximum(power, floor)))


def _ratio(acc: list | None) -> float:
    """Relative error power over all channels together; 0 when there is nothing to compare (exact
    inputs)."""
    err = 0.0 if acc is None else float(np.sum(acc[1]))
    if err == 0:
        return 0.0
    power = float(np.sum(acc[0]))
    return err / power if power > 0 else math.inf


def _noise_db(relative_noise: float) -> float:
    """Relative noise power as SQNR in dB (0 noise: infinite)."""
    return math.inf if relative_noise <= 0 else -10.0 * math.log10(relative_noise)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def alternatives(op: QuantizedOp, refusals: Mapping[str, Callable[[QuantizedOp], str | None]]) -> list[str]:
    """Where an op may go when static int8 costs too much, cheapest first: the outlier-channel split
    (static int8 with the input's few outlier channels in float, quantize/outlier_split.py), dynamic int8 (int8
    weight, activations quantized per run, as fast), per-token dynamic int8 (one scale per token:
    a few outlier tokens no longer set every token's step; slower), weight-only int8 (int8 weight
    in blocks, float activations: the size kept at float speed), float. Embedding tables only go float:
    their weight-only rows already carry almost no error."""
    out = []
    if op.kind != OpKind.EMBEDDING:
        out += [name for name in (SchemeName.SPLIT.value, SchemeName.DYNAMIC.value, SchemeName.PER_TOKEN.value,
                                  SchemeName.WEIGHT_ONLY.value)
                if name in refusals and refusals[name](op) is None]
    return [*out, FLOAT]


LADDER_GAIN_DB = 1.0  # an alternative is worth its cost only if it beats every cheaper choice by this much


def ladder(options: list[str], row: Mapping[str, Any] | None) -> list[str]:
    """Of an op's alternatives (cheapest first), the ones worth trying: each must cut the op's own noise,
    as emulated on the probe (quantize/simulate.py), at least LADDER_GAIN_DB below static int8's and
    every cheaper alternative kept before it. Alternatives never emulated stay; float always does."""
    emulated = (row or {}).get("alternatives_own_sqnr_db") or {}

    def db(figure: float | None) -> float:  # a None figure is an infinite SQNR: no noise at all
        return math.inf if figure is None else figure

    best = db((row or {}).get("own_sqnr_db"))
    kept = []
    for name in options:
        if name == FLOAT or name not in emulated:
            kept.append(name)
        elif db(emulated[name]) >= best + LADDER_GAIN_DB:
            kept.append(name)
            best = db(emulated[name])
    return kept


def by_gain(ranked: list[dict], choices: Mapping[str, list[str]]) -> list[dict]:
    """The sensitivity rows in the order the search moves ops: by how much own noise the op's first
    alternative removes (its emulated figure; all of it for float), largest first, ties by name. An op
    whose cheap alternative barely helps it (a LayerNorm-fed projection SmoothQuant already holds)
    no longer goes before one whose alternative halves its noise."""
    def gain(row: dict) -> float:
        own = row["own_noise"] if row["own_noise"] is not None else math.inf
        first = next(iter(choices.get(row["node"], [FLOAT])))
        emulated = row.get("alternatives_own_sqnr_db") or {}
        if first == FLOAT or first not in emulated:  # float, or a figure never emulated: all of it
            return own
        db = emulated[first]
        return own - (0.0 if db is None else 10 ** (-db / 10))

    return sorted(ranked, key=lambda r: (-gain(r), r["node"]))


# ---------------------------------------------------------------- search

@dataclass
class SearchResult:
    overrides: dict[str, str] = field(default_factory=dict)  # node -> "dynamic" | "weight_only" | "float"
    met: bool = True
    figures: list[dict] = field(default_factory=list)  # probe figures of the chosen placement
    trials: list[dict] = field(default_factory=list)
    shortfall: str | None = None


# Op kinds for which float is the cheapest alternative: no weight to store (plan.SPEED_ONLY_KINDS: attention
# MatMuls, and the int8 region's Add, Concat, Sigmoid, Split...: going float costs them speed only, and a level of
# weight-only convolutions around a static one only dequantizes and requantizes)
FREE_FLOAT_KINDS = tuple(k.value for k in SPEED_ONLY_KINDS)


@dataclass
class Levels:
    """Each op's choices as levels: level L is its L-th non-float alternative (its last one when it
    has fewer; none when it has no other), and float is the last level of all: an op with no other
    alternative (an embedding table) stays static int8 until every cheaper scheme of the others has been
    tried. Ops in `free_float` (of FREE_FLOAT_KINDS) go float from the first level on."""

    choices: Mapping[str, list[str]]
    free_float: frozenset[str] = frozenset()

    @functools.cached_property
    def count(self) -> int:  # read by every pick: computed once
        return 1 + max((len([c for c in cs if c != FLOAT]) for cs in self.choices.values()), default=0)

    def pick(self, n: str, level: int) -> str | None:
        if n in self.free_float:
            return FLOAT
        others = [c for c in self.choices[n] if c != FLOAT]
        if level >= self.count - 1:
            return self.choices[n][-1]
        return others[min(level, len(others) - 1)] if others else None

    def at(self, level: int, k: int, ranking: list[str]) -> dict[str, str]:
        """The top k of `ranking` on their level-th choice, the others static."""
        return {n: p for n in ranking[:k] if (p := self.pick(n, level)) is not None}

    def split(self, level: int, k: int, ranking: list[str], model: NoiseModel) -> Callable[[int], dict[str, str]]:
        """j -> of the top k, the j that keep the most (gain-weighted) noise one level back go to
        `level`, the others stay one level back (an op whose cheaper alternative already holds it does
        not go float before an attention MatMul whose only alternative is float). The order is fixed
        when the family is made: the gains move as candidates are scored, the family must not."""
        back = self.at(level - 1, k, ranking)
        worst = sorted(ranking[:k], key=lambda n: -model.weighted(n, back.get(n)))  # stable: ties by rank

        def build(j: int) -> dict[str, str]:
            return {**back, **{n: p for n in worst[:j] if (p := self.pick(n, level)) is not None}}

        return build


def search(ranked: list[dict], choices: dict[str, list[str]], target: Target,
           evaluate: Callable[[dict[str, str]], list[dict]], status: Callable[[str], None],
           max_restores: int = 4) -> SearchResult:
    """Ops leave static int8 level by level (see Levels), measuring as few candidates as the noise
    model's guesses and bisection allow (moving more ops off static int8 is assumed not to hurt;
    every chosen placement is measured, never inferred):

    for level 0, 1, ... (skipping a level the noise model puts far over the target) the ops, ranked
    by the weighted noise moving them removes, go to that level's choice: the smallest top-k that
    meets the target is found (guesses first, bisection above a guess that misses) and the search
    stops there; of those k, the fewest that must stay at that level are found the same way, the
    rest going one level back; then the chosen ops least sensitive first go back one more level
    where the target still holds, at most `max_restores` probes. When that placement moves more
    than 1/CROWDED of the ops (the level's everything-moved placement barely met the target), the
    next non-float level is searched as well and the placement moving fewer ops is kept."""
    order = [r["node"] for r in ranked if r["node"] in choices]
    result = SearchResult()
    model = NoiseModel({r["node"]: r for r in ranked}, order, target)

    verdicts: dict[frozenset, bool] = {}

    def measure(overrides: dict[str, str], what: str) -> bool:
        key = frozenset(overrides.items())
        if key in verdicts:  # a family with flat steps (ops with no choice at a level) asks twice
            if verdicts[key]:
                result.overrides, result.shortfall = dict(overrides), None
                result.figures = next(t["figures"] for t in result.trials if t["moved"] == overrides)
            return verdicts[key]
        status(f"placement: scoring {what}")
        start = time.perf_counter()
        figures = evaluate(overrides)
        seconds = round(time.perf_counter() - start, 3)
        model.observe(overrides, figures)
        why = target.shortfall(figures)
        result.trials.append({"moved": dict(overrides), "figures": figures, "meets_target": why is None,
                              "shortfall": why, "seconds": seconds})  # built, its session made, scored
        if why is None or not result.figures:
            result.overrides, result.figures, result.shortfall = dict(overrides), figures, why
        verdicts[key] = why is None
        return why is None

    if measure({}, "every op in static int8") or not order:
        result.met = result.shortfall is None
        return result
    levels = Levels(choices, frozenset(r["node"] for r in ranked if r["node"] in choices
                                       and r.get("kind") in FREE_FLOAT_KINDS and FLOAT in choices[r["node"]]))
    result.met = _by_level(order, levels, model, measure, result, max_restores)
    return result


def _by_level(order: list[str], levels: Levels, model: NoiseModel, measure, result: SearchResult,
              max_restores: int) -> bool:
    """search's level loop: leaves the chosen placement in `result`; whether it meets the target."""
    crowded: tuple[dict[str, str], list[dict]] | None = None  # a level's placement that moved most ops
    for level in range(levels.count):
        everything = levels.at(level, len(order), order)
        if level and everything == levels.at(level - 1, len(order), order):
            continue
        if level < levels.count - 1 and model.hopeless(everything):
            continue
        # this level's order: by what moving each op removes, as the gains learnt so far weigh it
        ranking = model.ranked(order, functools.partial(levels.pick, level=level))
        # below the float level every op keeps int8 weights: a few more ops off static int8 cost speed only
        resolution = len(order) // BISECT_WORTH if level < levels.count - 1 else 0
        k = _guided(functools.partial(levels.at, level, ranking=ranking), len(order), False, model, measure, result,
                    resolution)
        if k is None:
            continue
        if level:  # of those k, only the noisiest one level back need this level: the rest stay there
            _split(levels.split(level, k, ranking, model), k, model, measure, result)
        _restore(result, levels.choices, ranking, level, max_restores, measure)
        if crowded is None and level + 1 < levels.count - 1 and len(result.overrides) * CROWDED > len(order):
            # met only with most ops on this level (its everything-moved placement barely did): a few ops
            # one level up may do, which costs less than most ops here, so that level is searched too
            crowded = (dict(result.overrides), result.figures)
            continue
        break
    else:
        if crowded is None:
            return False
    if crowded is not None and len(crowded[0]) <= len(result.overrides):  # the placement moving fewer ops
        result.overrides, result.figures, result.shortfall = dict(crowded[0]), crowded[1], None
    return True


@dataclass
class NoiseModel:
    """The search's guess before it measures: a placement's output error, in units of what the
    target allows (1 or less meets it), taken as sum over ops of gain[op kind] x the op's own noise
    on its choice (sensitivity rows: static int8, each emulated alternative; float adds none). The
    gains start as one number fitted on the all-static candidate and are refitted per op kind on
    every candidate scored in full (a ridge fit pulled towards the common gain), so that a kind
    whose noise reaches the output amplified (attention MatMuls) is learnt after a miss or two.
    Nothing is guessed when the rows cannot say (an op's noise unknown or infinite)."""

    rows: Mapping[str, Mapping[str, Any]]
    order: list[str]
    target: Target
    observed: list[tuple[dict[str, float], float]] = field(default_factory=list)
    gain: dict[str, float] | None = None
    misses: list[tuple[dict[str, str], float]] = field(default_factory=list)  # placements that missed, error

    HOPELESS = 4.0  # a level is skipped unmeasured only when its best is this far over the target
    PRIOR = 0.1  # weight of the pull towards the common gain in the per-kind fit

    def features(self, overrides: Mapping[str, str]) -> dict[str, float]:
        """Own noise summed per op kind under a placement."""
        out: dict[str, float] = {}
        for n in self.order:
            row = self.rows.get(n, {})
            kind = str(row.get("kind", ""))
            out[kind] = out.get(kind, 0.0) + _noise_at(row, overrides.get(n))
        return out

    def observe(self, overrides: Mapping[str, str], figures: list[dict]) -> None:
        """A candidate scored in full refits the gains; one stopped early only bounds its error.
        A candidate that misses the target is kept for `correction` either way."""
        error = _error(self.target, figures)
        if error is not None and 1 < error < math.inf:  # stopped early: its scored samples' error, not the bound
            estimate = _error(self.target, [f.get("scored_only", f) for f in figures])
            self.misses.append((dict(overrides), max(error, estimate or error)))
        f = self.features(overrides)
        if error is None or error <= 0 or any("samples_scored" in x for x in figures) \
                or not all(math.isfinite(v) for v in f.values()):
            return
        self.observed.append((f, error))
        self._refit()

    def _refit(self) -> None:
        kinds = sorted({k for f, _ in self.observed for k in f})
        a = np.array([[f.get(k, 0.0) for k in kinds] for f, _ in self.observed])
        e = np.array([err for _, err in self.observed])
        common = float(e.sum() / max(a.sum(), 1e-300))
        if common <= 0 or not math.isfinite(common):
            self.gain = None
            return
        scaled = a * common / e[:, None]  # relative fit of each candidate's error, in units of the common gain
        # the pull towards the common gain weighs each kind by its own column: a kind whose noise is a
        # small part of every candidate's is still fitted from the candidates
        prior = self.PRIOR * np.maximum((scaled ** 2).sum(axis=0), 1e-300)
        x = np.linalg.solve(scaled.T @ scaled + np.diag(prior), scaled.T @ np.ones(len(e)) + prior)
        self.gain = {k: common * max(float(v), 0.0) for k, v in zip(kinds, x)}

    def weighted(self, n: str, choice: str | None) -> float:
        """An op's own noise on a choice, times its kind's gain (1 before any fit)."""
        row = self.rows.get(n, {})
        gain = 1.0 if self.gain is None else self.gain.get(str(row.get("kind", "")), 0.0)
        noise = _noise_at(row, choice)
        return noise if noise == 0 else gain * noise  # no 0 x inf

    def ranked(self, order: list[str], choice: Callable[[str], str | None]) -> list[str]:
        """`order` re-sorted by the weighted noise moving each op to `choice(op)` removes, largest
        first (ties, and no fit yet: `order` itself)."""
        if self.gain is None:
            return list(order)

        def removed(n: str) -> float:
            before, after = self.weighted(n, None), self.weighted(n, choice(n))
            return math.inf if math.isinf(before) and not math.isinf(after) else \
                (0.0 if math.isinf(before) else before - after)

        return sorted(order, key=lambda n: -removed(n))

    def predict(self, overrides: Mapping[str, str]) -> float | None:
        if self.gain is None:
            return None
        return sum(self.gain.get(k, 0.0) * v for k, v in self.features(overrides).items())

    def hopeless(self, overrides: Mapping[str, str]) -> bool:
        guess = self.predict(overrides)
        return guess is not None and guess > self.HOPELESS

    def correction(self, since: int = 0) -> float:
        """How far the model underestimated the misses recorded from `since` on: the largest ratio of
        a miss's error (for one stopped early, that of the samples it was scored on: the bound it
        passed takes every later sample as perfect, just past the target by construction) to the
        model's prediction for it, at least 1. A guess that missed thus moves the next guess out."""
        ratios = [error / p for overrides, error in self.misses[since:] if (p := self.predict(overrides))]
        return max([1.0, *ratios])

    def smallest(self, build: Callable[[int], dict[str, str]], n: int, slack: float = 1.0,
                 since: int | None = None) -> int | None:
        """The smallest k in 1..n whose placement the model says meets the target (with `slack`
        times the error allowed; with `since`, its predictions scaled by `correction(since)`);
        None when it cannot tell or no k does."""
        if self.gain is None:
            return None
        scale = 1.0 if since is None else self.correction(since)
        return next((k for k in range(1, n + 1) if scale * (self.predict(build(k)) or 0.0) <= slack), None)


def _error(target: Target, figures: list[dict]) -> float | None:
    """The output error in units of what the target allows, the worst over outputs and figures
    (error taken as 1 - cosine, 10^(-SQNR/10), top-1 disagreement): 1 or less meets the target.
    None when it cannot be scaled (non-finite outputs, no figure the target names)."""
    errors = []
    for f in figures:
        if f["nonfinite"]:
            return None
        if target.min_cosine is not None and target.min_cosine < 1:
            errors.append((1 - f["cosine"]) / (1 - target.min_cosine))
        if target.min_sqnr is not None and math.isfinite(f["sqnr_db"]):
            errors.append(10 ** ((target.min_sqnr - f["sqnr_db"]) / 10))
        if target.max_disagreement and f.get("top1") is not None:
            errors.append((1 - f["top1"]) / target.max_disagreement)
        if target.max_sequence_disagreement and f.get("sequences") is not None:
            errors.append((1 - f["sequences"]) / target.max_sequence_disagreement)
    return max(errors) if errors else None


GUESS_SLACK = 2.0  # the bolder guess first: twice the noise the model allows
GUESSES = 3  # plain guesses at most, each after the model is corrected by the misses before it


def _guided(build: Callable[[int], dict[str, str]], n: int, n_meets: bool, model: NoiseModel, measure,
            result: SearchResult, resolution: int = 0) -> int | None:
    """The smallest k in 1..n whose placement meets the target, measuring the noise model's guesses
    first: a bolder one, then plain ones, each scaled by how far the model underestimated this
    family's misses so far (NoiseModel.correction), so a miss pushes the next guess out; when a
    guess meets, it is taken without bisecting below it. When the guesses miss (or stop moving),
    all n moved is measured, and bisection runs above the last miss, to within `resolution` ops
    (_smallest). None when not even n meets."""
    lo, since = 0, len(model.misses)
    for slack in (GUESS_SLACK, *[1.0] * GUESSES):
        guess = model.smallest(build, n, slack, since)
        if guess is None or guess >= n or guess <= lo:
            if slack == GUESS_SLACK:
                continue
            break
        if measure(build(guess), f"the {guess} op(s) the noise model picks"):
            return guess
        lo = guess
    if not n_meets and not measure(build(n), f"all {n} op(s) moved"):
        return None
    return _smallest(build, n, measure, result, lo, resolution)


CROWDED = 2  # a level whose placement moves more than 1/CROWDED of the ops: the next level is searched too
SPLIT_WORTH = 8  # the split is searched only when it can send back more than 1/8 of the ops


def _split(build: Callable[[int], dict[str, str]], k: int, model: NoiseModel, measure, result: SearchResult) -> None:
    """The fewest of the k ops that must stay at the level (build(j): the j noisiest there, the rest one
    level back). The placement with all but k/SPLIT_WORTH of them there is measured first: when it misses,
    the split could send back at most that many ops and is not worth its candidates (all k stay). Its
    bisection runs to the end: each op it leaves undecided stays float and loses its int8 weights (stopping
    within k/SPLIT_WORTH ops cut the YOLOv8n's search from 15 to 9 candidates, but its F1 went from 97.1% to
    96.7%, below the issue's 97%, and its file from 3.15x to 2.62x smaller)."""
    few = k - max(1, k // SPLIT_WORTH)
    if few >= 1 and build(few) != build(k) and not measure(build(few), f"{k - few} op(s) one level back"):
        return  # the level's own placement (all k there, measured) stays the result
    _guided(build, max(few, 1), True, model, measure, result)


def _noise_at(row: Mapping[str, Any], choice: str | None) -> float:
    """The own noise the sensitivity step measured (or emulated) for an op on `choice` (None: static
    int8): float has none; an alternative never emulated is taken to be no better than static int8."""
    if choice == FLOAT:
        return 0.0
    static = row.get("own_noise")
    static = math.inf if static is None else float(static)
    emulated = row.get("alternatives_own_sqnr_db") or {}
    if choice is None or choice not in emulated:
        return static
    db = emulated[choice]
    return 0.0 if db is None else 10 ** (-db / 10)


BISECT_WORTH = 8  # below the float level, bisection stops once at most 1/8 of the ops are undecided


def _smallest(build: Callable[[int], dict[str, str]], n: int, measure, result: SearchResult, lo: int = 0,
              resolution: int = 0) -> int:
    """Bisection for the smallest k in lo+1..n whose placement meets the target (n is known to), over
    the k that change the placement (an op with no choice at a level leaves it as it was). With a
    `resolution`, it stops once the k between the last miss and the smallest k met are at most that
    many ops apart (the k met is taken): on a level where every op keeps int8 weights, those few ops
    in static int8 are worth less than the candidates that would find them (SPLIT_WORTH's reasoning)."""
    steps, prev = [], build(lo)
    for k in range(lo + 1, n + 1):
        cur = build(k)
        if cur != prev:
            steps.append(k)
            prev = cur
    if not steps:
        steps.append(n)
    a, b = -1, len(steps) - 1  # the last step places what n does (nothing changes after it): it meets
    while b - a > 1 and steps[b] - (steps[a] if a >= 0 else lo) > resolution:
        mid = (a + b) // 2
        if measure(build(steps[mid]), f"the {steps[mid]} most sensitive op(s) moved"):
            b = mid
        else:
            a = mid
    hi = steps[b]
    best = build(hi)
    result.overrides, result.shortfall = best, None
    result.figures = next(t["figures"] for t in reversed(result.trials) if t["moved"] == best)
    return hi


def _restore(result: SearchResult, choices: Mapping[str, list[str]], order: list[str], level: int,
             max_restores: int, measure) -> None:
    """Move the chosen ops, least sensitive first, one level back where the target still holds: all of them
    in one candidate first (when it meets the target, that is where moving them one by one would end, in one
    candidate instead of `max_restores`, each scored on the whole probe), else one by one."""
    if level == 0:
        return
    moved = [n for n in reversed(order) if n in result.overrides][:max_restores]

    def back(overrides: dict[str, str], ops: list[str]) -> dict[str, str]:
        out = {k: v for k, v in overrides.items() if k not in ops}
        for n in ops:
            at = choices[n].index(overrides[n]) if overrides[n] in choices[n] else 0
            if at > 0:
                out[n] = choices[n][at - 1]
        return out

    if len(moved) > 1 and measure(back(result.overrides, moved), f"{len(moved)} op(s) back one level together"):
        return
    for n in moved:
        one = back(result.overrides, [n])
        measure(one, f"{n} back to {one.get(n, 'static int8')}")


# ---------------------------------------------------------------- plan files

@dataclass
class PlanFile:
    """A placement to replay: per-node schemes and the op groups the speed guard left float."""

    nodes: dict[str, str]
    speed_dropped: list[str]
    model_sha256: str
    target: str = ""

    def save(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def load(cls, path: Path, model_sha256: str) -> PlanFile:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            plan = cls(dict(data["nodes"]), list(data["speed_dropped"]), str(data["model_sha256"]),
                       str(data.get("target", "")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path} is not a quantkit plan ({e}); write one with --plan") from e
        if plan.model_sha256 != model_sha256:
            raise InputError(f"{path} was made for another model (sha256 {plan.model_sha256[:12]}...); "
                             "run the search again with --plan for this model")
        bad = {v for v in plan.nodes.values() if v not in (*(s.value for s in SchemeName), FLOAT)}
        if bad or not set(plan.speed_dropped) <= {k.value for k in OpKind}:
            raise InputError(f"{path} names unknown schemes or op groups: {sorted(bad) or plan.speed_dropped}")
        return plan
