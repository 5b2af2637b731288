"""Train the bundled sample models on scikit-learn's digits and export them to ONNX.

    pip install torch==2.13.0 onnxscript scikit-learn   # the CPU wheel; see README
    python sample_models/train.py

Writes, for each model, sample_models/<name>/model.onnx plus calib.npz (256 training images,
input only) and eval.npz (the 360 held-out images with their labels); for the CNN also
model.torchscript.pt, model.pt2 (torch.export) and model.state_dict.pt (for
--model-class sample_models.digits_models:DigitsCNN). Deterministic: fixed seeds, one thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_models import DigitsCNN, DigitsTransformer  # noqa: E402

HERE = Path(__file__).resolve().parent


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


def save_torch_forms(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    """The same trained CNN in each PyTorch form quantkit reads: a TorchScript archive, a
    torch.export program (dynamic batch), and a state_dict for --model-class."""
    torch.jit.save(torch.jit.trace(model, example), str(out / "model.torchscript.pt"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(out / "model.pt2"))
    torch.save(model.state_dict(), out / "model.state_dict.pt")


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
        if name == "digits_cnn":
            save_torch_forms(model, torch.from_numpy(x_te[:2]), out)
        np.savez(out / "calib.npz", x=calib)
        np.savez(out / "eval.npz", x=x_te, labels=y_te)
        print(f"{name}: test accuracy {acc:.2f}% -> {out / 'model.onnx'}")


if __name__ == "__main__":
    main()
