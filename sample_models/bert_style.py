"""A BERT-style encoder in torch, as Hugging Face writes BERT, for tests and benchmarks.

Token + position embeddings, LayerNorm, post-norm encoder layers with separate Q/K/V projections,
an additive attention mask filled with float32 min, GELU FFN, a tanh pooler and a classifier.
Outputs: `logits` and `pooled` (the mean of the last hidden states over real tokens).
`tokenize` turns scikit-learn's 8x8 digits into token sequences: 49 tokens, one per overlapping
2x2 patch (4 intensities hashed into the vocabulary), framed as [CLS] ... [SEP], padded to 128.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

VOCAB, SEQ, PAD, CLS, SEP = 8192, 128, 0, 1, 2


def tokenize(images: np.ndarray, vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) intensities 0..16 -> input_ids and attention_mask, int64 (N, 128)."""
    n = len(images)
    a, b = images[:, :-1, :-1], images[:, :-1, 1:]
    c, d = images[:, 1:, :-1], images[:, 1:, 1:]
    code = (((a * 17 + b) * 17 + c) * 17 + d).reshape(n, -1).astype(np.int64)
    tokens = 3 + (code * 2654435761 % (vocab - 3))  # a fixed hash into the vocabulary
    ids = np.full((n, SEQ), PAD, np.int64)
    ids[:, 0], ids[:, 1 : 1 + tokens.shape[1]], ids[:, 1 + tokens.shape[1]] = CLS, tokens, SEP
    mask = (ids != PAD).astype(np.int64)
    return ids, mask


def build(layers: int = 6, hidden: int = 384, heads: int = 12, ff: int = 1536, vocab: int = VOCAB):
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
            self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(SEQ, hidden)
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


def tiny():
    """A one-layer, 32-wide encoder with a 256-token vocabulary: for tests and the README's
    --model-class example (two inputs: int64 token ids and a float attention mask)."""
    return build(layers=1, hidden=32, heads=2, ff=64, vocab=256)
