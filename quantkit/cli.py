"""Command line: the only module that prints or exits. Heavy imports happen inside commands so
that `quantkit --help` stays fast and never loads onnxruntime or torch."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource

from quantkit import __version__
from quantkit.config import Activations, Algorithm, Format, Method, Rounding, Weights
from quantkit.errors import (
    AccuracyGateError,
    Interrupted,
    QuantkitError,
    clear_signals,
    raise_if_interrupted,
    signal_received,
)

EXIT_CODES = """\b
Exit codes:
  0  success
  1  internal error (a bug: rerun with --verbose and report it)
  2  usage error (bad options, output exists without --force)
  3  bad input (unreadable model, data that does not match the model)
  4  unsupported model
  5  gate failed (--max-accuracy-drop / --min-cosine / --require-speedup);
     model and report are still written"""


# quantize parameters that only change how the run is shown, and click names that differ from the option keys
CLI_ONLY = ("config_file", "as_json", "quiet", "verbose")
CLI_KEYS = {"eval_": "eval", "fmt": "format", "inputs": "input"}


def _given_options(ctx: click.Context, model: Path | None, o: dict) -> dict:
    """The --config file's options, overridden by the flags given on the command line (defaults
    are not 'given': they must not override the file)."""
    from quantkit import options

    base = options.read_toml(o["config_file"]) if o["config_file"] is not None else {}
    given = {CLI_KEYS.get(k, k): v for k, v in o.items()
             if k not in CLI_ONLY and ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    if model is not None:
        given["model"] = model
    return {**base, **options.normalize(given)}


@click.group(epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="quantkit")
def cli() -> None:
    """Post-training int8/int4 quantization of ONNX and PyTorch models, with an accuracy report."""


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML file of quantize options (keys as the long flags, e.g. calib_samples = 256); flags given on the command line override it.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: .npz keyed by input name, .npy (single input), or a directory of them.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Quantized model path [default: MODEL.int8.onnx].")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help="Evaluation data (same formats; may hold 'labels'). Default: the calibration data.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the full report as JSON to this path.")
@click.option("--html", type=click.Path(path_type=Path), help="Also write the report as one self-contained HTML page with charts (needs matplotlib: pip install 'quantkit[html]').")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout (the table goes to stderr).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--activations", type=click.Choice(Activations.values()), help="uint8 asymmetric (default) or int8 symmetric static activations; dynamic (quantized at run time); none (weight-only; the default with --weights int4). dynamic and none need no --calib.")
@click.option("--weights", type=click.Choice(Weights.values()), default=Weights.INT8.value, show_default=True, help="Weight type; int4 is weight-only (MatMulNBits, GatherBlockQuantized).")
@click.option("--block-size", type=int, default=32, show_default=True, help="Weight-only: rows of K sharing one scale (16..256, power of two).")
@click.option("--asymmetric", is_flag=True, help="Weight-only: a zero point per block instead of symmetric blocks.")
@click.option("--algorithm", type=click.Choice(Algorithm.values()), default=Algorithm.RTN.value, show_default=True, help="Weight-only rounding: round to nearest, GPTQ against the calibration inputs, or AWQ channel scales (gptq and awq need --calib).")
@click.option("--accuracy-level", type=int, default=4, show_default=True, help="MatMulNBits compute type: 4 = int8 (fastest on CPU), 0 = float.")
@click.option("--format", "fmt", type=click.Choice(Format.values()), default=Format.ORT.value, show_default=True, help="ort: onnxruntime contrib ops where they are faster (MatMulNBits, biases inside MatMulIntegerToFloat); qdq: standard QuantizeLinear/DequantizeLinear only (int4 blocks at opset 21), for other runtimes.")
@click.option("--keep-int8", multiple=True, metavar="PATTERN", help="Weight-only int4: node names or op types (glob) kept at 8 bits.")
@click.option("--method", type=click.Choice(Method.values()), default=Method.MINMAX.value, show_default=True, help="How activation ranges are chosen from the calibration statistics.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --method percentile: keep this central percentage of values.")
@click.option("--stats-cache", type=click.Path(path_type=Path), help="Save/reuse calibration histograms here; a rerun on the same model and data skips the forward passes.")
@click.option("--smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[ALPHA|off]", help="Smooth activation outliers into the weights of MatMuls fed by LayerNorm; alpha searched per layer unless given. On by default for static int8; 'off' turns it off.")
@click.option("--bias-correction", is_flag=True, help="Shift each channel's bias by the mean error the int8 weights introduce, measured on the calibration data.")
@click.option("--weight-rounding", type=click.Choice(Rounding.values()), default=Rounding.RTN.value, show_default=True, help="Static int8: round each per-channel weight to nearest, or against its layer's calibration inputs (GPTQ, same scales; slower calibration).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Node names or op types (glob, comma-separated, repeatable) to keep float.")
@click.option("--preprocess", metavar="STEPS", help="Image folders as data: e.g. resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw (see README).")
@click.option("--calib-samples", type=int, help="Use at most N calibration samples.")
@click.option("--batch-axis", multiple=True, metavar="NAME=K", help="The axis of input NAME that samples are stacked on (default: its first dynamic axis); NAME=none feeds the array whole to every batch.")
@click.option("--batch-size", type=int, help="Batch size for calibration, evaluation and timing [default: 8, or the model's fixed batch; without either, the speed guard and the latency figure time one sample when it costs at least 128M multiply-accumulates].")
@click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Target and gate: exit 5 if top-1 accuracy drops more than this (needs labels); the placement keeps top-1 agreement within it on calibration data.")
@click.option("--min-cosine", type=float, help="Target and gate: every output's mean cosine to fp32 at least this (static int8 places ops to meet it; exit 5 if the result misses it). Default target without any: 0.998.")
@click.option("--min-sqnr", type=float, metavar="DB", help="Target and gate: every output's SQNR against fp32 at least DB (static int8 moves the most sensitive ops out until it holds; exit 5 if the result misses it).")
@click.option("--plan", type=click.Path(path_type=Path), help="Write the chosen per-node placement (JSON) here, to replay with --from-plan.")
@click.option("--from-plan", type=click.Path(path_type=Path), help="Replay a placement written by --plan: no sensitivity search, no speed guard; the same inputs give the same model bytes.")
@click.option("--require-speedup", type=float, metavar="X", help="Gate: exit 5 if the int8 model is not at least X times faster than fp32.")
@click.option("--threads", type=int, help="onnxruntime threads for timing (speed guard and report) [default: onnxruntime's].")
@click.option("--latency-runs", type=int, metavar="N", help="Timed runs of each model for the report's latency, after a warm-up [default: 20, or fewer (at least 5) once they took 2 s, unless --require-speedup reads the figure; large external-data models: each model's own evaluation batches, no extra runs].")
@click.option("--no-speed-guard", is_flag=True, help="Write every placement without timing candidates first.")
@click.option("--model-class", metavar="PKG.MODULE:FACTORY", help="PyTorch checkpoint (state_dict .pt/.pth or .safetensors): the callable that builds the module.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a whole pickled torch module (this runs code from the file).")
@click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE:DTYPE", help="PyTorch models: an input signature, e.g. x:Bx3x224x224:float32 (non-numeric dims are dynamic). Default: from the data.")
@click.option("--output-names", metavar="A,B", help="PyTorch models: names for the exported model's outputs, in order (instead of the exporter's).")
@click.option("--save-fp32", type=click.Path(path_type=Path), help="PyTorch models: also keep the exported fp32 ONNX here.")
@click.option("--prune", type=float, metavar="RATIO", help="Prune this fraction (e.g. 0.3) of channels / heads / weights before quantizing (see --prune-structure).")
@click.option("--prune-structure", type=click.Choice(["channel", "head", "unstructured", "2:4"]), default="channel", show_default=True, help="channel: output channels and FFN neurons, consumers refitted by least squares; head: attention heads; unstructured / 2:4: single weights zeroed (file stored sparse).")
@click.option("--prune-method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), help="Which weights unstructured / 2:4 pruning zeroes [default: wanda].")
@click.option("--prune-allocation", type=click.Choice(["uniform", "sensitivity"]), default="uniform", show_default=True, help="channel: the same ratio in every layer, or per layer from each layer's measured effect on the outputs (RATIO of the prunable MACs removed where it costs the least).")
@click.option("--prune-refit", type=click.Choice(["one-shot", "sequential", "train", "joint"]), default="one-shot", show_default=True, help="channel: refit every layer on the unpruned model's statistics, or layer after layer on the pruned model's towards the unpruned model's block outputs (one calibration pass per layer); train: sequential, then each pruned block's kept weights trained (Adam, in PyTorch) towards those outputs; joint: train, then all pruned blocks' kept weights trained together towards the unpruned model's outputs.")
@click.option("--prune-train-steps", type=int, metavar="N", help="--prune-refit train or joint: Adam steps per pruned block at most [default: 800].")
@click.option("--prune-joint-steps", type=int, metavar="N", help="--prune-refit joint: Adam steps of the joint phase at most [default: 1500].")
@click.option("--prune-joint-loss", type=click.Choice(["outputs", "pooled"]), help="--prune-refit joint: outputs: per-sample cosine over real positions plus squared error of the outputs (what the report compares); pooled: also the cosine of the mask-aware mean-pooled vector (sentence embeddings) [default: outputs].")
@click.option("--prune-fixed", is_flag=True, help="With --prune and an accuracy target (--min-cosine, --min-sqnr, --max-accuracy-drop): prune exactly RATIO (no ratio search) and hold the target on quantization alone, measured against the pruned float model by the placement and the gates (the report also compares with the original model).")
@click.option("--prune-train-data", type=click.Path(path_type=Path), help="--prune-refit train or joint: more data (same formats) the blocks are also trained on; the refit and the held-out check use the calibration data only.")
@click.option("--finetune", type=int, metavar="STEPS", help="PyTorch models: after quantizing, train the quantized graph STEPS steps against the fp32 model's outputs and block outputs (the unpruned model's with --prune; learned weights, scales and ranges); Ctrl-C stops early and keeps the best so far.")
@click.option("--lr", type=float, metavar="LR", help="--finetune: Adam learning rate of the weights (activation ranges: 10x, weight scales: 0.1x) [default: 1e-4].")
@click.option("--finetune-data", type=click.Path(path_type=Path), help="--finetune: training data (same formats) [default: the calibration data].")
@click.option("--finetune-rounding", type=int, metavar="ITERS", help="--finetune with int4 weights: first learn each MatMulNBits weight's rounding up or down against its float output on the training data, ITERS iterations per layer (0: off) [default: 100].")
@click.option("--finetune-labels-weight", type=float, metavar="W", help="--finetune: mix cross-entropy on the data's labels into the loss with weight W in [0, 1] [default: 0].")
@click.option("--force", is_flag=True, help="Overwrite existing output and report files.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json).")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def quantize(model: Path | None, **o) -> None:
    """Quantize MODEL (ONNX, or PyTorch: TorchScript, torch.export, checkpoint + --model-class) and
    report the accuracy kept."""
    _command(o, lambda run: _quantize(model, o, run))


def _quantize(model: Path | None, o: dict, run: _Run) -> None:
    from quantkit.report.render import render_text
    from quantkit.run import run as pipeline

    options = _given_options(click.get_current_context(), model, o)
    result = pipeline(options, status=run.status, progress=None if o["quiet"] else TerminalProgress(run.err))
    run.emit(result.report, render_text)
    if result.gate_failures:
        raise AccuracyGateError("; ".join(result.gate_failures))


class _Run:
    """One command's terminal: its own stdout/stderr (see _isolated_streams) and its flags."""

    def __init__(self, o: dict, out, err):
        self.o, self.out, self.err = o, out, err
        self.printed = False  # a JSON document is already on stdout

    def status(self, msg: str) -> None:
        raise_if_interrupted()  # a signal whose exception Python dropped (see errors.py)
        if not self.o.get("quiet"):
            click.echo(f"quantkit: {msg}", file=self.err)

    def echo(self, text: str) -> None:
        click.echo(text, file=self.out)

    def emit(self, report: dict, render: Callable[[dict], str]) -> None:
        """The report: JSON on stdout with --json (the table then on stderr), else the table."""
        from quantkit.output import dumps

        if self.o.get("as_json"):
            click.echo(dumps(report), file=self.out)
            self.printed = True
        if not self.o.get("quiet"):
            click.echo(render(report), file=self.err if self.o.get("as_json") else self.out)


