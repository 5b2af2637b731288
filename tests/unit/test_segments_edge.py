"""graph/segments.py on the graphs that stress its cuts: every segmented tensor equals the same tensor from
one session of the whole model, bit for bit, and nothing is kept once the last segment ran."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantkit.graph.ir_edit import with_outputs
from quantkit.graph.segments import Pipeline


def _session(model: ir.Model):
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def _model(nodes, outputs: list[str], inits, opset: int = 18) -> ir.Model:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def _weight(rng: np.random.Generator, name: str):
    return numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), name)


def _check(model: ir.Model, asks: list[list[str]], rng: np.random.Generator, rtol: float = 0.0) -> Pipeline:
    """Two batches of different sizes through the segments, against one whole-model session per ask (bit
    for bit, or within `rtol` where onnxruntime fuses QDQ differently as a session's outputs change)."""
    pipe = Pipeline(model, _session)
    for b, n in enumerate((3, 5)):
        feed = {"x": rng.normal(size=(n, 8)).astype(np.float32)}
        kept: dict = {}
        for i, names in enumerate(asks):
            if b == 0:
                assert pipe.add(names, kept) == i
            got = pipe.run(i, feed, kept)
            want = _session(with_outputs(model, names)).run(names, feed)
            for name, w in zip(names, want):
                assert got[name].dtype == w.dtype
                np.testing.assert_allclose(got[name], w, rtol=rtol, atol=rtol * float(np.abs(w).max()))
        assert kept == {}
    return pipe


def test_a_graph_output_later_segments_read_is_passed_on():
    """mm's output `a` is a graph output and Relu, Add, Mul and Sub (three later segments) read it."""
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
                    helper.make_node("Relu", ["a"], ["b"], name="relu"),
                    helper.make_node("Add", ["a", "b"], ["c"], name="add"),
                    helper.make_node("Mul", ["a", "c"], ["d"], name="mul"),
                    helper.make_node("Sub", ["d", "a"], ["y"], name="sub")], ["a", "b", "y"], [_weight(rng, "w")])
    pipe = _check(model, [["a"], ["b"], ["c"], ["d"], ["y"]], rng)
    assert [s.inputs for s in pipe.segments] == [["x"], ["a"], ["a", "b"], ["a", "c"], ["a", "d"]]


def test_a_sequence_later_segments_read_is_recomputed_from_the_inputs():
    """SplitToSequence's output is read by SequenceAt nodes in two segments: onnxruntime returns a sequence
    as a list, which cannot type a segment's input; the segment reading it again computes it anew (from x)
    and reads the kept Relu output."""
    rng = np.random.default_rng(1)
    index = [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in (0, 1)]
    model = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
                    helper.make_node("SplitToSequence", ["a"], ["seq"], axis=1, name="split"),
                    helper.make_node("SequenceAt", ["seq", "i0"], ["s0"], name="at0"),
                    helper.make_node("Relu", ["s0"], ["r"], name="relu"),
                    helper.make_node("SequenceAt", ["seq", "i1"], ["s1"], name="at1"),
                    helper.make_node("Add", ["s1", "r"], ["y"], name="add")], ["y"], [_weight(rng, "w"), *index])
    pipe = _check(model, [["a"], ["r"], ["y"]], rng)
    assert pipe.segments[2].inputs == ["x", "r"]


def test_an_initializer_listed_as_a_graph_input_is_not_asked_of_the_feed():
    """w1 is an initializer that is also a graph input (older exporters list them so): the probe's feeds do
    not hold it and the sessions read the initializer, so the segments neither ask the feed for it nor
    count it among the inputs a chunk can use (the sensitivity step used to fail with KeyError: 'w1')."""
    rng = np.random.default_rng(2)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
                           helper.make_node("Relu", ["a"], ["b"], name="relu"),
                           helper.make_node("MatMul", ["b", "w1"], ["y"], name="mm1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                           helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [_weight(rng, "w0"), _weight(rng, "w1")])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    pipe = Pipeline(model, _session)
    assert pipe.graph_inputs == {"x"}
    feed = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    kept: dict = {}
    for i, names in enumerate([["a"], ["b", "w1", "x"], ["y"]]):
        pipe.add(names, kept)
        got = pipe.run(i, feed, kept)
        want = [n for n in names if n != "w1"]
        assert sorted(got) == sorted(want)
        for name, w in zip(want, _session(with_outputs(model, want)).run(want, feed)):
            np.testing.assert_array_equal(got[name], w)
    assert kept == {}


def test_segments_of_a_graph_with_subgraphs_expose_and_keep_only_what_is_asked():
    """With an If node every segment runs from the graph inputs, so nothing a segment could pass on is ever
    read: a segment's session gives the asked tensors only (as before the segments) and keeps nothing."""
    rng = np.random.default_rng(3)
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = _model([helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
                    helper.make_node("Relu", ["a"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "w1"], ["m"], name="mm1"),
                    helper.make_node("Add", ["m", "r"], ["h"], name="skip"),
                    helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
                    helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if")],
                   ["y"], [_weight(rng, "w0"), _weight(rng, "w1")])
    pipe = _check(model, [["m"], ["h"], ["y"]], rng)
    assert not pipe.segmented
    assert [s.outputs for s in pipe.segments] == [["m"], ["h"], ["y"]]


def _qdq(name: str) -> list:
    return [helper.make_node("QuantizeLinear", [name, f"{name}_s", "zp"], [f"{name}_q"], name=f"{name}_Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", "zp"], [f"{name}_dq"], name=f"{name}_DQ")]


def test_a_weight_dequantized_once_for_matmuls_in_two_segments_is_dequantized_in_each():
    """One DequantizeLinear of an int8 weight feeds MatMuls in two segments (a weight shared by two layers,
    as the quantizer writes it). Passed on as a float tensor it would make the second MatMul a float one:
    onnxruntime runs DQ -> MatMul of the whole model as an integer MatMul, so the segment must compute the
    constant DequantizeLinear itself and the tensors stay those of the whole model, bit for bit."""
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, size=(8, 8)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(np.float32(0.02), "w_s"),
             numpy_helper.from_array(np.int8(0), "zp"), numpy_helper.from_array(np.float32(0.03), "x_s"),
             numpy_helper.from_array(np.float32(0.05), "b_s")]
    model = _model([*_qdq("x"), helper.make_node("DequantizeLinear", ["w_q", "w_s", "zp"], ["w_dq"], name="w_DQ"),
                    helper.make_node("MatMul", ["x_dq", "w_dq"], ["a"], name="mm0"),
                    helper.make_node("Relu", ["a"], ["b"], name="relu"), *_qdq("b"),
                    helper.make_node("MatMul", ["b_dq", "w_dq"], ["y"], name="mm1")], ["y"], inits)
    pipe = _check(model, [["a"], ["b"], ["y"]], rng)
    assert "w_dq" not in pipe.segments[2].inputs


