"""quantize --prune end to end on the sample models: the pruned + quantized model loads and runs,
and the report's pruning section says what was removed and what was left whole."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

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
