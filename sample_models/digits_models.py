"""The architectures of the bundled digits models. `--model-class sample_models.digits_models:DigitsCNN`
builds the CNN for the checkpoint sample_models/digits_cnn/model.state_dict.pt."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Conv + BatchNorm + depthwise/pointwise pair + a dense head: the shapes a mobile CNN has."""

    def __init__(self):
        super().__init__()

        def block(cin, cout, k, groups=1):
            return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16, 3),
            *block(16, 16, 3, groups=16),  # depthwise
            *block(16, 32, 1),  # pointwise
            nn.MaxPool2d(2),
            *block(32, 32, 3),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer written out, as BERT-style models are exported."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.ln1(x + self.out(y))
        return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class DigitsTransformer(nn.Module):
    """Each image row is a token: 8 tokens of 8 pixels, 2 encoder layers, mean-pooled head."""

    def __init__(self, d: int = 64, heads: int = 4, ff: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ff) for _ in range(layers))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))
