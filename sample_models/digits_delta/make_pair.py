"""The sample pair for `quantkit delta`: the bundled digits CNN (base) and the same network
fine-tuned on a shifted task (new): digit images moved one pixel right and down and dimmed to
60% brightness, as a camera that was knocked and aged would see them.

    pip install torch==2.13.0 onnxscript scikit-learn   # the CPU wheel; see README
    python sample_models/digits_delta/make_pair.py

Writes base.onnx (the weights of sample_models/digits_cnn/model.state_dict.pt), new.onnx (those
weights after 4 epochs of AdamW on the shifted training images), and eval.npz (the 360 held-out
images, shifted, with labels). Deterministic: fixed seeds, one thread, the same exporter for both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from digits_models import DigitsCNN  # noqa: E402
from train import data, export, train  # noqa: E402


def shifted(x: np.ndarray) -> np.ndarray:
    """One pixel right and down (zeros come in), brightness 60%."""
    out = np.zeros_like(x)
    out[..., 1:, 1:] = x[..., :-1, :-1]
    return (0.6 * out).astype(np.float32)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_tr, x_te, y_tr, y_te = data()
    xs_tr, xs_te = shifted(x_tr), shifted(x_te)
    model = DigitsCNN()
    model.load_state_dict(torch.load(HERE.parent / "digits_cnn" / "model.state_dict.pt", weights_only=True))
    model.eval()
    example = torch.from_numpy(x_te[:2])
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"base: {accuracy(model, x_te, y_te):.2f}% on digits, {accuracy(model, xs_te, y_te):.2f}% shifted")
    export(model, example, args.out / "base.onnx", "torchscript")
    torch.manual_seed(0)
    model = train(model, xs_tr, y_tr, epochs=4, lr=1e-3)
    print(f"new:  {accuracy(model, x_te, y_te):.2f}% on digits, {accuracy(model, xs_te, y_te):.2f}% shifted")
    export(model, example, args.out / "new.onnx", "torchscript")
    np.savez(args.out / "eval.npz", x=xs_te, labels=y_te)


if __name__ == "__main__":
    main()
