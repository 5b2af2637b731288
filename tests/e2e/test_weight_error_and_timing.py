"""The report's weight error taken while the weights are rounded (no second rounding pass), and what
a streamed run times by default (its evaluation batches) or on request (--latency-runs)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from large_model import write_data, write_lm
from onnx import numpy_helper

from quantkit.cli import cli
from quantkit.config import QuantConfig
from quantkit.graph import shapes
from quantkit.load.onnx import load_onnx
from quantkit.quantize import blockwise as bw
from quantkit.quantize import streaming
from quantkit.report import weight_error


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    write_lm(folder, layers=2, dim=64, vocab=256)
    write_data(folder / "data.npz", samples=12, seq=6, vocab=256)
    return folder


def _quantize(small, tmp_path, *args) -> dict:
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["quantize", str(small / "model.onnx"), "--weights", "int4", "--eval",
                                 str(small / "data.npz"), "--batch-size", "4", "--no-speed-guard", "-o", str(out),
                                 "--report", str(report), *map(str, args)])
    assert r.exit_code == 0, r.output
    return json.loads(report.read_text())


def _no_second_rounding(monkeypatch):
    def fail(op, quant):
        raise AssertionError(f"{op.node.name} rounded a second time for the report")

    monkeypatch.setattr(weight_error, "_rounded", fail)


@pytest.mark.parametrize("streamed", [False, True])
def test_weight_error_from_the_rounding_itself_equals_rounding_again(small, tmp_path, monkeypatch, streamed):
    monkeypatch.setattr(streaming, "MIN_BYTES", 0 if streamed else 1 << 40)
    _no_second_rounding(monkeypatch)
    rep = _quantize(small, tmp_path)
    assert rep["memory"]["streamed"] is streamed
    monkeypatch.undo()
    got = {r["node"]: r for r in rep["weight_error"]}
    # what the report computed before: every weight read and rounded again, compared in float64
    model = load_onnx(small / "model.onnx")
    shapes.infer(model)
    want = {r["node"]: r for r in weight_error.weight_errors(model, QuantConfig(weights="int4", activations="none"),
                                                             set())}
    # 2 x (up, down), the Gemm projection, the LM head and the embedding table
    assert len(got) == 7 and got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert (g["scheme"], g["weights"], g["op_type"]) == (w["scheme"], w["weights"], w["op_type"])
        assert g["weight_sqnr_db"] == pytest.approx(w["weight_sqnr_db"], abs=1e-5), name
    assert [r["weight_sqnr_db"] for r in rep["weight_error"]] == sorted(r["weight_sqnr_db"] for r in got.values())


def test_gptq_weight_error_is_that_of_the_codes_written(small, tmp_path, monkeypatch):
    _no_second_rounding(monkeypatch)
    rep = _quantize(small, tmp_path, "--algorithm", "gptq", "--calib", small / "data.npz")
    rows = {r["node"]: r for r in rep["weight_error"]}
    assert rows["layers.0.up_proj"]["scheme"] == "int4 blocks of 32, symmetric, GPTQ"
    assert rows["embed"]["scheme"].endswith("round to nearest")  # an embedding table is not GPTQ's
    out = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    w = numpy_helper.to_array(onnx.load(str(small / "model.onnx")).graph.initializer[1])  # layers.0.up (64, 256)
    packed, scales = inits["layers.0.up_q4"], inits["layers.0.up_scales"].reshape(256, -1)
    codes = bw.unpack(packed, 4, 32)
    shipped = bw.Blockwise(codes, scales, np.full(scales.shape, 8, np.uint8), 64, 4, 32, True).dequantize()
    want = weight_error.sqnr_db(w, shipped)
    rtn = weight_error.sqnr_db(w, bw.quantize_blockwise(w).dequantize())
    assert rows["layers.0.up_proj"]["weight_sqnr_db"] == pytest.approx(want, abs=1e-5)
    assert abs(want - rtn) > 0.01  # GPTQ's codes are not round-to-nearest's: the figure is of the shipped ones


def test_streamed_latency_is_timed_on_the_evaluation_batches_unless_runs_are_asked(small, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "MIN_BYTES", 0)
    rep = _quantize(small, tmp_path)
    lat = rep["latency"]
    assert lat["timed"] == "evaluation batches" and lat["runs"] == 3 and lat["batch_size"] == 4  # 12 samples
    assert lat["fp32_ms"] > 0 and lat["quantized_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["fp32_ms"] / lat["quantized_ms"])
    assert any(n.startswith("latency: each model's median time per evaluation batch") for n in rep["notes"])
    assert rep["evaluation"]["samples"] == 12  # evaluation itself is not cut short
    assert set(rep["stage_seconds"]) == {"load", "fp32_reference", "canonicalize", "calibrate", "tune",
                                         "quantize_and_write", "evaluate", "report"}
    assert sum(rep["stage_seconds"].values()) <= rep["seconds"] + 0.01
    asked = _quantize(small, tmp_path, "--latency-runs", "2", "--force")
    assert asked["latency"]["timed"] == "timed runs after a warm-up" and asked["latency"]["runs"] == 2
    assert not any(n.startswith("latency:") for n in asked["notes"])
    assert asked["effective_config"]["latency_runs"] == 2 and "latency_runs" not in rep["effective_config"]
    r = CliRunner().invoke(cli, ["quantize", str(small / "model.onnx"), "--weights", "int4", "--eval",
                                 str(small / "data.npz"), "--latency-runs", "0", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "--latency-runs must be at least 1" in r.output


def test_streamed_latency_names_the_samples_timed_when_the_data_is_shorter_than_a_batch(small, tmp_path, monkeypatch):
    """12 samples at --batch-size 16: both ways of timing run batches of 12, and the report says 12, not 16."""
    monkeypatch.setattr(streaming, "MIN_BYTES", 0)
    for runs in ([], ["--latency-runs", "2"]):
        lat = _quantize(small, tmp_path, "--batch-size", "16", "--force", *runs)["latency"]
        assert lat["batch_size"] == 12 and lat["runs"] == (2 if runs else 1)
