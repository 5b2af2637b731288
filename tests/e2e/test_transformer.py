"""BERT-style encoders exported by both torch.onnx exporters: masks found and kept float,
attention and projection MatMuls quantized, outputs kept; and dynamic int8."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

torch = pytest.importorskip("torch")


def quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def test_static_int8_finds_the_mask_keeps_it_float_and_keeps_the_outputs(encoder, tmp_path):
    path, d = encoder
    r = quantize(path, "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", tmp_path / "q.onnx",
                 "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    floats = report["float_tensors"]
    assert floats and all("additive attention mask" in f["reason"] for f in floats)
    assert not set(report["activations"]) & {f["tensor"] for f in floats}
    kinds = [q["kind"] for q in report["nodes"]["quantized"]]
    assert kinds.count("MatMul (activation x activation)") == 4  # 2 layers x (QK^T, PV)
    assert kinds.count("Gather (embedding table)") == 2  # token and position embeddings
    assert len(kinds) - 6 >= 2 * 6  # q, k, v, o, ff1, ff2 per layer (+ pooler and classifier)
    pooled = next(o for o in report["outputs"] if o["name"] == "pooled")
    assert pooled["cosine_mean"] > 0.995


def test_dynamic_int8_needs_no_calibration(encoder, tmp_path):
    path, d = encoder
    r = quantize(path, "--activations", "dynamic", "--eval", d / "eval.npz", "-o", tmp_path / "q.onnx",
                 "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["calibration"] is None
    ops = [q["op_type"] for q in report["nodes"]["quantized"]]
    assert ops.count("Gather") == 2  # token and position embedding tables, weight-only int8
    assert ops.count("DynamicQuantizeMatMul") == len(ops) - 2 >= 12
    pooled = next(o for o in report["outputs"] if o["name"] == "pooled")
    assert pooled["cosine_mean"] > 0.995


def test_token_ids_outside_the_vocabulary_are_bad_input_not_a_crash(encoder, tmp_path):
    path, d = encoder
    data = dict(np.load(d / "calib.npz"))
    data["input_ids"] = data["input_ids"] + 10_000
    np.savez(tmp_path / "bad.npz", **data)
    r = quantize(path, "--calib", tmp_path / "bad.npz", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 3 and "could not run the model on" in r.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_smoothquant_folds_or_inserts_scales_and_keeps_the_outputs(encoder, tmp_path):
    path, d = encoder
    r = quantize(path, "--calib", d / "calib.npz", "--eval", d / "eval.npz", "-o", tmp_path / "q.onnx",
                 "--smoothquant", "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    groups = report["smoothquant"]
    assert len(groups) == 4  # post-norm: 2 LayerNorms per layer feed MatMuls (QKV, FFN-in)
    for g in groups:
        assert g["applied"].startswith(("Mul inserted", "folded", "no alpha"))
    pooled = next(o for o in report["outputs"] if o["name"] == "pooled")
    assert pooled["cosine_mean"] > 0.995
    r = quantize(path, "--calib", d / "calib.npz", "-o", tmp_path / "q2.onnx", "--smoothquant", "1.5")
    assert r.exit_code == 2 and "alpha must be in (0, 1)" in r.stderr


def _ops(path):
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_int4_weight_only_uses_matmulnbits_and_gatherblockquantized(encoder, tmp_path):
    path, d = encoder
    out = tmp_path / "q4.onnx"
    r = quantize(path, "--weights", "int4", "--eval", d / "eval.npz", "-o", out, "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ops = _ops(out)
    assert ops.count("MatMulNBits") >= 12 and ops.count("GatherBlockQuantized") == 2
    assert "QuantizeLinear" not in ops and "DynamicQuantizeMatMul" not in ops
    assert report["model"]["compression"] > 3.0  # a tiny model: graph and scales weigh more than at scale
    pooled = next(o for o in report["outputs"] if o["name"] == "pooled")
    assert pooled["cosine_mean"] > 0.98


def test_gptq_beats_round_to_nearest_and_keep_int8_keeps_8_bits(encoder, tmp_path):
    path, d = encoder
    common = ["--weights", "int4", "--eval", d / "eval.npz", "--json", "-q", "--no-speed-guard", "--block-size", "16"]
    rtn = json.loads(quantize(path, *common, "-o", tmp_path / "rtn.onnx").stdout)
    r = quantize(path, *common, "--algorithm", "gptq", "--calib", d / "calib.npz", "-o", tmp_path / "gptq.onnx")
    assert r.exit_code == 0, r.output
    gptq = json.loads(r.stdout)
    assert len(gptq["nodes"]["gptq"]) >= 12

    def sqnr(rep):
        return next(o for o in rep["outputs"] if o["name"] == "pooled")["sqnr_db"]

    assert sqnr(gptq) > sqnr(rtn)
    kept = json.loads(quantize(path, *common, "--keep-int8", "*", "-o", tmp_path / "k8.onnx").stdout)
    assert sqnr(kept) > sqnr(rtn)
    assert kept["model"]["bytes_after"] > rtn["model"]["bytes_after"]


def test_qdq_format_is_standard_onnx_and_runs(encoder, tmp_path):
    import onnx

    path, d = encoder
    out = tmp_path / "qdq.onnx"
    r = quantize(path, "--weights", "int4", "--format", "qdq", "--eval", d / "eval.npz", "-o", out, "--json", "-q",
                 "--no-speed-guard")
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int4 = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]
    assert len(int4) >= 14
    pooled = next(o for o in json.loads(r.stdout)["outputs"] if o["name"] == "pooled")
    assert pooled["cosine_mean"] > 0.98


def test_int4_options_are_checked(encoder, tmp_path):
    path, d = encoder
    r = quantize(path, "--weights", "int4", "--activations", "uint8", "--calib", d / "calib.npz",
                 "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "weight-only" in r.stderr
    r = quantize(path, "--weights", "int4", "--block-size", "48", "--eval", d / "eval.npz", "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "power of two" in r.stderr
    r = quantize(path, "--weights", "int4", "--algorithm", "gptq", "--eval", d / "eval.npz", "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "needs --calib" in r.stderr


def test_keep_int8_auto_measures_the_first_and_last_layers(encoder, tmp_path):
    path, d = encoder
    r = quantize(path, "--weights", "int4", "--keep-int8", "auto", "--eval", d / "eval.npz", "-o", tmp_path / "a.onnx",
                 "--json", "-q", "--no-speed-guard")
    assert r.exit_code == 0, r.output
    auto = [n for n in json.loads(r.stdout)["notes"] if n.startswith("--keep-int8 auto")]
    assert len(auto) == 2 and all("dB" in n for n in auto)
