"""quantize(): the pipeline, top to bottom.

load -> canonicalize -> place (which scheme rewrites which node) -> statistics (one streamed ORT
pass shared by every algorithm; a second one only for tensors SmoothQuant rescaled) -> tune
-> rewrite (+ speed guard over candidate placements) -> evaluate -> report -> save
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from quantkit import __version__, runtime
from quantkit.calibrate.data import LABELS, DataSource, InputSpec, assign_batch_axes, complete_batches
from quantkit.config import Activations, Algorithm, RunConfig
from quantkit.errors import ConfigError, UnsupportedModelError, first_line
from quantkit.graph import shapes
from quantkit.graph.canonicalize import already_quantized, canonicalize
from quantkit.graph.masks import mask_tensors
from quantkit.load.onnx import file_sha256, input_specs, load_onnx, model_bytes, model_files
from quantkit.load.source import Source, load_source, open_data
from quantkit.options import effective_config
from quantkit.output import Outputs, check_destinations
from quantkit.prune.report import node_macs
from quantkit.quantize import budget, lower, subgraphs
from quantkit.quantize.outlier_split import SplitScheme
from quantkit.quantize.plan import OpKind, Plan, SchemeName
from quantkit.quantize.prepare import Calibration, CalibrationData, calibrate
from quantkit.quantize.scheme import Placement, RewriteResult, placement_for
from quantkit.quantize.speed import COMPRESSION_ONLY, GuardReport, guard, timed_kinds
from quantkit.report import lm, memory
from quantkit.report.compare import OutputComparison
from quantkit.report.gates import check_gates
from quantkit.report.histograms import histograms
from quantkit.report.latency import compare_latency
from quantkit.report.parts import Parts, output_parts
from quantkit.report.weight_error import weight_errors

DEFAULT_BATCH = 8
DEFAULT_LATENCY_RUNS = 20
# ...or fewer (at least 5) once the timed runs took this long, when neither --latency-runs nor
# --require-speedup is given (PP-PicoDet layout at 800 x 608: 20 pairs of 117 ms and 48 ms runs are ~3.3 s of 28)
LATENCY_SECONDS = 2.0
# the speed guard and the latency figure time one sample only when a sample costs at least this many
# multiply-accumulates (a run of several ms here); below, they time the first batch: ocr_cls (16M a sample, runs
# of 0.8 ms) timed one sample at a time wrote another file in 1 run of 10 beside two busy-looping processes
# (a scheduler slice is several such runs), and 0 of 12 timed 8 at a time
MIN_TIMED_MACS = 128_000_000
KNOWN_BYTES = 256 << 20  # the probe's fp32 outputs are kept for the evaluation up to this size (an LM's logits...)
SHARED_LOOK_BYTES = 2 << 30  # the speed guard's candidates are timed together while their weights fit in this
SPEED_GUARD_REASON = "left float by the speed guard: the model ran faster without this group quantized"


class Progress(Protocol):
    """Progress of a long stage (export, calibration, speed guard, evaluation) over a known number
    of units (samples, placements, steps); the CLI draws it, the API default is silent."""

    def start(self, label: str, total: int, unit: str = "samples") -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class Silent:
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


def _fixed_batches(specs: list[InputSpec]) -> set[int]:
    """Batch sizes the model fixes: a batched input whose batch axis has a fixed size."""
    return {s.shape[s.batch_axis] for s in specs
            if s.batch_axis is not None and s.shape and s.shape[s.batch_axis] is not None}


def _batch_size(specs: list[InputSpec], asked: int | None) -> int:
    fixed = _fixed_batches(specs)
    if len(fixed) > 1:
        raise UnsupportedModelError(f"graph inputs disagree on a fixed batch size: {sorted(fixed)}")
    if fixed:
        (n,) = fixed
        if asked is not None and asked != n:
            raise ConfigError(f"--batch-size {asked} conflicts with the model's fixed batch size {n}")
        return n
    return asked or DEFAULT_BATCH


def _check_options(cfg: RunConfig) -> None:
    if cfg.html is not None:
        from quantkit.report.html import require_matplotlib

        require_matplotlib()
    from quantkit.finetune.step import check as check_finetune

    check_finetune(cfg)
    check_destinations({"output": cfg.output, "--report": cfg.report, "--save-fp32": cfg.save_fp32,
                        "--plan": cfg.plan_out, "--html": cfg.html},
                       [*model_files(cfg.model), cfg.data.calib, cfg.data.eval, cfg.data.stats_cache, cfg.plan_in,
                        cfg.prune.train_data],
                       cfg.force)
    if (cfg.plan_out is not None or cfg.plan_in is not None) and not cfg.quant.activations.static:
        raise ConfigError("--plan and --from-plan record per-node placements of static int8 (uint8/int8 "
                          f"activations), not of --activations {cfg.quant.activations}")
    if cfg.data.stats_cache is not None and not cfg.quant.activations.static:
        raise ConfigError(f"--stats-cache holds activation histograms: it applies to static activations (uint8/int8), "
                          f"not to --activations {cfg.quant.activations}")
    if cfg.data.stats_cache is not None and not Path(cfg.data.stats_cache).parent.is_dir():
        raise ConfigError(f"--stats-cache directory {Path(cfg.data.stats_cache).parent} does not exist")
    q = cfg.quant
    if cfg.prune.enabled and cfg.data.calib is None:
        raise ConfigError("--prune needs --calib: channels and weights are ranked (and consumers refitted) on "
                          "calibration data")
    if cfg.data.calib is None:
        if q.activations.static:
            raise ConfigError("--calib is required: static int8 needs calibration data to set activation ranges "
                              "(or use --activations dynamic, or weight-only --activations none)")
        if q.activations == Activations.NONE and q.algorithm in (Algorithm.GPTQ, Algorithm.AWQ):
            raise ConfigError(f"--algorithm {q.algorithm} needs --calib: it rounds against the layers' "
                              "calibration inputs")
        if cfg.data.eval is None:
            raise ConfigError(f"--activations {q.activations} needs no calibration, but the accuracy report needs "
                              "data: pass --eval")


def quantize(cfg: RunConfig, status: Callable[[str], None] = lambda s: None,
             progress: Progress | None = None) -> Result:
    progress = progress or Silent()
    t_start = time.perf_counter()
    _check_options(cfg)
    with tempfile.TemporaryDirectory(prefix="quantkit-") as tmp:
        workdir = Path(tmp)
        from quantkit.quantize import streaming

        if streaming.applies(cfg.model):
            return streaming.quantize(cfg, workdir, status, progress, t_start)
        return _quantize(cfg, workdir, status, progress, t_start)


@dataclass
class Inputs:
    """What one run reads: the fp32 model and session, the data, the batch, a first feed."""

    source: Source
    model: ir.Model
    calib: DataSource | None
    evald: DataSource | None
    batch: int
    fixed: bool  # the model has a fixed batch size
    fp32: ort.InferenceSession
    feed: dict[str, np.ndarray]  # one calibration (or evaluation) batch, for tuning
    notes: list[str] = field(default_factory=list)
    fp32_timed: ort.InferenceSession | None = None  # with --threads: the session timings use
    # fp32 outputs already computed on calibration batches (the placement probe's), reused by the evaluation
    known: list[tuple[dict[str, np.ndarray], list[np.ndarray]]] = field(default_factory=list)
    parts: Parts | None = None  # what the comparisons score: outputs, or parts of concatenated ones
    # what the speed guard and the latency figure time: one sample of `feed` (see _timing_feed)
    timing_feed: dict[str, np.ndarray] = field(default_factory=dict)
    timed_batch: int = 1
    feed_samples: int = 1  # the samples `feed` holds

    @property
    def scored(self) -> DataSource:
        return self.evald or self.calib

    def scored_limit(self, cfg: RunConfig) -> int | None:
        """How many samples of `scored` are compared: the whole evaluation set, or the calibration
        samples the run used (--calib-samples) when there is none."""
        return None if self.evald else cfg.data.calib_samples

    @property
    def fp32_timing(self) -> ort.InferenceSession:
        return self.fp32_timed or self.fp32


@dataclass
class Outcome:
    """Everything the report is made of."""

    cfg: RunConfig
    inputs: Inputs
    placement: Placement
    calibration: Calibration
    plan: Plan
    rw: RewriteResult
    guard: GuardReport
    outputs: list[dict]
    latency: dict
    evaluation: dict
    bytes_after: int
    notes: list[str]


class _Laps:
    """Wall-clock seconds of each stage of a run, for the report."""

    def __init__(self, start: float) -> None:
        self.last = start
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 3)
        self.last = now


def _quantize(cfg: RunConfig, workdir: Path, status, progress: Progress, t_start: float) -> Result:
    laps = _Laps(t_start)
    inputs = _open(cfg, workdir, status, progress)
    laps.lap("load")
    model, notes = _canonicalize(inputs, workdir, status)
    _cheap_samples_time_the_batch(inputs, model, workdir)
    outputs = [o.name for o in inputs.fp32.get_outputs()]
    inputs.parts = output_parts(model, outputs)
    notes += _parts_notes(inputs.parts, outputs)
    laps.lap("canonicalize")
    model, pruning = _prune(cfg, model, inputs, workdir, status)
    laps.lap("prune")
    placement = placement_for(cfg.quant, trainable=cfg.finetune is not None)
    lowers = placement.lower
    placement.lower = lowers and cfg.finetune is None  # lowered after training instead
    model = placement.prepare_model(model)
    placement.float_tensors.update(mask_tensors(model))  # calibration may add more from observed ranges
    data = CalibrationData.of(cfg, inputs.calib, inputs.batch, inputs.fixed)
    calibration = calibrate(model, placement, cfg.quant, data, workdir, status, progress)
    notes += calibration.notes
    laps.lap("calibrate")
    notes += placement.tune(model, lambda m: _sqnr(m, inputs, workdir), status)
    laps.lap("tune")
    reference = _reference(cfg, model, inputs, workdir)
    placed = _budget(cfg, model, placement, inputs, workdir, status, reference, calibration.batch_bytes)
    notes += placed.get("notes", [])
    laps.lap("placement")
    (qmodel, plan, rw), guard_report = _place(cfg, model, placement, inputs, workdir, status, placed, progress)
    laps.lap("rewrite_and_speed_guard")
    notes += rw.notes
    finetuned = _finetune(cfg, inputs, qmodel, workdir, status, progress) if cfg.finetune is not None else None
    notes += finetuned["notes"] if finetuned is not None else []
    if finetuned is not None and lowers:
        lower.lower(qmodel)
    inner = subgraphs.quantize_weights(qmodel)
    if inner:
        notes.append(f"{len(inner)} weight(s) inside If/Loop/Scan bodies stored int8 and dequantized at run time "
                     "(activations inside control flow cannot be calibrated; see nodes.subgraph_weights)")
    if not plan.ops:
        notes.append("no node could be quantized; the output is the canonicalized float model")

    if pruning is not None and cfg.prune.sparse:  # zeros stored as a bitmask, rebuilt when ORT loads the model
        from quantkit.prune.storage import store_sparse, summarize

        pruning["storage"] = summarize(store_sparse(qmodel))
    q_path = workdir / "quantized.onnx"
    runtime.save(qmodel, q_path)
    # the speed guard timed the very model written unless something changed it afterwards
    guarded = finetuned is None and not inner and not (pruning is not None and cfg.prune.sparse)
    qsess, latency = _written(cfg, inputs, q_path, workdir, guard_report if guarded else GuardReport())
    outputs, evaluation = _measure(cfg, inputs, qsess, latency, guard_report, notes, status, progress)
    vs_pruned = _measure_pruned(cfg, inputs, reference.session, qsess, notes, progress) if reference.fixed else None
    laps.lap("evaluate")
    report = _report(Outcome(cfg, inputs, placement, calibration, plan, rw, guard_report, outputs, latency,
                             evaluation, model_bytes(q_path), notes))
    if vs_pruned is not None:
        report["outputs_vs_pruned"] = vs_pruned
    failures = _complete(report, cfg, model, placement, placed, inner, t_start, rw)
    report["pruning"] = pruning
    if finetuned is not None:
        report["finetune"] = finetuned
    laps.lap("report")
    report["stage_seconds"] = laps.seconds

    plan_file = _plan_file(cfg, placement, guard_report, placed) if cfg.plan_out is not None else None
    _save(cfg, qmodel, report, inputs.source.onnx_path, plan_file)
    return Result(report, failures)


def _complete(report: dict, cfg: RunConfig, model: ir.Model, placement: Placement, placed: dict,
              inner: list[subgraphs.SubgraphWeight], t_start: float, rw: RewriteResult,
              streamed: bool = False) -> list[str]:
    """The report sections every path shares; returns the gate failures."""
    _move_subgraph_nodes(report["nodes"], inner)
    report["sensitivity"] = placed.get("sensitivity", [])
    report["weight_error"] = weight_errors(model, cfg.quant, {s["node"] for s in report["nodes"]["float"]},
                                           rw.weight_error, placement.schemes[0].memo if placement.schemes else None)
    report["effective_config"] = effective_config(cfg)
    observers = {k: v for scheme in placement.schemes for k, v in getattr(scheme, "observers", {}).items()}
    report["histograms"] = histograms(observers, report["activations"])
    report["placement"] = {k: v for k, v in placed.items() if k not in ("sensitivity", "notes")} or None
    # --prune-fixed: the accuracy targets were quantization's, so they are gated against the pruned float
    # model too; the speedup is against the original fp32 model either way
    vs_pruned = report.get("outputs_vs_pruned")
    if vs_pruned is None:
        failures = check_gates(report["outputs"], cfg.gates, report["latency"])
    else:
        failures = [f"against the pruned float model: {f}"
                    for f in check_gates(vs_pruned, replace(cfg.gates, require_speedup=None))]
        failures += check_gates([], replace(cfg.gates, max_accuracy_drop=None, min_cosine=None, min_sqnr=None),
                                report["latency"])
    report["gates"] = {**asdict(cfg.gates), "passed": not failures, "failures": failures,
                       "accuracy_against": "the original model" if vs_pruned is None else
                       "the pruned float model (--prune-fixed; outputs_vs_pruned)"}
    report["memory"] = memory.section(report["model"]["bytes_before"], streamed)
    report["seconds"] = time.perf_counter() - t_start
    return failures


def _finetune(cfg: RunConfig, inputs: Inputs, qmodel: ir.Model, workdir: Path, status, progress: Progress) -> dict:
    """--finetune: train the quantized graph in place (quantkit/finetune/); the report's section,
    with the accuracy before training measured as the report measures it after."""
    from quantkit.finetune.step import finetune

    def scores(m: ir.Model) -> list[dict]:
        sess = runtime.session(m, workdir, tag="before fine-tuning", threads=cfg.threads)
        comparisons, _, _ = _evaluate(inputs.fp32, sess, inputs.scored, inputs.batch, inputs.fixed,
                                   inputs.scored_limit(cfg), inputs.source.reference, progress,
                                   parts=inputs.parts)
        return [c.result() for c in comparisons]

    return finetune(cfg, inputs, qmodel, workdir, status, progress, scores)[1]


def _save(cfg: RunConfig, qmodel: ir.Model, report: dict, fp32_path: Path, plan_file: dict | None) -> None:
    """The model, the report, the plan and the exported fp32 model are written together or not at all."""
    with Outputs(cfg.force) as out:
        out.stage_model(qmodel, cfg.output)
        if cfg.report is not None:
            out.stage_json(report, cfg.report)
        if plan_file is not None:
            out.stage_json(plan_file, cfg.plan_out)
        if cfg.html is not None:
            from quantkit.report.html import render_html

            out.stage_text(render_html(report), cfg.html)
        if cfg.save_fp32 is not None:
            out.stage_copy(fp32_path, cfg.save_fp32)
        out.commit()


def _move_subgraph_nodes(nodes: dict, inner: list[subgraphs.SubgraphWeight]) -> None:
    """Nodes inside control flow whose weights were stored int8 are listed as quantized (weight-only)."""
    names = {w.node for w in inner}
    nodes["float"] = [f for f in nodes["float"] if f["node"] not in names]
    nodes["quantized"] += [{"node": w.node, "op_type": w.op_type, "kind": "weight-only int8 (inside control flow)",
                            "per_channel": w.per_channel_axis >= 0} for w in inner]
    nodes["subgraph_weights"] = [asdict(w) for w in inner]


def _open(cfg: RunConfig, workdir: Path, status, progress: Progress, streamed: bool = False) -> Inputs:
    """Load the model (exporting PyTorch first), open the data, fix the batch, make the fp32
    session and take one batch for timing. `streamed` (quantize/streaming.py): the weights stay on
    disk and no fp32 session is made here (it runs alone later)."""
    source = _load(cfg, workdir, status, progress)
    model = load_onnx(source.onnx_path, keep_on_disk=streamed)
    done = already_quantized(model)
    if done:
        raise UnsupportedModelError(f"{cfg.model} is already quantized (it has {', '.join(done)})")
    specs = assign_batch_axes(input_specs(model), cfg.data.batch_axes)
    calib = open_data(cfg.data.calib, specs, cfg.data.preprocess) if cfg.data.calib is not None else None
    evald = open_data(cfg.data.eval, specs, cfg.data.preprocess) if cfg.data.eval is not None else None
    scored = evald or calib
    if cfg.gates.max_accuracy_drop is not None and not scored.has_labels:
        raise ConfigError(f"--max-accuracy-drop needs labels: add a '{LABELS}' array to {scored.path}")
    batch = _batch_size(specs, cfg.data.batch_size)
    fixed = bool(_fixed_batches(specs))
    first_source = calib or evald
    # --threads is for timings only: evaluation and search run at onnxruntime's default, as its own quantizer does
    fp32 = None if streamed else runtime.session(source.onnx_path, workdir, tag="original")
    timed = runtime.session(source.onnx_path, workdir, tag="original", threads=cfg.threads) \
        if cfg.threads and not streamed else None
    first_batch = next(complete_batches(first_source, batch, None, fixed), None)
    if first_batch is None:
        raise ConfigError(f"{first_source.path} holds fewer samples than the model's fixed batch size {batch}")
    feed = {s.name: first_batch[s.name] for s in specs}
    notes = _input_notes(source, calib)
    timing_feed, timed_batch, held = _timing(fp32, feed, specs,
                                             batch if fixed or cfg.data.batch_size is not None else 1, notes)
    return Inputs(source, model, calib, evald, batch, fixed, fp32, feed, notes, timed,
                  timing_feed=timing_feed, timed_batch=timed_batch, feed_samples=held)


def _timing(fp32: ort.InferenceSession | None, feed: dict[str, np.ndarray], specs: list[InputSpec], samples: int,
            notes: list[str]) -> tuple[dict[str, np.ndarray], int, int]:
    """The timing feed (_timing_feed), how many samples it holds (`samples`, or fewer when the first
    batch has fewer: --batch-size 16 on 3 samples times 3, and says so) and how many `feed` holds. A
    model that declares a dynamic batch but bakes its size into its graph (a Reshape to (8, -1)) cannot
    run one sample: one run of `fp32` on it tells, and then the whole first batch is timed. A cheap model
    times its first batch too (_cheap_samples_time_the_batch, once the model is canonical)."""
    held = min((feed[s.name].shape[s.batch_axis] for s in specs if s.batch_axis is not None), default=samples)
    if held <= samples:
        return feed, held, held
    one = _timing_feed(feed, specs, samples)
    if fp32 is not None:
        try:
            fp32.run(None, one)
        except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException
            why = first_line(e).split(" Status Message:")[0].split(" : ")[-1]  # onnxruntime's, without its source
            notes.append(f"the model does not run on {samples} sample(s) ({why}): the speed guard and the latency "
                         f"figure time the first batch of the data ({held} samples) instead")
            return feed, held, held
    return one, samples, held


def _cheap_samples_time_the_batch(inputs: Inputs, model: ir.Model, workdir: Path) -> None:
    """A timing feed of fewer samples than the first batch holds is kept only when they cost at least
    MIN_TIMED_MACS (counted on the canonical model, whose weights are initializers: a converter's Constant
    nodes hide theirs): a cheap model's one-sample runs are too short to time on a loaded machine."""
    if not inputs.timing_feed or inputs.timing_feed is inputs.feed:
        return
    per_node = node_macs(model, inputs.timing_feed, workdir, one_sample=True)
    if per_node is not None and sum(per_node.values()) >= MIN_TIMED_MACS:
        return
    inputs.timing_feed, inputs.timed_batch = inputs.feed, inputs.feed_samples


