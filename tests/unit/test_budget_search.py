"""The placement search on a synthetic error model: which ops leave static int8, for what, and in
how many probes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantkit.quantize.budget import FLOAT, Target, search

# noise each op adds on each choice (relative power); static default
NOISE = {
    "down0": {"static": 1e-2, "dynamic": 8e-3, "weight_only": 1e-5, FLOAT: 0.0},
    "down1": {"static": 6e-3, "dynamic": 5e-3, "weight_only": 1e-5, FLOAT: 0.0},
    "up0": {"static": 8e-4, "dynamic": 2e-4, "weight_only": 1e-5, FLOAT: 0.0},
    "up1": {"static": 6e-4, "dynamic": 1e-4, "weight_only": 1e-5, FLOAT: 0.0},
    "qkv": {"static": 1e-4, "dynamic": 5e-5, "weight_only": 1e-5, FLOAT: 0.0},
    "attn": {"static": 5e-5, FLOAT: 0.0},
}
CHOICES = {n: [c for c in ("dynamic", "weight_only") if c in v] + [FLOAT] for n, v in NOISE.items()}
RANKED = [{"node": n} for n in sorted(NOISE, key=lambda n: -NOISE[n]["static"])]


def _evaluate(probes: list):
    def evaluate(overrides: dict[str, str]) -> list[dict]:
        probes.append(dict(overrides))
        noise = 1e-9 + sum(v[overrides.get(n, "static")] for n, v in NOISE.items())  # 1e-9: float's own rounding
        sqnr = -10 * math.log10(noise)
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": sqnr, "top1": None}]
    return evaluate


def test_the_outlier_ops_go_weight_only_the_next_ones_dynamic_the_rest_stay_static():
    probes: list = []
    found = search(RANKED, CHOICES, Target(min_sqnr=25.0), _evaluate(probes), lambda s: None)
    assert found.met
    # 25 dB allows 3.2e-3 of noise: both down-projections need weight-only (dynamic keeps 1.3e-2)...
    assert found.overrides["down0"] == "weight_only" and found.overrides["down1"] == "weight_only"
    # ...and nothing else has to leave static int8 for float: "attn", whose only alternative is float,
    # stays static int8 although it ranks above "qkv" (float is the last level, after every cheaper scheme)
    assert FLOAT not in found.overrides.values() and "attn" not in found.overrides
    assert found.figures[0]["sqnr_db"] >= 25.0
    assert len(probes) <= 2 + 2 * math.ceil(math.log2(len(NOISE))) + 8


def test_a_loose_target_keeps_everything_static_after_one_probe():
    probes: list = []
    found = search(RANKED, CHOICES, Target(min_sqnr=10.0), _evaluate(probes), lambda s: None)
    assert found.met and found.overrides == {} and probes == [{}]


def test_an_impossible_target_is_reported_unmet():
    probes: list = []
    found = search(RANKED, CHOICES, Target(min_sqnr=100.0), _evaluate(probes), lambda s: None)
    assert not found.met and found.shortfall
    # every level was tried once, the last one (everything float) included
    assert probes[-1] == dict.fromkeys(NOISE, FLOAT)


def test_float_is_the_last_level_and_takes_ops_with_no_other_alternative_only_then():
    probes: list = []
    found = search(RANKED, CHOICES, Target(min_sqnr=48.0), _evaluate(probes), lambda s: None)
    # 48 dB needs the weight-only noise of five ops gone too: only float does that
    assert found.met and FLOAT in found.overrides.values()
    float_levels = [i for i, p in enumerate(probes) if "attn" in p]
    assert float_levels and probes[float_levels[0]]["attn"] == FLOAT
    # no probe before the float level touched "attn"
    assert all("attn" not in p for p in probes[:float_levels[0]])


def _rows_with_noise() -> list[dict]:
    """Sensitivity rows carrying the ops' own noise (and emulated alternatives), as the search gets them."""
    rows = []
    for n in sorted(NOISE, key=lambda n: -NOISE[n]["static"]):
        alts = {a: -10 * math.log10(v) for a, v in NOISE[n].items() if a not in ("static", FLOAT)}
        rows.append({"node": n, "own_noise": NOISE[n]["static"], "alternatives_own_sqnr_db": alts})
    return rows


