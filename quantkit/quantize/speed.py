"""Speed guard: time candidate placements against each other and against fp32 in onnxruntime
before anything is written, and drop the groups of quantized ops that make the model slower.

Groups are op kinds (QuantizedOp.kind): Conv, depthwise Conv, Gemm, MatMul, attention
(activation x activation) MatMul... A group is dropped only when the model without it runs at
least MARGIN faster in a first short look (which settles most groups) and then in each of
REPEATS separate interleaved measurements on the timing feed (api._timing_feed): one noisy comparison, or a
burst of load, cannot change the written model. Timing never undoes pure compression (int8
embedding tables cost no compute) unless --require-speedup asks for speed. When even the
fastest placement is not faster than fp32, int8 cannot win on this model: the groups with weights
come back (the smallest file; groups with none stay float) and the report says how much slower it is.
Groups with weights stay float only when the written model beats fp32 by MARGIN in the guard's last
timing and in REPEATS more short looks, so which file is written never rests on one timing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantkit.quantize.plan import SPEED_ONLY_KINDS, OpKind
from quantkit.report.latency import interleaved_ms

MARGIN = 0.05  # timing noise on a quiet machine is ~1-2%, a loaded one more: demand a clear win
REPEATS = 3  # ...in every one of this many separate measurements (stopping at the first that fails)
QUICK_RUNS = 5  # ...after a first short look that must show the same win (most groups stop there)
SHARED_LOOKS = 2  # with every group timed together, a group must win this many shared looks to be timed alone
# runs of each session before its timed runs: a session's first run plans and allocates its memory, the
# next ones are steady; the median of the timed runs absorbs one slow run more (the report's own latency
# timing and the benchmarks warm up 3 times)
WARMUP = 1
TIMER = functools.partial(interleaved_ms, warmup=WARMUP)
COMPRESSION_ONLY = (OpKind.EMBEDDING,)  # weight storage only: dropped for speed only when asked
# Groups tried in this order: the likeliest to lose time first, so later trials start from the
# faster placement.
ORDER = (OpKind.INT8_REGION, OpKind.CONV_UNFUSED_ACTIVATION, OpKind.ATTENTION_MATMUL, OpKind.DEPTHWISE_CONV,
         OpKind.CONV_TRANSPOSE, OpKind.GEMM, OpKind.MATMUL, OpKind.CONV, OpKind.EMBEDDING)


@dataclass
class GuardReport:
    dropped: list[str] = field(default_factory=list)
    dropped_kinds: list[str] = field(default_factory=list)  # OpKind values, for plan files
    trials: list[dict] = field(default_factory=list)
    int8_cannot_win: bool = False
    # (fp32 ms, written model's ms, runs) from the guard's own last interleaved timing of the model it
    # returns, so the report need not time the same pair again; None when no timing covered it
    final_ms: tuple[float, float, int] | None = None


def guard(build: Callable[[set[OpKind]], tuple], session: Callable[[Any], Any], fp32_sess, feed: dict,
          kinds: set[OpKind], runs: int = 10, status: Callable[[str], None] = lambda s: None,
          timer: Callable[..., list[float]] = TIMER, for_speed: bool = False,
          compression_only: tuple[OpKind, ...] | set[OpKind] = COMPRESSION_ONLY, shared_look: bool = True,
          advance: Callable[[int], None] = lambda n: None):
    """`build(dropped_kinds)` returns (model, plan, rewrite result); `session(model)` makes an
    onnxruntime session. `for_speed` (--require-speedup) lets timing drop compression-only groups
    (every group of a weight-only run). Returns the build to write and what was tried; `advance(n)`
    counts groups settled (timed_kinds says how many there are).

    With `shared_look` (the caller's call: every candidate's session is held at once), the first short
    look times every group's trial (the full placement without that group) in one interleaved timing
    with fp32 and the full placement, instead of one timing of three sessions per group; only groups
    that win there are measured again, one by one, from the placement the earlier drops left."""
    report = GuardReport()
    dropped: set[OpKind] = set()
    full = build(dropped)
    current, current_sess = full, session(full[0])
    order = timed_kinds(kinds, for_speed, compression_only)
    first, looked = _first_look(build, session, timer, fp32_sess, current_sess, feed, order, runs, status) \
        if shared_look and len(order) > 1 else ({}, {})
    for kind in order:
        row = first.get(kind)
        if row is not None and row["decision"] == KEPT:
            report.trials.append(row)
            report.final_ms = (row["fp32_ms"], row["with_ms"], row["runs"]) if not dropped else report.final_ms
            advance(1)
            continue
        if row is not None and row["decision"] == NOT_CLEARLY_FASTER:  # settled: no weights, no clear win
            report.trials.append(row)
            dropped.add(kind)
            current = build(dropped)
            # the model without just this group was timed in the look: its session and timing serve on
            alone = dropped == {kind}
            current_sess = looked[kind] if alone else None
            report.final_ms = (row["fp32_ms"], row["without_ms"], row["runs"]) if alone else None
            advance(1)
            continue
        status(f"speed guard: timing the model without {kind} quantized")
        trial = build(dropped | {kind})
        trial_sess = session(trial[0])
        current_sess = current_sess or session(current[0])
        fp32_ms, with_ms, without_ms, keep, used = _compare(timer, fp32_sess, current_sess, trial_sess, feed, runs,
                                                            kind in SPEED_ONLY_KINDS)
        report.trials.append({"group": kind.label, "fp32_ms": fp32_ms, "with_ms": with_ms, "without_ms": without_ms,
                              "runs": used, "decision": KEPT if keep else
                              (NOT_CLEARLY_FASTER if kind in SPEED_ONLY_KINDS else "left float (faster)")})
        report.final_ms = (fp32_ms, with_ms if keep else without_ms, used)
        if not keep:
            dropped.add(kind)
            current, current_sess = trial, trial_sess
        advance(1)
    return _finish(report, dropped, kinds, build, full, current, lambda: current_sess or session(current[0]),
                   fp32_sess, timer, feed, runs)


KEPT = "kept quantized"
RESTORED = "(dropped groups with weights restored)"  # the trial row saying int8 cannot win
NOT_CLEARLY_FASTER = "left float (no weights to shrink, and int8 not clearly faster)"


def timed_kinds(kinds: set[OpKind], for_speed: bool = False,
                compression_only: tuple[OpKind, ...] | set[OpKind] = COMPRESSION_ONLY) -> list[OpKind]:
    """The groups the guard times, in the order it settles them."""
    return [k for k in ORDER if k in kinds and (for_speed or k not in compression_only)]


def _first_look(build, session, timer, fp32_sess, full_sess, feed, order: list[OpKind], runs: int,
                status) -> tuple[dict[OpKind, dict], dict[OpKind, Any]]:
    """Every group's trial against the full placement and fp32 in one short interleaved timing, twice
    (the second time only the groups that won the first: one slow median of the full placement must not
    send every group to the long measurements); a group that does not win by MARGIN in a look is kept
    (its trial row), the others are timed again one by one. A group of SPEED_ONLY_KINDS is the other way round: it
    is timed again only while int8 wins by MARGIN, and left float as soon as it does not. Returns the rows
    and each group's trial session."""
    status(f"speed guard: timing the model without each of {len(order)} groups quantized")
    sessions = {kind: session(build({kind})[0]) for kind in order}
    quick = min(QUICK_RUNS, runs)
    rows: dict[OpKind, dict] = {}
    pending = list(order)
    for _ in range(SHARED_LOOKS):
        if not pending:
            break
        fp32_ms, with_ms, *without = timer([fp32_sess, full_sess, *(sessions[k] for k in pending)], feed, quick)
        for kind, ms in zip(pending, without):
            speed_only = kind in SPEED_ONLY_KINDS
            decision = (NOT_CLEARLY_FASTER if speed_only else KEPT) if _settled(with_ms, ms, speed_only) \
                else "timed again"
            rows[kind] = {"group": kind.label, "fp32_ms": fp32_ms, "with_ms": with_ms, "without_ms": ms,
                          "runs": quick, "decision": decision}
        pending = [k for k in pending if rows[k]["decision"] == "timed again"]
    return rows, sessions


