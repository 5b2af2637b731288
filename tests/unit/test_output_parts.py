"""Outputs that concatenate several quantities (a detector's boxes and scores) are scored part by part."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from quantkit.report.compare import OutputComparison
from quantkit.report.parts import Parts, output_parts


def _detector_head(box_rows: int | str = 4) -> ir.Model:
    """boxes [N, 4, A] (x 300) and scores [N, 3, A] (sigmoid) concatenated on axis 1; a plain second output."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Mul", ["b", "k"], ["boxes"]), helper.make_node("Sigmoid", ["s"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["det"], axis=1),
             helper.make_node("Relu", ["s"], ["other"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("b", f, ["N", box_rows, "A"]),
                     helper.make_tensor_value_info("s", f, ["N", 3, "A"])],
        [helper.make_tensor_value_info("det", f, ["N", 7, "A"]), helper.make_tensor_value_info("other", f, None)],
        initializer=[helper.make_tensor("k", f, [], [300.0])],
        value_info=[helper.make_tensor_value_info("boxes", f, ["N", box_rows, "A"]),
                    helper.make_tensor_value_info("scores", f, ["N", 3, "A"])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_concat_output_is_split_into_its_parts_and_other_outputs_stay_whole():
    parts = output_parts(_detector_head(), ["det", "other"])
    assert parts.names == ["det[:, 0:4]", "det[:, 4:7]", "other"]
    assert parts.split_outputs == [0]
    det = np.arange(2 * 7 * 5, dtype=np.float32).reshape(2, 7, 5)
    other = np.ones((2, 3, 5), np.float32)
    boxes, scores, rest = parts.split([det, other])
    assert np.array_equal(boxes, det[:, :4]) and np.array_equal(scores, det[:, 4:]) and rest is other


def test_parts_of_unknown_size_leave_the_output_whole():
    parts = output_parts(_detector_head(box_rows="R"), ["det", "other"])
    assert parts.names == ["det", "other"] and parts.split_outputs == []
    assert Parts.whole(2, ["a", "b"]).names == ["a", "b"]


def test_the_small_part_shows_the_error_the_whole_output_hides():
    """Boxes in the hundreds and scores in [0, 1]: noise that wrecks the scores barely moves the whole
    output's cosine, while the scores' own part shows it."""
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 300, (8, 4, 50)).astype(np.float32)
    scores = rng.uniform(0, 0.05, (8, 3, 50)).astype(np.float32)
    ref = np.concatenate([boxes, scores], axis=1)
    q = ref.copy()
    q[:, 4:] += rng.normal(0, 0.05, q[:, 4:].shape).astype(np.float32)
    whole = OutputComparison("det")
    whole.update(ref, q)
    parts = output_parts(_detector_head(), ["det"])
    split = [OutputComparison(n) for n in parts.names]
    for c, r, x in zip(split, parts.split([ref]), parts.split([q])):
        c.update(r, x)
    assert whole.result()["cosine_mean"] > 0.9999
    assert split[0].result()["cosine_mean"] == 1.0 and split[1].result()["cosine_mean"] < 0.9


def test_a_classifiers_concatenated_logits_stay_one_output():
    """[batch, classes] made of two heads' logits: top-1 and labelled accuracy need every class together."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["logits"], axis=1)], "g",
        [helper.make_tensor_value_info("a", f, ["N", 3]), helper.make_tensor_value_info("b", f, ["N", 3])],
        [helper.make_tensor_value_info("logits", f, ["N", 6])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert output_parts(model, ["logits"]).names == ["logits"]
