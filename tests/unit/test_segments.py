"""graph/segments.py: a model run in consecutive segments gives the tensors the whole model gives, each
segment computing only what the earlier ones did not, and keeping no more than later ones read."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantkit.graph.ir_edit import with_outputs
from quantkit.graph.segments import Pipeline


def _residual(rng: np.random.Generator, with_if: bool = False) -> ir.Model:
    """x -> mm1 -> relu -> mm2 -> add(relu's output: a skip) -> mm3 -> y; with_if: y through an If."""
    ws = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["h2"], name="mm2"),
             helper.make_node("Add", ["h2", "r"], ["s"], name="skip"),
             helper.make_node("MatMul", ["s", "w2"], ["h3" if with_if else "y"], name="mm3")]
    if with_if:
        branch = helper.make_graph([helper.make_node("Identity", ["h3"], ["o"])], "b", [],
                                   [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
        nodes += [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
                  helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], ws)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


class _Sessions:
    def __init__(self) -> None:
        self.models: list[ir.Model] = []

    def __call__(self, model: ir.Model):
        self.models.append(model)
        return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                    providers=["CPUExecutionProvider"])


def _full(model: ir.Model, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(ir.serde.serialize_model(with_outputs(model, names)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feed)))


def test_segments_compute_each_node_once_and_give_the_whole_models_tensors():
    rng = np.random.default_rng(0)
    model = _residual(rng)
    sessions = _Sessions()
    pipe = Pipeline(model, sessions)
    asks = [["h1"], ["h2", "r"], ["s", "y"]]
    feeds = [{"x": rng.normal(size=(n, 8)).astype(np.float32)} for n in (4, 3)]
    for b, feed in enumerate(feeds):
        kept: dict[str, np.ndarray] = {}
        for i, names in enumerate(asks):
            if b == 0:
                assert pipe.add(names, kept) == i
            got = pipe.run(i, feed, kept)
            want = _full(model, names, feed)
            assert set(got) == set(names)
            for n in names:
                np.testing.assert_array_equal(got[n], want[n])
        assert kept == {}  # nothing is held once the last segment ran
    ops = [[n.name for n in m.graph] for m in sessions.models]
    assert ops == [["mm1"], ["relu", "mm2"], ["skip", "mm3"]]  # every node in one segment only
    # the third segment reads the skip's relu output and mm2's output from what the second kept
    assert sorted(v.name for v in sessions.models[2].graph.inputs) == ["h2", "r"]
    assert pipe.segments[1].kept == ["r", "h2"] and pipe.segments[1].freed == ["h1"]


def test_a_tensor_an_earlier_segment_computed_but_did_not_keep_is_computed_again_from_the_inputs():
    """Asking for mm1's output after a segment that consumed it entirely: that segment did not keep it,
    so the new segment computes mm1 again from the graph input, and mm3 from the skip's kept output."""
    rng = np.random.default_rng(1)
    model = _residual(rng)
    sessions = _Sessions()
    pipe = Pipeline(model, sessions)
    feed = {"x": rng.normal(size=(2, 8)).astype(np.float32)}
    kept: dict[str, np.ndarray] = {}
    pipe.add(["s"], kept)
    pipe.run(0, feed, kept)
    pipe.add(["h1", "y"], kept)
    got = pipe.run(1, feed, kept)
    np.testing.assert_array_equal(got["h1"], _full(model, ["h1"], feed)["h1"])
    np.testing.assert_array_equal(got["y"], _full(model, ["y"], feed)["y"])
    assert [v.name for v in sessions.models[1].graph.inputs] == ["x", "s"]
    assert [n.name for n in sessions.models[1].graph] == ["mm1", "mm3"]


def test_a_graph_with_subgraphs_is_run_from_its_inputs_every_segment():
    rng = np.random.default_rng(2)
    model = _residual(rng, with_if=True)
    sessions = _Sessions()
    pipe = Pipeline(model, sessions)
    assert not pipe.segmented
    feed = {"x": rng.normal(size=(2, 8)).astype(np.float32)}
    kept: dict[str, np.ndarray] = {}
    for i, names in enumerate([["h1"], ["y"]]):
        pipe.add(names, kept)
        got = pipe.run(i, feed, kept)
        np.testing.assert_array_equal(got[names[0]], _full(model, names, feed)[names[0]])
    assert all([v.name for v in m.graph.inputs] == ["x"] for m in sessions.models)
