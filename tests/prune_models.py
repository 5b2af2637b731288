"""Small ONNX models for the pruning tests: a conv chain with BatchNorm, a depthwise conv, a
squeeze-excitation gate and a residual block; a transformer FFN beside an attention projection."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _graph(nodes, name, inputs, outputs, tensors: dict) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in tensors.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _f(rng, *shape, scale=0.3):
    return rng.normal(0, scale, shape).astype(np.float32)


def se_residual_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,4,8,8] -> conv1(3x3, 16) -> BN -> Relu -> depthwise(16) -> Relu -> SE gate (GAP -> se1
    -> Relu -> se2 -> Sigmoid -> Mul) -> conv2(1x1, 8) -> Relu -> conv3(1x1, 8) -> + (residual)
    -> GAP -> Flatten -> fc -> logits."""
    t = {"w1": _f(rng, 16, 4, 3, 3), "b1": _f(rng, 16, scale=0.1),
         "gamma": rng.uniform(0.5, 1.5, 16).astype(np.float32), "beta": _f(rng, 16, scale=0.1),
         "mean": _f(rng, 16, scale=0.1), "var": rng.uniform(0.5, 1.5, 16).astype(np.float32),
         "wd": _f(rng, 16, 1, 3, 3), "bd": _f(rng, 16, scale=0.1),
         "ws1": _f(rng, 4, 16, 1, 1), "bs1": _f(rng, 4, scale=0.1), "ws2": _f(rng, 16, 4, 1, 1),
         "bs2": _f(rng, 16, scale=0.1), "w2": _f(rng, 8, 16, 1, 1), "b2": _f(rng, 8, scale=0.1),
         "w3": _f(rng, 8, 8, 1, 1), "b3": _f(rng, 8, scale=0.1), "wf": _f(rng, 8, 5), "bf": _f(rng, 5, scale=0.1)}
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        n("Relu", ["bn1"], ["r1"], name="relu1"),
        n("Conv", ["r1", "wd", "bd"], ["cd"], name="dwconv", pads=[1, 1, 1, 1], group=16),
        n("Relu", ["cd"], ["rd"], name="relud"),
        n("GlobalAveragePool", ["rd"], ["gp"], name="se_pool"),
        n("Conv", ["gp", "ws1", "bs1"], ["s1"], name="se1"),
        n("Relu", ["s1"], ["sr"], name="se_relu"),
        n("Conv", ["sr", "ws2", "bs2"], ["s2"], name="se2"),
        n("Sigmoid", ["s2"], ["gate"], name="se_sigmoid"),
        n("Mul", ["rd", "gate"], ["se"], name="se_mul"),
        n("Conv", ["se", "w2", "b2"], ["c2"], name="conv2"),
        n("Relu", ["c2"], ["r2"], name="relu2"),
        n("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        n("Add", ["r2", "c3"], ["res"], name="residual"),
        n("GlobalAveragePool", ["res"], ["pool"], name="pool"),
        n("Flatten", ["pool"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc"),
    ]
    return _graph(nodes, "se_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], t)


def ffn_block(rng: np.random.Generator, d: int = 16, hidden: int = 64) -> onnx.ModelProto:
    """x[N,T,d] -> MatMul(d->hidden) -> +b1 -> GELU (erf form) -> MatMul(hidden->d) -> +b2 -> + x
    -> y; beside it a query projection reshaped into 2 heads -> q."""
    t = {"w1": _f(rng, d, hidden), "b1": _f(rng, hidden, scale=0.1), "sqrt2": np.float32(np.sqrt(2)),
         "one": np.float32(1.0), "half": np.float32(0.5), "w2": _f(rng, hidden, d, scale=0.15),
         "b2": _f(rng, d, scale=0.1), "wq": _f(rng, d, d), "heads": np.array([0, 0, 2, d // 2], np.int64)}
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["h0"], name="ffn_in"),
        n("Add", ["h0", "b1"], ["h1"], name="ffn_in_bias"),
        n("Div", ["h1", "sqrt2"], ["g0"], name="gelu_div"),
        n("Erf", ["g0"], ["g1"], name="gelu_erf"),
        n("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        n("Mul", ["h1", "g2"], ["g3"], name="gelu_mul"),
        n("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
        n("MatMul", ["g4", "w2"], ["o0"], name="ffn_out"),
        n("Add", ["o0", "b2"], ["o1"], name="ffn_out_bias"),
        n("Add", ["o1", "x"], ["y"], name="residual"),
        n("MatMul", ["x", "wq"], ["q0"], name="query"),
        n("Reshape", ["q0", "heads"], ["q"], name="split_heads"),
    ]
    return _graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", d]),
                   helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", "T", 2, d // 2])], t)


def attention_block(rng: np.random.Generator, d: int = 16, heads: int = 4,
                    shared_shape: bool = True) -> onnx.ModelProto:
    """Self-attention as torch.onnx writes it, with explicit head counts in the Reshape shapes
    ([0, 0, H, dh] shared by Q, K, V when `shared_shape`, [0, 0, H*dh] to merge), an additive
    mask [N, 1, 1, T] and a residual add after the output projection."""
    dh = d // heads
    t = {f"w{p}": _f(rng, d, d) for p in "qkvo"} | {f"b{p}": _f(rng, d, scale=0.1) for p in "qkvo"}
    t |= {"scale": np.float32(1 / np.sqrt(dh)), "merge_shape": np.array([0, 0, d], np.int64)}
    splits = {p: "split_shape" if shared_shape else f"split_shape_{p}" for p in "qkv"}
    for name in set(splits.values()):
        t[name] = np.array([0, 0, heads, dh], np.int64)
    n = helper.make_node
    nodes = []
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"),
                  n("Add", [f"{p}0", f"b{p}"], [f"{p}1"], name=f"{p}_bias"),
                  n("Reshape", [f"{p}1", splits[p]], [f"{p}2"], name=f"{p}_split"),
                  n("Transpose", [f"{p}2"], [f"{p}3"], name=f"{p}_t", perm=perm)]
    nodes += [n("MatMul", ["q3", "k3"], ["s0"], name="scores"),
              n("Mul", ["s0", "scale"], ["s1"], name="scale_mul"),
              n("Add", ["s1", "mask"], ["s2"], name="mask_add"),
              n("Softmax", ["s2"], ["p"], name="softmax", axis=-1),
              n("MatMul", ["p", "v3"], ["c0"], name="context"),
              n("Transpose", ["c0"], ["c1"], name="c_t", perm=[0, 2, 1, 3]),
              n("Reshape", ["c1", "merge_shape"], ["c2"], name="merge"),
              n("MatMul", ["c2", "wo"], ["o0"], name="o_proj"),
              n("Add", ["o0", "bo"], ["o1"], name="o_bias"),
              n("Add", ["o1", "x"], ["y"], name="residual")]
    return _graph(nodes, "attention",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d]),
                   helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 1, "T"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", d])], t)


def padded_sequences(rng: np.random.Generator, n: int, dims: int, rank: int, t: int = 12,
                     pad_scale: float | None = None) -> list[dict[str, np.ndarray]]:
    """Batches of 32 sequences for an encoder on [N, T, dims]: x near a `rank`-dimensional subspace plus a
    little noise, the last positions of each sequence padded (attention_mask 0); with `pad_scale` the padded
    positions are redrawn at that scale, unlike the real tokens."""
    basis = np.random.default_rng(99).normal(0, 1, (rank, dims))
    out = []
    for _ in range(n):
        x = rng.normal(0, 1, (32, t, rank)) @ basis + rng.normal(0, 0.2, (32, t, dims))
        mask = np.ones((32, t), np.int64)
        for i, real in enumerate(rng.integers(t // 3, t, 32)):
            mask[i, real:] = 0
            if pad_scale is not None:
                x[i, real:] = rng.normal(0, pad_scale, (t - real, dims))
        out.append({"x": x.astype(np.float32), "attention_mask": mask})
    return out