def _command(o: dict, body: Callable[[_Run], None]) -> None:
    """Run a command body with only quantkit's own output on the terminal, signals that unwind
    (and remove temporary files), and every outcome mapped to its exit code."""
    with _isolated_streams(bool(o.get("verbose"))) as (out, err), _signals_interrupt():
        run = _Run(o, out, err)
        code = _guarded(run, body)
    sys.exit(code)


def _guarded(run: _Run, body: Callable[[_Run], None]) -> int:
    try:
        body(run)
        return 0
    except QuantkitError as e:
        return _fail(run, e, str(e), e.exit_code)
    except Interrupted as e:
        return _fail(run, e, f"interrupted by {e.name}; temporary files removed, nothing written", e.exit_code)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal(run, e)
        where = f" writing {e.filename}" if e.filename else ""
        return _fail(run, e, f"no space left on the device{where}; free space (or point TMPDIR at a larger disk) "
                     "and rerun: nothing was written", 3)
    except Exception as e:
        return _internal(run, e)


def _internal(run: _Run, e: Exception) -> int:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return _fail(run, e, f"internal error: {type(e).__name__}: {first} (rerun with --verbose and report it)", 1,
                 prefix="")


def _fail(run: _Run, exc: BaseException, message: str, code: int, prefix: str = "error: ") -> int:
    """One line on stderr (the whole chained traceback with -v); with --json and no report printed
    yet, a JSON error document on stdout, so stdout always holds exactly one JSON document."""
    if run.o.get("verbose"):
        _print_traceback(exc, run.err)
    click.echo(f"{prefix}{message}", file=run.err)
    if run.o.get("as_json") and not run.printed:
        click.echo(json.dumps({"error": {"message": message, "exit_code": code, "type": type(exc).__name__}},
                              indent=2), file=run.out)
    return code