def _amplified(probes: list, amplify: dict[str, float]):
    """The output noise is each op's own noise times its amplification (the noise model assumes one)."""
    def evaluate(overrides: dict[str, str]) -> list[dict]:
        probes.append(dict(overrides))
        noise = 1e-9 + sum(amplify.get(n, 1.0) * v[overrides.get(n, "static")] for n, v in NOISE.items())
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": -10 * math.log10(noise),
                 "top1": None}]
    return evaluate


def test_the_noise_model_guess_meets_the_target_in_fewer_probes_than_bisection():
    guided: list = []
    found = search(_rows_with_noise(), CHOICES, Target(min_sqnr=25.0), _amplified(guided, {}), lambda s: None,
                   max_restores=0)
    blind: list = []
    plain = search(RANKED, CHOICES, Target(min_sqnr=25.0), _evaluate(blind), lambda s: None, max_restores=0)
    assert found.met and plain.met
    assert found.overrides == plain.overrides  # an exact noise model lands where the bisection does...
    assert len(guided) < len(blind)  # ...measuring fewer candidates


def test_a_wrong_guess_falls_back_to_measuring_and_still_meets_the_target():
    """The attention MatMul's noise reaches the output 100x amplified: the first guess (from one common gain)
    leaves it static and misses; the search measures on, learns the kinds' gains, and meets the target."""
    probes: list = []
    rows = _rows_with_noise()
    for r in rows:
        r["kind"] = "attention" if r["node"] == "attn" else "matmul"
    found = search(rows, CHOICES, Target(min_sqnr=25.0), _amplified(probes, {"attn": 100.0}), lambda s: None,
                   max_restores=0)
    assert found.met and found.figures[0]["sqnr_db"] >= 25.0
    assert any(t["moved"] and not t["meets_target"] for t in found.trials)  # a guess was measured and missed
    # the gain learnt for the attention kind sends it float first at the float level: the other ops keep
    # their cheaper alternatives (ranked by own noise alone, all five would have gone float before it)
    assert found.overrides == {"down0": "weight_only", "down1": "weight_only", "attn": FLOAT}
    assert len(probes) <= 7


def test_an_op_whose_first_alternative_was_never_emulated_moves_by_its_own_noise():
    """A Gemm's dynamic alternative is not emulated: it ranks by all of its own noise, not below every op."""
    from quantkit.quantize.budget import by_gain

    ranked = [{"node": "gemm", "own_noise": 1e-2, "alternatives_own_sqnr_db": {}},
              {"node": "mm", "own_noise": 5e-3, "alternatives_own_sqnr_db": {"dynamic": 30.0}},
              {"node": "attn", "own_noise": 1e-3, "alternatives_own_sqnr_db": {}}]
    choices = {"gemm": ["dynamic", FLOAT], "mm": ["dynamic", FLOAT], "attn": [FLOAT]}
    assert [r["node"] for r in by_gain(ranked, choices)] == ["gemm", "mm", "attn"]


@pytest.mark.parametrize("seed", [*range(30), 125, 390])  # 125, 390: a family changed under the bisection
def test_random_models_and_targets_always_end_in_a_measured_placement(seed):
    """Random own noises, kinds, amplifications and targets: the search never fails internally (the gains
    move while it measures: every family it bisects over is fixed when made), every placement it returns
    was measured, and it meets the target whenever everything float does."""
    rng = np.random.default_rng(seed)
    names = [f"op{i}" for i in range(int(rng.integers(3, 25)))]
    kinds = {n: str(rng.choice(["conv", "matmul", "attention"])) for n in names}
    static = {n: float(10 ** rng.uniform(-5, -2)) for n in names}
    alts = {n: {a: static[n] * float(10 ** rng.uniform(-3, 0)) for a in ("dynamic", "weight_only")
                if kinds[n] != "attention" and rng.random() < 0.8} for n in names}
    gain = {k: float(10 ** rng.uniform(-1, 2)) for k in ("conv", "matmul", "attention")}
    choices = {n: [*alts[n], FLOAT] for n in names}
    ranked = sorted(({"node": n, "kind": kinds[n], "own_noise": static[n],
                      "alternatives_own_sqnr_db": {a: -10 * math.log10(v) for a, v in alts[n].items()}}
                     for n in names), key=lambda r: -r["own_noise"])

    def evaluate(overrides):
        noise = 1e-9 + sum(gain[kinds[n]] * (0.0 if overrides.get(n) == FLOAT else
                                            alts[n].get(overrides.get(n), static[n])) for n in names)
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": -10 * math.log10(noise),
                 "top1": None}]

    target = Target(min_sqnr=float(rng.uniform(10, 60)))
    found = search(ranked, choices, target, evaluate, lambda s: None)
    assert found.overrides in [t["moved"] for t in found.trials]
    assert found.met == (target.shortfall(found.figures) is None)
    if target.shortfall(evaluate(dict.fromkeys(names, FLOAT))) is None:
        assert found.met


