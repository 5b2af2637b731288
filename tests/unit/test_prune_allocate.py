"""Per-layer pruning ratios: the greedy allocation over the groups' noise curves (pure numpy) and,
on a model with one sensitive and one insensitive layer, the measured curves and what they buy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.prune.allocate import Curve, allocate, hull, noise
from quantkit.prune.structured import prune_channels


def test_hull_drops_points_above_the_lower_convex_hull_and_stops_at_infinity():
    assert hull([0, 0.25, 0.5, 0.75], [0, 0.5, 0.6, 2.0]) == [0, 2, 3]  # 0.25 lies above the 0 -> 0.5 chord
    assert hull([0, 0.25, 0.5], [0, 0.1, float("inf")]) == [0, 1]


def test_allocation_spends_the_budget_where_noise_per_unit_is_least():
    grid = [0, 0.25, 0.5, 0.75]
    cheap = Curve("cheap", 100.0, grid, [0, 0.01, 0.02, 0.5])
    dear = Curve("dear", 100.0, grid, [0, 0.2, 0.4, 0.6])
    small = Curve("small", 20.0, grid, [0, 0.001, 0.002, 0.003])  # nearly free but holds little
    ratios = allocate([cheap, dear, small], 0.3)
    assert ratios[2] == pytest.approx(0.75) and ratios[0] == pytest.approx(0.5)
    # the rest of the budget: 0.3 * 220 - 0.75 * 20 - 0.5 * 100 = 1 unit, from `dear` (0.2 / 25 per unit
    # against cheap's next step 0.48 / 25)
    assert ratios[1] == pytest.approx(1 / 100)
    assert sum(c.size * r for c, r in zip([cheap, dear, small], ratios)) == pytest.approx(0.3 * 220)
    equal = allocate([Curve("a", 10.0, grid, [0, 0.1, 0.3, 0.9]), Curve("b", 10.0, grid, [0, 0.1, 0.3, 0.9])], 0.25)
    assert equal == pytest.approx([0.25, 0.25])


def test_noise_is_the_summed_noise_to_signal_ratio():
    ref = [np.array([3.0, 4.0]), np.array([1.0, 0.0])]
    assert noise(ref, [np.array([3.0, 4.0]), np.array([1.0, 0.5])]) == pytest.approx(0.25)
    assert noise(ref, [np.array([3.0, 5.0]), np.array([1.0, 0.0])]) == pytest.approx(1 / 25)
    assert noise(ref, [np.array([np.nan, 4.0]), ref[1]]) == float("inf")


def _two_branches(rng, d=16, hidden=64) -> onnx.ModelProto:
    """y = x + relu(x A1) A2 + relu(x B1) B2, with B2 ten times A2: branch b is the sensitive one."""
    t = {"a1": rng.normal(0, 0.3, (d, hidden)), "a2": rng.normal(0, 0.03, (hidden, d)),
         "b1": rng.normal(0, 0.3, (d, hidden)), "b2": rng.normal(0, 0.3, (hidden, d))}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "a1"], ["ha"], name="a_in"), n("Relu", ["ha"], ["ra"]),
             n("MatMul", ["ra", "a2"], ["oa"], name="a_out"),
             n("MatMul", ["x", "b1"], ["hb"], name="b_in"), n("Relu", ["hb"], ["rb"]),
             n("MatMul", ["rb", "b2"], ["ob"], name="b_out"),
             n("Add", ["oa", "ob"], ["o"]), n("Add", ["o", "x"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in t.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_sensitivity_prunes_the_insensitive_layer_more_and_leaves_less_noise(tmp_path):
    rng = np.random.default_rng(0)
    proto = _two_branches(rng)
    data = [{"x": rng.normal(0, 1, (32, 16)).astype(np.float32)} for _ in range(4)]
    x = rng.normal(0, 1, (64, 16)).astype(np.float32)
    ref = _run(ir.serde.deserialize_model(proto), x)
    out = {}
    for allocation in ("uniform", "sensitivity"):
        model = ir.serde.deserialize_model(proto)
        section = prune_channels(model, 0.4, lambda: iter(data), tmp_path, allocation=allocation, feed=data[0])
        out[allocation] = (section, noise([ref], [_run(model, x)]))
    section, sens_noise = out["sensitivity"]
    ratios = {la["layer"]: la["ratio"] for la in section["layers"]}
    assert ratios["a_in"] > 0.4 > ratios.get("b_in", 0.0)
    # the same budget: 40% of the groups' MACs (the two groups are the same size), to one 8-channel step
    assert (ratios["a_in"] + ratios.get("b_in", 0.0)) / 2 == pytest.approx(0.4, abs=8 / 64 / 2)
    curves = {c["group"]: c for c in section["sensitivity"]["curves"]}
    assert curves["b_in"]["noise"][1] > 10 * curves["a_in"]["noise"][1]  # the measured curves see it
    assert all(np.diff(c["noise"]).min() >= 0 for c in curves.values())  # more pruning, more noise
    assert sens_noise < 0.5 * out["uniform"][1]
    assert "sensitivity" not in out["uniform"][0]


def test_a_ratio_search_measures_the_curves_once_and_meets_its_target(tmp_path, monkeypatch):
    from quantkit import runtime
    from quantkit.config import PruneConfig
    from quantkit.prune import prune_to_target, sensitivity
    from quantkit.quantize.budget import Target

    rng = np.random.default_rng(1)
    proto = _two_branches(rng)
    data = [{"x": rng.normal(0, 1, (32, 16)).astype(np.float32)} for _ in range(4)]
    ref = _run(ir.serde.deserialize_model(proto), data[0]["x"])
    calls = []
    measure = sensitivity.curves
    monkeypatch.setattr(sensitivity, "curves", lambda *a, **k: calls.append(1) or measure(*a, **k))

    def score(m):
        sess = runtime.session(m, tmp_path, tag="t")
        y = sess.run(None, data[0])[0]
        cos = float(np.mean(np.sum(y * ref, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))
        return [{"name": "y", "cosine": cos, "sqnr_db": 40.0, "top1": None, "nonfinite": 0}]

    model = ir.serde.deserialize_model(proto)
    cfg = PruneConfig(ratio=0.75, allocation="sensitivity")
    pruned, section = prune_to_target(model, cfg, lambda: iter(data), data[0], tmp_path, Target(min_cosine=0.999),
                                      score)
    trials = section["search"]["trials"]
    assert len(trials) > 1 and len(calls) == 1  # several ratios tried, curves measured once
    assert score(pruned)[0]["cosine"] >= 1 - (1 - 0.999) / 2  # the half budget pruning may use
    assert 0 < section["search"]["chosen_ratio"] < 0.75 and section["allocation"] == "sensitivity"


def test_noise_counts_only_the_real_tokens_when_given_masks():
    ref = np.ones((2, 4, 3))
    got = ref.copy()
    got[0, 3] += 100.0  # a padded position: whatever it holds, no reader uses it
    got[1, 0] += 0.5
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    assert noise([ref], [got], [mask]) == pytest.approx(3 * 0.25 / (7 * 3))
    assert noise([ref], [got]) == pytest.approx((3 * 100.0 ** 2 + 3 * 0.25) / (8 * 3))
    assert noise([ref], [got], [None]) == noise([ref], [got])
