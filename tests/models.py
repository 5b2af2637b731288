"""Tiny ONNX models built inline for structural and numeric tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def conv_bn_relu_gemm(rng: np.random.Generator, weights_as_constants: bool = False,
                      opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->8) -> BatchNorm -> Relu -> Conv depthwise -> Relu -> Flatten -> Gemm(->10)."""
    tensors = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "beta": rng.normal(0, 0.1, 8).astype(np.float32),
        "mean": rng.normal(0, 0.1, 8).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "wd": rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32),
        "wg": rng.normal(0, 0.1, (8 * 8 * 8, 10)).astype(np.float32),
        "bg": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd"], ["c2"], name="dwconv", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc"),
    ]
    inits = []
    if weights_as_constants:
        consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k))
                  for k, v in tensors.items()]
        nodes = consts + nodes
    else:
        inits = [_init(k, v) for k, v in tensors.items()]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def mlp_with_attention_matmul(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,4,16] -> MatMul(W) -> Relu -> h; h @ h^T (activation x activation) -> output."""
    w = rng.normal(0, 0.3, (16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h0"], name="proj"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu"),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["y"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])],
        [_init("w", w)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_with_matmul(rng: np.random.Generator) -> onnx.ModelProto:
    """A MatMul inside an If branch and one outside it."""
    w = rng.normal(0, 0.3, (8, 8)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t_out"], name="inner_mm")], "then",
                               [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 8])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"], name="neg")], "else",
                               [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 8])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["branch", "w"], ["y"], name="outer_mm"),
    ]
    graph = helper.make_graph(
        nodes, "ifmodel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("w", w), _init("zero", np.float32(0))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feed: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)
