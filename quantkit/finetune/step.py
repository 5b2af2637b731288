"""--finetune in the pipeline: after placement and ranges are chosen and the quantized graph is
built, train it (graph.py, loop.py) against the fp32 model and write the trained codes and scales
back (export.py). Returns the report's `finetune` section."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import runtime
from quantkit.calibrate.data import LABELS, assign_batch_axes, class_ids, complete_batches
from quantkit.config import RunConfig
from quantkit.errors import ConfigError, InputError
from quantkit.finetune import trim
from quantkit.load.onnx import input_specs
from quantkit.load.source import open_data

HELDOUT_FRACTION = 0.2
HELDOUT_MAX = 8  # batches: scored ~20 times per run, so kept small
ROUNDING_BATCHES = 32  # training batches whose layer inputs the learned rounding reconstructs


def padding_positions(feed: dict[str, np.ndarray]):
    """(batch, sequence) 0/1 of the real tokens, when the model reads an attention_mask of 0s and 1s;
    outputs laid out (batch, sequence, ...) are then distilled on the real tokens only (padded
    positions' outputs are what a mean-pooled embedding masks out and no user reads)."""
    import torch

    m = feed.get(trim.PADDING_MASK)
    if not trim.is_padding_mask(m):
        return None
    return torch.from_numpy(np.ascontiguousarray(m.astype(np.int64)))


def check(cfg: RunConfig) -> None:
    """Refusals that need no work: --finetune trains PyTorch models (not TorchScript), in static
    int8 or weight-only form, from data."""
    if cfg.finetune is None:
        return
    from quantkit.load import torch as torch_load

    model = Path(cfg.model)
    if not (model.is_file() and torch_load.is_torch_file(model)):
        raise ConfigError(f"--finetune trains PyTorch models (a checkpoint with --model-class, or a torch.export "
                          f".pt2 program); {model} is ONNX: quantize it without --finetune")
    if torch_load.kind_of(model) == "torchscript":
        raise ConfigError(f"--finetune cannot train the TorchScript archive {model}: save a torch.export .pt2 "
                          "program or a state_dict with --model-class instead")
    if cfg.quant.activations == "dynamic":
        raise ConfigError("--finetune applies to static int8 (--activations uint8/int8) and weight-only "
                          "quantization, not to --activations dynamic")
    if cfg.finetune.data is None and cfg.data.calib is None:
        raise ConfigError("--finetune needs training data: pass --finetune-data or --calib")


def _feeds(cfg: RunConfig, inputs) -> tuple[list[dict[str, np.ndarray]], list, str]:
    """The training data's batches as arrays (the graph's inputs, and labels when the data has them),
    the graph's input specs and the data's path."""
    path = cfg.finetune.data or cfg.data.calib
    specs = assign_batch_axes(input_specs(inputs.model), cfg.data.batch_axes)
    source = open_data(path, specs, cfg.data.preprocess)
    if cfg.finetune.labels_weight > 0 and not source.has_labels:
        raise InputError(f"--finetune-labels-weight needs labels: add a '{LABELS}' array to {path}")
    names = [s.name for s in specs]
    feeds = [{k: b[k] for k in [*names, LABELS] if k in b}
             for b in complete_batches(source, inputs.batch, None, inputs.fixed)]
    if not feeds:
        raise InputError(f"{path} holds fewer samples than one batch of {inputs.batch}")
    return feeds, specs, str(path)


def _split(batches: list) -> tuple[list, list, list[str]]:
    """Training and held-out batches (the last ones, at most HELDOUT_MAX)."""
    if len(batches) < 2:
        return batches, list(batches), [
            "--finetune: the data holds one batch, so the held-out loss is measured on the training batch (give "
            "more data for a real held-out set)"]
    n = min(HELDOUT_MAX, max(1, round(len(batches) * HELDOUT_FRACTION)))
    return batches[:-n], batches[-n:], []


def _trimmed(g, specs: list, sets: tuple[list[dict], list[dict]], teachers: tuple[Callable, Callable | None]):
    """Training batches regrouped by length and cut after their last real token, held-out ones cut,
    when trim.py finds the model's padding masked; the report's `trimming` entry; and which outputs
    (the teacher's, then the block outputs) are per token (None when not trimmed)."""
    (train, held), first = sets, sets[0][0]
    cut, reason = trim.plan(specs, first)
    full = int(np.shape(first[trim.PADDING_MASK])[1]) if trim.PADDING_MASK in first else None
    dynamic = sorted({n.op_type for n in g.nodes} & trim.WHOLE_TENSOR_RANGES)
    if cut and dynamic:
        cut, reason = [], f"the quantized graph takes ranges over whole tensors at run time ({', '.join(dynamic)})"
    db, tokens = None, None
    if cut:
        grouped = trim.by_length(train, {s.name for s in specs if s.batch_axis == 0} | ({LABELS} & set(first)))
        shortest = min(grouped, key=lambda f: int(trim.real_lengths(f[trim.PADDING_MASK]).max()))
        reason, db, tokens = _probe(g, specs, shortest, cut, teachers)
        if reason is None:
            train, held = [trim.cut_batch(f, cut) for f in grouped], [trim.cut_batch(f, cut) for f in held]
        else:
            cut, tokens = [], None
    lengths = [int(np.shape(f[trim.PADDING_MASK])[1]) for f in train] if cut else []
    db = None if db is None or math.isinf(db) else db  # inf: bit for bit (the JSON report has no inf)
    return train, held, {"applied": bool(cut), "reason": reason, "inputs": cut, "probe_sqnr_db": db,
                         "length": full, "mean_length": float(np.mean(lengths)) if lengths else None}, tokens


def _probe(g, specs: list, feed: dict, cut: list[str], teachers: tuple[Callable, Callable | None]):
    """(why not trimmed or None, the fp32 model's dB cut against full, per-token outputs): the fp32
    model (outputs and block outputs) must not see the padding, the quantized graph must run the cut batch."""
    def on_inputs(run):
        return lambda f: run({s.name: f[s.name] for s in specs})

    db, tokens = trim.probe(on_inputs(teachers[0]), feed, cut)
    if teachers[1] is not None:
        tap_db, tap_tokens = trim.probe(on_inputs(teachers[1]), feed, cut)
        db, tokens = min(db, tap_db), tokens + tap_tokens
    if db == -math.inf:
        return "the fp32 model cannot run a shorter sequence", None, None
    if db < trim.PROBE_DB:
        return (f"the fp32 model's outputs at real tokens change when padding is cut ({db:.1f} dB against the full "
                f"length, {trim.PROBE_DB:g} needed): padding reaches them"), db, None
    if trim.probe(trim.graph_runner(g), feed, cut)[0] == -math.inf:
        return "the quantized graph cannot run a shorter sequence", db, None
    return None, db, tokens


def _batches(feeds: list[dict], specs: list, path: str, teacher: Callable[[dict], list[np.ndarray]],
             blocks: Callable[[dict], list[np.ndarray]] | None = None, tokens: list[bool] | None = None) -> list:
    """loop.Batch of each feed with the fp32 model's outputs (and block outputs when `blocks` is given,
    kept as float16: only what the loss compares against)."""
    import torch

    from quantkit.finetune.loop import Batch

    out = []
    for b in feeds:
        feed = {s.name: b[s.name] for s in specs}
        ref = teacher(feed)
        labels = torch.from_numpy(class_ids(b[LABELS], f"{path} '{LABELS}'")) if LABELS in b else None
        taps = [torch.from_numpy(np.asarray(t, np.float16)) for t in blocks(feed)] if blocks is not None else []
        out.append(Batch([torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in specs],
                         [torch.from_numpy(np.asarray(r)) if np.asarray(r).dtype.kind == "f" else None for r in ref],
                         labels, taps, padding_positions(feed), tokens))
    return out


def agreement(g, qmodel: ir.Model, feed: dict[str, np.ndarray], workdir: Path) -> dict:
    """The shipped onnxruntime model against the trained torch graph on one batch (as the data holds
    it: not trimmed)."""
    import torch

    sess = runtime.session(qmodel, workdir, tag="fine-tuned")
    feed = {n: np.ascontiguousarray(feed[n]) for n in g.inputs}
    got = sess.run(None, feed)
    with torch.no_grad():
        ref = [t.numpy() for t in g(*[torch.from_numpy(feed[n]) for n in g.inputs])]
    sig = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in ref)
    err = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(o, np.float64)) ** 2)) for r, o in zip(ref, got))
    return {"sqnr_db": float(10 * np.log10(sig / err)) if err > 0 else None,
            "max_abs_diff": max(float(np.abs(np.asarray(r, np.float64) - o).max(initial=0)) for r, o in zip(ref, got))}


