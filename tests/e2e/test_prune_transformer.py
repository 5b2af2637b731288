"""Pruning BERT-style encoders exported by both torch.onnx exporters: FFN neurons and attention
heads removed, the pruned + int8 model runs and keeps the pooled output close."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from quantkit.cli import cli

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("structure,unit,before,after", [("channel", "channels", 128, 64), ("head", "heads", 4, 2)])
def test_ffn_neurons_and_heads_of_an_exported_encoder(encoder, tmp_path, structure, unit, before, after):
    path, d = encoder
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["quantize", str(path), "--calib", str(d / "calib.npz"), "--eval", str(d / "eval.npz"),
                                 "-o", str(out), "--report", str(rep), "--prune", "0.5", "--prune-structure", structure,
                                 "--activations", "dynamic", "--no-speed-guard"])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    layers = report["pruning"]["layers"]
    # one FFN / attention block per encoder layer (channel pruning also takes the pooler's 64 channels)
    assert sum(layer["detail"] == f"{before} -> {after} {unit}" for layer in layers) == 2
    pooled = next(o for o in report["outputs"] if o["name"] == "pooled")
    assert pooled["cosine_mean"] > 0.9  # half the neurons / heads of a random-weight encoder, then int8
    data = np.load(d / "eval.npz")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: data[k][:3] for k in ("input_ids", "attention_mask")})
    assert outs[1].shape == (3, 64)