def _timing_feed(feed: dict[str, np.ndarray], specs: list[InputSpec], samples: int) -> dict[str, np.ndarray]:
    """The first `samples` samples of a batch: what the speed guard and the latency figure time. One sample
    unless the model fixes its batch, --batch-size asked for one or a sample is cheap (MIN_TIMED_MACS): a CPU
    or edge deployment typically runs a request at a time, and a timed run of one sample costs an eighth of
    one of eight (ocr_det: 8.4 s of a 45 s run went to the guard's batches)."""
    out = {}
    for s in specs:
        x = feed[s.name]
        out[s.name] = x if s.batch_axis is None or x.shape[s.batch_axis] <= samples else \
            np.ascontiguousarray(np.take(x, range(samples), axis=s.batch_axis))
    return out


def _input_notes(source: Source, calib: DataSource | None) -> list[str]:
    notes = [f"{calib.path}: arrays {', '.join(calib.extra_keys)} match no model input and were ignored"] \
        if calib is not None and calib.extra_keys else []
    if source.export is not None:
        notes.append(f"exported from PyTorch with the {source.export['exporter']} exporter; the report compares "
                     "against the PyTorch model's own outputs")
        if "fallback_reason" in source.export:
            notes.append(source.export["fallback_reason"])
    return notes


