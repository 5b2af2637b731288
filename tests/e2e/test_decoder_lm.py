"""A Llama-style decoder (tests/tiny_llama.py) exported from PyTorch, quantized and evaluated as a
language model: with past key/value inputs (token ids, position ids, cache tensors from a real
prefix, targets), through the in-memory and the streamed pipeline, and without a cache."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from tiny_llama import LlamaShape, build, export, make_data

from quantkit.cli import cli


def _quantize(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def _ops(path) -> list:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _torch_agreement(model, qpath, data) -> float:
    """Top-1 agreement of the quantized ONNX model's logits with the PyTorch model's own."""
    d = dict(np.load(data))
    sess = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
    feed = {i.name: d[i.name] for i in sess.get_inputs()}
    q = sess.run(["logits"], feed)[0]
    with torch.no_grad():
        args = [torch.from_numpy(feed[i.name]) for i in sess.get_inputs()]
        out = model(*args)
    ref = (out[0] if isinstance(out, tuple) else out).numpy()
    return float((q.argmax(-1) == ref.argmax(-1)).mean())


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder")
    model = build(LlamaShape())
    export(model, folder / "model.onnx")
    make_data(model, folder / "calib.npz", 16)
    make_data(model, folder / "eval.npz", 16, seed=2)
    return model, folder


@pytest.mark.parametrize("streamed", [False, True])
def test_decoder_with_cache_to_int4_reports_language_model_figures(decoder, tmp_path, monkeypatch, streamed):
    from quantkit.quantize import streaming

    model, folder = decoder
    src = folder / "model.onnx"
    if streamed:  # the same decoder with its weights in an external file, streamed
        src = tmp_path / "ext.onnx"
        onnx.save(onnx.load(str(folder / "model.onnx")), str(src), save_as_external_data=True,
                  location="ext.onnx.data", size_threshold=0)
        monkeypatch.setattr(streaming, "MIN_BYTES", 0)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = _quantize(src, "--weights", "int4", "--calib", folder / "calib.npz", "--eval", folder / "eval.npz",
                  "--no-speed-guard", "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["memory"]["streamed"] is streamed
    ops = _ops(out)
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head; the embedding gathers int4 blocks
    assert ops.count("MatMulNBits") == 15 and ops.count("GatherBlockQuantized") == 1
    outs = {o["name"]: o for o in rep["outputs"]}
    assert set(outs) == {"logits", "present_key.0", "present_value.0", "present_key.1", "present_value.1"}
    assert all(o["cosine_mean"] > 0.98 for o in outs.values())
    lm = rep["evaluation"]["language_model"]
    assert lm["output"] == "logits" and lm["positions"] == 16 * 4 and lm["target_positions"] == 16 * 4
    assert lm["top1_agreement"] >= 0.9 and 0 < lm["kl_mean"] < 0.05
    assert abs(math.log(lm["perplexity_quantized"] / lm["perplexity_fp32"])) < 0.3
    # the figure agrees with an independent measurement against PyTorch's own logits
    assert abs(_torch_agreement(model, out, folder / "eval.npz") - lm["top1_agreement"]) <= 0.05


def test_decoder_without_cache_untied_keeps_lm_head_int8(tmp_path):
    model = build(LlamaShape(tied=False), cache=False)
    export(model, tmp_path / "model.onnx")
    make_data(model, tmp_path / "eval.npz", 8, seq=6)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = _quantize(tmp_path / "model.onnx", "--weights", "int4", "--eval", tmp_path / "eval.npz",
                  "--keep-int8", "/lm_head/*", "--no-speed-guard", "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    nodes = onnx.load(str(out)).graph.node
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    assert len(bits) == 15 and [k for k, b in bits.items() if b == 8] == ["/lm_head/MatMul_int8"]
    lm = json.loads(report.read_text())["evaluation"]["language_model"]
    assert lm["positions"] == 8 * 6 and lm["top1_agreement"] >= 0.7
    assert abs(_torch_agreement(model, out, tmp_path / "eval.npz") - lm["top1_agreement"]) <= 0.05


def test_streamed_gptq_gathers_one_gram_per_pass_and_beats_rtn(decoder, tmp_path, monkeypatch):
    from quantkit.quantize import streaming

    model, folder = decoder
    calib = make_data(model, tmp_path / "calib.npz", 128, seed=5)  # GPTQ needs more rows than K to help
    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(folder / "model.onnx")), str(src), save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)
    monkeypatch.setattr(streaming, "MIN_BYTES", 0)
    monkeypatch.setattr(streaming, "GRAM_MIN_BYTES", 0)  # budget 0: every Gram matrix in a pass of its own
    monkeypatch.setattr(streaming, "GRAM_SHARE", 0.0)
    kl = {}
    for algo in ("rtn", "gptq"):
        report = tmp_path / f"{algo}.json"
        r = _quantize(src, "--weights", "int4", "--algorithm", algo, "--calib", calib,
                      "--eval", folder / "eval.npz", "-o", tmp_path / f"{algo}.onnx", "--report", report)
        assert r.exit_code == 0, r.output
        rep = json.loads(report.read_text())
        kl[algo] = rep["evaluation"]["language_model"]["kl_mean"]
    # distinct MatMul inputs per layer: q/k/v share one, o, gate/up share one, down; plus lm_head's
    assert rep["calibration"]["passes"] == 2 * 4 + 1 and len(rep["nodes"]["gptq"]) == 15
    assert kl["gptq"] < kl["rtn"]


def test_awq_divides_each_scaled_input_once_and_keeps_the_outputs(decoder, tmp_path):
    model, folder = decoder
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = _quantize(folder / "model.onnx", "--weights", "int4", "--algorithm", "awq", "--calib", folder / "calib.npz",
                  "--eval", folder / "eval.npz", "--no-speed-guard", "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    note = next(n for n in rep["notes"] if n.startswith("awq:"))
    scaled = int(note.split()[1])
    m = onnx.load(str(out))
    muls = [n for n in m.graph.node if n.op_type == "Mul" and n.name.endswith("_awq")]
    # one Mul per scaled input: q/k/v share one, gate/up share one; each feeds only MatMulNBits
    assert len(muls) == scaled and 0 < scaled <= 9
    readers = [n.op_type for n in m.graph.node for mul in muls if mul.output[0] in n.input]
    assert readers and set(readers) == {"MatMulNBits"}
    assert rep["evaluation"]["language_model"]["top1_agreement"] >= 0.8
    assert all(o["cosine_mean"] > 0.98 for o in rep["outputs"])


def test_streamed_path_refuses_options_that_need_two_sessions(decoder, tmp_path, monkeypatch):
    from quantkit.quantize import streaming

    _, folder = decoder
    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(folder / "model.onnx")), str(src), save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)
    monkeypatch.setattr(streaming, "MIN_BYTES", 0)
    for flags in (["--require-speedup", "1.1"], ["--plan", tmp_path / "p.json"]):
        r = _quantize(src, "--calib", folder / "calib.npz", "-o", tmp_path / "q.onnx", *flags)
        assert r.exit_code == 2 and "large external-data models" in r.output
        assert not (tmp_path / "q.onnx").exists()
