"""Speed guard: time candidate placements against each other and against fp32 in onnxruntime
before anything is written, and drop the groups of quantized ops that make the model slower.

Groups are op kinds (QuantizedOp.kind): Conv, depthwise Conv, Gemm, MatMul, attention
(activation x activation) MatMul... A group is dropped when the model without it runs at least
MARGIN faster, measured interleaved on a calibration batch. When even the fastest placement is
not faster than fp32, int8 cannot win on this model: the full placement (the smallest file) is
kept and the report says how much slower it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantkit.quantize.plan import OpKind
from quantkit.report.latency import interleaved_ms

MARGIN = 0.03  # timing noise on a quiet machine is ~1-2%: demand a clear win before dropping
# Groups tried in this order: the likeliest to lose time first, so later trials start from the
# faster placement.
ORDER = (OpKind.CONV_UNFUSED_ACTIVATION, OpKind.ATTENTION_MATMUL, OpKind.DEPTHWISE_CONV, OpKind.CONV_TRANSPOSE,
         OpKind.GEMM, OpKind.MATMUL, OpKind.CONV, OpKind.EMBEDDING)


@dataclass
class GuardReport:
    dropped: list[str] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    int8_cannot_win: bool = False


def guard(build: Callable[[set[OpKind]], tuple], session: Callable[[Any], Any], fp32_sess, feed: dict,
          kinds: set[OpKind], runs: int = 15, status: Callable[[str], None] = lambda s: None,
          timer: Callable[..., list[float]] = interleaved_ms):
    """`build(dropped_kinds)` returns (model, plan, rewrite result); `session(model)` makes an
    onnxruntime session. Returns the build to write and what was tried."""
    report = GuardReport()
    dropped: set[OpKind] = set()
    full = build(dropped)
    current, current_sess = full, session(full[0])
    for kind in [k for k in ORDER if k in kinds]:
        status(f"speed guard: timing the model without {kind} quantized")
        trial = build(dropped | {kind})
        trial_sess = session(trial[0])
        fp32_ms, with_ms, without_ms = timer([fp32_sess, current_sess, trial_sess], feed, runs)
        keep = without_ms >= with_ms * (1 - MARGIN)
        report.trials.append({"group": kind.label, "fp32_ms": fp32_ms, "with_ms": with_ms, "without_ms": without_ms,
                              "decision": "kept quantized" if keep else "left float (faster)"})
        if not keep:
            dropped.add(kind)
            current, current_sess = trial, trial_sess
    if dropped:
        fp32_ms, best_ms = timer([fp32_sess, current_sess], feed, runs)
        # quantizing nothing, or still losing to fp32: int8 cannot win, so write the smallest model
        if dropped == kinds or best_ms >= fp32_ms:
            report.int8_cannot_win = True
            report.trials.append({"group": "(all dropped groups restored)", "fp32_ms": fp32_ms, "with_ms": best_ms,
                                  "decision": "no placement beats fp32: writing the smallest model"})
            dropped, current = set(), full
    report.dropped = sorted(k.label for k in dropped)
    return current, report
