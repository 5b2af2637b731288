"""The probe's early stop: a candidate stops being scored once the target is out of reach even if
every remaining sample matched fp32, and the decision is always the one the whole probe gives."""

from __future__ import annotations

import numpy as np
import pytest
from fake_session import FakeSession

from quantkit.quantize.budget import Probe, Target


class _Fixed(FakeSession):
    """A session returning given outputs batch after batch, counting the runs."""

    def __init__(self, outputs: list[np.ndarray], names=("y",)):
        super().__init__(inputs=(), outputs=tuple(names))
        self.given = outputs

    def outputs(self, feed):
        return [self.given[(self.runs - 1) % len(self.given)]]


def _probe(batches: int = 8, seed: int = 0) -> tuple[Probe, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    refs = [rng.normal(size=(8, 16)).astype(np.float32) for _ in range(batches)]
    probe = Probe.take(_Fixed(refs), [{"x": np.zeros((8, 1), np.float32)}] * batches)
    return probe, refs


def _noisy(refs, scales, seed=1):
    rng = np.random.default_rng(seed)
    return [r + s * rng.normal(size=r.shape).astype(np.float32) for r, s in zip(refs, scales)]


def test_without_a_target_every_batch_is_scored_and_the_figures_are_the_reports():
    probe, refs = _probe()
    got = _noisy(refs, [0.05] * 8)
    s = _Fixed(got)
    (f,) = probe.score(s)
    assert s.runs == 8 and "samples_scored" not in f
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in refs)
    noise = sum(float(np.sum((r.astype(np.float64) - g) ** 2)) for r, g in zip(refs, got))
    assert f["sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), rel=1e-9)
    agree = sum(int((r.argmax(1) == g.argmax(1)).sum()) for r, g in zip(refs, got))
    assert f["top1"] == agree / 64 and f["nonfinite"] == 0 and 0.99 < f["cosine"] < 1.0


@pytest.mark.parametrize("target", [Target(min_sqnr=30.0), Target(min_cosine=0.999)])
def test_a_clear_failure_stops_after_the_first_batch_with_the_same_verdict(target):
    probe, refs = _probe()
    got = _noisy(refs, [0.5] * 8)  # ~6 dB: hopeless for both targets
    early, full = _Fixed(got), _Fixed(got)
    bound = probe.score(early, target)
    figures = probe.score(full, None)
    assert early.runs == 1 and full.runs == 8
    assert bound[0]["samples_scored"] == 8
    assert target.shortfall(bound) is not None and target.shortfall(figures) is not None
    assert "at best, after 8 probe samples" in target.shortfall(bound)
    # the bound is optimistic: never below what the whole probe measures
    assert bound[0]["sqnr_db"] >= figures[0]["sqnr_db"] and bound[0]["cosine"] >= figures[0]["cosine"]


def test_a_candidate_that_meets_the_target_is_scored_in_full_and_identically():
    probe, refs = _probe()
    got = _noisy(refs, [0.01] * 8)  # ~40 dB
    target = Target(min_sqnr=30.0)
    s = _Fixed(got)
    assert probe.score(s, target) == probe.score(_Fixed(got), None) and s.runs == 8
    assert target.shortfall(probe.score(_Fixed(got), target)) is None


def test_a_late_bad_batch_is_still_caught_and_a_late_good_one_is_not_cut_short():
    probe, refs = _probe()
    target = Target(min_sqnr=30.0)
    # good first batches, then one awful batch: the bound only fails once the error has arrived
    late_bad = _noisy(refs, [0.001] * 7 + [3.0])
    s = _Fixed(late_bad)
    assert target.shortfall(probe.score(s, target)) is not None and s.runs == 8
    # a mediocre first batch that the rest (exact) can carry: no early stop, and the full verdict is a pass
    early_meh = [refs[0] + np.float32(0.04) * np.ones_like(refs[0])] + [r.copy() for r in refs[1:]]
    s = _Fixed(early_meh)
    figures = probe.score(s, target)
    assert s.runs == 8 and target.shortfall(figures) is None


def test_non_finite_values_stop_scoring_at_once():
    probe, refs = _probe()
    got = [r.copy() for r in refs]
    got[0][0, 0] = np.nan
    s = _Fixed(got)
    bound = probe.score(s, Target(min_cosine=0.9))
    assert s.runs == 1 and bound[0]["nonfinite"] == 1


def test_the_baseline_puts_its_worst_batches_first_and_later_failures_stop_sooner():
    """Scoring the all-static candidate with reorder=True sorts the batches by its error share, worst
    first, with references and bounds moved alike: a later candidate erring on the same batches fails
    after one batch instead of six, with the whole probe's verdict."""
    target = Target(min_sqnr=25.0)
    scales = [0.01] * 8
    scales[6] = 0.3  # one bad batch, late in the probe
    probe, refs = _probe()
    base = _Fixed(_noisy(refs, scales))
    before = probe.score(base)
    probe.score(_Fixed(_noisy(refs, scales)), reorder=True)
    order = [next(i for i, r in enumerate(refs) if r is ref[0]) for ref in probe.reference]
    assert order[0] == 6 and sorted(order) == list(range(8))
    (after,) = probe.score(_Fixed([base.given[b] for b in order]))
    assert after["sqnr_db"] == pytest.approx(before[0]["sqnr_db"], rel=1e-9)  # same figures in the new order
    worse = _noisy(refs, [s * 1.5 for s in scales], seed=2)
    s_old, s_new = _Fixed(worse), _Fixed([worse[b] for b in order])
    fresh, _ = _probe()
    v_old, v_new = fresh.score(s_old, target), probe.score(s_new, target)
    assert target.shortfall(v_old) is not None and target.shortfall(v_new) is not None
    assert s_new.runs == 1 and s_old.runs == 7


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _decoded(top, blank=0):
    out = []
    for row in top:
        seq = [int(c) for j, c in enumerate(row) if c != blank and (j == 0 or c != row[j - 1])]
        out.append(seq)
    return out


def test_a_ctc_output_is_held_to_the_same_decoded_sequences_by_default():
    """A CTC recognizer's (batch, positions, classes) probabilities, mostly blank (class 0): a candidate
    whose mean cosine passes easily but flips near-tied positions changes the decoded text of some
    samples, and misses the default budget on that share; positions flipped between repeats of one
    class change no text and count as agreeing. --max-accuracy-drop bounds the per-position share."""
    rng = np.random.default_rng(0)
    logits, flipped_logits = [], []
    for _ in range(4):
        z = rng.normal(scale=2.0, size=(8, 40, 12))
        z[..., 0] += 5.0  # blank wins at most positions
        w = z.copy()
        rows, cols = np.nonzero(rng.random(z.shape[:2]) < 0.01)  # ~1% of positions: a near tie, flipped
        for r, c in zip(rows, cols):
            top, second = np.argsort(z[r, c])[[-1, -2]]
            z[r, c, second] = z[r, c, top] - 0.05
            w[r, c] = z[r, c]
            w[r, c, [top, second]] = z[r, c, [second, top]]
        logits.append(z)
        flipped_logits.append(w)
    refs = [_softmax(z) for z in logits]
    probe = Probe.take(_Fixed(refs), [{"x": np.zeros((8, 1), np.float32)}] * 4)
    flipped = [_softmax(w) for w in flipped_logits]
    (f,) = probe.score(_Fixed(flipped))
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(refs, flipped)) / (4 * 8 * 40)
    same = sum(a == b for r, g in zip(refs, flipped) for a, b in zip(_decoded(r.argmax(-1)), _decoded(g.argmax(-1))))
    assert f["positions"] == pytest.approx(agree) and f["top1"] == f["positions"] and 0.985 < agree < 0.995
    assert f["sequences"] == same / 32 and 0.5 < f["sequences"] < 0.97
    assert f["cosine"] > 0.9999  # the cosine alone passes
    default = Target.from_gates(None, None, None)
    why = default.with_margin().shortfall([f])
    assert why is not None and "decoded sequence" in why
    assert Target.from_gates(None, None, 2.0).shortfall([f]) is None  # a 2-point drop of positions allowed
    assert Target.from_gates(None, None, 0.5).shortfall([f]) is not None
    (exact,) = probe.score(_Fixed(refs))
    assert exact["sequences"] == 1.0 and default.with_margin().shortfall([exact]) is None
    # not CTC (no class is the top one at half the positions): per-position figures, no sequences
    tagger = [_softmax(rng.normal(scale=2.0, size=(8, 40, 12))) for _ in range(2)]
    (t,) = Probe.take(_Fixed(tagger), [{"x": np.zeros((8, 1), np.float32)}] * 2).score(_Fixed(tagger))
    assert t["positions"] == 1.0 and t["sequences"] is None