def test_no_placement_is_measured_twice():
    """Ops with no choice at a level make flat steps in its family: the bisection asks for the same
    placement again, and gets the verdict it already has."""
    probes: list = []
    found = search(RANKED, CHOICES, Target(min_sqnr=25.0), _evaluate(probes), lambda s: None)
    keys = [frozenset(p.items()) for p in probes]
    assert found.met and len(keys) == len(set(keys))
    for seed in (3, 125):
        test_random_models_and_targets_always_end_in_a_measured_placement(seed)  # still consistent


def test_a_split_that_could_send_back_only_a_few_ops_costs_one_candidate():
    """16 ops that must all go float (their weight-only alternative is barely better than static): the
    placement with 2 of them (16 // 8) back on weight-only misses, so the split stops after that one
    candidate instead of bisecting over all 16; the result is the measured all-float placement."""
    names = [f"op{i:02d}" for i in range(16)]
    static = {n: 1e-3 * (1 + i / 100) for i, n in enumerate(names)}
    ranked = [{"node": n, "kind": "conv", "own_noise": static[n],
               "alternatives_own_sqnr_db": {"weight_only": -10 * math.log10(0.9 * static[n])}} for n in names]
    choices = {n: ["weight_only", FLOAT] for n in names}
    probes: list = []

    def evaluate(overrides):
        probes.append(dict(overrides))
        noise = 1e-9 + sum({FLOAT: 0.0, "weight_only": 0.9 * static[n]}.get(overrides.get(n), static[n])
                           for n in names)
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": -10 * math.log10(noise),
                 "top1": None}]

    found = search(ranked, choices, Target(min_sqnr=31.0), evaluate, lambda s: None)  # allows ~8e-4: one op
    assert found.met and set(found.overrides.values()) == {FLOAT} and len(found.overrides) >= 15
    mixed = [p for p in probes if set(p.values()) == {FLOAT, "weight_only"}]
    # the split's one probe (2 of the 16 back), and the restores: 4 ops back together, then one at a time
    assert sum(1 for p in mixed if list(p.values()).count("weight_only") == 2) == 1
    restores = [p for p in mixed if list(p.values()).count("weight_only") != 2]
    assert [list(p.values()).count("weight_only") for p in restores] == [4, 1, 1, 1, 1]


def test_a_level_met_only_with_most_ops_on_it_gives_way_to_a_few_ops_one_level_up():
    """18.7 dB allows 1.349e-2 of noise: everything on dynamic int8 keeps 1.34e-2 and just meets it, so the
    cheapest level needs 4 of the 6 ops moved (the pruned MiniLM's 29 of 36); one op on weight-only meets it
    too (7.6e-3). The next level is searched as well and the placement moving fewer ops kept."""
    probes: list = []
    found = search(RANKED, CHOICES, Target(min_sqnr=18.7), _evaluate(probes), lambda s: None)
    assert found.met and found.overrides == {"down0": "weight_only"}
    assert found.figures == _evaluate([])({"down0": "weight_only"})
    # the crowded dynamic placement was found and measured first: 4 ops, meeting the target
    crowded = [t for t in found.trials if t["meets_target"] and set(t["moved"].values()) == {"dynamic"}]
    assert crowded and min(len(t["moved"]) for t in crowded) == 4


def test_the_crowded_level_is_kept_when_the_next_one_needs_as_many_ops():
    """When weight-only is no better per op (equal noise to dynamic here), the next level needs as many ops:
    the cheaper level's placement stays the result."""
    noise = {n: {**v, "weight_only": v.get("dynamic", v["static"])} for n, v in NOISE.items()}
    rows = [{"node": n} for n in sorted(noise, key=lambda n: -noise[n]["static"])]

    def evaluate(overrides: dict[str, str]) -> list[dict]:
        total = 1e-9 + sum(v[overrides.get(n, "static")] for n, v in noise.items())
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - total / 2, "sqnr_db": -10 * math.log10(total),
                 "top1": None}]

    found = search(rows, CHOICES, Target(min_sqnr=18.7), evaluate, lambda s: None)
    assert found.met and set(found.overrides.values()) == {"dynamic"} and len(found.overrides) == 4
    assert any(set(t["moved"].values()) == {"weight_only"} for t in found.trials)  # the next level was tried


