"""The speed guard's decisions, with a fake clock so the outcome does not depend on the machine."""

from quantkit.quantize.plan import OpKind
from quantkit.quantize.speed import NOT_CLEARLY_FASTER, ORDER, guard


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
    assert [t["decision"] for t in report.trials] == [NOT_CLEARLY_FASTER, "kept quantized"]


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
    (_, _, _), report = guard(build, session, FP32, {}, kinds, timer=timer, for_speed=True)
    assert [t["group"] for t in report.trials] == [k.label for k in ORDER]
    assert set(ORDER) == set(OpKind)
    # every group's trial once, from the full placement; then the models without the groups with no weights
    # (attention MatMuls, the int8 region), whose int8 must win to stay (here nothing is faster): the rest are kept
    speed_only = [k for k in ORDER if k in (OpKind.ATTENTION_MATMUL, OpKind.INT8_REGION)]
    assert built[:1 + len(ORDER)] == [frozenset()] + [frozenset({k}) for k in ORDER]
    assert built[1 + len(ORDER):] == [frozenset(speed_only[:i + 1]) for i in range(len(speed_only))]
    assert report.dropped_kinds == sorted(k.value for k in speed_only)


def test_compression_only_groups_are_not_timed_unless_speed_is_required():
    """int8 embedding tables only shrink the file: a timing never undoes that by default."""
    build, session, timer, _ = make(lambda d: 100.0 if d == {"fp32"} else (40.0 if OpKind.EMBEDDING in d else 50.0))
    _, report = guard(build, session, FP32, {}, {OpKind.EMBEDDING, OpKind.MATMUL}, timer=timer)
    assert [t["group"] for t in report.trials] == [OpKind.MATMUL.label] and report.dropped == []
    _, report = guard(build, session, FP32, {}, {OpKind.EMBEDDING, OpKind.MATMUL}, timer=timer, for_speed=True)
    assert report.dropped == [OpKind.EMBEDDING.label]


def test_a_weight_only_run_is_compression_only_even_when_float_beats_it_and_fp32():
    """int4 MatMulNBits slower than the float model (which other rewrites, such as the masked-Softmax
    floor, made faster than fp32): the guard would have written a float model; weight-only groups are
    compression, kept unless --require-speedup."""
    def cost(d):
        return 100.0 if d == {"fp32"} else (90.0 if OpKind.MATMUL in d else 120.0)

    build, session, timer, _ = make(cost)
    kinds = {OpKind.MATMUL, OpKind.EMBEDDING}
    (model, _, _), report = guard(build, session, FP32, {}, kinds, timer=timer, compression_only=kinds)
    assert report.trials == [] and model.dropped == frozenset()
    (model, _, _), report = guard(build, session, FP32, {}, kinds, timer=timer, compression_only=kinds,
                                  for_speed=True)
    assert OpKind.MATMUL in model.dropped


def test_a_noisy_clock_cannot_drop_a_group_that_costs_nothing():
    """Median timings with +-5% noise (a loaded machine) and no real difference: a drop needs a
    clear win in every one of the repeated measurements, which noise alone does not give (checked
    over many seeds); a real 15% gain under the same noise is still found."""
    import numpy as np

    for seed in range(40):
        rng = np.random.default_rng(seed)
        build, session, _, _ = make(lambda d: 0.0)

        def noisy(sessions, feed, runs, rng=rng):
            return [100.0 if s.dropped == {"fp32"} else 50.0 * rng.uniform(0.95, 1.05) for s in sessions]

        _, report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.CONV, OpKind.GEMM}, timer=noisy)
        assert report.dropped == [], (seed, report.trials)

    rng = np.random.default_rng(0)
    build, session, _, _ = make(lambda d: 0.0)

    def real_gain(sessions, feed, runs):
        return [100.0 if s.dropped == {"fp32"} else (42.5 if OpKind.CONV in s.dropped else 50.0)
                * rng.uniform(0.98, 1.02) for s in sessions]

    _, report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.CONV}, timer=real_gain)
    assert report.dropped == [OpKind.CONV.label]