def _canonicalize(inputs: Inputs, workdir: Path, status) -> tuple[ir.Model, list[str]]:
    status("canonicalizing graph")
    model = inputs.model
    notes = inputs.notes + canonicalize(model)
    shapes.infer(model)
    if shapes.untyped_values(model):
        n = shapes.fill_from_run(model, inputs.feed, workdir)
        notes.append(f"shape inference left {n} tensor(s) untyped; typed them from one real run")
    return model, notes


def _prune(cfg: RunConfig, model: ir.Model, inputs: Inputs, workdir: Path, status) -> tuple[ir.Model, dict | None]:
    """--prune: channels, heads or weights removed before quantization (quantkit/prune); with an
    accuracy target (and no --prune-fixed), the largest ratio up to --prune that leaves quantization
    half the budget."""
    if not cfg.prune.enabled:
        return model, None
    from quantkit.prune import prune, prune_to_target

    def batches():
        return complete_batches(inputs.calib, inputs.batch, cfg.data.calib_samples, inputs.fixed)

    train_batches = None
    if cfg.prune.train_data is not None:  # --prune-train-data: the block training's extra data
        extra = open_data(cfg.prune.train_data, assign_batch_axes(input_specs(inputs.model), cfg.data.batch_axes),
                          cfg.data.preprocess)

        def train_batches():
            return complete_batches(extra, inputs.batch, None, inputs.fixed)

    g = cfg.gates
    if cfg.prune.fixed or (g.min_cosine is None and g.min_sqnr is None and g.max_accuracy_drop is None):
        status(f"pruning {cfg.prune.ratio:.0%} ({cfg.prune.structure})")
        section = prune(model, cfg.prune, batches, inputs.feed, workdir, status=status, train_batches=train_batches)
        if cfg.prune.fixed:  # --prune-fixed: the ratio as given; any target is quantization's (_reference)
            section["fixed"] = True
        return model, section
    target = budget.Target.from_gates(g.min_cosine, g.min_sqnr, g.max_accuracy_drop)
    probe = budget.Probe.take(inputs.fp32, batches())
    return prune_to_target(model, cfg.prune, batches, inputs.feed, workdir, target,
                           lambda m: probe.score(runtime.session(m, workdir, tag="pruned candidate")), status,
                           train_batches)


