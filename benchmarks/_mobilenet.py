"""A MobileNetV3-style CNN trained briefly on scikit-learn's digits, upscaled to 96x96 RGB so the
layers carry real compute: depthwise separable inverted-residual blocks, BatchNorm left in the
exported graph, HardSwish activations and HardSigmoid squeeze-excite, exported by the TorchScript
exporter as many converted CNNs are. Trained on first use, then cached in benchmarks/.cache/.

    python benchmarks/_mobilenet.py [--out benchmarks/.cache/mobilenet] [--epochs 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "mobilenet"
SIZE = 96


def images(x8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) intensities 0..16 -> (N, 3, 96, 96) float32 in [0, 1], nearest upscaling plus a
    fixed colour tint per channel so the three channels differ."""
    up = np.repeat(np.repeat(x8 / 16.0, SIZE // 8, axis=1), SIZE // 8, axis=2).astype(np.float32)
    return np.stack([up, up * 0.8 + 0.1, 1.0 - up], axis=1)


def build():
    from torch import nn

    def cba(cin, cout, k, stride=1, groups=1, act=nn.Hardswish):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
            self.act, self.gate = nn.ReLU(), nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))

    class Block(nn.Module):
        def __init__(self, cin, exp, cout, stride, se):
            super().__init__()
            layers = cba(cin, exp, 1) + cba(exp, exp, 3, stride, groups=exp)
            if se:
                layers.append(SE(exp))
            layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class MobileNet(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = [(16, 64, 24, 2, False), (24, 72, 24, 1, False), (24, 96, 40, 2, True), (40, 240, 40, 1, True),
                   (40, 240, 48, 1, True), (48, 288, 96, 2, True), (96, 576, 96, 1, True)]
            self.stem = nn.Sequential(*cba(3, 16, 3, 2))
            self.blocks = nn.Sequential(*[Block(*c) for c in cfg])
            self.head = nn.Sequential(*cba(96, 576, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(576, 256), nn.Hardswish(), nn.Linear(256, 10))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    return MobileNet()


def make(out: Path = CACHE, epochs: int = 4, force: bool = False) -> Path:
    if (out / "model.onnx").exists() and not force:
        return out
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    torch.set_num_threads(2)
    d = load_digits()
    tr_x, te_x, tr_y, te_y = train_test_split(d.images, d.target.astype(np.int64), test_size=360, random_state=0,
                                              stratify=d.target)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(images(tr_x)), torch.from_numpy(tr_y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    xe = images(te_x)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xe)).argmax(1).numpy() == te_y).mean() * 100)
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(xe[:2]),), str(out / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, opset_version=17)
    rng = np.random.default_rng(0)
    np.savez(out / "calib.npz", x=images(tr_x[rng.choice(len(tr_x), 256, replace=False)]))
    np.savez(out / "eval.npz", x=xe, labels=te_y)
    (out / "README.txt").write_text(f"MobileNetV3-style CNN, {epochs} epochs on digits at 96x96; "
                                    f"fp32 test accuracy {acc:.2f}%\n")
    print(f"mobilenet: fp32 test accuracy {acc:.2f}% -> {out / 'model.onnx'}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CACHE)
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    make(a.out, a.epochs, force=True)