class _Recording:
    def __init__(self) -> None:
        self.models: list[ir.Model] = []

    def __call__(self, model: ir.Model):
        self.models.append(model)
        return _session(model)


def test_an_asked_tensor_an_earlier_segment_did_not_keep_is_recomputed_from_what_was_kept():
    """As the quantized model has it: Relu's output b is read by its QuantizeLinear only, and the DQ'd b by
    MatMuls in two segments. The second segment asks b again (an op's input) though no later node reads
    it, so nothing kept it: the segment recomputes the Relu from its input a (kept for the residual Add),
    not every node from the graph inputs, and dequantizes the kept int8 b itself."""
    rng = np.random.default_rng(5)
    inits = [_weight(rng, "w0"), _weight(rng, "w1"), _weight(rng, "w2"), numpy_helper.from_array(np.int8(0), "zp"),
             numpy_helper.from_array(np.float32(0.05), "b_s")]
    model = _model([helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
                    helper.make_node("Relu", ["a"], ["b"], name="relu"), *_qdq("b"),
                    helper.make_node("MatMul", ["b_dq", "w1"], ["c"], name="mm1"),
                    helper.make_node("MatMul", ["b_dq", "w2"], ["e"], name="mm2"),
                    helper.make_node("Add", ["e", "a"], ["y"], name="residual")], ["c", "y"], inits)
    sessions = _Recording()
    pipe = Pipeline(model, sessions)
    feed = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    kept: dict = {}
    for i, names in enumerate([["b", "c"], ["b", "e"], ["y"]]):
        pipe.add(names, kept)
        got = pipe.run(i, feed, kept)
        for name, w in zip(names, _session(with_outputs(model, names)).run(names, feed)):
            np.testing.assert_array_equal(got[name], w)
    assert kept == {}
    assert [n.name for n in sessions.models[1].graph] == ["relu", "b_DQ", "mm2"]
    assert sorted(v.name for v in sessions.models[1].graph.inputs) == ["a", "b_q"]


def test_an_activations_dequantizelinear_read_in_two_segments_is_dequantized_in_each():
    """The quantizer writes one Q -> DQ per activation: here Relu's output b, its DQ read by MatMuls with
    int8 weights in two segments. Whole, onnxruntime fuses each DQ -> MatMul <- DQ into an integer MatMul;
    passed on as a float tensor, the DQ'd b made the later MatMul's output differ by far more than a
    rounding. What is passed on is the int8 b, and each segment dequantizes it. (Which outputs a session
    gives changes onnxruntime's fusions: the tensors agree to float rounding, not bit for bit.)"""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(np.int8(0), "zp"), numpy_helper.from_array(np.float32(0.05), "b_s"),
             numpy_helper.from_array(np.float32(0.02), "w_s")]
    inits += [numpy_helper.from_array(rng.integers(-127, 128, size=(8, 8)).astype(np.int8), f"w{i}_q") for i in (1, 2)]
    model = _model([helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
                    helper.make_node("Relu", ["a"], ["b"], name="relu"), *_qdq("b"),
                    *[helper.make_node("DequantizeLinear", [f"w{i}_q", "w_s", "zp"], [f"w{i}_dq"]) for i in (1, 2)],
                    helper.make_node("MatMul", ["b_dq", "w1_dq"], ["c"], name="mm1"),
                    helper.make_node("MatMul", ["b_dq", "w2_dq"], ["e"], name="mm2"),
                    helper.make_node("Add", ["c", "e"], ["y"], name="add")], ["y"], [_weight(rng, "w0"), *inits])
    pipe = _check(model, [["a"], ["b", "c"], ["b", "e"], ["y"]], rng, rtol=1e-6)
    assert pipe.segments[2].inputs == ["x", "b_q"]  # b asked again: Relu and mm0 recomputed