def _sqnr(model: ir.Model, inputs: Inputs, workdir: Path) -> float:
    """Output SQNR in dB of a candidate against fp32 on the first batch."""
    ref = inputs.fp32.run(None, inputs.feed)
    out = runtime.session(model, workdir, tag="candidate").run(None, inputs.feed)
    sig = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in ref)
    err = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(o, np.float64)) ** 2)) for r, o in zip(ref, out))
    return float(10 * np.log10(sig / max(err, 1e-30)))


@dataclass
class Reference:
    """What the accuracy targets are measured against: the original model, or the pruned float model."""

    make: Callable[[], ort.InferenceSession]
    pruned: bool  # the pruned float model
    fixed: bool  # ... because of --prune-fixed (then the gates read it too)

    @cached_property
    def session(self) -> ort.InferenceSession:
        return self.make()

    @property
    def describe(self) -> str:
        return "the pruned float model" if self.pruned else "the original model"


def _reference(cfg: RunConfig, model: ir.Model, inputs: Inputs, workdir: Path) -> Reference:
    """The reference of the placement's budget (and with --prune-fixed of the accuracy gates).
    After --prune with no target, the default budget keeps the quantized model faithful to the pruned
    one: against the original, pruning alone may have spent it, and then no placement (float included)
    meets it. With a target and no --prune-fixed, pruning took half of it and quantization is measured
    against the original for the rest. With --prune-fixed the ratio was not searched: the target is
    quantization's alone, against the pruned float model."""
    g = cfg.gates
    target = budget.Target.from_gates(g.min_cosine, g.min_sqnr, g.max_accuracy_drop)
    fixed = cfg.prune.enabled and cfg.prune.fixed
    if not (cfg.prune.enabled and (target.default or fixed)):
        return Reference(lambda: inputs.fp32, False, False)
    ref = Reference(lambda: runtime.session(model, workdir, tag="pruned reference"), True, fixed)
    if fixed:  # made now, from the pruned float model as it is before the rewrite: the gates read it at the end
        _ = ref.session
    return ref


