"""Accuracy-budgeted placement: sensitivity ranks the op that hurts first, targets are met or the
run fails with exit 5, and a written plan replays to the same bytes without any search."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

from models import planted_outlier


@pytest.fixture
def outlier(tmp_path):
    rng = np.random.default_rng(0)
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(planted_outlier(rng), str(model))
    np.savez(calib, x=rng.normal(size=(64, 64)).astype(np.float32))
    return model, calib


def _run(*args):
    r = CliRunner().invoke(cli, ["quantize", *map(str, args), "-q", "--no-speed-guard"])
    return r


def test_sensitivity_ranks_the_planted_outlier_layer_first(outlier, tmp_path):
    model, calib = outlier
    rep = tmp_path / "r.json"
    r = _run(model, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", rep)
    assert r.exit_code == 0, r.stderr
    report = json.loads(rep.read_text())
    ranked = report["sensitivity"]
    assert [x["node"] for x in ranked][0] == "b"
    assert {x["node"] for x in ranked} == {"a", "b", "c"}
    # b adds several times the noise of the next op: the outlier channel eats its int8 levels
    assert ranked[0]["own_noise"] > 3 * ranked[1]["own_noise"]


def test_default_budget_moves_the_outlier_op_and_meets_it(outlier, tmp_path):
    model, calib = outlier
    rep = tmp_path / "r.json"
    plain = _run(model, "--calib", calib, "-o", tmp_path / "p.onnx", "--json", "--min-cosine", "-1")
    assert plain.exit_code == 0, plain.stderr
    assert json.loads(plain.stdout)["placement"]["moved"] == {}  # a target that everything meets
    assert _run(model, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", rep).exit_code == 0
    report = json.loads(rep.read_text())
    placement = report["placement"]
    assert placement["met"] and "default budget" in placement["target"]
    # where the placement's time went: its parts, and each candidate's
    n = len(placement["trials"])
    assert list(placement["seconds"]) == ["probe (fp32 reference)", "sensitivity", f"search ({n} candidates)"]
    assert n > 1 and all(t["seconds"] > 0 for t in placement["trials"])
    # per-tensor int8 (static or dynamic) cannot hold b's outlier channel; the cheapest alternative that does
    # keeps b static int8 with that one channel in float (the outlier-channel split)
    assert placement["moved"].get("b") == "split"
    emulated = {x["node"]: x for x in report["sensitivity"]}["b"]["alternatives_own_sqnr_db"]
    assert emulated["split"] > max(emulated["dynamic"], emulated["per_token"], emulated["weight_only"]) + 10
    assert "c" not in placement["moved"]
    before = json.loads(plain.stdout)["outputs"][0]["cosine_mean"]
    after = report["outputs"][0]["cosine_mean"]
    assert before < 0.998 <= after
    quantized = {q["node"]: q for q in report["nodes"]["quantized"]}
    assert "b" in quantized and "b" not in {f["node"] for f in report["nodes"]["float"]}
    written = onnx.load(str(tmp_path / "q.onnx"))
    nodes = {n.name: n for n in written.graph.node}
    assert sorted(n for n in nodes if n.startswith("b")) == ["b", "b_outlier_Add", "b_outlier_Gather",
                                                              "b_outlier_MatMul"]
    producers = {o: n for n in written.graph.node for o in n.output}
    assert [producers[i].op_type for i in nodes["b"].input] == ["DequantizeLinear", "DequantizeLinear"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in written.graph.initializer}
    assert inits[nodes["b_outlier_Gather"].input[1]].tolist() == [7]  # the planted channel, and only it


def test_a_target_int8_cannot_reach_leaves_the_model_float_and_says_so(outlier, tmp_path):
    model, calib = outlier
    r = _run(model, "--calib", calib, "-o", tmp_path / "q.onnx", "--min-sqnr", "200", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["placement"]["moved"].values()) == {"float"} and len(report["placement"]["moved"]) == 3
    assert any("int8 cannot reach this target" in n for n in report["notes"])
    assert report["nodes"]["quantized"] == []


def test_a_gate_missed_on_the_evaluation_data_exits_5(outlier, tmp_path):
    """The search meets the target on calibration batches; the gate is checked on --eval data,
    here shifted so that the same placement falls short."""
    model, calib = outlier
    shifted = tmp_path / "e.npz"
    np.savez(shifted, x=(np.random.default_rng(5).normal(size=(64, 64)) * 4).astype(np.float32))
    r = _run(model, "--calib", calib, "--eval", shifted, "-o", tmp_path / "q.onnx", "--min-sqnr", "38", "--json")
    report = json.loads(r.stdout)
    assert report["placement"]["met"]
    assert r.exit_code == 5 and any("SQNR" in f for f in report["gates"]["failures"])
    assert (tmp_path / "q.onnx").exists()  # written, so the failure can be inspected


def test_a_reachable_sqnr_target_is_met(outlier, tmp_path):
    model, calib = outlier
    r = _run(model, "--calib", calib, "-o", tmp_path / "q.onnx", "--min-sqnr", "30", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["placement"]["met"] and report["outputs"][0]["sqnr_db"] >= 30


def test_from_plan_replays_to_identical_bytes_without_search(outlier, tmp_path):
    model, calib = outlier
    plan = tmp_path / "plan.json"
    first = _run(model, "--calib", calib, "-o", tmp_path / "a.onnx", "--plan", plan)
    assert first.exit_code == 0, first.stderr
    saved = json.loads(plan.read_text())
    assert saved["nodes"]["b"] == "split"
    again = _run(model, "--calib", calib, "-o", tmp_path / "b.onnx", "--from-plan", plan, "--json")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    placement = json.loads(again.stdout)["placement"]
    assert placement["source"].startswith("replayed") and "trials" not in placement


def test_a_plan_for_another_model_is_refused(outlier, tmp_path, samples):
    model, calib = outlier
    plan = tmp_path / "plan.json"
    assert _run(model, "--calib", calib, "-o", tmp_path / "a.onnx", "--plan", plan).exit_code == 0
    d = samples / "digits_cnn"
    r = _run(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "c.onnx", "--from-plan", plan)
    assert r.exit_code == 3 and "another model" in r.stderr


def test_a_plan_with_the_speed_guard_replays_its_dropped_groups(samples, tmp_path):
    d = samples / "digits_transformer"
    plan = tmp_path / "plan.json"
    args = [d / "model.onnx", "--calib", d / "calib.npz", "--calib-samples", "64", "-q"]
    first = CliRunner().invoke(cli, ["quantize", *map(str, args), "-o", str(tmp_path / "a.onnx"), "--plan", str(plan)])
    assert first.exit_code == 0, first.stderr
    again = CliRunner().invoke(cli, ["quantize", *map(str, args), "-o", str(tmp_path / "b.onnx"),
                                     "--from-plan", str(plan)])
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def _write_conv_net(tmp_path, nodes, inits, output: str, out_shape: list, rng) -> tuple:
    """Save a graph from x [N, 4, 8, 8] to `output` as m.onnx (opset 17), and 32 calibration samples of x drawn
    from `rng` as c.npz; returns their paths."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
                              initializer=inits)
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    np.savez(calib, x=rng.normal(size=(32, 4, 8, 8)).astype(np.float32))
    return model, calib