@contextlib.contextmanager
def _signals_interrupt():
    def handler(signum, frame):
        signal_received(signum)
        raise Interrupted(signum)

    clear_signals()

    wanted = [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)]
    try:
        old = {s: signal.signal(s, handler) for s in wanted if s is not None}
    except ValueError:  # not the main thread (embedded use): leave signals alone
        old = {}
    if old and hasattr(signal, "pthread_sigmask"):
        # a blocked mask is inherited from the parent process (some launchers block these while they
        # fork): blocked, the signals would wait until the run ends instead of stopping it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(old))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        clear_signals()


def _own_stream(stream):
    """A stream of our own on a copy of `stream`'s file descriptor (so redirecting the descriptor
    does not silence us), or `stream` itself when it has none (click's test runner)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream, None
    stream.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace"), fd


@contextlib.contextmanager
def _isolated_streams(verbose: bool):
    """(out, err) for quantkit's own output. Inside, whatever else is written to stdout (Python
    prints, onnxruntime's or torch's C++ logging on descriptor 1) goes to stderr with -v and nowhere
    without it; other stderr output is kept only with -v. stdout then carries only what we print."""
    out, out_fd = _own_stream(sys.stdout)
    err, err_fd = _own_stream(sys.stderr)
    saved_py = sys.stdout, sys.stderr
    sink = os.open(os.devnull, os.O_WRONLY)
    saved_fds = {fd: os.dup(fd) for fd in (out_fd, err_fd) if fd is not None}
    try:
        if out_fd is not None:
            os.dup2(err_fd if (verbose and err_fd is not None) else sink, out_fd)
        if err_fd is not None and not verbose:
            os.dup2(sink, err_fd)
        sys.stdout = saved_py[1] if verbose else open(os.devnull, "w")  # noqa: SIM115 - closed below
        sys.stderr = saved_py[1] if verbose else sys.stdout
        yield out, err
    finally:
        _flush_c_stdio()
        if sys.stdout is not saved_py[1]:
            sys.stdout.close()
        sys.stdout, sys.stderr = saved_py
        for fd, copy in saved_fds.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(sink)
        for s in (out, err):
            if s not in saved_py:
                s.close()


def _flush_c_stdio() -> None:
    """C/C++ libraries buffer their own stdout; flush it while it still points at the sink."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _print_traceback(e: BaseException, file) -> None:
    """The full chained traceback on stderr, including causes a `raise ... from None` hid: with
    --verbose the original error matters more than a tidy message."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        x.__suppress_context__ = False
        x = x.__cause__ or x.__context__
    traceback.print_exception(type(e), e, e.__traceback__, file=file)


@cli.command("report", epilog=EXIT_CODES)
@click.argument("report_json", type=click.Path(path_type=Path))
@click.option("--html", type=click.Path(path_type=Path), help="Write the report as a self-contained HTML page here.")
@click.option("--config-out", type=click.Path(path_type=Path), help="Write the run's effective configuration as TOML (replay it with quantize --config).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def report_command(report_json: Path, html: Path | None, config_out: Path | None, force: bool, verbose: bool) -> None:
    """Render REPORT_JSON (written by quantize --report): the table, an HTML page, or the config to replay it."""
    def body(out: _Run):
        from quantkit import run
        from quantkit.output import check_destinations
        from quantkit.report.render import render_text

        report = run.load_report(report_json)
        if html is not None:
            from quantkit.report.html import require_matplotlib

            require_matplotlib()
            check_destinations({"--html": html}, [report_json], force)
        if config_out is not None:
            check_destinations({"--config-out": config_out}, [report_json], force)
            run.write_config(report, config_out, force)
        if html is not None:
            run.write_html(report, html, force)
        if html is None and config_out is None:
            out.echo(render_text(report))

    _command({"verbose": verbose}, body)


@cli.command("inspect", epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Data to check against the model (and to type tensors shape inference leaves untyped).")
@click.option("--activations", type=click.Choice(["uint8", "int8", "dynamic", "none"]), help="The scheme to plan for, as in quantize.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default="int8", show_default=True, help="The weight type to plan for, as in quantize.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Node names or op types (glob) to keep float, as in quantize.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def inspect_command(model: Path, calib: Path | None, activations: str | None, weights: str, exclude: tuple[str, ...],
                    as_json: bool, verbose: bool) -> None:
    """What quantkit sees in MODEL before doing anything: inputs, ops, the placement it would choose, sizes."""
    def body(out: _Run):
        from quantkit import inspect as look
        from quantkit import options

        opts = options.normalize({"model": model, "calib": calib, "activations": activations, "weights": weights,
                                  "exclude": exclude})
        info = look.inspect(options.run_config(opts))
        if as_json:
            out.printed = True
        out.echo(json.dumps(info, indent=2) if as_json else look.render(info))

    _command({"verbose": verbose, "as_json": as_json}, body)


class TerminalProgress:
    """A bar on a terminal; on a pipe or CI log, a plain line every 10% (or 10 s)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bar = None

    def start(self, label: str, total: int, unit: str = "samples") -> None:
        self.label, self.total, self.done, self.unit = label, max(total, 1), 0, unit
        self.last_pct, self.last_t, self.shown = -10, time.monotonic(), 0
        if self.tty:
            self.bar = click.progressbar(length=self.total, label=f"quantkit: {label}", file=self.stream,
                                         show_pos=True)
            self.bar.__enter__()

    def advance(self, n: int) -> None:
        raise_if_interrupted()  # a signal whose exception Python dropped (see errors.py)
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        pct = 100 * self.done // self.total
        if pct >= self.last_pct + 10 or time.monotonic() - self.last_t > 10:
            click.echo(f"quantkit: {self.label} {self.done}/{self.total} {self.unit} ({pct}%)", file=self.stream)
            self.last_pct, self.last_t, self.shown = pct, time.monotonic(), self.done

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        elif self.done != self.shown:  # a log shows where the stage ended
            click.echo(f"quantkit: {self.label} {self.done}/{self.total} {self.unit} "
                       f"({100 * self.done // self.total}%)", file=self.stream)