def _round(cfg: RunConfig, g, fp32_path: Path, train_set: list, heldout: list, workdir: Path, status) -> dict | None:
    """Learned rounding of the int4 MatMulNBits weights (rounding.py) on up to ROUNDING_BATCHES training
    batches, before the end-to-end training; the report's `rounding` entry, None when nothing rounds.
    Ctrl-C stops it between layers (the layers done keep their learned codes)."""
    import time

    from quantkit.finetune import rounding
    from quantkit.finetune.loop import _interrupted_by_user, heldout_loss

    iters = cfg.finetune.rounding
    if not iters or not any(n.op_type == "MatMulNBits" for n in g.nodes):
        return None
    t0 = time.perf_counter()
    status("fine-tuning: learning the rounding of the int4 weights")
    use = train_set[:ROUNDING_BATCHES]
    feeds = [{n: t.numpy() for n, t in zip(g.inputs, b.inputs)} for b in use]
    positions = [None if b.positions is None else b.positions.numpy() for b in use]
    layers = rounding.fp32_layers(g, fp32_path, feeds, positions, workdir, cfg.threads)
    held_before, interrupted = heldout_loss(g, heldout, cfg.finetune.labels_weight), False
    done: list[dict] = []
    try:
        rounding.learn_rounding(g, layers, iters, done.append)
    except KeyboardInterrupt as e:
        if not _interrupted_by_user(e):
            raise
        interrupted = True
    held_after = heldout_loss(g, heldout, cfg.finetune.labels_weight)
    return {"iterations": iters, "layers": len(layers), "layers_done": len(done), "interrupted": interrupted,
            "layers_improved": sum(r["learned"] < r["before"] for r in done), "batches": len(use),
            "layer_error_before": float(np.mean([r["before"] for r in done])) if done else None,
            "layer_error_after": float(np.mean([r["after"] for r in done])) if done else None,
            "heldout_loss_before": held_before, "heldout_loss_after": held_after,
            "seconds": time.perf_counter() - t0}


