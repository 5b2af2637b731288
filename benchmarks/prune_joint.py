"""Experiment (issue 14, stop 25): a joint final phase on a pruned MiniLM. The FFN parameters of
every layer of an already pruned (and block-trained) all-MiniLM-L6-v2 ONNX model are trained
together in PyTorch, distilled from the unpruned model towards what the target reads: the
mask-aware mean-pooled, L2-normalized sentence vector (1 - cosine), plus `--token` times the
token-level mean squared error of the last hidden state.

    python benchmarks/prune_joint.py PRUNED.onnx OUT.onnx [--steps 600] [--lr 1e-5] [--token 1.0]
                                     [--params ffn|all] [--layers 0 1 2 3 4 5] [--calib-sentences 2352]
                                     [--batch 32]

--layers: only these layers' parameters train (e.g. `--layers 5`: the last block alone, towards the
pooled vector); --params all: every parameter of those layers (attention and LayerNorms too), not
only the FFN's two MatMuls and biases.

Training data: the N `training_calib` sentences (prune_sweep.py: the same sentences the pruning was
calibrated on). Held-out check (every --every steps, the best state is kept): the cache's 128
calibration sentences (calib.npz), which neither the pruning nor this training sees, so the check
is not biased towards the refit's state (the block training's own check holds out part of the
refit's data). Scored on the cache's 256 evaluation sentences (benchmarks/real_models.py's metric).
The unpruned model is the package's checkpoint (transformers BertModel, eager attention, the model
benchmarks/_real_data.py exported); the pruned weights are read from the ONNX graph by node name.
torch runs on one thread (--threads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402
from prune_sweep import DEFAULT_CACHE, training_calib  # noqa: E402

FFN = ("intermediate/dense", "output/dense")  # node-name parts of the two MatMuls (+ bias Adds) per layer


def ffn_weights(onnx_path: Path) -> dict[tuple[int, str], tuple[str, np.ndarray, str, np.ndarray]]:
    """(layer, part) -> (weight initializer name, weight [in, out], bias initializer name, bias)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    out = {}
    for layer in range(6):
        for part in FFN:
            mm = nodes[f"/bert/encoder/layer.{layer}/{part}/MatMul"]
            add = nodes[f"/bert/encoder/layer.{layer}/{part}/Add"]
            b = next(i for i in add.input if i in init)
            out[(layer, part)] = (mm.input[1], init[mm.input[1]], b, init[b])
    return out


def student_from(weights: dict, torch):
    """The package's BertModel with each layer's FFN resized to the pruned widths and set to the
    pruned model's weights."""
    from _real_data import minilm_dir
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False)
    for layer, mod in enumerate(bert.encoder.layer):
        for part, lin in (("intermediate/dense", "intermediate"), ("output/dense", "output")):
            _, w, _, b = weights[(layer, part)]
            new = torch.nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                new.weight.copy_(torch.from_numpy(w.T.copy()))
                new.bias.copy_(torch.from_numpy(b.copy()))
            getattr(mod, lin).dense = new
    return bert


def pooled(h, mask):
    w = mask[..., None].to(h.dtype)
    return (h * w).sum(1) / w.sum(1).clamp_min(1)


def batches(ids, mask, size: int, rng):
    """Batches of `size` sentences, cut to their longest real length."""
    order = rng.permutation(len(ids))
    for i in range(0, len(order) - size + 1, size):
        sel = order[i:i + size]
        n = int(mask[sel].sum(1).max())
        yield ids[sel, :n], mask[sel, :n]


def outputs(model, ids, mask, torch, size: int = 64):
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.from_numpy(ids[i:i + size]),
                                attention_mask=torch.from_numpy(mask[i:i + size])).last_hidden_state
                          for i in range(0, len(ids), size)])


def held_error(student, ids, mask, ref_pooled, torch) -> float:
    p = pooled(outputs(student, ids, mask, torch), torch.from_numpy(mask))
    return float((1 - torch.nn.functional.cosine_similarity(p, ref_pooled, dim=-1)).mean())


