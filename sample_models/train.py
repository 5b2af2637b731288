"""Train the bundled sample models on scikit-learn's digits and export them to ONNX.

    pip install torch==2.13.0 onnxscript scikit-learn   # the CPU wheel; see README
    python sample_models/train.py

Writes, for each model, sample_models/<name>/model.onnx plus calib.npz (256 training images,
input only) and eval.npz (the 360 held-out images with their labels). Deterministic: fixed seeds,
one thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent


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


def data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # N, 1, 8, 8 in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=360, random_state=0, stratify=y)


def train(model: nn.Module, x, y, epochs: int, lr: float) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    """Both torch.onnx exporters, as users meet them. The TorchScript one with training=PRESERVE
    leaves BatchNormalization unfolded and routes weights through Identity nodes, like many
    converted CNNs; the dynamo one gives the graph a current torch user gets."""
    if exporter == "torchscript":
        torch.onnx.export(
            model, (example,), str(path), input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE, opset_version=17,
        )
        return
    batch = torch.export.Dim("batch", min=1, max=4096)
    onnx_program = torch.onnx.export(
        model, (example,), input_names=["x"], output_names=["logits"],
        dynamic_shapes=({0: batch},), dynamo=True, optimize=True,
    )
    onnx_program.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_tr, x_te, y_tr, y_te = data()
    rng = np.random.default_rng(0)
    calib = x_tr[rng.choice(len(x_tr), 256, replace=False)]
    for name, make, epochs, lr, exporter in [("digits_cnn", DigitsCNN, 30, 3e-3, "torchscript"),
                                             ("digits_transformer", DigitsTransformer, 60, 2e-3, "dynamo")]:
        torch.manual_seed(0)
        model = train(make(), x_tr, y_tr, epochs, lr)
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean() * 100
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        export(model, torch.from_numpy(x_te[:2]), out / "model.onnx", exporter)
        np.savez(out / "calib.npz", x=calib)
        np.savez(out / "eval.npz", x=x_te, labels=y_te)
        print(f"{name}: test accuracy {acc:.2f}% -> {out / 'model.onnx'}")


if __name__ == "__main__":
    main()