class _ByFeed(FakeSession):
    """A session whose outputs depend only on the feed (as onnxruntime's do), safe to run concurrently."""

    def __init__(self, table: dict[int, np.ndarray]):
        super().__init__()
        self.table = table

    def outputs(self, feed):
        return [self.table[int(feed["x"][0, 0])]]


def test_batches_run_in_parallel_give_the_same_figures_and_verdicts():
    """parallel=2 runs two batches at a time (runtime.run_all) and scores them in order: the figures of a
    full scoring and of an early stop are those of parallel=1; at most one batch runs past the stop."""
    rng = np.random.default_rng(0)
    refs = {b: rng.normal(size=(8, 16)).astype(np.float32) for b in range(8)}
    feeds = [{"x": np.full((8, 1), b, np.float32)} for b in range(8)]
    probe = Probe.take(_ByFeed(refs), feeds)
    for scales, target in (([0.05] * 8, None), ([0.05] * 8, Target(min_sqnr=20.0)), ([0.5] * 8, Target(min_sqnr=30.0))):
        got = dict(enumerate(_noisy([refs[b] for b in range(8)], scales)))
        one, two = _ByFeed(got), _ByFeed(got)
        assert probe.score(one, target) == probe.score(two, target, parallel=2)
        assert two.runs - one.runs in (0, 1)
    from quantkit import runtime

    assert runtime.run_all([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]
    with pytest.raises(ZeroDivisionError):
        runtime.run_all([lambda: 1, lambda: 1 / 0])


def test_a_ctc_output_gets_a_probe_twice_as_large():
    """Decoded sequences are all-or-nothing per sample: with a CTC output the probe takes
    SEQUENCE_PROBE_SAMPLES (judged on the first PROBE_SAMPLES), other outputs PROBE_SAMPLES."""
    from quantkit.quantize.budget import PROBE_SAMPLES, SEQUENCE_PROBE_SAMPLES

    rng = np.random.default_rng(3)

    def ctc_batch():
        z = rng.normal(scale=2.0, size=(8, 40, 12))
        z[..., 0] += 5.0  # blank wins at most positions
        return _softmax(z)

    many = SEQUENCE_PROBE_SAMPLES // 8 + 4
    feeds = [{"x": np.zeros((8, 1), np.float32)}] * many
    ctc = Probe.take(_Fixed([ctc_batch() for _ in range(many)]), feeds)
    assert sum(len(r[0]) for r in ctc.reference) == SEQUENCE_PROBE_SAMPLES > PROBE_SAMPLES
    plain = Probe.take(_Fixed([rng.normal(size=(8, 16)).astype(np.float32)]), feeds)
    assert sum(len(r[0]) for r in plain.reference) == PROBE_SAMPLES
    (f,) = ctc.score(_Fixed([r[0] for r in ctc.reference]))
    assert f["sequences"] == 1.0