def test_the_guard_hands_the_report_its_timing_of_the_model_it_returns():
    """The report reuses the guard's last interleaved timing of the returned model against fp32 instead of
    timing the same pair again; none when the returned model is one no timing covered."""
    def cost(d):
        if d == {"fp32"}:
            return 100.0
        return 50.0 - (5.0 if OpKind.ATTENTION_MATMUL in d else 0.0)

    build, session, timer, _ = make(cost)
    calls = []

    def counted(sessions, feed, runs):
        calls.append(len(sessions))
        return timer(sessions, feed, runs)

    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL},
                                  timer=counted)
    # attention dropped (45 ms), MatMul kept, both in the one shared look: the model without attention was
    # timed there against fp32, clearly faster, so that timing is the report's and nothing is timed again
    assert model.dropped == {OpKind.ATTENTION_MATMUL} and report.final_ms == (100.0, 45.0, 5)
    assert calls == [4]
    # the same drop when the written model is barely faster than fp32: timed again in full to say so
    build, session, timer, _ = make(lambda d: 100.0 if d == {"fp32"} else (97.0 if d else 99.0))
    calls.clear()
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL},
                                  timer=counted)
    assert model.dropped == {OpKind.ATTENTION_MATMUL} and report.final_ms == (100.0, 97.0, 10)
    assert calls == [4, 2]
    build, session, timer, _ = make(lambda d: 100.0 if d == {"fp32"} else 50.0)
    _, report = guard(build, session, FP32, {}, {OpKind.MATMUL}, timer=timer)
    assert report.final_ms == (100.0, 50.0, 5)  # kept after the short look: "with" is the returned model

    def slower(d):
        return 10.0 if d == {"fp32"} else 10.0 + 3.0 * (2 - len(d))

    build, session, timer, _ = make(slower)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.CONV, OpKind.GEMM}, timer=timer)
    assert report.int8_cannot_win and report.final_ms is None  # the full model written was not the one timed last


def test_the_first_look_times_every_group_together_and_only_winners_again():
    """One interleaved timing of fp32, the full placement and each group's trial settles the groups that
    do not win; a group that wins there and in a second shared look is measured again on its own (a
    short look and the repeats) from the placement earlier drops left. Held one at a time
    (shared_look=False) every group is timed alone."""
    def cost(d):
        if d == {"fp32"}:
            return 100.0
        return 50.0 - (10.0 if OpKind.CONV in d else 0.0)

    calls = []
    build, session, timer, _ = make(cost)

    def counting(sessions, feed, runs):
        calls.append(len(sessions))
        return timer(sessions, feed, runs)

    kinds = {OpKind.MATMUL, OpKind.CONV, OpKind.GEMM}
    (model, _, _), report = guard(build, session, FP32, {}, kinds, timer=counting)
    assert model.dropped == {OpKind.CONV} and report.dropped == [OpKind.CONV.label]
    # the shared look (fp32 + full + 3 trials), a second one for the winner, Conv's short look and 3
    # repeats; the last repeat timed the written model against fp32 already (clearly faster): no final timing
    # then, Conv having weights, 3 short looks of the written model against fp32 (clearly faster in each)
    assert calls == [5, 3, 3, 3, 3, 3, 2, 2, 2]
    assert [t["decision"] for t in report.trials] == ["kept quantized", "kept quantized", "left float (faster)"]
    calls.clear()
    (model, _, _), report = guard(build, session, FP32, {}, kinds, timer=counting, shared_look=False)
    assert model.dropped == {OpKind.CONV} and calls == [3, 3, 3, 3, 3, 3, 2, 2, 2]


def test_one_slow_median_of_the_full_placement_does_not_send_every_group_to_the_long_measurements():
    """The first shared look catches the full placement in a burst of load (its median 20% high): every
    trial seems to win; the second shared look, on a quiet clock, settles them all as kept."""
    looks = []

    def bursty(sessions, feed, runs):
        looks.append(len(sessions))
        slow = 1.2 if len(looks) == 1 else 1.0
        return [100.0 if s.dropped == {"fp32"} else (50.0 * slow if not s.dropped else 50.0) for s in sessions]

    build, session, _, _ = make(lambda d: 0.0)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.CONV, OpKind.GEMM}, timer=bursty)
    assert model.dropped == frozenset() and looks == [5, 5]
    assert all(t["decision"] == "kept quantized" and t["runs"] == 5 for t in report.trials)