def _damped_search(monkeypatch, guesses: int, target: float) -> tuple[dict[str, str], list[dict]]:
    """24 ops of one kind; the 6 noisiest reach the output at 0.3x, the rest at 1x: the gain fitted on the
    all-static candidate overestimates what moving the first ops removes, so plain guesses land short."""
    from quantkit.quantize import budget

    names = [f"op{i:02d}" for i in range(24)]
    own = {m: 1e-3 * 0.8 ** i for i, m in enumerate(names)}
    reach = {m: 0.3 if i < 6 else 1.0 for i, m in enumerate(names)}
    rows = [{"node": m, "kind": "matmul", "own_noise": own[m], "alternatives_own_sqnr_db": {}} for m in names]
    probes: list[dict] = []

    def evaluate(overrides):
        probes.append(dict(overrides))
        noise = 1e-9 + sum(reach[m] * own[m] for m in names if overrides.get(m) != FLOAT)
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": -10 * math.log10(noise),
                 "top1": None}]

    monkeypatch.setattr(budget, "GUESSES", guesses)
    found = search(rows, {m: [FLOAT] for m in names}, Target(min_sqnr=target), evaluate, lambda s: None,
                   max_restores=0)
    assert found.met and found.figures[0]["sqnr_db"] >= target
    return found.overrides, probes


@pytest.mark.parametrize("target", [28.0, 30.0, 32.0, 34.0])
def test_guesses_that_miss_push_the_next_guess_out_instead_of_bisecting(monkeypatch, target):
    """Each missed guess scales the model by how far it underestimated the miss (NoiseModel.correction):
    three corrected guesses land on the placement the bisection finds (one guess then bisection over all
    24), in at most two thirds of the candidates."""
    one, bisected = _damped_search(monkeypatch, 1, target)
    three, guessed = _damped_search(monkeypatch, 3, target)
    assert three == one
    assert 3 * len(guessed) <= 2 * len(bisected)
    assert [len(p) for p in guessed] == sorted(len(p) for p in guessed)  # each guess further out than the last
    assert not any(len(p) == 24 for p in guessed)  # all 24 moved was never needed


def test_the_correction_is_the_largest_underestimate_of_the_misses_since_a_mark():
    from quantkit.quantize.budget import NoiseModel

    model = NoiseModel({"a": {"kind": "k", "own_noise": 1.0}, "b": {"kind": "k", "own_noise": 1.0}}, ["a", "b"],
                       Target(min_cosine=0.99))
    model.gain = {"k": 1.0}  # predicts 2 with both static, 1 with one float
    model.misses = [({}, 3.0), ({"a": FLOAT}, 1.5), ({"b": FLOAT}, 1.2)]
    assert model.correction() == pytest.approx(1.5)
    assert model.correction(since=2) == pytest.approx(1.2)
    assert model.correction(since=3) == 1.0  # no miss: no correction, never below 1
    assert model.smallest(lambda k: {"a": FLOAT} if k == 1 else {"a": FLOAT, "b": FLOAT}, 2, 1.0, since=2) == 2
    assert model.smallest(lambda k: {"a": FLOAT} if k == 1 else {"a": FLOAT, "b": FLOAT}, 2, 1.0) == 1


def test_a_miss_stopped_early_corrects_by_its_scored_samples_not_by_its_bound():
    """A candidate stopped early carries the bound it passed (every later sample taken as perfect: just past
    the target) and the figures of the samples it was scored on: the miss is recorded with the larger
    error of the two, and it alone refits nothing."""
    from quantkit.quantize.budget import NoiseModel

    target = Target(min_cosine=0.99)
    model = NoiseModel({"a": {"kind": "k", "own_noise": 1.0}}, ["a"], target)
    bound = {"name": "y", "nonfinite": 0, "cosine": 0.9899, "sqnr_db": 30.0, "top1": None}
    scored = {**bound, "cosine": 0.97}  # 3x the error allowed on the samples scored
    model.observe({}, [{**bound, "samples_scored": 8, "scored_only": scored}])
    assert model.misses == [({}, pytest.approx(3.0))]
    assert model.observed == []  # stopped early: no refit
    model.observe({"a": FLOAT}, [{**bound, "cosine": 0.995}])  # met: not a miss
    assert len(model.misses) == 1


