"""With an accuracy target, the pruning ratio is the largest (by bisection) whose float pruned
model keeps half of the target's error budget."""

from __future__ import annotations

import pytest

from quantkit.prune.target import half_budget, search
from quantkit.quantize.budget import Target


def _fake(threshold: float):
    """A 'model' that is its ratio; its cosine falls linearly and crosses 0.995 at `threshold`."""
    def prune_at(ratio):
        return ratio, {"ratio": ratio}

    def score(ratio):
        return [{"name": "y", "cosine": 1 - 0.005 * ratio / threshold, "sqnr_db": 30.0, "top1": 1.0,
                 "nonfinite": 0}]
    return prune_at, score


@pytest.mark.parametrize("threshold", [0.1, 0.33, 0.45])
def test_bisection_finds_the_largest_ratio_meeting_the_target(threshold):
    prune_at, score = _fake(threshold)
    found = search(0.5, prune_at, score, Target(min_cosine=0.995))
    assert threshold - 0.5 / 16 <= found.ratio <= threshold
    assert found.section == {"ratio": found.ratio}
    assert len(found.trials) == 5 and all(t["met"] == (t["ratio"] <= threshold) for t in found.trials)


def test_the_largest_ratio_is_taken_at_once_when_it_meets_the_target():
    prune_at, score = _fake(0.9)
    found = search(0.5, prune_at, score, Target(min_cosine=0.995))
    assert found.ratio == 0.5 and len(found.trials) == 1


def test_nothing_is_pruned_when_no_ratio_meets_the_target():
    prune_at, score = _fake(0.001)
    found = search(0.5, prune_at, score, Target(min_cosine=0.995))
    assert found.ratio == 0.0 and found.model is None


def test_half_budget():
    half = half_budget(Target(min_cosine=0.99, min_sqnr=20.0, max_disagreement=0.01))
    assert half.min_cosine == pytest.approx(0.995)
    assert half.min_sqnr == pytest.approx(23.0103, abs=1e-3)
    assert half.max_disagreement == pytest.approx(0.005)