def test_a_group_with_no_weights_stays_int8_only_on_a_clear_repeated_win():
    """Attention MatMuls shrink nothing: 3% faster in int8 is within the margin and they go float (a group
    with weights 3% slower stays, as before); 10% faster in every look keeps them."""
    def costs(attention_gain):
        def cost(d):
            if d == {"fp32"}:
                return 100.0
            return 50.0 + (attention_gain if OpKind.ATTENTION_MATMUL in d else 0.0) \
                - (1.5 if OpKind.MATMUL in d else 0.0)
        return cost

    build, session, timer, _ = make(costs(1.5))
    _, report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL}, timer=timer)
    assert report.dropped_kinds == [OpKind.ATTENTION_MATMUL.value]
    build, session, timer, _ = make(costs(5.0))
    _, report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL}, timer=timer)
    assert report.dropped_kinds == [] and report.trials[0]["runs"] == 10  # confirmed by the full measurements


def test_when_int8_cannot_win_groups_without_weights_stay_float():
    """No placement beats fp32: the groups with weights come back (the smallest file), but attention MatMuls
    left float stay float, since int8 there shrinks nothing: that single-timing verdict cannot change the
    written model through them."""
    def cost(d):
        return 50.0 if d == {"fp32"} else 60.0 - (2.0 if OpKind.ATTENTION_MATMUL in d else 0.0)

    build, session, timer, _ = make(cost)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL}, timer=timer)
    assert report.int8_cannot_win and model.dropped == {OpKind.ATTENTION_MATMUL}
    assert report.dropped_kinds == [OpKind.ATTENTION_MATMUL.value] and report.final_ms == (50.0, 58.0, 10)

    def both(d):  # MatMul int8 loses time too: dropped, then restored (it has weights); attention stays float
        if d == {"fp32"}:
            return 50.0
        return 60.0 - (2.0 if OpKind.ATTENTION_MATMUL in d else 0.0) - (10.0 if OpKind.MATMUL in d else 0.0)

    build, session, timer, _ = make(both)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.MATMUL, OpKind.ATTENTION_MATMUL}, timer=timer)
    assert report.int8_cannot_win and model.dropped == {OpKind.ATTENTION_MATMUL} and report.final_ms is None


def test_groups_with_weights_come_back_unless_the_written_model_beats_fp32_clearly_in_every_look():
    """A group with weights dropped for speed, and the model without it near fp32: a noisy clock that shows it 2%
    faster one time and 3% slower the next must not decide which file is written (the smallest, every time);
    clearly faster in every look, the group stays float."""
    def jittery(offsets):
        looks = iter(offsets * 50)

        def cost(d):  # Conv int8 is slow; without it the model runs at fp32's speed give or take the jitter
            if d == {"fp32"}:
                return 100.0
            return (100.0 + next(looks)) if OpKind.CONV in d else 130.0
        return cost

    for offsets in ([-2.0, 3.0, -4.0], [3.0, -2.0, -4.5], [-4.9, -4.9, -4.9]):
        build, session, timer, _ = make(jittery(offsets))
        (model, _, _), report = guard(build, session, FP32, {}, {OpKind.CONV, OpKind.GEMM}, timer=timer)
        assert model.dropped == frozenset() and report.int8_cannot_win and report.dropped == []
    build, session, timer, _ = make(lambda d: 100.0 if d == {"fp32"} else (70.0 if OpKind.CONV in d else 130.0))
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.CONV, OpKind.GEMM}, timer=timer)
    assert model.dropped == {OpKind.CONV} and not report.int8_cannot_win

    # clearly faster in the guard's timings and the first two short looks, not in the third: the weights come back
    pairs = []

    def late_slip(sessions, feed, runs):
        if len(sessions) == 2:
            pairs.append(runs)
        return [100.0 if s.dropped == {"fp32"} else
                (98.0 if len(pairs) == 3 else 90.0) if OpKind.CONV in s.dropped else 130.0 for s in sessions]

    build, session, _, _ = make(lambda d: 0.0)
    (model, _, _), report = guard(build, session, FP32, {}, {OpKind.CONV, OpKind.GEMM}, timer=late_slip)
    assert pairs == [5, 5, 5] and model.dropped == frozenset() and report.int8_cannot_win
