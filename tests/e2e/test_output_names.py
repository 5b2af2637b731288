"""--output-names for exported PyTorch models: the names reach the ONNX graph and the report; a count
that does not match the model's outputs, or an ONNX model, is a usage error."""

import json

import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

pytest.importorskip("torch")


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def test_names_reach_the_graph_and_the_report(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.pt2", "--calib", d / "calib.npz", "--output-names", "digit_logits", "-o",
                 tmp_path / "q.onnx", "--save-fp32", tmp_path / "fp32.onnx", "--no-speed-guard", "--json", "-q",
                 "--calib-samples", "32")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [o["name"] for o in report["outputs"]] == ["digit_logits"]
    assert report["outputs"][0]["cosine_mean"] > 0.999
    for f in ("q.onnx", "fp32.onnx"):
        assert [o.name for o in onnx.load(str(tmp_path / f)).graph.output] == ["digit_logits"]
    assert report["effective_config"]["output_names"] == ["digit_logits"]


def test_wrong_count_duplicates_and_onnx_inputs_are_usage_errors(samples, tmp_path):
    d = samples / "digits_cnn"
    r = quantize(d / "model.pt2", "--calib", d / "calib.npz", "--output-names", "a,b", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "gives 2 name(s) but the exported model has 1 output(s)" in r.output
    assert not (tmp_path / "q.onnx").exists()
    r = quantize(d / "model.pt2", "--calib", d / "calib.npz", "--output-names", "a,a", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "a name twice" in r.output
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--output-names", "a", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--output-names apply to PyTorch models" in r.output