def _train(cfg: RunConfig, g, train_set: list, heldout: list, status, progress, skip: bool):
    from quantkit.finetune.loop import Trained, heldout_loss, train

    ft = cfg.finetune
    if skip:  # Ctrl-C during the rounding: no training, the rounded model is written
        held = heldout_loss(g, heldout, ft.labels_weight)
        return Trained(interrupted=True, heldout_before=held, heldout_best=held)
    progress.start("fine-tuning", ft.steps, unit="steps")

    def on_step(step: int, running: float, held: float | None) -> None:
        progress.advance(1)
        if held is not None:
            status(f"fine-tuning step {step}/{ft.steps}: running loss {running:.4g}, held-out loss {held:.4g}")

    result = train(g, train_set, heldout, ft.steps, ft.lr, ft.labels_weight, on_step)
    progress.finish()
    return result


def finetune(cfg: RunConfig, inputs, qmodel: ir.Model, workdir: Path, status, progress,
             evaluate: Callable[[ir.Model], list[dict]]) -> tuple[ir.Model, dict]:
    import torch

    from quantkit.finetune.blocks import block_outputs
    from quantkit.finetune.export import write_back
    from quantkit.finetune.graph import QuantGraph

    QuantGraph(qmodel)  # refuses ops it cannot run before any work
    status("fine-tuning: scoring the quantized model before training")
    before = evaluate(qmodel)
    taps, blocks = block_outputs(qmodel, inputs.source.onnx_path, workdir, cfg.threads)
    g = QuantGraph(qmodel, taps=taps, keep_zeros=cfg.prune.sparse)
    reference = inputs.source.reference or (lambda feed: inputs.fp32.run(None, feed))
    feeds, specs, path = _feeds(cfg, inputs)
    train_feeds, held_feeds, notes = _split(feeds)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        train_feeds, short_held, trimming, tokens = _trimmed(g, specs, (train_feeds, held_feeds), (reference, blocks))
        if trimming["applied"]:
            status(f"fine-tuning: padding trimmed, training batches of {trimming['mean_length']:.1f} positions on "
                   f"average instead of {trimming['length']}")
        train_set = _batches(train_feeds, specs, path, reference, blocks, tokens)
        heldout = _batches(short_held, specs, path, reference, tokens=tokens)  # scored on the outputs only
        rounded = _round(cfg, g, inputs.source.onnx_path, train_set, heldout, workdir, status)
        result = _train(cfg, g, train_set, heldout, status, progress, bool(rounded and rounded["interrupted"]))
        write_back(g, qmodel)
        exact = agreement(g, qmodel, held_feeds[0], workdir)
    finally:
        torch.set_num_threads(threads)
    if result.interrupted:
        notes.append(f"fine-tuning interrupted at step {result.steps_done}/{cfg.finetune.steps}: the best parameters "
                     f"so far (held-out loss, step {result.best_step}) were written")
    section = _section(cfg, inputs, g, result, path, (train_set, heldout), len(taps))
    section.update({"rounding": rounded, "trimming": trimming, "before": before, "torch_vs_onnxruntime": exact,
                    "notes": notes})
    return qmodel, section


def _section(cfg: RunConfig, inputs, g, result, path: str, sets: tuple[list, list], taps: int) -> dict:
    from quantkit.finetune.loop import SCALE_LR_FACTOR, WEIGHT_SCALE_LR_FACTOR

    ft, (train_set, heldout) = cfg.finetune, sets
    return {"steps": ft.steps, "steps_done": result.steps_done, "interrupted": result.interrupted,
            "lr": ft.lr, "scale_lr": ft.lr * SCALE_LR_FACTOR,
            "weight_scale_lr": ft.lr * WEIGHT_SCALE_LR_FACTOR, "labels_weight": ft.labels_weight, "data": path,
            "train_batches": len(train_set), "heldout_batches": len(heldout), "batch_size": inputs.batch,
            "trainable": g.learn.count(), "block_outputs": taps,
            "loss_positions": trim.PADDING_MASK if any(b.positions is not None for b in [*train_set, *heldout])
            else "all",
            "best_step": result.best_step, "heldout_loss_before": result.heldout_before,
            "heldout_loss_after": result.heldout_best, "seconds": result.seconds, "curve": result.curve}
