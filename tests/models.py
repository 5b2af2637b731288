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


def control_flow(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,64] -> MatMul -> If(sum > 0: MatMul with a Constant weight inside the branch,
    else: MatMul with an outer-scope initializer) -> Loop(2x: h = Tanh(MatMul(h, outer weight))) -> y.
    Most of the weight bytes live inside the subgraphs."""
    f32 = TensorProto.FLOAT
    w0 = rng.normal(0, 0.2, (64, 64)).astype(np.float32)
    w_then = rng.normal(0, 0.2, (64, 64)).astype(np.float32)
    w_else = rng.normal(0, 0.2, (64, 64)).astype(np.float32)
    w_loop = rng.normal(0, 0.1, (64, 64)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["w_then"], value=numpy_helper.from_array(w_then, "w_then")),
         helper.make_node("MatMul", ["h0", "w_then"], ["t_out"], name="then_matmul")],
        "then_branch", [], [helper.make_tensor_value_info("t_out", f32, ["N", 64])])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["h0", "w_else"], ["e_out"], name="else_matmul")],
        "else_branch", [], [helper.make_tensor_value_info("e_out", f32, ["N", 64])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "w_loop"], ["mm"], name="loop_matmul"),
         helper.make_node("Tanh", ["mm"], ["h_out"], name="loop_tanh")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", f32, ["N", 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", f32, ["N", 64])])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="main_matmul"),
        helper.make_node("ReduceSum", ["h0"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "true"], ["y"], name="loop", body=body),
    ]
    # the Loop's carried value starts at the If's output
    nodes[-1].input.append("branch")
    graph = helper.make_graph(
        nodes, "control_flow", [helper.make_tensor_value_info("x", f32, ["N", 64])],
        [helper.make_tensor_value_info("y", f32, ["N", 64])],
        initializer=[_init("w0", w0), _init("w_else", w_else), _init("w_loop", w_loop),
                     _init("zero", np.float32(0)), _init("trips", np.int64(2)), _init("true", np.bool_(True))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def stateful_vad(rng: np.random.Generator) -> onnx.ModelProto:
    """A voice-activity-style streaming model: input [N, 64], state [2, N, 128] (batch on axis 1),
    sr a scalar int64 sample rate. Outputs a probability [N, 1] and the next state."""
    f32 = TensorProto.FLOAT
    w1 = rng.normal(0, 0.2, (64, 128)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (128, 1)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"], name="enc"),
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0, name="state_sum"),
        helper.make_node("Add", ["h", "s"], ["hs"], name="mix"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="sr_cast"),
        helper.make_node("Div", ["srf", "rate"], ["g"], name="sr_gain"),
        helper.make_node("Mul", ["hs", "g"], ["h2"], name="scale"),
        helper.make_node("Relu", ["h2"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["z"], name="head"),
        helper.make_node("Sigmoid", ["z"], ["output"], name="prob"),
        helper.make_node("Unsqueeze", ["h2", "axis0"], ["u"], name="unsq"),
        helper.make_node("Concat", ["u", "u"], ["stateN"], axis=0, name="next_state"),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("input", f32, ["N", 64]),
         helper.make_tensor_value_info("state", f32, [2, "N", 128]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", f32, ["N", 1]),
         helper.make_tensor_value_info("stateN", f32, [2, "N", 128])],
        initializer=[_init("w1", w1), _init("w2", w2), _init("axis0", np.array([0], np.int64)),
                     _init("rate", np.float32(16000))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def planted_outlier(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,64] -> MatMul(a) -> Mul(one channel x300: an outlier channel, as after an encoder's GELU)
    -> MatMul(b) -> Relu -> MatMul(c) -> y[N,16]. Static int8 on b's input spends its 256 levels on
    the outlier and rounds every other channel to nothing: b is the op that hurts."""
    scale = np.ones(64, np.float32)
    scale[7] = 300.0
    inits = [_init("wa", rng.normal(0, 0.2, (64, 64)).astype(np.float32)), _init("outlier", scale),
             _init("wb", rng.normal(0, 0.2, (64, 64)).astype(np.float32)),
             _init("wc", rng.normal(0, 0.2, (64, 16)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["ha"], name="a"),
             helper.make_node("Mul", ["ha", "outlier"], ["hm"], name="spike"),
             helper.make_node("MatMul", ["hm", "wb"], ["hb"], name="b"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "wc"], ["y"], name="c")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def residual_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,8,8,8] -> Conv+Relu (a), Conv+Relu (b); Add(a, b) -> MaxPool; Mul(a, Sigmoid(b)) ->
    GlobalAveragePool; Concat of both pooled paths is read by a 1x1 Conv; Add(x, 1.0) reads a
    constant and stays float. Every op of the int8 region has int8 inputs except that last Add."""
    w = {k: rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32) for k in ("wa", "wb")}
    w["wc"] = rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["a"], name="relu_a"),
        helper.make_node("Conv", ["x", "wb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["cb"], ["b"], name="relu_b"),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("MaxPool", ["s"], ["p1"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sigmoid", ["b"], ["g"], name="sigmoid"),
        helper.make_node("Mul", ["a", "g"], ["m"], name="gate"),
        helper.make_node("AveragePool", ["m"], ["p2"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["p1", "p2"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["y0"], name="conv_c"),
        helper.make_node("Add", ["y0", "one"], ["y"], name="add_const"),
    ]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [_init(k, v) for k, v in w.items()] + [_init("one", np.float32(1.0))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def split_block(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv conv0 -> Split in two -> (Conv conv1, Conv conv2) -> Concat with the second part -> Relu -> y
    (a YOLOv8 C2f block's shape)."""
    w = [rng.normal(0, 0.5, shape).astype(np.float32) for shape in ((8, 4, 3, 3), (4, 4, 3, 3), (4, 4, 3, 3))]
    inits = [_init("w0", w[0]), _init("w1", w[1]), _init("w2", w[2]), _init("sizes", np.array([4, 4], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["a", "sizes"], ["s0", "s1"], name="split", axis=1),
             helper.make_node("Conv", ["s0", "w1"], ["b0"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["s1", "w2"], ["b1"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["b0", "b1", "s1"], ["c"], name="concat", axis=1),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