def train(student, teacher, data: dict, held: dict, args, torch) -> dict:
    """Adam on the chosen parameters with a cosine decay; keeps the best held-out state."""
    layers = {f"encoder.layer.{i}." for i in args.layers}
    params = [p for n, p in student.named_parameters() if any(n.startswith(x) for x in layers)
              and (args.params == "all" or "intermediate" in n or ("output.dense" in n and "attention" not in n))]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    held_ref = pooled(outputs(teacher, held["input_ids"], held["attention_mask"], torch),
                      torch.from_numpy(held["attention_mask"]))
    best = start = held_error(student, held["input_ids"], held["attention_mask"], held_ref, torch)
    best_state, best_step, history, step = {k: v.clone() for k, v in student.state_dict().items()}, 0, [], 0
    rng = np.random.default_rng(0)
    while step < args.steps:
        for ids, mask in batches(data["input_ids"], data["attention_mask"], args.batch, rng):
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            with torch.no_grad():
                ref = teacher(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            got = student(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            w = mask_t[..., None].float()
            loss = (1 - torch.nn.functional.cosine_similarity(pooled(got, mask_t), pooled(ref, mask_t), dim=-1)).mean()
            if args.token:
                loss = loss + args.token * (((got - ref) ** 2) * w).sum() / w.sum() / got.shape[-1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                err = held_error(student, held["input_ids"], held["attention_mask"], held_ref, torch)
                history.append((step, round(err, 6)))
                print(f"step {step}: held-out pooled 1-cos {err:.6f}", file=sys.stderr, flush=True)
                if err < best:
                    best, best_step = err, step
                    best_state = {k: v.clone() for k, v in student.state_dict().items()}
            if step >= args.steps:
                break
    student.load_state_dict(best_state)
    return {"held_out_start": start, "held_out_best": best, "best_step": best_step, "history": history}


def write_back(src: Path, dst: Path, student, weights: dict) -> None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    init = {t.name: t for t in m.graph.initializer}
    for layer, mod in enumerate(student.encoder.layer):
        for part, lin in (("intermediate/dense", mod.intermediate.dense), ("output/dense", mod.output.dense)):
            wname, _, bname, _ = weights[(layer, part)]
            init[wname].CopyFrom(numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), wname))
            init[bname].CopyFrom(numpy_helper.from_array(lin.bias.detach().numpy().copy(), bname))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--token", type=float, default=1.0, help="weight of the token-level MSE (0: pooled loss only)")
    ap.add_argument("--params", choices=["ffn", "all"], default="ffn")
    ap.add_argument("--layers", type=int, nargs="+", default=list(range(6)), help="the layers trained (default all)")
    ap.add_argument("--calib-sentences", type=int, default=2352)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.cache / "minilm"
    with np.load(training_calib(args.calib_sentences)) as z:
        data = {k: z[k] for k in ("input_ids", "attention_mask")}
    with np.load(d / "calib.npz") as z:
        held = {k: z[k] for k in ("input_ids", "attention_mask")}
    weights = ffn_weights(args.pruned)
    from _real_data import minilm_dir
    from transformers import BertModel

    teacher = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False).eval()
    student = student_from(weights, torch).eval()  # eval: no dropout
    evalset, _, _ = real_models.eval_set("minilm", d)
    ref = real_models.run_eval("minilm", d / "model.onnx", evalset)
    before = real_models.metrics("minilm", ref, outputs(student, evalset["input_ids"], evalset["attention_mask"],
                                                        torch).numpy(), evalset, [], None)
    t, load0 = time.perf_counter(), os.getloadavg()[0]
    record = train(student, teacher, data, held, args, torch)
    seconds = time.perf_counter() - t
    write_back(args.pruned, args.out, student, weights)
    after = real_models.metrics("minilm", ref, real_models.run_eval("minilm", args.out, evalset), evalset, [], None)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "before (torch)": before, "after (onnx)": after,
              "seconds": round(seconds, 1), "load": [round(load0, 1), round(os.getloadavg()[0], 1)], **record}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
