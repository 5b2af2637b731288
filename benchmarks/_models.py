"""Models the benchmarks build for themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def wide_cnn(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A plain conv stack on 3 x size x size images with large activations (32-64 channels at full
    resolution): what makes calibrators that keep every intermediate output run out of memory.
    Weights are random (He-scaled); the model is for measuring memory and time, not accuracy."""
    rng = np.random.default_rng(seed)
    layers = [(3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
    nodes, inits, x = [], [], "x"
    for i, (cin, cout, stride) in enumerate(layers):
        w = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                   strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    wf = (rng.normal(size=(128, 10)) * 0.1).astype(np.float32)
    inits.append(numpy_helper.from_array(wf, "wf"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("MatMul", ["flat", "wf"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "wide_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def image_data(path: Path, n: int, size: int = 64, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.uniform(0, 1, (n, 3, size, size)).astype(np.float32))
    return path
