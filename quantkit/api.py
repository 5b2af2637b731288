"""quantize(): the pipeline, top to bottom.

load -> canonicalize -> plan -> calibrate (one streamed ORT pass) -> keep masks float
     -> rewrite (+ speed guard over candidate placements) -> evaluate -> save
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from quantkit import __version__, runtime
from quantkit.calibrate import cache
from quantkit.calibrate.collect import TIMINGS, statistics
from quantkit.calibrate.data import LABELS, DataSource, InputSpec, complete_batches
from quantkit.calibrate.ranges import Levels, observer_kind, select_range
from quantkit.config import RunConfig
from quantkit.errors import ConfigError, UnsupportedModelError
from quantkit.graph import shapes
from quantkit.graph.canonicalize import already_quantized, canonicalize
from quantkit.graph.masks import mask_tensors
from quantkit.load.onnx import input_specs, load_onnx, model_bytes
from quantkit.load.source import load_source, open_data
from quantkit.options import effective_config
from quantkit.output import check_destination, write_json, write_model
from quantkit.quantize import dynamic, prepare, qdq, weight_only
from quantkit.quantize.plan import make_plan
from quantkit.quantize.speed import GuardReport, guard
from quantkit.report.compare import OutputComparison
from quantkit.report.gates import check_gates
from quantkit.report.histograms import histograms
from quantkit.report.latency import compare_latency
from quantkit.report.weight_error import weight_errors

DEFAULT_BATCH = 8
SPEED_GUARD_REASON = "left float by the speed guard: the model ran faster without this group quantized"


class Progress:
    """Progress of a long stage (export, calibration, speed guard, evaluation) over a known number
    of units (samples, placements, steps); the CLI draws it, the API default is silent."""

    def start(self, label: str, total: int, unit: str = "samples") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Result:
    report: dict
    gate_failures: list[str]


def _batch_size(specs: list[InputSpec], asked: int | None) -> int:
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if len(fixed) > 1:
        raise UnsupportedModelError(f"graph inputs disagree on a fixed batch size: {sorted(fixed)}")
    if fixed:
        (n,) = fixed
        if asked is not None and asked != n:
            raise ConfigError(f"--batch-size {asked} conflicts with the model's fixed batch size {n}")
        return n
    return asked or DEFAULT_BATCH


def _check_options(cfg: RunConfig) -> None:
    check_destination(cfg.output, cfg.force, "output", [cfg.model, cfg.data.calib, cfg.data.eval])
    if cfg.save_fp32 is not None:
        check_destination(cfg.save_fp32, cfg.force, "--save-fp32", [cfg.model, cfg.output])
    if cfg.report is not None:
        check_destination(cfg.report, cfg.force, "report", [cfg.model, cfg.output])
    if cfg.data.stats_cache is not None and not Path(cfg.data.stats_cache).parent.is_dir():
        raise ConfigError(f"--stats-cache directory {Path(cfg.data.stats_cache).parent} does not exist")
    q = cfg.quant
    if cfg.data.calib is None:
        if q.activations in ("uint8", "int8"):
            raise ConfigError("--calib is required: static int8 needs calibration data to set activation ranges "
                              "(or use --activations dynamic, or weight-only --activations none)")
        if q.activations == "none" and q.algorithm == "gptq":
            raise ConfigError("--algorithm gptq needs --calib: it rounds against the layers' calibration inputs")
        if cfg.data.eval is None:
            raise ConfigError(f"--activations {q.activations} needs no calibration, but the accuracy report needs "
                              "data: pass --eval")


def quantize(cfg: RunConfig, status: Callable[[str], None] = lambda s: None,
             progress: Progress | None = None) -> Result:
    progress = progress or Progress()
    t_start = time.perf_counter()
    _check_options(cfg)
    with tempfile.TemporaryDirectory(prefix="quantkit-") as tmp:
        workdir = Path(tmp)
        return _quantize(cfg, workdir, status, progress, t_start)


def _quantize(cfg: RunConfig, workdir: Path, status, progress: Progress, t_start: float) -> Result:
    source = _load(cfg, workdir, status, progress)
    model = load_onnx(source.onnx_path)
    done = already_quantized(model)
    if done:
        raise UnsupportedModelError(f"{cfg.model} is already quantized (it has {', '.join(done)})")
    specs = input_specs(model)
    calib = open_data(cfg.data.calib, specs, cfg.data.preprocess) if cfg.data.calib is not None else None
    evald = open_data(cfg.data.eval, specs, cfg.data.preprocess) if cfg.data.eval is not None else None
    scored = evald or calib
    if cfg.gates.max_accuracy_drop is not None and not scored.has_labels:
        raise ConfigError(f"--max-accuracy-drop needs labels: add a '{LABELS}' array to {scored.path}")
    batch = _batch_size(specs, cfg.data.batch_size)
    fixed = any(s.shape and s.shape[0] is not None for s in specs)
    first_source = calib or evald
    notes = [f"{calib.path}: arrays {', '.join(calib.extra_keys)} match no model input and were ignored"] \
        if calib is not None and calib.extra_keys else []
    if source.export is not None:
        notes.append(f"exported from PyTorch with the {source.export['exporter']} exporter; the report compares "
                     "against the PyTorch model's own outputs")
        if "fallback_reason" in source.export:
            notes.append(source.export["fallback_reason"])

    fp32 = runtime.session(source.onnx_path, workdir, tag="original", threads=cfg.threads)
    first_batch = next(complete_batches(first_source, batch, None, fixed), None)
    if first_batch is None:
        raise ConfigError(f"{first_source.path} holds fewer samples than the model's fixed batch size {batch}")
    feed = {s.name: first_batch[s.name] for s in specs}

    status("canonicalizing graph")
    notes += canonicalize(model)
    shapes.infer(model)
    if shapes.untyped_values(model):
        n = shapes.fill_from_run(model, feed, workdir)
        notes.append(f"shape inference left {n} tensor(s) untyped; typed them from one real run")

    smoothing = prepare.smooth(cfg, model, calib, batch, fixed, workdir, status) if cfg.quant.smoothquant else None
    masks = mask_tensors(model)  # found in the graph; calibration may add more from observed ranges
    calibration = None
    if cfg.quant.activations == "none":
        if cfg.quant.format == "qdq":
            model = prepare.opset_at_least(model, 21)
        hessians = prepare.gptq_hessians(cfg, model, calib, batch, fixed, workdir, status) \
            if cfg.quant.algorithm == "gptq" else {}

        def plan_for(m: ir.Model):
            plan = weight_only.restrict_plan(make_plan(m, cfg.quant))
            plan.keep_float(masks)
            return plan

        weight_config = cfg.quant
        if "auto" in cfg.quant.keep_int8:
            weight_config, auto_notes = prepare.auto_keep_int8(cfg, model, plan_for, hessians, fp32, feed, workdir, status)
            notes += auto_notes

        def rewrite(m, plan):
            return weight_only.rewrite(m, plan, weight_config, hessians)
    elif cfg.quant.activations == "dynamic":
        def plan_for(m: ir.Model):
            plan = dynamic.restrict_plan(make_plan(m, cfg.quant))
            plan.keep_float(masks)
            return plan

        def rewrite(m, plan):
            return dynamic.rewrite(m, plan, cfg.quant)
    else:
        calibration = _calibrate(cfg, model, calib, batch, fixed, workdir, status, progress, masks)
        notes += calibration["notes"]
        masks.update(calibration["masks"])

        def plan_for(m: ir.Model):
            plan = make_plan(m, cfg.quant)
            plan.keep_float(masks)
            return plan

        def rewrite(m, plan):
            return qdq.rewrite(m, plan, calibration["ranges"], cfg.quant, calibration["channel_means"])

    def build(drop: set[str]):
        m = model.clone()
        plan = plan_for(m)
        plan.drop(drop, SPEED_GUARD_REASON)
        return m, plan, rewrite(m, plan)

    kinds = {op.kind for op in plan_for(model.clone()).ops}
    if cfg.speed_guard and len(kinds) > 0:
        def session(m: ir.Model):
            return runtime.session(m, workdir, tag="candidate", threads=cfg.threads)

        trials = _trials(status, progress, kinds)
        (qmodel, plan, rw), guard_report = guard(build, session, fp32, feed, kinds, status=trials)
        progress.advance(1)
        progress.finish()
    else:
        (qmodel, plan, rw), guard_report = build(set()), GuardReport()
    status(f"quantized {len(plan.ops)} node(s)")
    notes += rw.notes
    if not plan.ops:
        notes.append("no node could be quantized; the output is the canonicalized float model")

    q_path = workdir / "quantized.onnx"
    runtime.save(qmodel, q_path)
    try:
        qsess = runtime.session(q_path, workdir, tag="quantized", threads=cfg.threads)
    except UnsupportedModelError as e:  # our own output failed to load: that is a bug
        raise RuntimeError(f"internal error: {e}") from None

    status("evaluating fp32 against int8")
    comparisons, eval_samples = _evaluate(fp32, qsess, scored, batch, fixed,
                                          None if evald else cfg.data.calib_samples, source.reference, progress)
    if evald is None:
        notes.append("evaluated on the calibration data (no --eval given): figures are optimistic")
    latency = compare_latency(fp32, qsess, feed, runs=cfg.latency_runs)
    latency.update(batch_size=batch, threads=cfg.threads or "onnxruntime default")
    if latency["speedup"] is not None and latency["speedup"] < 1:
        why = ("int8 cannot win on this model: no placement beat fp32, so the smallest one was written"
               if guard_report.int8_cannot_win else
               "its layers are too small for integer kernels to pay for the quantize/dequantize steps")
        notes.append(f"the int8 model is {1 / latency['speedup']:.2f}x SLOWER than fp32 in onnxruntime on this "
                     f"machine at batch {batch}: {why}")

    outputs = [c.result() for c in comparisons]
    report = _report(cfg, source, calibration, plan, rw, guard_report, outputs, latency, notes, smoothing,
                     eval_info={"source": str(scored.path), "on_calibration_data": evald is None,
                                "samples": eval_samples},
                     bytes_after=model_bytes(q_path))
    report["weight_error"] = weight_errors(model, cfg.quant, {s["node"] for s in report["nodes"]["float"]})
    failures = check_gates(outputs, cfg.gates, latency)
    report["gates"] = {**asdict(cfg.gates), "passed": not failures, "failures": failures}
    report["seconds"] = time.perf_counter() - t_start

    write_model(qmodel, cfg.output)
    if cfg.report is not None:
        write_json(report, cfg.report)
    return Result(report, failures)


def _calibrate(cfg: RunConfig, model: ir.Model, calib: DataSource, batch: int, fixed: bool, workdir: Path,
               status, progress, known_masks: dict[str, str]) -> dict:
    """Statistics for every tensor the plan needs, mask-like ranges found, ranges chosen."""
    plan = make_plan(model, cfg.quant)
    plan.keep_float(known_masks)
    values = plan.activation_tensors()
    n_calib = min(calib.samples, cfg.data.calib_samples or calib.samples)
    status(f"calibrating {len(values)} activation tensor(s) with {cfg.quant.method} "
           f"on {n_calib} sample(s), batch {batch}")
    t0 = time.perf_counter()
    key = cache.fingerprint(cfg.model, calib.path, cfg.data.calib_samples, batch) if cfg.data.stats_cache else None

    def batches():
        progress.start("calibrating", n_calib)
        yield from complete_batches(calib, batch, cfg.data.calib_samples, fixed)
        progress.finish()

    channel_axes = {op.inputs[0].name: 1 if op.node.op_type == "Conv" else -1
                    for op in plan.ops if op.weighted} if cfg.quant.bias_correction else {}
    TIMINGS.clear()
    observers, samples, notes = statistics(model, values, batches, observer_kind(cfg.quant.method), workdir,
                                           cfg.data.stats_cache, key, progress.advance, channel_axes)
    timings = dict(TIMINGS)
    if values and not any(o.count for o in observers.values()):
        raise ConfigError("calibration saw no data: the calibration set is smaller than one batch "
                          f"of the model's fixed batch size {batch}")
    masks = {n: why for n, o in observers.items() if (why := o.mask_like())}
    if masks:
        notes.append(f"{len(masks)} tensor(s) with mask-like ranges stay float (see float_tensors)")
    levels = Levels(steps=254, symmetric=True) if cfg.quant.activations == "int8" else Levels(255, False)
    ranges, chosen = {}, {}
    t_ranges = time.perf_counter()
    for name, obs in observers.items():
        if name not in masks:
            ranges[name], chosen[name] = select_range(obs, cfg.quant.method, levels, cfg.quant.percentile)
    timings["range_seconds"] = time.perf_counter() - t_ranges
    channel_means = {n: observers[n].channel_mean() for n in channel_axes if observers[n].channel_mean() is not None}
    return {"observers": observers, "samples": samples, "notes": notes, "masks": masks, "ranges": ranges,
            "channel_means": channel_means, "timings": timings,
            "chosen": chosen, "seconds": time.perf_counter() - t0, "source": str(calib.path), "batch": batch}


def _report(cfg, source, calibration, plan, rw, guard_report, outputs, latency, notes, smoothing, eval_info,
            bytes_after) -> dict:
    report = {
        "quantkit_version": __version__,
        "onnxruntime_version": ort.__version__,
        "model": {"input": str(cfg.model), "output": str(cfg.output), "bytes_before": model_bytes(source.onnx_path),
                  "bytes_after": bytes_after},
        "export": source.export,
        "config": {**asdict(cfg.quant), "exclude": list(cfg.quant.exclude)},
        "calibration": None,
        "evaluation": eval_info,
        "outputs": outputs,
        "latency": latency,
        "speed_guard": asdict(guard_report) if cfg.speed_guard else None,
        "nodes": {
            "quantized": [{"node": op.node.name, "op_type": op.node.op_type, "kind": op.kind,
                           "per_channel": op.weight_axis is not None} for op in plan.ops],
            "float": [asdict(s) for s in plan.skipped],
            "float_bias": rw.float_bias,
            "bias_corrected": rw.bias_corrected,
            "gptq": rw.gptq,
        },
        "float_tensors": [{"tensor": k, "reason": v} for k, v in plan.float_tensors.items()],
        "smoothquant": smoothing,
        "activations": {},
        "notes": notes,
        "effective_config": effective_config(cfg),
    }
    if calibration is not None:
        obs, chosen = calibration["observers"], calibration["chosen"]
        report["calibration"] = {"source": calibration["source"], "samples": calibration["samples"],
                                 "batch_size": calibration["batch"], "method": cfg.quant.method,
                                 "seconds": calibration["seconds"], **calibration["timings"],
                                 "methods_chosen": _tally(chosen.values())}
        report["activations"] = {k: {**asdict(v), "method": chosen[k], "observed": list(obs[k].range()),
                                     "nonfinite": obs[k].nonfinite} for k, v in rw.activations.items()}
        report["histograms"] = histograms(obs, report["activations"])
    m = report["model"]
    m["compression"] = m["bytes_before"] / m["bytes_after"] if m["bytes_after"] else None
    return report


def _tally(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def _load(cfg: RunConfig, workdir: Path, status, progress: Progress):
    """load_source, with the PyTorch export (the slow part) shown as a one-step stage."""
    from quantkit.load.torch import is_torch_file

    exporting = cfg.model.is_file() and is_torch_file(cfg.model)
    if exporting:
        progress.start("exporting the PyTorch model to ONNX", 1, unit="step")
    source = load_source(cfg, workdir, status)
    if exporting:
        progress.advance(1)
        progress.finish()
    return source


def _trials(status, progress: Progress, kinds: set[str]):
    """The speed guard's status callback, also counting its trials (one per group) as progress."""
    progress.start("speed guard", len(kinds), unit="placements")
    started = False

    def on_status(msg: str) -> None:
        nonlocal started
        if started:  # the previous trial is done when the next one starts
            progress.advance(1)
        started = True
        status(msg)

    return on_status


def _evaluate(ref_sess: ort.InferenceSession, q_sess: ort.InferenceSession, source: DataSource,
              batch: int, fixed: bool, limit: int | None, reference: Callable | None = None,
              progress: Progress | None = None):
    """Compare the quantized model with the reference: the original ONNX model, or for PyTorch
    inputs the PyTorch model itself."""
    names = [o.name for o in ref_sess.get_outputs()]
    feeds = {i.name for i in ref_sess.get_inputs()}
    comparisons = [OutputComparison(n) for n in names]
    samples = 0
    progress = progress or Progress()
    progress.start("evaluating", min(source.samples, limit or source.samples))
    for b in complete_batches(source, batch, limit, fixed):
        feed = {k: v for k, v in b.items() if k in feeds}
        ref = reference(feed) if reference is not None else \
            runtime.run(ref_sess, names, feed, f"the evaluation data {source.path}")
        q = q_sess.run(names, feed)
        labels = b.get(LABELS)
        for i, (c, r, x) in enumerate(zip(comparisons, ref, q)):
            c.update(r, x, labels if i == 0 else None)
        samples += len(next(iter(b.values())))
        progress.advance(len(next(iter(b.values()))))
    progress.finish()
    return comparisons, samples
