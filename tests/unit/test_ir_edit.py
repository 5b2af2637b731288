"""The edit layer: names owned per edit (never shared across clones), node replacement, cleanup."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from quantkit.graph.ir_edit import Editor, drop_unused, taken_names

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    w_scale = Relu(x)
    y = MatMul(w_scale, w)
}
"""


def _model():
    proto = onnx.parser.parse_model(TEXT)
    proto.graph.initializer.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"))
    return ir.serde.deserialize_model(proto)


def test_names_avoid_every_taken_name_and_each_other():
    edit = Editor(_model().graph)
    assert {"x", "y", "w", "w_scale"} <= taken_names(edit.graph)
    assert edit.name("w_scale") == "w_scale_1"  # a node output already has the name
    assert edit.name("w_scale") == "w_scale_2"
    assert edit.name("fresh") == "fresh"


def test_clones_do_not_share_the_names_an_editor_hands_out():
    model = _model()
    names = []
    for _ in range(3):
        clone = model.clone()
        edit = Editor(clone.graph)
        v = edit.initializer("w_scale", np.ones(4, np.float32))
        names.append(v.name)
    assert names == ["w_scale_1"] * 3
    assert "w_scale_1" not in model.graph.initializers


def test_replace_node_keeps_the_output_name_and_readers():
    model = _model()
    edit = Editor(model.graph)
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    new = edit.node("Gemm", [mm.inputs[0], mm.inputs[1]], name="gemm")
    edit.replace_node(mm, new)
    assert [n.op_type for n in model.graph] == ["Relu", "Gemm"]
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer() is new


def test_drop_unused_removes_orphaned_initializers_only():
    model = _model()
    edit = Editor(model.graph)
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    mm.replace_input_with(1, edit.initializer("w_copy", np.eye(4, dtype=np.float32) * 2))
    edit.initializer("never_read", np.zeros(1, np.float32))
    drop_unused(model)
    assert set(model.graph.initializers) == {"w_copy"}


def test_dequantized_initializer_feeds_a_dequantize_linear_before_the_reader():
    model = _model()
    edit = Editor(model.graph)
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    q = np.arange(16, dtype=np.int8).reshape(4, 4)
    out = edit.dequantized("w", q, np.full(4, 0.5, np.float32), np.zeros(4, np.int8), 1, mm)
    mm.replace_input_with(1, out)
    dq = out.producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("axis") == 1
    assert [n.op_type for n in model.graph] == ["Relu", "DequantizeLinear", "MatMul"]
    assert [v.name for v in dq.inputs] == ["w_quantized", "w_scale_1", "w_zero_point"]
