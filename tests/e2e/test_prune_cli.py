"""quantize --prune end to end on the sample models: the pruned + quantized model loads and runs,
and the report's pruning section says what was removed and what was left whole."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from prune_models import attention_block

from quantkit.cli import cli


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def test_channel_pruning_then_int8_on_the_digits_cnn(samples, tmp_path):
    d = samples / "digits_cnn"
    out, rep = tmp_path / "cnn.onnx", tmp_path / "report.json"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", out,
                 "--report", rep, "--prune", "0.3", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    p = report["pruning"]
    assert p["structure"] == "channel" and p["ratio"] == 0.3
    assert p["params_after"] < 0.8 * p["params_before"]
    assert p["macs_after"] < 0.8 * p["macs_before"]
    assert {s["reason"] for s in p["skipped"]} >= {"tensor logits is a graph output"}
    assert all(0.25 <= layer["ratio"] <= 0.35 for layer in p["layers"]) and len(p["layers"]) >= 2
    assert "pruning   channel 30%" in r.output and "left whole:" in r.output
    assert report["effective_config"]["prune"] == 0.3
    onnx.checker.check_model(str(out), full_check=True)
    data = np.load(d / "eval.npz")
    (logits,) = report["outputs"]
    assert logits["top1_agreement"] > 0.9  # pruned 30% without any retraining, then int8
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert sess.run(None, {name: data[name][:4]})[0].shape[0] == 4


@pytest.mark.parametrize("args,message", [
    (["--prune", "1.5"], "--prune must be a fraction in (0, 1)"),
    (["--prune-method", "wanda"], "need --prune RATIO"),
    (["--prune", "0.3", "--prune-method", "wanda"], "--prune-method applies to --prune-structure unstructured"),
    (["--prune", "0.3", "--prune-structure", "2:4"], "use --prune 0.5"),
])
def test_bad_prune_options_are_usage_errors(samples, tmp_path, args, message):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "x.onnx", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_prune_needs_calibration_data(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--activations", "dynamic", "--eval", d / "eval.npz", "-o", tmp_path / "x.onnx",
                 "--prune", "0.3")
    assert r.exit_code == 2 and "--prune needs --calib" in r.output


def test_unstructured_half_then_int4_stores_the_zeros_almost_free(samples, tmp_path):
    d = samples / "digits_transformer"
    dense, sparse_out, rep = tmp_path / "dense.onnx", tmp_path / "sparse.onnx", tmp_path / "r.json"
    common = ["--weights", "int4", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "--no-speed-guard"]
    assert quantize(d / "model.onnx", *common, "-o", dense).exit_code == 0
    r = quantize(d / "model.onnx", *common, "-o", sparse_out, "--report", rep, "--prune", "0.5",
                 "--prune-structure", "unstructured", "--prune-method", "sparsegpt")
    assert r.exit_code == 0, r.output
    p = json.loads(rep.read_text())["pruning"]
    assert p["nonzero_after"] < 0.6 * p["nonzero_before"] and p["params_after"] == p["params_before"]
    assert p["storage"]["tensors"] >= 1 and p["storage"]["stored_bytes"] < 0.85 * p["storage"]["dense_bytes"]
    assert all(layer["ratio"] == pytest.approx(0.5, abs=0.01) for layer in p["layers"] if layer["op_type"] == "MatMul")
    saved = p["storage"]["dense_bytes"] - p["storage"]["stored_bytes"]
    assert saved > 0.25 * p["storage"]["dense_bytes"]
    assert sparse_out.stat().st_size < dense.stat().st_size  # tiny tensors here: the decode nodes eat most of it
    onnx.checker.check_model(str(sparse_out), full_check=True)
    data = np.load(d / "eval.npz")
    sess = ort.InferenceSession(str(sparse_out), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert np.isfinite(sess.run(None, {name: data[name][:4]})[0]).all()


def test_two_four_then_int8_on_the_digits_cnn(samples, tmp_path):
    d = samples / "digits_cnn"
    out, rep = tmp_path / "cnn24.onnx", tmp_path / "r.json"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", out, "--report", rep,
                 "--prune-structure", "2:4", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    p = report["pruning"]
    assert p["ratio"] == 0.5 and p["method"] is None
    assert all(layer["ratio"] == 0.5 for layer in p["layers"])
    assert report["outputs"][0]["top1_agreement"] > 0.5  # half of every weight group gone, no retraining


def test_head_pruning_then_int8_on_an_exported_attention_block(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "att.onnx"
    onnx.save(attention_block(rng), str(model))
    x = rng.normal(0, 1, (64, 6, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, mask=np.zeros((64, 1, 1, 6), np.float32))
    out, rep = tmp_path / "att.pruned.onnx", tmp_path / "r.json"
    r = quantize(model, "--calib", tmp_path / "calib.npz", "-o", out, "--report", rep, "--prune", "0.5",
                 "--prune-structure", "head", "--no-speed-guard", "--batch-axis", "mask=0")
    assert r.exit_code == 0, r.output
    p = json.loads(rep.read_text())["pruning"]
    (layer,) = p["layers"]
    assert (layer["heads_before"], layer["heads_after"]) == (4, 2)
    assert p["macs_after"] < 0.75 * p["macs_before"]
    assert "4 -> 2 heads" in r.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": x[:3], "mask": np.zeros((3, 1, 1, 6), np.float32)})[0].shape == (3, 6, 16)


def test_head_pruning_on_a_model_without_attention_says_so(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "-o", tmp_path / "x.onnx", "--prune", "0.3",
                 "--prune-structure", "head")
    assert r.exit_code == 4 and "found no attention block" in r.output


def test_with_a_target_the_ratio_is_searched_and_the_gate_holds(samples, tmp_path):
    d = samples / "digits_cnn"
    out, rep = tmp_path / "t.onnx", tmp_path / "r.json"
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", out, "--report", rep,
                 "--prune", "0.6", "--min-cosine", "0.99", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    search = report["pruning"]["search"]
    assert 0 < search["chosen_ratio"] < 0.6 and search["pruning_target"] == "mean cosine >= 0.995"
    assert not search["trials"][0]["met"] and any(t["met"] for t in search["trials"])
    assert report["pruning"]["ratio"] == search["chosen_ratio"]
    assert report["outputs"][0]["cosine_mean"] >= 0.99 and report["gates"]["passed"]