def _measure_pruned(cfg: RunConfig, inputs: Inputs, pruned: ort.InferenceSession, qsess, notes: list[str],
                    progress: Progress) -> list[dict]:
    """--prune-fixed: the written model against the pruned float model on the evaluation data (what the
    accuracy gates read); `outputs` stays the comparison with the original model."""
    comparisons, _, _ = _evaluate(pruned, qsess, inputs.scored, inputs.batch, inputs.fixed,
                                  inputs.scored_limit(cfg), None, progress,
                                  parts=inputs.parts)
    notes.append("--prune-fixed: the accuracy targets and gates apply to quantization, measured against the "
                 "pruned float model (outputs_vs_pruned); outputs compares with the original model")
    return [c.result() for c in comparisons]


def _budget(cfg: RunConfig, model: ir.Model, placement: Placement, inputs: Inputs, workdir: Path, status,
            reference: Reference, calibration_bytes: int = 0) -> dict:
    """Per-node placement for static int8: replayed from --from-plan, or searched to meet the
    accuracy target (quantize/budget.py). Sets `placement.overrides`; returns the report section.
    `calibration_bytes`: the largest batch of tensors the calibration pass held; a sensitivity chunk may
    hold as much (twice that grew ocr_rec's peak by a tenth: the chunk's sessions come on top)."""
    if not cfg.quant.activations.static:
        return {}
    if cfg.plan_in is not None:
        saved = budget.PlanFile.load(cfg.plan_in, file_sha256(cfg.model))
        placement.overrides = {k: v for k, v in saved.nodes.items() if v != SchemeName.STATIC.value}
        return {"source": f"replayed from {cfg.plan_in}", "target": saved.target, "moved": placement.overrides,
                "speed_dropped": saved.speed_dropped}
    full_model, full_plan, _ = placement.build(model, set(), "", lower=False)
    if not full_plan.ops:
        return {}

    def session(m: ir.Model):
        return runtime.session(m, workdir, tag="candidate", threads=runtime.PLACEMENT_THREADS)

    g = cfg.gates
    target = budget.Target.from_gates(g.min_cosine, g.min_sqnr, g.max_accuracy_drop)
    status("placement: measuring how much error each quantized op adds")
    laps = _Laps(time.perf_counter())  # where the placement's time goes (the report's placement.seconds)
    probe = budget.Probe.take(reference.session, complete_batches(inputs.calib, inputs.batch, None, inputs.fixed),
                              parts=inputs.parts)
    if not reference.pruned and sum(a.nbytes for ref in probe.reference for a in ref) <= KNOWN_BYTES:
        inputs.known = list(zip(probe.feeds, probe.reference))
    laps.lap("probe (fp32 reference)")
    split = next((s for s in placement.alternates if isinstance(s, SplitScheme)), None)
    ranked = budget.sensitivity(model, full_model, full_plan, probe, session,
                                lambda m: runtime.session(m, workdir, tag="single op", lean=True,
                                                          threads=runtime.PLACEMENT_THREADS),
                                split.emulation if split is not None else lambda x: None,
                                placement.schemes[0].memo,  # a convolution's weight-only int8: its GPTQ codes
                                max(budget.CHUNK_BYTES, calibration_bytes),
                                2 * calibration_bytes)  # the pass exposed every op's tensors, in fp32 only
    laps.lap("sensitivity")
    refusals = {s.name.value: s.refuse for s in placement.alternates}
    rows = {r["node"]: r for r in ranked}
    choices = {budget.op_key(op): budget.ladder(budget.alternatives(op, refusals), rows.get(budget.op_key(op)))
               for op in full_plan.ops}
    aim = target.with_margin()

    def evaluate(overrides: dict[str, str]) -> list[dict]:
        """A candidate's probe figures; the all-static one in full (the report's baseline), the others
        stopping as soon as they cannot meet the target (budget.Probe.score). Built as it would be
        written (lowered for onnxruntime), so it runs as fast as the written model would."""
        placement.overrides = overrides
        return probe.score(session(placement.build(model, set(), "")[0]), aim if overrides else None,
                           reorder=not overrides, parallel=runtime.PARALLEL_RUNS)

    found = budget.search(budget.by_gain(ranked, choices), choices, aim, evaluate, status)
    laps.lap(f"search ({len(found.trials)} candidates)")
    placement.overrides = found.overrides
    notes = _budget_notes(found, len(choices), target)
    samples = sum(len(next(iter(f.values()))) for f in probe.feeds)
    return {"source": "search", "target": target.describe(), "searched_for": target.with_margin().describe(),
            "reference": reference.describe,
            "met": found.met, "moved": found.overrides,
            "probe_samples": samples, "figures": found.figures, "trials": found.trials, "sensitivity": ranked,
            "notes": notes, "seconds": laps.seconds}


