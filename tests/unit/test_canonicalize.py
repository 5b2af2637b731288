import numpy as np
import onnx_ir as ir
import pytest

from quantkit.graph import shapes
from quantkit.graph.canonicalize import canonicalize
from quantkit.graph.ir_edit import const_array

from models import conv_bn_relu_gemm, run


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _proto(model: ir.Model):
    return ir.serde.serialize_model(model)


@pytest.mark.parametrize("as_constants", [False, True])
def test_batchnorm_folds_into_conv_with_same_outputs(as_constants):
    rng = np.random.default_rng(0)
    proto = conv_bn_relu_gemm(rng, weights_as_constants=as_constants)
    model = ir.serde.deserialize_model(proto)
    notes = canonicalize(model)
    assert "BatchNormalization" not in _ops(model)
    assert "Constant" not in _ops(model)
    assert any("folded 1 BatchNormalization" in n for n in notes)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    (ref,) = run(proto, {"x": x})
    (got,) = run(_proto(model), {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_constant_node_weights_become_initializers():
    model = ir.serde.deserialize_model(conv_bn_relu_gemm(np.random.default_rng(0), weights_as_constants=True))
    canonicalize(model)
    convs = [n for n in model.graph if n.op_type in ("Conv", "Gemm")]
    assert all(const_array(n.inputs[1]) is not None for n in convs)


def test_batchnorm_not_folded_when_conv_output_has_other_users():
    proto = conv_bn_relu_gemm(np.random.default_rng(0))
    proto.graph.output.append(onnx_value_info("c1"))
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    assert "BatchNormalization" in _ops(model)


def onnx_value_info(name):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def test_types_missing_after_inference_are_filled_from_one_run():
    model = ir.serde.deserialize_model(conv_bn_relu_gemm(np.random.default_rng(0)))
    canonicalize(model)
    for node in model.graph:
        for o in node.outputs:
            if not o.is_graph_output():
                o.type, o.shape = None, None
    assert shapes.untyped_values(model)
    batch = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        n = shapes.fill_from_run(model, batch, Path(d))
    assert n > 0 and not shapes.untyped_values(model)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.outputs[0].dtype == ir.DataType.FLOAT and len(relu.outputs[0].shape) == 4
    # the graph is unchanged: no outputs left behind by the probe
    assert [o.name for o in model.graph.outputs] == ["logits"]


def _linear_via_transpose():
    from onnx import numpy_helper, parser

    proto = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 3] y, float[N, 4] z) {
        wt = Transpose <perm = [1, 0]> (w)
        y = MatMul(x, wt)
        parts = SplitToSequence <axis = 1> (x)
        z = ConcatFromSequence <axis = 1> (parts)
    }""")
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    proto.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return ir.serde.deserialize_model(proto), w


def test_weight_transposes_fold_into_lazily_transposed_initializers(tmp_path):
    from quantkit import runtime
    from quantkit.graph.ir_edit import k_major_weight

    model, w = _linear_via_transpose()
    notes = canonicalize(model)
    assert any("folded 1 Transpose" in n for n in notes)
    ops = [n.op_type for n in model.graph]
    assert "Transpose" not in ops
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    np.testing.assert_array_equal(k_major_weight(matmul), w.T)
    # SplitToSequence's output stays a sequence after shape inference, so onnxruntime accepts the graph
    shapes.infer(model)
    split = next(n for n in model.graph if n.op_type == "SplitToSequence")
    assert isinstance(split.outputs[0].type, ir.SequenceType)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    sess = runtime.session(model, tmp_path, tag="t")
    y, z = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-6)
    np.testing.assert_array_equal(z, x)
