"""Padding trimmed from training batches (quantkit/finetune/trim.py): which arrays are cut and when,
batches of similar length drawn the same way every run, and on a quantized BERT-style encoder the
same loss and gradients from a cut batch as from the padded one."""

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import quantkit

torch = pytest.importorskip("torch")

from quantkit.calibrate.data import InputSpec  # noqa: E402
from quantkit.finetune import loop, trim  # noqa: E402
from quantkit.finetune.blocks import block_outputs  # noqa: E402
from quantkit.finetune.graph import QuantGraph  # noqa: E402
from quantkit.finetune.step import padding_positions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
I64 = np.dtype("int64")


def _padded(rng, n: int, seq: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Right-padded token ids (pad 0) and their 0/1 mask, real lengths drawn in [lo, hi]."""
    lengths = rng.integers(lo, hi + 1, n)
    lengths[0] = hi  # the longest is `hi`
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(3, 256, (n, seq)).astype(np.int64) * mask, "attention_mask": mask}


def test_real_lengths_end_at_the_last_real_token_and_only_trailing_padding_is_cut():
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert trim.real_lengths(mask).tolist() == [2, 3, 0]
    feed = {"input_ids": np.arange(18).reshape(3, 6), "attention_mask": mask, "pixels": np.ones((3, 6))}
    short = trim.cut_batch(feed, ["input_ids", "attention_mask"])
    assert short["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
    assert short["attention_mask"].shape == (3, 3) and short["pixels"].shape == (3, 6)  # not in the cut list
    left = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])  # left padding: the last column is real
    assert trim.real_lengths(left).tolist() == [6, 6]
    assert trim.cut_batch({"attention_mask": left}, ["attention_mask"])["attention_mask"].shape == (2, 6)


def test_by_length_batches_keep_every_sample_with_its_labels_and_are_the_same_every_run():
    rng = np.random.default_rng(0)
    data = _padded(rng, 48, 20, 2, 20)
    data["labels"] = np.arange(48)
    config = np.array([7.0])  # fed whole to every batch
    feeds = [{**{k: v[i:i + 8] for k, v in data.items()}, "config": config} for i in range(0, 48, 8)]
    rows = {"input_ids", "attention_mask", "labels"}
    grouped = trim.by_length(feeds, rows)
    again = trim.by_length(feeds, rows)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(grouped, again) for k in a)
    assert sorted(np.concatenate([f["labels"] for f in grouped]).tolist()) == list(range(48))
    for f in grouped:  # each sample's ids, mask and label stay together
        assert np.array_equal(f["input_ids"], data["input_ids"][f["labels"]]) and f["config"] is config
    spans = [trim.real_lengths(f["attention_mask"]) for f in grouped]
    widths = sorted((int(s.min()), int(s.max())) for s in spans)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(widths, widths[1:]))  # length ranges do not overlap
    assert [int(s.max()) for s in spans] != sorted(int(s.max()) for s in spans)  # batches shuffled, not short first
    per_batch = np.mean([int(trim.real_lengths(f["attention_mask"]).max()) for f in feeds])
    assert np.mean([int(s.max()) for s in spans]) < 0.8 * per_batch  # what grouping buys over cutting alone
    odd = [feeds[0], {**feeds[1], **{k: feeds[1][k][:, :10] for k in ("input_ids", "attention_mask")}}]
    assert trim.by_length(odd, rows) is odd  # files of different lengths: batches kept as they are


def test_plan_cuts_what_is_shaped_like_the_mask_and_only_on_a_dynamic_sequence_axis():
    rng = np.random.default_rng(0)
    feed = {**_padded(rng, 4, 10, 2, 6), "token_type_ids": np.zeros((4, 10), np.int64),
            "pixels": np.zeros((4, 3), np.float32)}
    dyn = [InputSpec(n, I64, (None, None)) for n in ("input_ids", "attention_mask", "token_type_ids")]
    specs = [*dyn, InputSpec("pixels", np.dtype("float32"), (None, 3))]
    assert trim.plan(specs, feed) == (["input_ids", "attention_mask", "token_type_ids"], None)
    fixed = [InputSpec("input_ids", I64, (None, 10)), *dyn[1:], specs[-1]]
    cut, why = trim.plan(fixed, feed)
    assert cut == [] and "fixes the sequence length of input_ids" in why
    cut, why = trim.plan(specs, {**feed, "attention_mask": feed["attention_mask"].astype(np.float32)})
    assert cut == [] and "attention_mask" in why  # an additive float mask is not a 0/1 padding mask
    cut, why = trim.plan([InputSpec("x", np.dtype("float32"), (None, 3))], {"x": np.zeros((4, 3), np.float32)})
    assert cut == [] and "attention_mask" in why


def test_probe_finds_padding_that_reaches_real_tokens():
    rng = np.random.default_rng(0)
    feed = _padded(rng, 4, 12, 3, 7)
    cut = ["input_ids", "attention_mask"]

    def masked(f):  # per token, and a mean over real tokens only
        x = f["input_ids"].astype(np.float64)[..., None] * np.ones(3)
        m = f["attention_mask"][..., None]
        return [x, (x * m).sum(1) / m.sum(1)]

    def leaky(f):  # a mean over every position: padding counts
        return [masked(f)[0].mean(1)]

    assert trim.probe(masked, feed, cut) == (np.inf, [True, False])  # the per-token output and the pooled one
    assert trim.probe(leaky, feed, cut)[0] < 20

    def fixed_length(f):
        if f["input_ids"].shape[1] != 12:
            raise RuntimeError("shape '[-1, 12]' is invalid for input of size 28")
        return masked(f)
    assert trim.probe(fixed_length, feed, cut)[0] == -np.inf


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """sample_models/bert_style's tiny encoder exported with a dynamic sequence axis and quantized int4
    (float compute, so no int8 rounding of the MatMulNBits inputs), with LayerNorm block outputs."""
    sys.path.insert(0, str(ROOT / "sample_models"))
    from bert_style import export, tiny

    d = tmp_path_factory.mktemp("trim")
    torch.manual_seed(0)
    data = _padded(np.random.default_rng(1), 32, 24, 4, 24)
    export(tiny().eval(), data["input_ids"][:2], data["attention_mask"][:2], d / "fp32.onnx")
    np.savez(d / "calib.npz", **data)
    quantkit.quantize(d / "fp32.onnx", calib=d / "calib.npz", output=d / "q.onnx", weights="int4", block_size=16,
                      accuracy_level=0, no_speed_guard=True, threads=1)
    taps, blocks = block_outputs(ir.load(d / "q.onnx"), d / "fp32.onnx", d, threads=1)
    return d, taps, blocks


def test_a_cut_batch_gives_the_loss_and_gradients_of_the_padded_one(encoder, monkeypatch):
    import onnxruntime as ort

    d, taps, blocks = encoder
    assert len(taps) == 3  # embeddings LayerNorm + 2 in the layer: per-token outputs in the loss
    fp32 = ort.InferenceSession(str(d / "fp32.onnx"), providers=["CPUExecutionProvider"])
    feed = _padded(np.random.default_rng(2), 8, 24, 3, 10)  # 10 real tokens of 24 at most
    cut = ["input_ids", "attention_mask"]
    short = trim.cut_batch(feed, cut)
    assert short["input_ids"].shape == (8, 10)
    # which outputs are per token, from the full batch: not the (batch, 10) logits, which the cut
    # batch's (8, 10) mask would pass for a sequence
    db, tokens = trim.probe(lambda f: fp32.run(None, f), feed, cut)
    tap_db, tap_tokens = trim.probe(blocks, feed, cut)
    assert min(db, tap_db) > trim.PROBE_DB and tokens + tap_tokens == [False, False, True, True, True]

    def loss_and_grads(g, f):
        b = loop.Batch([torch.from_numpy(f[n]) for n in g.inputs], [torch.from_numpy(t) for t in fp32.run(None, f)],
                       taps=[torch.from_numpy(t.astype(np.float16)) for t in blocks(f)], positions=padding_positions(f),
                       tokens=tokens + tap_tokens)
        g.zero_grad(set_to_none=True)
        loss = loop.loss_of(g(*b.inputs), b, 0.0)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in g.parameters() if p.grad is not None])

    g = QuantGraph(ir.load(d / "q.onnx"), taps=taps)
    assert sum(n.op_type == "MatMulNBits" for n in g.nodes) == 8  # q, k, v, o, ff1, ff2, pooler, classifier
    monkeypatch.setattr(loop, "PADDING_WEIGHT", 0.0)  # padded positions out of the loss entirely
    full_loss, full_grad = loss_and_grads(g, feed)
    cut_loss, cut_grad = loss_and_grads(g, short)
    assert full_loss > 1e-4 and cut_loss == pytest.approx(full_loss, rel=1e-5)
    assert full_grad.numel() > 10_000 and float(full_grad.norm()) > 0
    assert float((cut_grad - full_grad).norm() / full_grad.norm()) < 1e-4
    # with padding at its default weight the two differ by the padded positions' share only
    monkeypatch.setattr(loop, "PADDING_WEIGHT", 1e-3)
    weighted, _ = loss_and_grads(g, feed)
    assert weighted == pytest.approx(full_loss, rel=2e-2) and weighted != full_loss