def _budget_notes(found: budget.SearchResult, ops: int, target: budget.Target) -> list[str]:
    notes = []
    if found.overrides and len(found.overrides) == ops and set(found.overrides.values()) == {budget.FLOAT}:
        notes.append(f"to meet {target.describe()} every quantizable op stays float: int8 cannot reach this target "
                     "on this model")
    if found.overrides:
        notes.append(f"accuracy budget ({target.describe()}): {len(found.overrides)} op(s) moved out of static int8 "
                     f"({_tally(found.overrides.values())}); see placement and sensitivity")
    if not found.met:
        notes.append(f"the target {target.describe()} is not met even with every sensitive op moved out of "
                     f"static int8: {found.shortfall}")
    return notes


def _tally(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} to {k}" for k, n in sorted(counts.items()))


def _plan_file(cfg: RunConfig, placement: Placement, guard_report: GuardReport, info: dict) -> dict:
    return budget.PlanFile(dict(placement.overrides), guard_report.dropped_kinds, file_sha256(cfg.model),
                           target=info.get("target", "")).save()


def _place(cfg: RunConfig, model: ir.Model, placement: Placement, inputs: Inputs, workdir: Path, status,
           plan_info: dict, progress: Progress):
    """The rewritten model, its plan and rewrite result: every planned op, or with the speed guard
    the fastest placement of op groups (or the groups a replayed plan names)."""
    def build(drop):
        return placement.build(model, set(drop), SPEED_GUARD_REASON)

    # the ops the accuracy budget put on weight-only int8 stay so whatever the guard drops (Placement.build):
    # a group of them alone has nothing to drop and is not timed
    kinds = placement.kinds(model, droppable=True)
    if "speed_dropped" in plan_info:
        dropped = {OpKind(k) for k in plan_info["speed_dropped"]}
        built, report = build(dropped), GuardReport(dropped=sorted(k.label for k in dropped),
                                                    dropped_kinds=sorted(k.value for k in dropped))
    elif cfg.speed_guard and kinds:
        def session(m: ir.Model):
            return runtime.session(m, workdir, tag="candidate", threads=cfg.threads)

        # weight-only quantization is compression: timing never undoes it unless --require-speedup asks
        compression = set(kinds) if cfg.quant.activations == Activations.NONE else set(COMPRESSION_ONLY)
        for_speed = cfg.gates.require_speedup is not None
        progress.start("speed guard", len(timed_kinds(set(kinds), for_speed, compression)), unit="placements")
        # every group's trial session held at once for the shared first look, when they fit easily
        shared = model_bytes(inputs.source.onnx_path) * (len(kinds) + 2) <= SHARED_LOOK_BYTES
        built, report = guard(build, session, inputs.fp32_timing, inputs.timing_feed, kinds, status=status,
                              for_speed=for_speed, compression_only=compression, shared_look=shared,
                              advance=progress.advance)
        progress.finish()
    else:
        built, report = build(set()), GuardReport()
    status(f"quantized {len(built[1].ops)} node(s)")
    return built, report