def _biased_convs(tmp_path, between: str | None):
    """x -> Conv a (one output channel biased to 500) [-> `between`] -> Conv b -> y, and calibration data."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    bias = np.zeros(8, np.float32)
    bias[3] = 500.0
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(bias, "ba"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["ya"], name="a", pads=[1, 1, 1, 1]),
             *([helper.make_node(between, ["ya"], ["t"], name="between")] if between else []),
             helper.make_node("Conv", ["t" if between else "ya", "wb"], ["y"], name="b", pads=[1, 1, 1, 1])]
    model, calib = _write_conv_net(tmp_path, nodes, inits, "y", ["N", 4, 8, 8], rng)
    rep = tmp_path / "r.json"
    assert _run(model, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", rep).exit_code == 0
    return json.loads(rep.read_text())


def test_a_convolution_is_charged_with_the_rounding_of_its_own_output(tmp_path):
    """Static int8 rounds a convolution's output to int8 (for its fused kernel) even when a float op reads
    it. Conv "a" has one output channel biased to 500: its output range is 100x what the other channels
    use, so the output rounding wipes them out, while its weight and input rounding stay fine. The
    sensitivity must rank it first and the placement must move it (it used to rank it as clean)."""
    report = _biased_convs(tmp_path, "Tanh")
    rows = {r["node"]: r for r in report["sensitivity"]}
    assert report["sensitivity"][0]["node"] == "a"
    assert rows["a"]["own_sqnr_db"] < 25 and rows["b"]["own_sqnr_db"] > 35  # steps of ~1000/255 on values of ~1
    assert rows["a"]["alternatives_own_sqnr_db"]["weight_only"] > 35  # no output rounding there
    placement = report["placement"]
    assert placement["met"] and placement["moved"].get("a") in ("weight_only", "float")


def test_an_output_another_int8_op_reads_is_that_ops_input_rounding(tmp_path):
    """Conv a -> Conv b: the QDQ on a's output is b's input QDQ and stays when a leaves static int8, so it
    counts in b's own noise, not a's (a's own noise is its weight and input rounding only)."""
    report = _biased_convs(tmp_path, None)
    rows = {r["node"]: r for r in report["sensitivity"]}
    assert report["sensitivity"][0]["node"] == "b"
    assert rows["a"]["own_sqnr_db"] > 40 and rows["a"]["own_sqnr_db"] > rows["b"]["own_sqnr_db"] + 5


def test_the_sensitivity_stops_a_chunk_once_its_ops_have_seen_enough_values(tmp_path, monkeypatch):
    """Each further probe batch reruns the model up to the chunk: once every op of the chunk has seen
    SENSITIVITY_VALUES values per output channel the rest are skipped. Here a batch gives each of the two
    convolutions' channels 8 x 64 = 512 values: at 1,000 two batches of the four run, at the default all
    four, and the ranking is the same."""
    import importlib

    budget = importlib.import_module("quantkit.quantize.budget")
    calls = []
    accumulate = budget._accumulate_channels

    def counted(acc, ref, got, axis):
        calls.append(ref.shape)
        return accumulate(acc, ref, got, axis)

    monkeypatch.setattr(budget, "_accumulate_channels", counted)
    (tmp_path / "all").mkdir()
    (tmp_path / "few").mkdir()
    full = _biased_convs(tmp_path / "all", "Tanh")
    every = len(calls)
    calls.clear()
    monkeypatch.setattr(budget, "SENSITIVITY_VALUES", 1000)
    few = _biased_convs(tmp_path / "few", "Tanh")
    assert len(calls) * 2 == every and every > 0
    assert [r["node"] for r in few["sensitivity"]] == [r["node"] for r in full["sensitivity"]]
    own = {r["node"]: r["own_sqnr_db"] for r in full["sensitivity"]}
    assert all(abs(r["own_sqnr_db"] - own[r["node"]]) < 3 for r in few["sensitivity"])


def _squeeze_excite(tmp_path):
    """x -> Conv a (8 channels of 8 x 8 values per sample) -> GlobalAveragePool -> Conv s (1 x 1: one value
    per channel per sample) -> y, with 32 calibration samples run one per batch."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 8, 1, 1)).astype(np.float32), "ws")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ya"], ["ra"]),
             helper.make_node("GlobalAveragePool", ["ra"], ["p"]),
             helper.make_node("Conv", ["p", "ws"], ["y"], name="s")]
    return _write_conv_net(tmp_path, nodes, inits, "y", ["N", 8, 1, 1], rng)


def _measured_batches(monkeypatch, tmp_path, model, calib, name: str) -> tuple[dict[str, int], list[dict]]:
    """How many batches each op's own noise was measured on, and the sensitivity rows."""
    import importlib

    budget = importlib.import_module("quantkit.quantize.budget")
    counts: dict[str, int] = {}
    settle = budget._Chunk._settle

    def counted(self, key):
        counts[key] = counts.get(key, 0) + 1
        settle(self, key)

    monkeypatch.setattr(budget._Chunk, "_settle", counted)
    rep = tmp_path / f"{name}.json"
    assert _run(model, "--calib", calib, "--batch-size", 1, "-o", tmp_path / f"{name}.onnx", "--report",
                rep).exit_code == 0
    return counts, json.loads(rep.read_text())["sensitivity"]


def test_an_op_with_few_values_per_channel_stops_once_its_figure_is_steady(tmp_path, monkeypatch):
    """A squeeze-excite convolution's 1 x 1 output gives one value per channel per sample: it can never see
    SENSITIVITY_VALUES per channel in the probe, and used to keep every one of its batches running. It
    stops once its figures moved less than STEADY_DB for STEADY_BATCHES batches in a row: on fewer batches
    than the probe's, with the ranking and figures of the whole probe. Each op stops on its own: the big
    map's convolution, done after its first batches (SENSITIVITY_VALUES lowered to two batches' worth),
    is not measured again while the other one is."""
    import importlib

    budget = importlib.import_module("quantkit.quantize.budget")
    model, calib = _squeeze_excite(tmp_path)
    monkeypatch.setattr(budget, "SENSITIVITY_VALUES", 128)  # a's 64 values per channel per sample: 2 batches
    monkeypatch.setattr(budget, "STEADY_BATCHES", 10 ** 6)
    monkeypatch.setattr(budget, "MAX_OP_BATCHES", 10 ** 6)
    every, full = _measured_batches(monkeypatch, tmp_path, model, calib, "every")
    assert every["a"] == 2 and every["s"] == budget.SENSITIVITY_SAMPLES
    monkeypatch.undo()
    monkeypatch.setattr(budget, "SENSITIVITY_VALUES", 128)
    monkeypatch.setattr(budget, "MAX_OP_BATCHES", 10 ** 6)
    steady, rows = _measured_batches(monkeypatch, tmp_path, model, calib, "steady")
    assert steady["a"] == 2 and budget.STEADY_BATCHES < steady["s"] < budget.SENSITIVITY_SAMPLES
    assert [r["node"] for r in rows] == [r["node"] for r in full]
    own = {r["node"]: r["own_sqnr_db"] for r in full}
    assert all(abs(r["own_sqnr_db"] - own[r["node"]]) < 1.0 for r in rows)


def test_an_op_whose_figure_keeps_moving_is_measured_on_max_op_batches_batches_at_most(tmp_path, monkeypatch):
    """An op that never sees SENSITIVITY_VALUES per channel and whose figure never settles (STEADY_BATCHES
    out of reach here) is measured on MAX_OP_BATCHES batches, not on every batch of the probe, while the
    other op stops as before; the run still writes a model that meets the default budget."""
    import importlib

    budget = importlib.import_module("quantkit.quantize.budget")
    model, calib = _squeeze_excite(tmp_path)
    monkeypatch.setattr(budget, "SENSITIVITY_VALUES", 128)
    monkeypatch.setattr(budget, "STEADY_BATCHES", 10 ** 6)
    assert budget.MAX_OP_BATCHES < budget.SENSITIVITY_SAMPLES
    counts, rows = _measured_batches(monkeypatch, tmp_path, model, calib, "capped")
    assert counts["a"] == 2 and counts["s"] == budget.MAX_OP_BATCHES and max(counts.values()) == counts["s"]
    assert all(r["own_sqnr_db"] is not None for r in rows if r["node"] in ("a", "s"))
    report = json.loads((tmp_path / "capped.json").read_text())
    assert report["placement"]["met"] and report["gates"]["passed"]


def test_the_sensitivity_measures_every_op_in_one_chunk_when_calibration_says_they_fit(outlier, tmp_path,
                                                                                       monkeypatch):
    """The calibration pass exposed every op's tensors: when twice what it held (both models) fits a
    chunk, the sensitivity step measures every op in one chunk, not a first small chunk that only sizes
    the next ones. Where it does not fit (the chunk budget shrunk to the pass's own batch), chunks of
    FIRST_CHUNK ops and on; the figures are the same either way."""
    import importlib

    budget = importlib.import_module("quantkit.quantize.budget")
    chunks: list[int] = []
    make = budget._Chunk.__init__

    def counted(self, ops, *args, **kwargs):
        chunks.append(len(ops))
        make(self, ops, *args, **kwargs)

    monkeypatch.setattr(budget._Chunk, "__init__", counted)
    monkeypatch.setattr(budget, "FIRST_CHUNK", 1)
    model, calib = outlier
    reports = []
    for name in ("fits", "tight"):
        rep = tmp_path / f"{name}.json"
        assert _run(model, "--calib", calib, "-o", tmp_path / f"{name}.onnx", "--report", rep).exit_code == 0
        reports.append(json.loads(rep.read_text())["sensitivity"])
        monkeypatch.setattr(budget, "CHUNK_BYTES", 1)  # the chunk budget is then the pass's batch: half the need
    assert chunks[0] == 3 and chunks[1:][0] == 1 and sum(chunks[1:]) == 3
    assert reports[0] == reports[1]


def _conv_weights(path) -> dict[str, str]:
    """Per Conv node of the written model: "float" when its weight is a float initializer, "int8" when it is
    decoded from an int8 initializer (weight-only or static), and whether its input is quantized."""
    m = onnx.load(str(path))
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    floats = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert any(i.data_type == onnx.TensorProto.INT8 for i in m.graph.initializer) or all(
        n.input[1] in floats for n in m.graph.node if n.op_type == "Conv")
    return {n.name: ("float" if n.input[1] in floats else "int8")
            + (" static" if producer.get(n.input[0]) == "DequantizeLinear" else "")
            for n in m.graph.node if n.op_type == "Conv"}


def test_a_speed_dropped_group_keeps_its_weight_only_ops_compressed(tmp_path):
    """A replayed plan with conv "a" on weight-only int8, "b" static, and the Conv group dropped by the speed
    guard: only "b" goes float; "a" keeps its int8 weight (the budget's compression, which timing never
    undoes), with --require-speedup too, so the replay does not depend on the gates given."""
    _biased_convs(tmp_path, None)
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    plan = tmp_path / "plan.json"
    assert _run(model, "--calib", calib, "-o", tmp_path / "p.onnx", "--plan", plan).exit_code == 0
    saved = json.loads(plan.read_text())
    saved.update(nodes={"a": "weight_only", "b": "static"}, speed_dropped=["conv"])
    plan.write_text(json.dumps(saved))
    r = _run(model, "--calib", calib, "-o", tmp_path / "r.onnx", "--from-plan", plan)
    assert r.exit_code == 0, r.stderr
    assert _conv_weights(tmp_path / "r.onnx") == {"a": "int8", "b": "float"}  # "a": int8 weights, float input
    r = _run(model, "--calib", calib, "-o", tmp_path / "s.onnx", "--from-plan", plan, "--require-speedup", "0.01")
    assert r.exit_code == 0, r.stderr
    assert _conv_weights(tmp_path / "s.onnx") == {"a": "int8", "b": "float"}
    plan.write_text(json.dumps({**saved, "speed_dropped": []}))  # no group dropped: "b" in static int8
    assert _run(model, "--calib", calib, "-o", tmp_path / "t.onnx", "--from-plan", plan).exit_code == 0
    assert _conv_weights(tmp_path / "t.onnx") == {"a": "int8", "b": "int8 static"}


def test_a_group_of_weight_only_ops_alone_is_not_timed(tmp_path):
    """With every convolution on weight-only int8 (the budget's choice) there is nothing the speed guard may
    drop: no group is timed."""
    import onnx_ir as ir

    from quantkit.config import QuantConfig
    from quantkit.quantize.plan import OpKind
    from quantkit.quantize.scheme import placement_for

    _biased_convs(tmp_path, None)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "m.onnx"))))
    placement = placement_for(QuantConfig())
    assert placement.kinds(model, droppable=True) == {OpKind.CONV}
    placement.overrides = {"a": "weight_only"}
    assert placement.kinds(model, droppable=True) == {OpKind.CONV}  # "b" is still static
    placement.overrides = {"a": "weight_only", "b": "weight_only"}
    assert placement.kinds(model, droppable=True) == set() and placement.kinds(model) == {OpKind.CONV}


