"""FedAvg on scikit-learn's digits with a numpy MLP, each client's update sent through
`quantkit delta` (and decoded by the same code `quantkit apply` uses).

N clients hold label-skewed shards (Dirichlet(0.5) over the classes, seeded); each round every
client trains one local epoch of SGD from the global model, sends the compressed update
(local - global), and the server adds the mean of the decoded updates to the global model.
Bytes sent are the sizes of the .qkd files (for "none": 4 bytes per parameter, the raw float32
update).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

SIZES = (64, 256, 256, 10)


def digits_split(clients: int, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    rng = np.random.default_rng(seed)
    shards = [[] for _ in range(clients)]
    for c in range(10):  # label skew: each class spread over the clients by Dirichlet(0.5) shares
        idx = rng.permutation(np.flatnonzero(y_tr == c))
        cuts = (np.cumsum(rng.dirichlet([0.5] * clients)) * len(idx)).astype(int)[:-1]
        for s, part in zip(shards, np.split(idx, cuts)):
            s.extend(part.tolist())
    return [(x_tr[s], y_tr[s]) for s in map(np.array, shards)], (x_te, y_te)


def init(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {}
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        w[f"w{i}"] = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        w[f"b{i}"] = np.zeros(b, np.float32)
    return w


def forward(w, x):
    acts = [x]
    for i in range(len(SIZES) - 1):
        z = acts[-1] @ w[f"w{i}"] + w[f"b{i}"]
        acts.append(np.maximum(z, 0) if i < len(SIZES) - 2 else z)
    return acts


def local_train(w, x, y, lr: float, epochs: int, rng) -> dict[str, np.ndarray]:
    w = {k: v.copy() for k, v in w.items()}
    layers = len(SIZES) - 1
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 16)):
            acts = forward(w, x[idx])
            p = np.exp(acts[-1] - acts[-1].max(axis=1, keepdims=True))
            g = p / p.sum(axis=1, keepdims=True)
            g[np.arange(len(idx)), y[idx]] -= 1
            g /= len(idx)
            for i in reversed(range(layers)):
                gw, gb = acts[i].T @ g, g.sum(axis=0)
                if i:
                    g = (g @ w[f"w{i}"].T) * (acts[i] > 0)
                w[f"w{i}"] -= lr * gw
                w[f"b{i}"] -= lr * gb
    return w


def accuracy(w, x, y) -> float:
    return float((forward(w, x)[-1].argmax(1) == y).mean() * 100)


def save_onnx(w, path: Path) -> None:
    nodes, layers = [], len(SIZES) - 1
    for i in range(layers):
        src = "x" if i == 0 else f"h{i}"
        out = "logits" if i == layers - 1 else f"z{i + 1}"
        nodes.append(helper.make_node("Gemm", [src, f"w{i}", f"b{i}"], [out]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"]))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", SIZES[0]])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", SIZES[-1]])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@dataclass
class Scheme:
    name: str
    method: str | None  # None: the raw float32 update
    feedback: bool = False
    args: dict | None = None


def run(scheme: Scheme, clients: int, rounds: int, lr: float, epochs: int) -> dict:
    """One FedAvg run; returns accuracy per round and bytes sent."""
    from quantkit.config import Gates
    from quantkit.delta import container, tensors
    from quantkit.delta.apply import apply_records
    from quantkit.delta.make import DeltaConfig, make_delta

    shards, (x_te, y_te) = digits_split(clients)
    w = init()
    rng = np.random.default_rng(1)
    sent, curve = 0, []
    with tempfile.TemporaryDirectory(prefix="fedavg-") as tmp:
        tmp = Path(tmp)
        for c, (x, y) in enumerate(shards):
            np.savez(tmp / f"eval{c}.npz", x=x, labels=y)
        for _ in range(rounds):
            g_path = tmp / "global.onnx"
            save_onnx(w, g_path)
            base = tensors.read(g_path)
            total = {k: np.zeros_like(v, np.float64) for k, v in w.items()}
            for c, (x, y) in enumerate(shards):
                local = local_train(w, x, y, lr, epochs, rng)
                if scheme.method is None:
                    sent += sum(v.nbytes for v in local.values())
                    for k in w:
                        total[k] += local[k].astype(np.float64) - w[k]
                    continue
                l_path, u_path = tmp / "local.onnx", tmp / "u.qkd"
                save_onnx(local, l_path)
                auto = scheme.method == "auto"
                cfg = DeltaConfig(base=g_path, new=l_path, output=u_path, method=scheme.method, exact_below=0,
                                  residual=tmp / f"state{c}.npz" if scheme.feedback else None,
                                  eval=tmp / f"eval{c}.npz" if auto else None, force=True, zip_baseline=False,
                                  gates=Gates(**scheme.args) if auto else Gates(),
                                  **({} if auto else (scheme.args or {})))
                make_delta(cfg)
                data = u_path.read_bytes()
                sent += len(data)
                got = apply_records(base, container.unpack(data, u_path), u_path)
                for k in w:
                    total[k] += got[k].astype(np.float64) - w[k]
            w = {k: (v + total[k] / clients).astype(np.float32) for k, v in w.items()}
            curve.append(accuracy(w, x_te, y_te))
    params = sum(v.size for v in w.values())
    return {"scheme": scheme.name, "accuracy": curve, "bytes": sent, "params": params,
            "updates": clients * rounds}