def _written(cfg: RunConfig, inputs: Inputs, q_path: Path, workdir: Path, guard_report: GuardReport):
    """The written model's session and its latency against fp32."""
    try:
        qsess = runtime.session(q_path, workdir, tag="quantized")
    except UnsupportedModelError as e:  # our own output failed to load: that is a bug
        raise RuntimeError(f"internal error: {e}") from e

    def timed_session():
        return runtime.session(q_path, workdir, tag="quantized", threads=cfg.threads) if cfg.threads else qsess

    return qsess, _latency(cfg, inputs, timed_session, guard_report)


def _latency(cfg: RunConfig, inputs: Inputs, timed_session, guard_report: GuardReport) -> dict:
    """The written model against fp32, interleaved at --threads: the speed guard's own last timing of
    that pair when it has one (and --latency-runs asks for nothing else), else timed here."""
    if guard_report.final_ms is not None and cfg.latency_runs is None:
        fp32_ms, q_ms, runs = guard_report.final_ms
        latency = {"fp32_ms": fp32_ms, "quantized_ms": q_ms, "speedup": fp32_ms / q_ms if q_ms > 0 else None,
                   "runs": runs, "timed_by": "speed guard (its last timing of the written model)"}
    else:
        # the figure only: fewer runs once LATENCY_SECONDS passed, unless asked for a number or a gate reads it
        bounded = cfg.latency_runs is None and cfg.gates.require_speedup is None
        latency = compare_latency(inputs.fp32_timing, timed_session(), inputs.timing_feed,
                                  runs=cfg.latency_runs or DEFAULT_LATENCY_RUNS,
                                  seconds=LATENCY_SECONDS if bounded else None)
    latency.update(batch_size=inputs.timed_batch, threads=cfg.threads or "onnxruntime default")
    return latency


def _measure(cfg: RunConfig, inputs: Inputs, qsess, latency: dict, guard_report: GuardReport, notes: list[str],
             status, progress: Progress):
    """Accuracy against the reference on the evaluation data; notes on the latency against fp32."""
    status("evaluating fp32 against int8")
    scored, batch = inputs.scored, inputs.batch
    comparisons, eval_samples, lm_figures = _evaluate(inputs.fp32, qsess, scored, batch, inputs.fixed,
                                          inputs.scored_limit(cfg), inputs.source.reference,
                                          progress, [] if inputs.evald else inputs.known, inputs.parts)
    if inputs.evald is None:
        notes.append("evaluated on the calibration data (no --eval given): figures are optimistic")
    if latency["speedup"] is not None and latency["speedup"] < 1:
        why = ("int8 cannot win on this model: no placement clearly beat fp32, so the smallest one was written"
               if guard_report.int8_cannot_win else
               "its layers are too small for integer kernels to pay for the quantize/dequantize steps")
        notes.append(f"the int8 model is {1 / latency['speedup']:.2f}x SLOWER than fp32 in onnxruntime on this "
                     f"machine at batch {latency['batch_size']}: {why}")
    evaluation = {"source": str(scored.path), "on_calibration_data": inputs.evald is None, "samples": eval_samples}
    if lm_figures is not None:
        evaluation["language_model"] = lm_figures
    return [c.result() for c in comparisons], evaluation


