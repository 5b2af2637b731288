"""A BERT-style encoder trained briefly on a real task, built here (no downloads).

Task: scikit-learn's digits as text. Each 8x8 image becomes 49 tokens, one per overlapping 2x2
patch (4 pixel intensities hashed into an 8,192-token vocabulary), framed as
[CLS] tokens [SEP] and padded to 128 with an attention mask. The model is BERT's architecture at
6 layers x hidden 384 x 12 heads: token + position embeddings, LayerNorm, post-norm encoder
layers with separate Q/K/V projections, an additive mask filled with float32 min (as Hugging Face
builds it), GELU FFN, a tanh pooler and a classifier. Outputs: `logits` and `pooled` (the mean of
the last hidden states over real tokens).

    python benchmarks/_encoder.py [--out benchmarks/.cache/encoder] [--epochs 3]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "encoder"
VOCAB, SEQ, PAD, CLS, SEP = 8192, 128, 0, 1, 2


def tokenize(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) intensities 0..16 -> input_ids and attention_mask, int64 (N, 128)."""
    n = len(images)
    a, b = images[:, :-1, :-1], images[:, :-1, 1:]
    c, d = images[:, 1:, :-1], images[:, 1:, 1:]
    code = (((a * 17 + b) * 17 + c) * 17 + d).reshape(n, -1).astype(np.int64)
    tokens = 3 + (code * 2654435761 % (VOCAB - 3))  # a fixed hash into the vocabulary
    ids = np.full((n, SEQ), PAD, np.int64)
    ids[:, 0], ids[:, 1 : 1 + tokens.shape[1]], ids[:, 1 + tokens.shape[1]] = CLS, tokens, SEP
    mask = (ids != PAD).astype(np.int64)
    return ids, mask


def build(layers: int = 6, hidden: int = 384, heads: int = 12, ff: int = 1536):
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.o = nn.Linear(hidden, hidden)
            self.dh = hidden // heads

        def forward(self, x, ext_mask):
            b, t, _ = x.shape

            def split(y):
                return y.view(b, t, heads, self.dh).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + ext_mask
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, hidden)
            return self.o(ctx)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.ln1 = Attention(), nn.LayerNorm(hidden, eps=1e-12)
            self.ff1, self.ff2, self.ln2 = nn.Linear(hidden, ff), nn.Linear(ff, hidden), nn.LayerNorm(hidden, eps=1e-12)

        def forward(self, x, ext_mask):
            x = self.ln1(x + self.att(x, ext_mask))
            return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(VOCAB, hidden), nn.Embedding(SEQ, hidden)
            self.ln = nn.LayerNorm(hidden, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.pooler, self.cls = nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            x = self.ln(self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))[None])
            m = attention_mask.to(x.dtype)
            ext = (1.0 - m[:, None, None, :]) * torch.finfo(torch.float32).min
            for layer in self.layers:
                x = layer(x, ext)
            logits = self.cls(torch.tanh(self.pooler(x[:, 0])))
            pooled = (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True)
            return logits, pooled

    return Encoder()


def export(model, ids: np.ndarray, mask: np.ndarray, path: Path, exporter: str = "dynamo") -> Path:
    import torch

    args = (torch.from_numpy(ids), torch.from_numpy(mask))
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits", "pooled"])
    if exporter == "torchscript":
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "logits": {0: "batch"}, "pooled": {0: "batch"}}, **names)
    else:
        batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=SEQ)
        prog = torch.onnx.export(model, args, dynamo=True, optimize=True,
                                 dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), **names)
        prog.save(str(path))
    return path


def train(model, ids, mask, labels, epochs: int, train_len: int = 64):
    """AdamW with linear warmup; sequences trimmed to the padded length actually used (the masked
    tail does not change the real tokens' outputs), which makes CPU training quick."""
    import torch

    ids, mask, labels = (torch.from_numpy(a) for a in (ids[:, :train_len], mask[:, :train_len], labels))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / 32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=g).split(32):
            opt.zero_grad()
            logits, _ = model(ids[idx], mask[idx])
            torch.nn.functional.cross_entropy(logits, labels[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


def make(out: Path = CACHE, epochs: int = 3, force: bool = False) -> Path:
    """Train, export and write model.onnx, calib.npz (256 train samples), eval.npz (360 test
    samples with labels) into `out`; reuse them when already there."""
    if (out / "model.onnx").exists() and not force:
        return out
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    images, y = digits.images.astype(np.int64), digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, y, test_size=360, random_state=0, stratify=y)
    tr_ids, tr_mask = tokenize(tr_x)
    te_ids, te_mask = tokenize(te_x)
    model = train(build(), tr_ids, tr_mask, tr_y, epochs)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(te_ids), torch.from_numpy(te_mask))
    acc = float((logits.argmax(1).numpy() == te_y).mean() * 100)
    out.mkdir(parents=True, exist_ok=True)
    export(model, te_ids[:2], te_mask[:2], out / "model.onnx")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(tr_ids), 256, replace=False)
    np.savez(out / "calib.npz", input_ids=tr_ids[pick], attention_mask=tr_mask[pick])
    np.savez(out / "eval.npz", input_ids=te_ids, attention_mask=te_mask, labels=te_y)
    (out / "README.txt").write_text(f"BERT-style encoder 6x384x12 trained {epochs} epochs on digits-as-tokens; "
                                    f"fp32 test accuracy {acc:.2f}%\n")
    print(f"encoder: fp32 test accuracy {acc:.2f}% -> {out / 'model.onnx'}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CACHE)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    make(a.out, a.epochs, force=True)
