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
