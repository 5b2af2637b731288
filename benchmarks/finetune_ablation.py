"""One change at a time for int4 MiniLM fine-tuning: the loop of quantkit/finetune run directly on a
quantized ONNX model (no export, no pipeline), scored every N steps on the cache's 256 evaluation
sentences by the trained torch graph itself (which the written model matches, see BENCHMARKS.md).

    # the starting point: any quantkit int4 model of the cache's MiniLM ONNX, e.g. GPTQ + int8 embeddings
    C=benchmarks/.cache/real/minilm
    python -m quantkit quantize $C/model.onnx --calib $C/calib.npz \\
        --weights int4 --algorithm gptq --keep-int8 Gather -o gptq_g8.onnx --no-speed-guard --threads 1
    python benchmarks/finetune_ablation.py gptq_g8.onnx                       # score only (PTQ)
    python benchmarks/finetune_ablation.py gptq_g8.onnx --steps 300 --lr 2e-4 --weight-scale-lr-factor 0.1 \\
        [--no-float-params] [--blocks all|layers] [--every 50]

Training: the same 1,024 docstring sentences as benchmarks/finetune.py (1,008 in 124 batches of 8 train,
4 batches held out), teacher: the cache's fp32 ONNX. Single thread unless --threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._real_metrics import masked_mean_pool, row_cosine, token_sqnr_db  # noqa: E402

SEQ, TRAIN_SENTENCES, HELD_OUT = 50, 1024, 4


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def tap_teacher(fp32: Path, which: str):
    """Names of the block outputs (LayerNorm outputs: all 13, or the 7 that end a layer) and a
    session computing them in the fp32 model."""
    import onnx_ir as ir

    model = ir.load(fp32)
    lns = [n.outputs[0] for n in model.graph if n.op_type == "LayerNormalization"]
    chosen = lns if which == "all" else [v for v in lns if "attention" not in v.name]
    model.graph.outputs.clear()
    model.graph.outputs.extend(chosen)
    return [v.name for v in chosen], _session(ir.serde.serialize_model(model).SerializeToString())


def training_batches(fp32, taps: list[str], tap_sess, batch: int, masked: bool = False, trim: bool = False,
                     by_length: bool = False) -> list:
    """`masked`: the loss over real tokens only; `trim`: each batch cut to its longest sentence;
    `by_length`: sentences batched in order of length (the batches then shuffled, seed 0)."""
    import torch

    from benchmarks._real_data import sentences, tokenize
    from quantkit.finetune.loop import Batch

    ids, mask = tokenize(sentences()[384:384 + TRAIN_SENTENCES], max_len=SEQ)
    starts = list(range(0, len(ids) - batch + 1, batch))
    if by_length:
        order = np.argsort(mask.sum(1), kind="stable")
        ids, mask = ids[order], mask[order]
        starts = [starts[i] for i in np.random.default_rng(0).permutation(len(starts))]
    out = []
    for i in starts:
        n = int(mask[i:i + batch].sum(1).max()) if trim else ids.shape[1]
        feed = {"input_ids": ids[i:i + batch, :n], "attention_mask": mask[i:i + batch, :n]}
        blocks = [torch.from_numpy(t.astype(np.float16)) for t in tap_sess.run(taps, feed)] if taps else []
        out.append(Batch([torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])],
                         [torch.from_numpy(t) for t in fp32.run(None, feed)], taps=blocks,
                         positions=torch.from_numpy(feed["attention_mask"]) if masked else None))
    return out


def learned_rounding(g, fp32_path: Path, batches: list, iters: int) -> None:
    """Learned rounding of every MatMulNBits weight (quantkit/finetune/rounding.py, as --finetune runs
    it) against the fp32 model's inputs to it over the real tokens of `batches`."""
    import tempfile

    from quantkit.finetune import rounding

    t0 = time.process_time()
    feeds = [{"input_ids": b.inputs[0].numpy(), "attention_mask": b.inputs[1].numpy()} for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        layers = rounding.fp32_layers(g, fp32_path, feeds, [f["attention_mask"] for f in feeds], Path(tmp), 1)
    print(f"grams: {time.process_time() - t0:.0f} CPU s", flush=True)
    for r in rounding.learn_rounding(g, layers, iters):
        print(f"{r['name']}: {r['before']:.3e} -> {r['learned']:.3e}", flush=True)
    print(f"learned rounding: {time.process_time() - t0:.0f} CPU s", flush=True)


def scorer(g, fp32, eval_npz: Path):
    import torch

    ev = np.load(eval_npz)
    ids, mask = ev["input_ids"], ev["attention_mask"]
    chunks = [(ids[i:i + 32], mask[i:i + 32]) for i in range(0, len(ids), 32)]
    ref = np.concatenate([fp32.run(None, {"input_ids": a, "attention_mask": m})[0] for a, m in chunks])

    def score() -> dict:
        with torch.no_grad():
            got = np.concatenate([g(torch.from_numpy(a), torch.from_numpy(m))[0].numpy() for a, m in chunks])
        cos = row_cosine(masked_mean_pool(ref, mask), masked_mean_pool(got, mask))
        return {"pooled cosine": round(float(cos.mean()), 5), "worst": round(float(cos.min()), 4),
                "token SQNR dB": round(float(token_sqnr_db(ref, got, mask)), 2)}
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUANTKIT_REAL_CACHE", HERE / ".cache" / "real")))
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-scale-lr-factor", type=float, default=0.1)
    ap.add_argument("--no-float-params", action="store_true", help="train codes and scales only")
    ap.add_argument("--blocks", choices=("all", "layers"), help="also distil LayerNorm outputs")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--round-iters", type=int, default=0, help="learned rounding before training (--finetune-rounding)")
    ap.add_argument("--round-batches", type=int, default=32)
    ap.add_argument("--masked", action="store_true", help="loss over real tokens only")
    ap.add_argument("--trim", action="store_true", help="each batch cut to its longest sentence")
    ap.add_argument("--by-length", action="store_true", help="batch sentences of similar length together")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import onnx_ir as ir
    import torch

    from quantkit.finetune import loop
    from quantkit.finetune.graph import QuantGraph

    torch.set_num_threads(a.threads)
    fp32_path = a.cache / "minilm" / "model.onnx"
    fp32 = _session(str(fp32_path))
    taps, tap_sess = tap_teacher(fp32_path, a.blocks) if a.blocks else ([], None)
    g = QuantGraph(ir.load(a.model), taps=taps)
    if a.no_float_params:
        g.learn.float_params, g.learn.floats = torch.nn.ParameterList(), {}
    score = scorer(g.eval(), fp32, a.cache / "minilm" / "eval.npz")
    print("step 0", score(), g.learn.count(), f"{len(taps)} block outputs", flush=True)
    batches = training_batches(fp32, taps, tap_sess, a.batch, a.masked, a.trim, a.by_length)
    if a.round_iters:
        learned_rounding(g, fp32_path, batches[:a.round_batches], a.round_iters)
        print("rounded", score(), flush=True)
    if not a.steps:
        return
    held = [loop.Batch(b.inputs, b.teacher, positions=b.positions) for b in batches[-HELD_OUT:]]
    loop.WEIGHT_SCALE_LR_FACTOR = a.weight_scale_lr_factor
    t0 = time.process_time()

    def on_step(step: int, running: float, _held) -> None:
        if step % a.every == 0:
            print(f"step {step}", f"{time.process_time() - t0:.0f} CPU s", f"loss {running:.4f}", score(), flush=True)
    r = loop.train(g, batches[:-HELD_OUT], held, a.steps, a.lr, 0.0, on_step)
    print(f"kept step {r.best_step}", score(), flush=True)


if __name__ == "__main__":
    main()
