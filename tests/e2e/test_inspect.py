"""`quantkit inspect`: inputs and batch axes, op counts, the placement quantize would choose (checked
against what quantize then does), float nodes with reasons, weight bytes, expected sizes."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

from models import if_with_matmul


def inspect(*args):
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


@pytest.fixture
def cnn(samples):
    return samples / "digits_cnn"


def test_cnn_findings_match_the_model_and_what_quantize_does(cnn, tmp_path):
    r = inspect(cnn / "model.onnx", "--calib", cnn / "calib.npz", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    (x,) = info["inputs"]
    assert x["name"] == "x" and x["shape"] == [None, 1, 8, 8] and x["batch"] == "dynamic (axis 0)"
    raw = [n.op_type for n in onnx.load(str(cnn / "model.onnx")).graph.node]
    assert "BatchNormalization" in raw and "BatchNormalization" not in info["op_counts"]  # folded, as quantize does
    assert info["op_counts"]["Conv"] == raw.count("Conv") and info["op_counts"]["Gemm"] == raw.count("Gemm")
    assert info["data"]["samples"] == 256
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(cnn / "model.onnx")).graph.initializer)
    assert sum(info["weight_bytes"].values()) <= weights  # BN parameters were folded away

    q = CliRunner().invoke(cli, ["quantize", str(cnn / "model.onnx"), "--calib", str(cnn / "calib.npz"), "-o",
                                 str(tmp_path / "q.onnx"), "--no-speed-guard", "--json", "-q"])
    report = json.loads(q.stdout)
    assert [n["node"] for n in info["nodes"]["quantized"]] == [n["node"] for n in report["nodes"]["quantized"]]
    assert {n["scheme"] for n in info["nodes"]["quantized"] if n["op_type"] in ("Conv", "Gemm")} == {
        "int8 weights per-channel, uint8 activations"}
    assert {n["scheme"] for n in info["nodes"]["quantized"] if n["op_type"] not in ("Conv", "Gemm")} <= {
        "uint8 in and out (integer kernel, no weight)"}
    # the size estimate counts weights only: within 25% of the file quantize wrote
    assert abs(info["expected_bytes"]["int8"] / report["model"]["bytes_after"] - 1) < 0.25
    assert info["expected_bytes"]["int4"] < info["expected_bytes"]["int8"] < info["bytes"]


def test_int4_plan_and_float_nodes_with_reasons(tmp_path):
    path = tmp_path / "if.onnx"
    onnx.save(if_with_matmul(np.random.default_rng(0)), path)
    r = inspect(path, "--weights", "int4", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["scheme"] == {"weights": "int4", "activations": "none"}
    (outer,) = info["nodes"]["quantized"]
    assert outer["node"] == "outer_mm" and outer["scheme"] == "int4 weights, blocks of 32"
    (inner,) = info["nodes"]["float"]
    assert inner["node"] == "inner_mm" and "inside a If subgraph" in inner["reason"]
    r = inspect(path, "--exclude", "outer_mm")
    assert r.exit_code == 0 and "outer_mm" in r.output and "excluded by --exclude outer_mm" in r.output


def test_masks_are_reported_as_float_tensors(tmp_path):
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8] x, float[N, 1, 4] m) => (float[N, 4, 8] y) {
            big = Constant<value = float {-1000000000.0}>()
            xt = Transpose<perm = [0, 2, 1]>(x)
            s = MatMul(x, xt)
            neg = Mul(m, big)
            a = Add(s, neg)
            p = Softmax<axis = -1>(a)
            y = MatMul(p, x)
        }""")
    path = tmp_path / "mask.onnx"
    onnx.save(proto, path)
    info = json.loads(inspect(path, "--json").stdout)
    floats = {t["tensor"]: t["reason"] for t in info["float_tensors"]}
    assert set(floats) == {"neg", "a"} and all("additive attention mask" in v for v in floats.values())
    assert [n["scheme"] for n in info["nodes"]["quantized"]] == ["uint8 x uint8 (activation x activation)"] * 2
    assert {i["name"]: i["batch"] for i in info["inputs"]} == {"x": "dynamic (axis 0)", "m": "dynamic (axis 0)"}


def test_text_output_and_errors(cnn, tmp_path):
    r = inspect(cnn / "model.onnx")
    assert r.exit_code == 0
    for part in ("inputs:", "x  ", "batch dynamic (axis 0)", "ops: ", "placement for --weights int8",
                 "weight bytes by op type: Gemm", "expected size: fp32"):
        assert part in r.output
    assert inspect(tmp_path / "none.onnx").exit_code == 3
    np.savez(tmp_path / "bad.npz", y=np.zeros((4, 1, 8, 8), np.float32))
    bad = inspect(cnn / "model.onnx", "--calib", tmp_path / "bad.npz")
    assert bad.exit_code == 3 and "'x'" in bad.output


def test_pytorch_models_are_exported_first(cnn):
    pytest.importorskip("torch")
    r = inspect(cnn / "model.pt2", "--calib", cnn / "calib.npz", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["export"]["exporter"] == "dynamo" and info["export"]["max_abs_error"] < 1e-4
    weighted = [n for n in info["nodes"]["quantized"] if n["op_type"] in ("Conv", "Gemm", "MatMul")]
    assert len(weighted) == 6 and info["op_counts"]["Conv"] == 4