def _detector_head(tmp_path):
    """A detector head: boxes (hundreds) and sigmoid scores ([0, 1]) concatenated into one output "det"."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 0.5, (3, 8, 1, 1)).astype(np.float32), "ws"),
             numpy_helper.from_array(np.array(300.0, np.float32), "k")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h0"], name="trunk", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("Conv", ["h", "wb"], ["b0"], name="box"),
             helper.make_node("Mul", ["b0", "k"], ["boxes"], name="scale"),
             helper.make_node("Conv", ["h", "ws"], ["s0"], name="score"),
             helper.make_node("Sigmoid", ["s0"], ["scores"], name="sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["det"], name="cat", axis=1)]
    return _write_conv_net(tmp_path, nodes, inits, "det", ["N", 7, 8, 8], rng)


def test_boxes_and_scores_concatenated_are_budgeted_part_by_part(tmp_path):
    """Boxes and scores concatenated (_detector_head). Judged whole, the scores' error is drowned by the boxes'
    power (tests/unit/test_output_parts.py); judged part by part, the placement's probe, the report and the
    gates list both parts, and the default budget holds the scores' own cosine."""
    model, calib = _detector_head(tmp_path)
    rep = tmp_path / "r.json"
    assert _run(model, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", rep).exit_code == 0
    report = json.loads(rep.read_text())
    outputs = {o["name"]: o for o in report["outputs"]}
    assert list(outputs) == ["det[:, 0:4]", "det[:, 4:7]"]
    assert any("concatenates 2 tensors along axis 1" in n for n in report["notes"])
    assert report["placement"]["met"] and outputs["det[:, 4:7]"]["cosine_mean"] >= 0.998
    baseline = report["placement"]["trials"][0]["figures"]  # every op static int8, as scored by the probe
    assert [f["name"] for f in baseline] == list(outputs)


def test_the_streamed_path_compares_and_gates_a_concatenated_output_part_by_part(tmp_path):
    """Large models take the streamed path (quantize/streaming.py, forced here by its size limit): it compares
    the same parts as the in-memory path, and a gate on the scores' part fails where the whole output's
    cosine (the boxes' power) would pass it."""
    import subprocess
    import sys

    model, calib = _detector_head(tmp_path)
    model = tmp_path / "external.onnx"  # the streamed path takes models whose weights sit in a data file
    onnx.save(onnx.load(str(tmp_path / "m.onnx")), str(model), save_as_external_data=True,
              location="external.onnx.data", size_threshold=0)
    code = ("import sys; from quantkit.quantize import streaming; streaming.MIN_BYTES = 0; "
            "from quantkit.cli import main; sys.argv = ['quantkit'] + sys.argv[1:]; main()")
    runs = {}
    for name, gate in (("plain", []), ("gated", ["--min-sqnr", "60"])):
        p = subprocess.run([sys.executable, "-c", code, "quantize", model, "--calib", calib, "-o",
                            tmp_path / f"{name}.onnx", "--report", tmp_path / f"{name}.json", "-q", *gate],
                           capture_output=True, text=True)
        runs[name] = (p.returncode, json.loads((tmp_path / f"{name}.json").read_text()) if p.returncode in (0, 5)
                      else p.stderr)
    code_, report = runs["plain"]
    assert code_ == 0, report
    assert report["memory"]["streamed"]
    assert [o["name"] for o in report["outputs"]] == ["det[:, 0:4]", "det[:, 4:7]"]
    assert any("concatenates 2 tensors along axis 1" in n for n in report["notes"])
    code_, report = runs["gated"]
    assert code_ == 5 and any("det[:, 4:7]" in f for f in report["gates"]["failures"])