def _finish(report: GuardReport, dropped: set[OpKind], kinds: set[OpKind], build, full, current,
            current_sess: Callable[[], Any], fp32_sess, timer, feed, runs: int):
    """`current_sess()`: the written model's session (made only when it is timed)."""
    if dropped:
        # the written model timed already (in the look that settled the last drop) and clearly faster than
        # fp32: that timing is the report's; otherwise, or when it is close, a full timing decides
        if report.final_ms is None or not _beats(report.final_ms[1], report.final_ms[0]):
            report.final_ms = (*timer([fp32_sess, current_sess()], feed, runs), runs)
        fp32_ms, best_ms, _ = report.final_ms
        # quantizing nothing, or still losing to fp32: int8 cannot win, so write the smallest model: the
        # groups with weights come back; groups with none (SPEED_ONLY_KINDS) stay float, since int8 there
        # shrinks nothing, so a single timing's verdict never changes the written model through them. Groups
        # with weights stay float only while the written model beats fp32 clearly in every look: one timing
        # near fp32 must not decide which file is written
        weighted = dropped - set(SPEED_ONLY_KINDS)
        if dropped == kinds or (not _clearly_faster(timer, fp32_sess, current_sess, feed, runs, fp32_ms, best_ms)
                                if weighted else best_ms >= fp32_ms):
            report.int8_cannot_win = True
            still_float = {k for k in dropped if k in SPEED_ONLY_KINDS}
            report.trials.append({"group": RESTORED, "fp32_ms": fp32_ms, "with_ms": best_ms,
                                  "decision": "no placement clearly beats fp32: writing the smallest model"})
            if still_float != dropped:
                current = full if not still_float else build(still_float)
                dropped, report.final_ms = still_float, None
    report.dropped = sorted(k.label for k in dropped)
    report.dropped_kinds = sorted(k.value for k in dropped)
    return current, report