def _report(o: Outcome) -> dict:
    cfg = o.cfg
    bytes_before = model_bytes(o.inputs.source.onnx_path)
    calibration, activations = o.placement.report(o.rw)
    report = {
        "quantkit_version": __version__,
        "onnxruntime_version": ort.__version__,
        "model": {"input": str(cfg.model), "output": str(cfg.output), "bytes_before": bytes_before,
                  "bytes_after": o.bytes_after,
                  "compression": bytes_before / o.bytes_after if o.bytes_after else None},
        "export": o.inputs.source.export,
        "config": {**asdict(cfg.quant), "exclude": list(cfg.quant.exclude)},
        "calibration": None,
        "evaluation": o.evaluation,
        "outputs": o.outputs,
        "latency": o.latency,
        "speed_guard": asdict(o.guard) if cfg.speed_guard else None,
        "nodes": {
            "quantized": [{"node": op.key, "op_type": op.node.op_type, "kind": op.kind.label,
                           "scheme": op.scheme.value if op.scheme else None,
                           "per_channel": op.weight_axis is not None} for op in o.plan.ops],
            "float": [asdict(s) for s in o.plan.skipped],
            "float_bias": o.rw.float_bias,
            "bias_corrected": o.rw.bias_corrected,
            "gptq": o.rw.gptq,
        },
        "float_tensors": [{"tensor": k, "reason": v} for k, v in o.plan.float_tensors.items()],
        "smoothquant": o.calibration.smoothing,
        "activations": activations,
        "notes": o.notes,
    }
    if calibration is None and o.calibration.passes:  # statistics without activation ranges (GPTQ)
        calibration = {"method": None}
    if calibration is not None:
        c = o.calibration
        report["calibration"] = {"source": c.source, "samples": c.samples, "batch_size": c.batch,
                                 "method": calibration.pop("method"), "seconds": c.seconds, "passes": c.passes,
                                 **c.timings, **calibration}
    return report


def _parts_notes(parts: Parts, outputs: list[str]) -> list[str]:
    """A note per output that is compared part by part."""
    notes = []
    for i in parts.split_outputs:
        pieces = [p for p in parts.parts if p.output == i]
        notes.append(f"output '{outputs[i]}' concatenates {len(pieces)} tensors along axis {pieces[0].axis} "
                     f"({', '.join(p.label for p in pieces)}): each part is compared, budgeted and gated on its "
                     "own, so that small values (class scores) are not drowned by large ones (boxes)")
    return notes


def _known(known: list[tuple[dict, list[np.ndarray]]] | None, i: int, feed: dict) -> list[np.ndarray] | None:
    """The i-th known reference outputs, when they were computed on exactly this feed."""
    if not known or i >= len(known):
        return None
    seen, outs = known[i]
    same = seen.keys() == feed.keys() and all(seen[k].shape == feed[k].shape and np.array_equal(seen[k], feed[k])
                                              for k in feed)
    return outs if same else None


def _evaluate(ref_sess: ort.InferenceSession, q_sess: ort.InferenceSession, source: DataSource,
              batch: int, fixed: bool, limit: int | None, reference: Callable | None = None,
              progress: Progress | None = None, known: list[tuple[dict, list[np.ndarray]]] | None = None,
              parts: Parts | None = None):
    """Compare the quantized model with the reference: the original ONNX model, or for PyTorch
    inputs the PyTorch model itself. `known`: ref_sess's outputs already computed on some batches
    (feed, outputs), used for a batch whose feed is identical instead of running it again."""
    names = [o.name for o in ref_sess.get_outputs()]
    feeds = {i.name for i in ref_sess.get_inputs()}
    parts = parts or Parts.whole(len(names), names)
    comparisons = [OutputComparison(n) for n in parts.names]
    tracker = lm.Tracker(names)
    samples = 0
    progress = progress or Silent()
    progress.start("evaluating", min(source.samples, limit or source.samples))
    for i, b in enumerate(complete_batches(source, batch, limit, fixed)):
        feed = {k: v for k, v in b.items() if k in feeds}
        ref = reference(feed) if reference is not None else _known(known, i, feed) or \
            runtime.run(ref_sess, names, feed, f"the evaluation data {source.path}")
        q = q_sess.run(names, feed)
        labels = b.get(LABELS)
        for i, (c, r, x) in enumerate(zip(comparisons, parts.split(ref), parts.split(q))):
            c.update(r, x, labels if i == 0 else None, feed)
        tracker.update(ref, q, b)
        n = len(next(iter(b.values())))
        samples += n
        progress.advance(n)
    progress.finish()
    return comparisons, samples, tracker.result()


def _load(cfg: RunConfig, workdir: Path, status, progress: Progress) -> Source:
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