# ---- model updates: `quantkit delta` and `quantkit apply` (quantkit/delta/) -------------------------


@cli.command(epilog=EXIT_CODES)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The update file to write (.qkd).")
@click.option("--method", type=click.Choice(["auto", "int8", "int4", "sign", "topk", "lowrank"]), default="auto", show_default=True, help="Encoding of the float weight deltas; auto: per tensor the cheapest that meets the target on --eval.")
@click.option("--density", type=float, default=0.01, show_default=True, help="--method topk: fraction of each tensor's delta entries sent.")
@click.option("--topk-values", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True, help="--method topk: the kept values in float32 (exact there) or int8 with a scale per tensor.")
@click.option("--rank", type=int, default=8, show_default=True, help="--method lowrank: rank of each matrix's delta.")
@click.option("--exact-below", type=int, default=1024, show_default=True, metavar="N", help="Float tensors with fewer elements (biases, norms, small convolutions) are sent bit-exact; 0 encodes every float tensor.")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help="Data (.npz/.npy, may hold 'labels') to measure apply(BASE, update) against NEW; needed by --method auto.")
@click.option("--batch-size", type=int, help="Batch size for the evaluation [default: 8, or the model's fixed batch].")
@click.option("--residual", type=click.Path(path_type=Path), metavar="STATE", help="Error feedback: add what the last update did not send (kept in STATE, .npz) to this one, and update STATE.")
@click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Target for auto, and gate (exit 5): top-1 accuracy of the applied model at most this far below NEW's.")
@click.option("--min-cosine", type=float, help="Target for auto, and gate (exit 5): mean cosine of each output to NEW's at least this [auto's default target: 0.999].")
@click.option("--report", type=click.Path(path_type=Path), help="Write the full report as JSON to this path.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout (the table goes to stderr).")
@click.option("--threads", type=int, help="onnxruntime threads for the evaluation.")
@click.option("--force", is_flag=True, help="Overwrite existing output, report and files.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json).")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def delta(base: Path, new: Path, **o) -> None:
    """Write the update that turns BASE into NEW (two ONNX models, state_dicts or .safetensors files
    of the same architecture), compressed, with a report of its size and of the applied model's accuracy."""
    _command(o, lambda run: _delta(base, new, o, run))