def _clearly_faster(timer, fp32_sess, current_sess: Callable[[], Any], feed, runs: int, fp32_ms: float,
                    best_ms: float) -> bool:
    """Whether the written model beats fp32 by MARGIN in the timing already made (`fp32_ms`, `best_ms`) and
    then in each of REPEATS short looks (stopping at the first that does not show it)."""
    quick = min(QUICK_RUNS, runs)
    for look in range(REPEATS + 1):
        if look:
            fp32_ms, best_ms = timer([fp32_sess, current_sess()], feed, quick)
        if not _beats(best_ms, fp32_ms):
            return False
    return True


def _beats(ms: float, than_ms: float) -> bool:
    """Whether a timing is clearly (by MARGIN) below another."""
    return ms < than_ms * (1 - MARGIN)


def _compare(timer, fp32_sess, with_sess, without_sess, feed, runs,
             speed_only: bool = False) -> tuple[float, float, float, bool, int]:
    """Median timings; `keep` unless the model without the group wins by MARGIN every time: in a
    first short look (QUICK_RUNS each), which settles most groups, and then in each of REPEATS full
    measurements. `speed_only` (a group with no weights): left float unless the model *with* it wins
    by MARGIN every time."""
    quick = min(QUICK_RUNS, runs)
    fp32_ms, with_ms, without_ms = timer([fp32_sess, with_sess, without_sess], feed, quick)
    if _settled(with_ms, without_ms, speed_only):
        return fp32_ms, with_ms, without_ms, not speed_only, quick
    for _ in range(REPEATS):
        fp32_ms, with_ms, without_ms = timer([fp32_sess, with_sess, without_sess], feed, runs)
        if _settled(with_ms, without_ms, speed_only):
            return fp32_ms, with_ms, without_ms, not speed_only, runs
    return fp32_ms, with_ms, without_ms, speed_only, runs


def _settled(with_ms: float, without_ms: float, speed_only: bool) -> bool:
    """Whether one look settles a group in its default direction (kept int8; float for a group with no
    weights): the other side did not win by MARGIN."""
    return with_ms > without_ms * (1 - MARGIN) if speed_only else without_ms >= with_ms * (1 - MARGIN)
