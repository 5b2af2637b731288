"""The benchmark encoder: sample_models/bert_style.py at BERT's shape for a small model
(6 layers x hidden 384 x 12 heads, 8,192-token vocabulary), trained briefly on a real task built
here (no downloads): scikit-learn's digits as token sequences, padded to 128 with an attention mask.

    python benchmarks/_encoder.py [--out benchmarks/.cache/encoder] [--epochs 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "encoder"
sys.path.insert(0, str(HERE.parent / "sample_models"))
from bert_style import build, export, tokenize  # noqa: E402


def train(model, ids, mask, labels, epochs: int, train_len: int = 64):
    """AdamW with linear warmup; sequences trimmed to the padded length actually used (the masked
    tail does not change the real tokens' outputs), which makes CPU training quick."""
    import torch

    ids, mask, labels = (torch.from_numpy(a) for a in (ids[:, :train_len], mask[:, :train_len], labels))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / 32)
    def warmup_then_decay(s):
        return min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay)
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
