"""The speed guard's decisions, with a fake clock so the outcome does not depend on the machine."""

from quantkit.quantize.plan import OpKind
from quantkit.quantize.speed import ORDER, guard


class FakeSession:
    def __init__(self, dropped):
        self.dropped = frozenset(dropped)


def make(cost):
    """cost(dropped kinds) -> ms; fp32 is the FakeSession with dropped=None."""
    built = []

    def build(dropped):
        built.append(frozenset(dropped))
        return (FakeSession(dropped), f"plan-{sorted(dropped)}", None)

    def timer(sessions, feed, runs):
        return [cost(s.dropped) for s in sessions]

    return build, (lambda model: model), timer, built


FP32 = FakeSession({"fp32"})


def test_drops_the_group_that_slows_the_model_down():
    def cost(d):
        if d == {"fp32"}:
            return 100.0
        return 50.0 - (5.0 if OpKind.ATTENTION_MATMUL in d else 0.0)

    build, session, timer, _ = make(cost)
    (model, plan, _), report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL},
                                     timer=timer)
    assert report.dropped == ["MatMul (activation x activation)"] and not report.int8_cannot_win
    assert model.dropped == {OpKind.ATTENTION_MATMUL}
    assert [t["decision"] for t in report.trials] == ["left float (faster)", "kept quantized"]


def test_small_differences_within_the_noise_margin_keep_the_group():
    def cost(d):
        return 100.0 if d == {"fp32"} else (49.5 if OpKind.GEMM in d else 50.0)

    build, session, timer, _ = make(cost)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.GEMM, OpKind.MATMUL}, timer=timer)
    assert report.dropped == [] and model.dropped == frozenset()


def test_when_no_placement_beats_fp32_the_full_placement_is_written():
    def cost(d):  # every quantized group costs time; fp32 is fastest
        return 10.0 if d == {"fp32"} else 10.0 + 3.0 * (2 - len(d))

    build, session, timer, _ = make(cost)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.CONV, OpKind.GEMM}, timer=timer)
    assert report.int8_cannot_win and report.dropped == []
    assert model.dropped == frozenset()  # the smallest model: everything quantized


def test_groups_are_tried_in_the_fixed_order_whatever_the_set_order():
    """The order comes from the enum, not from display text or set iteration."""
    build, session, timer, built = make(lambda d: 100.0 if d == {"fp32"} else 50.0)
    kinds = set(OpKind)
    (_, _, _), report = guard(build, session, FP32, {}, kinds, timer=timer)
    assert [t["group"] for t in report.trials] == [k.label for k in ORDER]
    assert set(ORDER) == set(OpKind)
    # each trial drops one more group on top of the (kept) ones before it: here nothing is dropped
    assert built == [frozenset()] + [frozenset({k}) for k in ORDER]