def _uniform_family(choice: list[str]):
    """32 ops alike (1e-3 own noise static, 1e-6 on weight-only, none float) with no sensitivity rows, so
    the search has no guess and bisects: 24.5 dB allows 3.55e-3, so the smallest k that meets is 29."""
    names = [f"op{i:02d}" for i in range(32)]
    probes: list = []

    def evaluate(overrides):
        probes.append(dict(overrides))
        noise = 1e-9 + sum({FLOAT: 0.0, "weight_only": 1e-6}.get(overrides.get(n), 1e-3) for n in names)
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": -10 * math.log10(noise),
                 "top1": None}]

    found = search([{"node": n} for n in names], {n: choice for n in names}, Target(min_sqnr=24.5), evaluate,
                   lambda s: None)
    return found, probes


def test_bisection_below_the_float_level_stops_within_an_eighth_of_the_ops(monkeypatch):
    """On the weight-only level every op keeps its int8 weights: the bisection stops once at most 32 // 8 = 4
    ops are undecided and takes the k that met, in fewer candidates than the exact bisection."""
    from quantkit.quantize import budget

    found, probes = _uniform_family(["weight_only", FLOAT])
    assert found.met and set(found.overrides.values()) == {"weight_only"}
    assert 29 <= len(found.overrides) <= 29 + 32 // 8
    monkeypatch.setattr(budget, "BISECT_WORTH", 10 ** 6)  # resolution 0: the exact bisection
    exact, exact_probes = _uniform_family(["weight_only", FLOAT])
    assert exact.met and len(exact.overrides) == 29
    assert len(probes) < len(exact_probes)


def test_bisection_at_the_float_level_finds_the_fewest_ops():
    """Going float costs each op its int8 weights: there the bisection runs to the smallest k that meets."""
    found, _ = _uniform_family([FLOAT])
    assert found.met and set(found.overrides.values()) == {FLOAT} and len(found.overrides) == 29


def test_the_split_sends_back_every_op_the_level_below_can_hold():
    """64 ops whose static int8 (1e-2) and whole weight-only level (64 x 1e-4) miss 26.9 dB (2.04e-3 allowed): all
    go float, then the split sends back the ones weight-only can hold: 20 of them, so exactly 44 stay float (an
    op left float needlessly loses its int8 weights, so the split's bisection runs to the end)."""
    names = [f"op{i:02d}" for i in range(64)]

    def evaluate(overrides):
        noise = 1e-9 + sum({FLOAT: 0.0, "weight_only": 1e-4}.get(overrides.get(n), 1e-2) for n in names)
        return [{"name": "y", "nonfinite": 0, "cosine": 1 - noise / 2, "sqnr_db": -10 * math.log10(noise),
                 "top1": None}]

    found = search([{"node": n} for n in names], {n: ["weight_only", FLOAT] for n in names},
                   Target(min_sqnr=26.9), evaluate, lambda s: None, max_restores=0)
    assert found.met and len(found.overrides) == 64 and list(found.overrides.values()).count(FLOAT) == 44


@pytest.mark.parametrize("fails", [set(), {"c"}])
def test_restores_are_tried_together_first_then_one_by_one(fails):
    """The 4 least sensitive chosen ops go back one level in one candidate; only when it misses are they
    tried one at a time, each from the placement the earlier restores left."""
    from quantkit.quantize.budget import SearchResult, _restore

    choices = {n: ["weight_only", FLOAT] for n in "abcde"}
    result = SearchResult(overrides={"a": FLOAT, "b": FLOAT, "c": FLOAT, "d": "weight_only", "e": FLOAT})
    asked: list[dict] = []

    def measure(overrides, what):
        asked.append(dict(overrides))
        # an op in `fails` may not leave float; "d" back to static int8 is fine
        ok = all(overrides.get(n) == FLOAT for n in fails)
        if ok:
            result.overrides = dict(overrides)
        return ok

    _restore(result, choices, list("abcde"), 1, 4, measure)
    together = {"a": FLOAT, "b": "weight_only", "c": "weight_only", "e": "weight_only"}  # d: static int8
    assert asked[0] == together
    if not fails:
        assert asked == [together] and result.overrides == together
    else:
        assert len(asked) == 5 and [set(a) ^ set(b) or {k for k in a if a[k] != b.get(k)} for a, b in
                                    zip(asked[1:], asked[2:])]  # each later candidate differs by one op
        assert result.overrides == {"a": FLOAT, "b": "weight_only", "c": FLOAT, "e": "weight_only"}