def _delta(base: Path, new: Path, o: dict, run: _Run) -> None:
    from quantkit.config import Gates
    from quantkit.delta.make import DeltaConfig, make_delta
    from quantkit.delta.render import render_delta

    cfg = DeltaConfig(base=base, new=new, output=o["output"], method=o["method"], density=o["density"],
                      topk_values=o["topk_values"], rank=o["rank"], exact_below=o["exact_below"],
                      eval=o["eval_"], batch_size=o["batch_size"], residual=o["residual"],
                      gates=Gates(max_accuracy_drop=o["max_accuracy_drop"], min_cosine=o["min_cosine"]),
                      report=o["report"], force=o["force"], threads=o["threads"])
    result = make_delta(cfg, status=run.status)
    run.emit(result.report, render_delta)
    if result.gate_failures:
        raise AccuracyGateError("; ".join(result.gate_failures))


@cli.command(epilog=EXIT_CODES)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("update", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the updated model (same form as BASE).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def apply(base: Path, update: Path, output: Path, force: bool, quiet: bool, verbose: bool) -> None:
    """Apply UPDATE (from `quantkit delta`) to BASE and write the new model. Needs numpy and onnx only;
    refuses an update made against another base or a corrupted one (exit 3)."""
    def body(run: _Run) -> None:
        from quantkit.delta.apply import ApplyConfig
        from quantkit.delta.apply import apply as apply_update

        info = apply_update(ApplyConfig(base=base, update=update, output=output, force=force))
        run.status(f"wrote {info['output']} ({info['tensors_changed']} of {info['tensors']} "
                   f"tensor(s) updated from {info['update_bytes']} bytes)")

    _command({"verbose": verbose, "quiet": quiet}, body)


# ---- end of model updates ------------------------------------------------------------------------


def main() -> None:
    cli()
