"""quantize(): the pipeline, top to bottom.

load -> canonicalize -> plan -> calibrate (one streamed ORT pass) -> rewrite -> evaluate -> save
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnxruntime as ort

from quantkit import __version__, runtime
from quantkit.calibrate import cache
from quantkit.calibrate.collect import statistics
from quantkit.calibrate.ranges import Levels, observer_kind, select_range
from quantkit.calibrate.data import LABELS, DataSource, InputSpec
from quantkit.config import RunConfig
from quantkit.errors import ConfigError, UnsupportedModelError
from quantkit.graph import shapes
from quantkit.graph.canonicalize import already_quantized, canonicalize
from quantkit.load.onnx import input_specs, load_onnx, model_bytes
from quantkit.output import check_destination, write_json, write_model
from quantkit.quantize.plan import make_plan
from quantkit.quantize.qdq import rewrite
from quantkit.report.compare import OutputComparison
from quantkit.report.gates import check_gates
from quantkit.report.latency import compare_latency

DEFAULT_BATCH = 8


class Progress:
    """Progress over a known number of samples; the CLI draws it, the API default is silent."""

    def start(self, label: str, total: int) -> None:
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


def _complete_batches(source: DataSource, batch: int, limit: int | None, fixed: bool):
    """Batches of the data; a model with a fixed batch size cannot take the short last one."""
    for b in source.batches(batch, limit):
        if fixed and len(next(iter(b.values()))) != batch:
            return
        yield b


def quantize(cfg: RunConfig, status: Callable[[str], None] = lambda s: None,
             progress: Progress | None = None) -> Result:
    progress = progress or Progress()
    t_start = time.perf_counter()
    check_destination(cfg.output, cfg.force, "output", [cfg.model, cfg.data.calib, cfg.data.eval])
    if cfg.report is not None:
        check_destination(cfg.report, cfg.force, "report", [cfg.model, cfg.output])
    if cfg.data.stats_cache is not None and not Path(cfg.data.stats_cache).parent.is_dir():
        raise ConfigError(f"--stats-cache directory {Path(cfg.data.stats_cache).parent} does not exist")
    if cfg.data.calib is None:
        raise ConfigError("--calib is required: static int8 needs calibration data to set activation ranges")

    model = load_onnx(cfg.model)
    done = already_quantized(model)
    if done:
        raise UnsupportedModelError(f"{cfg.model} is already quantized (it has {', '.join(done)})")
    specs = input_specs(model)
    calib = DataSource(cfg.data.calib, specs)
    evald = DataSource(cfg.data.eval, specs) if cfg.data.eval is not None else None
    scored = evald or calib
    if cfg.gates.max_accuracy_drop is not None and not scored.has_labels:
        raise ConfigError(f"--max-accuracy-drop needs labels: add a '{LABELS}' array to {scored.path}")
    batch = _batch_size(specs, cfg.data.batch_size)
    fixed = any(s.shape and s.shape[0] is not None for s in specs)
    notes = [f"{calib.path}: arrays {', '.join(calib.extra_keys)} match no model input and were ignored"] \
        if calib.extra_keys else []

    with tempfile.TemporaryDirectory(prefix="quantkit-") as tmp:
        workdir = Path(tmp)
        fp32 = runtime.session(cfg.model, workdir, tag="original")

        status("canonicalizing graph")
        notes += canonicalize(model)
        shapes.infer(model)
        if shapes.untyped_values(model):
            first = next(_complete_batches(calib, batch, 1 if not fixed else batch, fixed))
            n = shapes.fill_from_run(model, first, workdir)
            notes.append(f"shape inference left {n} tensor(s) untyped; typed them from one real run")

        plan = make_plan(model, cfg.quant)
        values = plan.activation_tensors()
        n_calib = min(calib.samples, cfg.data.calib_samples or calib.samples)
        status(f"calibrating {len(values)} activation tensor(s) with {cfg.quant.method} "
               f"on {n_calib} sample(s), batch {batch}")
        t0 = time.perf_counter()
        key = cache.fingerprint(cfg.model, calib.path, cfg.data.calib_samples, batch) \
            if cfg.data.stats_cache else None

        def batches():
            progress.start("calibrating", n_calib)
            yield from _complete_batches(calib, batch, cfg.data.calib_samples, fixed)
            progress.finish()

        observers, calib_samples, cache_notes = statistics(
            model, values, batches, observer_kind(cfg.quant.method), workdir,
            cfg.data.stats_cache, key, progress.advance)
        notes += cache_notes
        if values and not any(o.count for o in observers.values()):
            raise ConfigError("calibration saw no data: the calibration set is smaller than one batch "
                              f"of the model's fixed batch size {batch}")
        levels = Levels(steps=254, symmetric=True) if cfg.quant.activations == "int8" else Levels(255, False)
        ranges, chosen = {}, {}
        for name, obs in observers.items():
            ranges[name], chosen[name] = select_range(obs, cfg.quant.method, levels, cfg.quant.percentile)
        calib_seconds = time.perf_counter() - t0

        status(f"rewriting {len(plan.ops)} node(s) to int8")
        rw = rewrite(model, plan, ranges, cfg.quant)
        if not plan.ops:
            notes.append("no node could be quantized; the output is the canonicalized float model")
        q_path = workdir / "quantized.onnx"
        runtime.save(model, q_path)
        try:
            qsess = runtime.session(q_path, workdir, tag="quantized")
        except UnsupportedModelError as e:  # our own output failed to load: that is a bug
            raise RuntimeError(f"internal error: {e}") from None

        status("evaluating fp32 against int8")
        comparisons, latency_feed, eval_samples = _evaluate(fp32, qsess, scored, batch, fixed,
                                                            None if evald else cfg.data.calib_samples)
        if evald is None:
            notes.append("evaluated on the calibration data (no --eval given): figures are optimistic")
        latency = compare_latency(fp32, qsess, latency_feed, runs=cfg.latency_runs) if latency_feed else None
        if latency is not None:
            latency["batch_size"] = batch
            latency["threads"] = "onnxruntime default"
            if latency["speedup"] is not None and latency["speedup"] < 1:
                notes.append(f"the int8 model is {1 / latency['speedup']:.2f}x SLOWER than fp32 in onnxruntime "
                             f"on this machine at batch {batch}: its layers are too small for integer "
                             "kernels to pay for the quantize/dequantize steps")

        outputs = [c.result() for c in comparisons]
        report = {
            "quantkit_version": __version__,
            "onnxruntime_version": ort.__version__,
            "model": {"input": str(cfg.model), "output": str(cfg.output),
                      "bytes_before": model_bytes(cfg.model), "bytes_after": model_bytes(q_path)},
            "config": {**asdict(cfg.quant), "exclude": list(cfg.quant.exclude)},
            "calibration": {"source": str(calib.path), "samples": calib_samples, "batch_size": batch, "method": cfg.quant.method,
                            "seconds": calib_seconds, "methods_chosen": _tally(chosen.values())},
            "evaluation": {"source": str(scored.path), "on_calibration_data": evald is None,
                           "samples": eval_samples},
            "outputs": outputs,
            "latency": latency,
            "nodes": {
                "quantized": [{"node": op.node.name, "op_type": op.node.op_type,
                               "per_channel": op.weight_axis is not None} for op in plan.ops],
                "float": [asdict(s) for s in plan.skipped],
                "float_bias": rw.float_bias,
            },
            "activations": {k: {**asdict(v), "method": chosen[k], "observed": list(observers[k].range()),
                                "nonfinite": observers[k].nonfinite}
                            for k, v in rw.activations.items()},
            "notes": notes,
        }
        m = report["model"]
        m["compression"] = m["bytes_before"] / m["bytes_after"] if m["bytes_after"] else None
        failures = check_gates(outputs, cfg.gates)
        report["gates"] = {**asdict(cfg.gates), "passed": not failures, "failures": failures}
        report["seconds"] = time.perf_counter() - t_start

        write_model(model, cfg.output)
        if cfg.report is not None:
            write_json(report, cfg.report)
    return Result(report, failures)


def _tally(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def _evaluate(ref_sess: ort.InferenceSession, q_sess: ort.InferenceSession, source: DataSource,
              batch: int, fixed: bool, limit: int | None):
    names = [o.name for o in ref_sess.get_outputs()]
    feeds = {i.name for i in ref_sess.get_inputs()}
    comparisons = [OutputComparison(n) for n in names]
    latency_feed = None
    samples = 0
    for b in _complete_batches(source, batch, limit, fixed):
        feed = {k: v for k, v in b.items() if k in feeds}
        ref = ref_sess.run(names, feed)
        q = q_sess.run(names, feed)
        labels = b.get(LABELS)
        for i, (c, r, x) in enumerate(zip(comparisons, ref, q)):
            c.update(r, x, labels if i == 0 else None)
        samples += len(next(iter(b.values())))
        if latency_feed is None:
            latency_feed = feed
    return comparisons, latency_feed, samples
