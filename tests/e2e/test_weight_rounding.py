"""--weight-rounding: static int8 weights rounded by GPTQ on their per-channel grid or to nearest (the
default), end to end on the small trained CNN (a depthwise, a pointwise and two full convolutions, two
Gemms): the written model is valid and runs in onnxruntime, every weight keeps rounding-to-nearest's
scales exactly, the codes move, the layers' output error on the evaluation data goes down, and two runs
write the same bytes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import numpy_helper

from quantkit.cli import cli
from quantkit.quantize.hessian_rounding import HOW


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def _run(samples, out, *extra):
    """GPTQ unless `extra` names another rounding."""
    d = samples / "digits_cnn"
    rounding = [] if "--weight-rounding" in extra else ["--weight-rounding", "gptq"]
    r = quantize(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", out,
                 "--no-speed-guard", "--min-cosine", "0.9", "--json", "-q", *rounding, *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _weights(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per quantized weight of the written model: (int8 codes, scales). A weight-only convolution's
    DequantizeLinear is lowered to Cast -> Mul by a `_DequantizeLinear_step` (its scales, broadcastable)."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    out = {}
    for k, v in inits.items():
        base = k[: -len("_quantized")]
        scale = inits.get(base + "_scale", inits.get(base + "_DequantizeLinear_step"))
        if k.endswith("_quantized") and v.dtype == np.int8 and scale is not None:
            out[base] = (v, scale.reshape(-1))
    return out


def test_gptq_codes_on_the_same_scales_give_a_valid_model_closer_to_fp32(samples, tmp_path):
    gptq = _run(samples, tmp_path / "gptq.onnx")
    rtn = _run(samples, tmp_path / "rtn.onnx", "--weight-rounding", "rtn")
    onnx.checker.check_model(str(tmp_path / "gptq.onnx"))
    # every weighted layer the static scheme quantized was rounded against its inputs: 4 Conv, 2 Gemm
    assert sorted(gptq["nodes"]["gptq"]) == sorted(
        n["node"] for n in gptq["nodes"]["quantized"] if n["op_type"] in ("Conv", "Gemm"))
    assert len(gptq["nodes"]["gptq"]) == 6 and rtn["nodes"]["gptq"] == []
    assert any("rounded with GPTQ" in n for n in gptq["notes"])
    rows = {r["node"]: r for r in gptq["weight_error"]}
    assert all(rows[n]["scheme"] == HOW for n in gptq["nodes"]["gptq"])
    # same grid, other codes
    wg, wr = _weights(tmp_path / "gptq.onnx"), _weights(tmp_path / "rtn.onnx")
    assert wg.keys() == wr.keys() and len(wg) == 6
    for name in wg:
        assert np.array_equal(wg[name][1], wr[name][1]), name
    assert sum(int(np.sum(wg[n][0] != wr[n][0])) for n in wg) > 100
    # the written model runs, and is closer to fp32 on held-out data than rounding to nearest
    x = np.load(samples / "digits_cnn" / "eval.npz")["x"]
    ref = ort.InferenceSession(str(samples / "digits_cnn" / "model.onnx")).run(None, {"x": x})[0]

    def err(path):
        y = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
        assert y.shape == ref.shape and np.isfinite(y).all()
        return float(np.mean((y - ref) ** 2))

    assert err(tmp_path / "gptq.onnx") < err(tmp_path / "rtn.onnx")


def test_two_runs_write_the_same_bytes(samples, tmp_path):
    _run(samples, tmp_path / "a.onnx")
    _run(samples, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_convolution_moved_to_weight_only_keeps_its_gptq_codes(samples, tmp_path):
    """The accuracy budget's alternatives share the static scheme's rounded weights: a convolution a plan
    moves to weight-only int8 is stored with the very GPTQ codes static int8 would have used."""
    plan = tmp_path / "plan.json"
    static = _run(samples, tmp_path / "static.onnx", "--plan", plan)
    assert static["placement"]["moved"] == {}  # every op static int8 at this loose target
    conv = next(n["node"] for n in static["nodes"]["quantized"] if n["op_type"] == "Conv")
    saved = json.loads(plan.read_text())
    saved["nodes"] = {conv: "weight_only"}
    plan.write_text(json.dumps(saved))
    moved = _run(samples, tmp_path / "moved.onnx", "--from-plan", plan)
    assert {n["node"]: n["scheme"] for n in moved["nodes"]["quantized"]}[conv] == "weight_only"
    _run(samples, tmp_path / "rtn.onnx", "--from-plan", plan, "--weight-rounding", "rtn")
    ws, wm, wr = (_weights(tmp_path / f"{n}.onnx") for n in ("static", "moved", "rtn"))
    assert ws.keys() == wm.keys() == wr.keys()
    for name in ws:  # the moved convolution's weight among them: same codes and scales as static's
        assert np.array_equal(ws[name][0], wm[name][0]) and np.array_equal(ws[name][1], wm[name][1]), name
    assert any(not np.array_equal(wm[n][0], wr[n][0]) for n in wm)
