"""The pipeline for models whose weights live in an external data file and are large: memory
close to the model's own size.

What the in-memory pipeline holds at once (the whole model loaded, the fp32 session alive during
the whole run, candidate sessions of the speed guard and of the accuracy budget beside it) costs
several times the model. Here:

  * weights stay in the data file and are read one tensor at a time (load/external.ReadTensor);
    a weight is quantized and its float copy dropped before the next one is read
  * the fp32 reference runs first, alone, from the model's own file with its weights mapped and
    no prepacked copies; its outputs on the scored data are spilled to the work directory and the
    session is released before anything else is loaded
  * calibration (static int8, GPTQ) is the only session alive during its pass
  * the quantized model is written tensor by tensor (load/external.write_model), then loaded
    from that file, evaluated against the spilled reference outputs, and copied to the output
  * no speed guard and no per-node accuracy budget search: both keep several sessions alive
    (the report says so; --exclude and the gates still apply)
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantkit import api, runtime
from quantkit.calibrate.data import LABELS, complete_batches
from quantkit.errors import ConfigError, UnsupportedModelError
from quantkit.graph.masks import mask_tensors
from quantkit.load.external import write_model
from quantkit.load.onnx import model_bytes, model_files
from quantkit.output import Outputs
from quantkit.quantize import subgraphs
from quantkit.quantize.prepare import CalibrationData, calibrate
from quantkit.quantize.qdq import StaticScheme
from quantkit.quantize.scheme import placement_for
from quantkit.quantize.speed import GuardReport
from quantkit.quantize.weight_only import AUTO, WeightOnlyScheme
from quantkit.report import lm
from quantkit.report.compare import OutputComparison
from quantkit.report.parts import Parts, output_parts

# external-data models at least this large take this path
MIN_BYTES = 256 << 20
# GPTQ: Gram matrices gathered a group at a time within this share of the model's bytes (the fp32 pass
# maps ~1.0x the model; int4 is held to 1.25x, so Grams of 15% leave room for the rest)
GRAM_SHARE = 0.15
GRAM_MIN_BYTES = 16 << 20
LATENCY_FROM_EVALUATION = ("each model's median time per evaluation batch, measured on its own pass over the "
                           "evaluation data (first run included; no extra timed runs of a large model: pass "
                           "--latency-runs N for a warm-up and N timed runs of each)")
NOTE = ("large model with external data: weights streamed one tensor at a time and sessions created one at a "
        "time; no speed guard and no per-node accuracy budget (use --exclude to keep layers float)")


def applies(path: Path) -> bool:
    path = Path(path)
    files = model_files(path)
    if len(files) < 2 or not all(f.is_file() for f in files):  # a missing data file is reported by the loader
        return False
    return sum(f.stat().st_size for f in files) >= MIN_BYTES


def _check(cfg) -> None:
    for flag, given in (("--plan", cfg.plan_out), ("--from-plan", cfg.plan_in)):
        if given is not None:
            raise ConfigError(f"{flag} records the per-node accuracy budget, which large external-data models "
                              "skip to stay within memory; drop it")
    if cfg.gates.require_speedup is not None:
        raise ConfigError("--require-speedup is not available for large external-data models (fp32 and the "
                          "quantized model are never loaded together); drop it")


class Timing:
    """Latency of one model: its evaluation batches' own times (the default), or with
    --latency-runs N a warm-up and N timed runs on the first batch (`first`: its samples). `timed`: the
    samples in each batch the result is the median of (fewer than the batch size on a short data set)."""

    def __init__(self, runs: int | None, batch: int, first: int) -> None:
        self.runs, self.batch = runs, batch
        self.seen: list[tuple[int, float]] = []  # (samples, ms) of each evaluation batch
        self.timed = min(batch, first) if runs is not None else batch

    def record(self, seconds: float, samples: int) -> None:
        self.seen.append((samples, seconds * 1000.0))

    def result(self, sess, feed: dict) -> tuple[float, int]:
        """(median ms, runs it is the median of): of the largest batches (the full ones, unless the data
        holds fewer samples than a batch)."""
        if self.runs is None:
            self.timed = max((n for n, _ in self.seen), default=self.batch)
            full = [ms for n, ms in self.seen if n == self.timed]
            return (statistics.median(full), len(full)) if full else (0.0, 0)
        sess.run(None, feed)
        times = []
        for _ in range(self.runs):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(times), self.runs


class Reference:
    """fp32 outputs of the scored data, spilled to disk batch by batch, and of the first batch."""

    def __init__(self, inputs: api.Inputs, cfg, workdir: Path) -> None:
        self.inputs, self.cfg = inputs, cfg
        self.folder = workdir / "reference"
        self.folder.mkdir()
        self.limit = inputs.scored_limit(cfg)
        self.names: list[str] = []
        self.first: list[np.ndarray] = []
        self.fp32_ms, self.fp32_runs = 0.0, 0

    def batches(self):
        i = self.inputs
        return complete_batches(i.scored, i.batch, self.limit, i.fixed)

    def take(self, status, progress) -> None:
        status("running the fp32 model alone for reference outputs")
        i = self.inputs
        sess = runtime.session(i.source.onnx_path, self.folder, tag="original", threads=self.cfg.threads,
                               mapped=True)
        self.names = [o.name for o in sess.get_outputs()]
        feeds = {x.name for x in sess.get_inputs()}
        timing = Timing(self.cfg.latency_runs, i.batch, i.feed_samples)
        progress.start("fp32 reference", min(i.scored.samples, self.limit or i.scored.samples))
        for k, b in enumerate(self.batches()):
            t = time.perf_counter()
            outs = runtime.run(sess, self.names, {n: v for n, v in b.items() if n in feeds},
                               f"the evaluation data {i.scored.path}")
            timing.record(time.perf_counter() - t, len(next(iter(b.values()))))
            for j, out in enumerate(outs):
                np.save(self.folder / f"{k}_{j}.npy", out)
            if k == 0 and all(np.array_equal(b.get(n), v) for n, v in i.feed.items()):
                self.first = outs  # the tuning batch is the first evaluation batch: no extra run
            progress.advance(len(next(iter(b.values()))))
        progress.finish()
        if not self.first and AUTO in self.cfg.quant.keep_int8:  # --keep-int8 auto scores candidates on it
            self.first = sess.run(self.names, i.feed)
        self.fp32_ms, self.fp32_runs = timing.result(sess, i.feed)
        del sess
        gc.collect()

    def sqnr(self, model: ir.Model, workdir: Path) -> float:
        out = runtime.session(model, workdir, tag="candidate").run(self.names, self.inputs.feed)
        sig = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in self.first)
        err = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(o, np.float64)) ** 2))
                  for r, o in zip(self.first, out))
        return float(10 * np.log10(sig / max(err, 1e-30)))

    def compare(self, qsess, progress, timing: Timing,
                parts: Parts | None = None) -> tuple[list[dict], int, dict | None]:
        """Each output's comparison (each part's, for an output that concatenates several tensors:
        report/parts.py, as the in-memory path compares), the samples seen, and the language-model figures."""
        parts = parts or Parts.whole(len(self.names), self.names)
        comparisons = [OutputComparison(n) for n in parts.names]
        feeds = {x.name for x in qsess.get_inputs()}
        tracker = lm.Tracker(self.names)
        samples = 0
        progress.start("evaluating", min(self.inputs.scored.samples, self.limit or self.inputs.scored.samples))
        for k, b in enumerate(self.batches()):
            t = time.perf_counter()
            q = runtime.run(qsess, self.names, {n: v for n, v in b.items() if n in feeds}, "the evaluation data")
            timing.record(time.perf_counter() - t, len(next(iter(b.values()))))
            ref = [np.load(self.folder / f"{k}_{j}.npy", mmap_mode="r") for j in range(len(self.names))]
            labels = b.get(LABELS)
            for j, (c, r, x) in enumerate(zip(comparisons, parts.split([np.asarray(r) for r in ref]), parts.split(q))):
                c.update(r, x, labels if j == 0 else None, b)
            tracker.update(ref, q, b)
            n = len(next(iter(b.values())))
            samples += n
            progress.advance(n)
        progress.finish()
        return [c.result() for c in comparisons], samples, tracker.result()


def quantize(cfg, workdir: Path, status, progress, t_start: float) -> api.Result:
    _check(cfg)
    laps = api._Laps(t_start)
    inputs = api._open(cfg, workdir, status, progress, streamed=True)
    laps.lap("load")
    reference = Reference(inputs, cfg, workdir)
    reference.take(status, progress)
    laps.lap("fp32_reference")
    model, notes = api._canonicalize(inputs, workdir, status)
    inputs.parts = output_parts(model, reference.names)
    notes += api._parts_notes(inputs.parts, reference.names)
    placement = placement_for(cfg.quant)
    model = placement.prepare_model(model)
    placement.float_tensors.update(mask_tensors(model))
    laps.lap("canonicalize")
    data = CalibrationData.of(cfg, inputs.calib, inputs.batch, inputs.fixed)
    budget = max(GRAM_MIN_BYTES, int(GRAM_SHARE * model_bytes(inputs.source.onnx_path)))
    for scheme in placement.schemes:
        if isinstance(scheme, WeightOnlyScheme):  # GPTQ's rounded layers wait on disk
            scheme.spill = workdir
        if isinstance(scheme, StaticScheme):  # static int8's GPTQ Hessians within the same share
            scheme.rounding.max_bytes = budget
    calibration = calibrate(model, placement, cfg.quant, data, workdir, status, progress, gram_budget=budget)
    notes += calibration.notes + [NOTE]
    laps.lap("calibrate")
    notes += placement.tune(model, lambda m: reference.sqnr(m, workdir), status)
    laps.lap("tune")
    qmodel, plan, rw = placement.build(model, set(), "")
    status(f"quantized {len(plan.ops)} node(s)")
    notes += rw.notes
    inner = subgraphs.quantize_weights(qmodel)
    with Outputs(cfg.force) as out:  # written where it is staged beside the output, evaluated there
        q_path = out.stage_written(Path(cfg.output), lambda p: write_model(qmodel, p))
        laps.lap("quantize_and_write")
        outputs, latency, evaluation = _measure(cfg, inputs, reference, q_path, workdir, progress, status, notes)
        laps.lap("evaluate")
        report = api._report(api.Outcome(cfg, inputs, placement, calibration, plan, rw, GuardReport(), outputs,
                                         latency, evaluation, model_bytes(q_path), notes))
        report["speed_guard"] = None
        failures = api._complete(report, cfg, model, placement, {}, inner, t_start, rw, streamed=True)
        laps.lap("report")
        report["stage_seconds"] = laps.seconds
        _stage_report(out, cfg, report)
        out.commit()
    return api.Result(report, failures)


def _measure(cfg, inputs: api.Inputs, reference: Reference, q_path: Path, workdir: Path, progress, status,
             notes: list[str]):
    status("evaluating the quantized model against the fp32 reference")
    try:
        qsess = runtime.session(q_path, workdir, tag="quantized", threads=cfg.threads)
    except UnsupportedModelError as e:  # our own output failed to load: that is a bug
        raise RuntimeError(f"internal error: {e}") from e
    timing = Timing(cfg.latency_runs, inputs.batch, inputs.feed_samples)
    outputs, samples, lm_figures = reference.compare(qsess, progress, timing, inputs.parts)
    q_ms, q_runs = timing.result(qsess, inputs.feed)
    del qsess
    latency = {"fp32_ms": reference.fp32_ms, "quantized_ms": q_ms,
               "speedup": reference.fp32_ms / q_ms if q_ms > 0 and reference.fp32_ms > 0 else None,
               "runs": min(reference.fp32_runs, q_runs), "batch_size": timing.timed,
               "threads": cfg.threads or "onnxruntime default", "interleaved": False,
               "timed": "evaluation batches" if cfg.latency_runs is None else "timed runs after a warm-up"}
    if cfg.latency_runs is None:
        notes.append(f"latency: {LATENCY_FROM_EVALUATION}")
    evaluation = {"source": str(inputs.scored.path), "on_calibration_data": inputs.evald is None,
                  "samples": samples}
    if lm_figures is not None:
        evaluation["language_model"] = lm_figures
    if inputs.evald is None:
        notes.append("evaluated on the calibration data (no --eval given): figures are optimistic")
    return outputs, latency, evaluation


def _stage_report(out: Outputs, cfg, report: dict) -> None:
    if cfg.report is not None:
        out.stage_json(report, cfg.report)
    if cfg.html is not None:
        from quantkit.report.html import render_html

        out.stage_text(render_html(report), cfg.html)
