"""--finetune on a BERT-style PyTorch encoder with padded sentences: the training batches are trimmed
to their real tokens, the written model keeps the input shapes of the model as exported, and a
model whose sequence length is fixed trains on the full length."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import quantkit

torch = pytest.importorskip("torch")

SEQ = 24


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch, samples):
    monkeypatch.chdir(samples.parent)  # --model-class imports sample_models.* from the working directory


def _data(rng, n: int) -> dict[str, np.ndarray]:
    lengths = rng.integers(3, SEQ + 1, n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(3, 256, (n, SEQ)).astype(np.int64) * mask, "attention_mask": mask}


@pytest.fixture
def encoder(tmp_path):
    from sample_models.bert_style import tiny

    torch.manual_seed(0)
    torch.save(tiny().state_dict(), tmp_path / "enc.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", **_data(rng, 32))
    np.savez(tmp_path / "train.npz", **_data(rng, 96))
    np.savez(tmp_path / "eval.npz", **_data(rng, 16))
    return tmp_path


def _run(d, **options):
    return quantkit.quantize(d / "enc.pt", model_class="sample_models.bert_style:tiny", calib=d / "calib.npz",
                             eval=d / "eval.npz", output=d / "q.onnx", save_fp32=d / "fp32.onnx",
                             finetune_data=d / "train.npz", weights="int4", block_size=16, finetune=30, lr=1e-3,
                             finetune_rounding=0, no_speed_guard=True, threads=1, **options)


def _shapes(path) -> list[tuple]:
    g = onnx.load(str(path)).graph
    return [(v.name, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
            for v in [*g.input, *g.output]]


def test_padding_is_trimmed_in_training_only_and_what_ships_is_what_trained(encoder):
    q = _run(encoder, html=encoder / "r.html")
    ft = q.report["finetune"]
    tr = ft["trimming"]
    assert tr["applied"] and tr["reason"] is None and tr["inputs"] == ["input_ids", "attention_mask"]
    assert tr["length"] == SEQ and tr["mean_length"] < 0.8 * SEQ  # 10 batches of 8 by length, 3..24 real tokens
    assert ft["train_batches"] == 10 and ft["heldout_batches"] == 2 and ft["loss_positions"] == "attention_mask"
    assert ft["heldout_loss_after"] < ft["heldout_loss_before"]
    assert ft["torch_vs_onnxruntime"]["sqnr_db"] > 60  # on a held-out batch of the data's full length
    # the written model has the exported model's inputs and outputs, and runs the full length
    assert _shapes(encoder / "q.onnx") == _shapes(encoder / "fp32.onnx")
    feed = dict(np.load(encoder / "eval.npz"))
    logits, pooled = ort.InferenceSession(str(encoder / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    assert logits.shape == (16, 10) and pooled.shape == (16, 32)
    assert f"instead of {SEQ})" in q.html.read_text() and "padding trimmed" in q.html.read_text()
    first = (encoder / "q.onnx").read_bytes()
    again = _run(encoder, force=True)  # the same command: the same batches, the same model
    assert (encoder / "q.onnx").read_bytes() == first and again.report["finetune"]["curve"] == ft["curve"]


def test_a_fixed_sequence_length_trains_on_the_full_length(encoder):
    q = _run(encoder, input=(f"input_ids:Bx{SEQ}:int64", f"attention_mask:Bx{SEQ}:int64"))
    tr = q.report["finetune"]["trimming"]
    assert not tr["applied"] and "fixes the sequence length of input_ids, attention_mask" in tr["reason"]
    assert tr["mean_length"] is None and q.report["finetune"]["steps_done"] == 30
    assert q.report["finetune"]["torch_vs_onnxruntime"]["sqnr_db"] > 60
    dims = dict(_shapes(encoder / "q.onnx"))
    assert dims["input_ids"][1] == SEQ and dims["attention_mask"][1] == SEQ
