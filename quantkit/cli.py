"""Command line: the only module that prints or exits. Heavy imports happen inside commands so
that `quantkit --help` stays fast and never loads onnxruntime or torch."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import click

from quantkit import __version__
from quantkit.errors import AccuracyGateError, QuantkitError

EXIT_CODES = """\b
Exit codes:
  0  success
  1  internal error (a bug: rerun with --verbose and report it)
  2  usage error (bad options, output exists without --force)
  3  bad input (unreadable model, data that does not match the model)
  4  unsupported model
  5  gate failed (--max-accuracy-drop / --min-cosine / --require-speedup);
     model and report are still written"""


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


@click.group(epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="quantkit")
def cli() -> None:
    """Post-training int8/int4 quantization of ONNX and PyTorch models, with an accuracy report."""


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: .npz keyed by input name, .npy (single input), or a directory of them.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Quantized model path [default: MODEL.int8.onnx].")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help="Evaluation data (same formats; may hold 'labels'). Default: the calibration data.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the full report as JSON to this path.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout (the table goes to stderr).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--activations", type=click.Choice(["uint8", "int8", "dynamic", "none"]), help="uint8 asymmetric (default) or int8 symmetric static activations; dynamic (quantized at run time); none (weight-only; the default with --weights int4). dynamic and none need no --calib.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default="int8", show_default=True, help="Weight type; int4 is weight-only (MatMulNBits, GatherBlockQuantized).")
@click.option("--block-size", type=int, default=32, show_default=True, help="Weight-only: rows of K sharing one scale (16..256, power of two).")
@click.option("--asymmetric", is_flag=True, help="Weight-only: a zero point per block instead of symmetric blocks.")
@click.option("--algorithm", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True, help="Weight-only rounding: round to nearest, or GPTQ against the calibration inputs (needs --calib).")
@click.option("--accuracy-level", type=int, default=4, show_default=True, help="MatMulNBits compute type: 4 = int8 (fastest on CPU), 0 = float.")
@click.option("--format", "fmt", type=click.Choice(["ort", "qdq"]), default="ort", show_default=True, help="Weight-only output: onnxruntime contrib ops, or standard DequantizeLinear with int4 blocks (opset 21).")
@click.option("--keep-int8", multiple=True, metavar="PATTERN", help="Weight-only int4: node names or op types (glob) kept at 8 bits.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse", "auto"]), default="minmax", show_default=True, help="How activation ranges are chosen from the calibration statistics.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --method percentile: keep this central percentage of values.")
@click.option("--stats-cache", type=click.Path(path_type=Path), help="Save/reuse calibration histograms here; a rerun on the same model and data skips the forward passes.")
@click.option("--smoothquant", is_flag=False, flag_value="auto", default=None, metavar="[ALPHA]", help="Smooth activation outliers into the weights of MatMuls fed by LayerNorm; alpha searched per layer unless given.")
@click.option("--bias-correction", is_flag=True, help="Shift each channel's bias by the mean error the int8 weights introduce, measured on the calibration data.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Node names or op types (glob, comma-separated, repeatable) to keep float.")
@click.option("--preprocess", metavar="STEPS", help="Image folders as data: e.g. resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw (see README).")
@click.option("--calib-samples", type=int, help="Use at most N calibration samples.")
@click.option("--batch-size", type=int, help="Batch size for calibration and evaluation [default: 8, or the model's fixed batch].")
@click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Gate: exit 5 if top-1 accuracy drops more than this (needs labels).")
@click.option("--min-cosine", type=float, help="Gate: exit 5 if any output's mean cosine to fp32 is below this.")
@click.option("--require-speedup", type=float, metavar="X", help="Gate: exit 5 if the int8 model is not at least X times faster than fp32.")
@click.option("--threads", type=int, help="onnxruntime threads for timing (speed guard and report) [default: onnxruntime's].")
@click.option("--no-speed-guard", is_flag=True, help="Write every placement without timing candidates first.")
@click.option("--model-class", metavar="PKG.MODULE:FACTORY", help="PyTorch checkpoint (state_dict .pt/.pth or .safetensors): the callable that builds the module.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a whole pickled torch module (this runs code from the file).")
@click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE:DTYPE", help="PyTorch models: an input signature, e.g. x:Bx3x224x224:float32 (non-numeric dims are dynamic). Default: from the data.")
@click.option("--save-fp32", type=click.Path(path_type=Path), help="PyTorch models: also keep the exported fp32 ONNX here.")
@click.option("--force", is_flag=True, help="Overwrite existing output and report files.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json).")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
def quantize(model: Path, **o) -> None:
    """Quantize MODEL (ONNX, or PyTorch: TorchScript, torch.export, checkpoint + --model-class) and
    report the accuracy kept."""
    try:
        from quantkit.config import DataConfig, Gates, QuantConfig, RunConfig

        output = o["output"] or model.with_name(f"{model.stem}.{o['weights']}.onnx")
        cfg = RunConfig(
            model=model, output=output, report=o["report"], force=o["force"], threads=o["threads"],
            speed_guard=not o["no_speed_guard"], model_class=o["model_class"], allow_pickle=o["allow_pickle"],
            inputs=o["inputs"], save_fp32=o["save_fp32"],
            quant=QuantConfig(
                per_channel=not o["per_tensor"], method=o["method"], percentile=o["percentile"],
                activations=o["activations"] or ("none" if o["weights"] == "int4" else "uint8"),
                weights=o["weights"], block_size=o["block_size"], symmetric=not o["asymmetric"],
                algorithm=o["algorithm"], accuracy_level=o["accuracy_level"], format=o["fmt"],
                keep_int8=_split(o["keep_int8"]), exclude=_split(o["exclude"]),
                bias_correction=o["bias_correction"], smoothquant=o["smoothquant"]),
            data=DataConfig(calib=o["calib"], eval=o["eval_"], calib_samples=o["calib_samples"],
                            batch_size=o["batch_size"], stats_cache=o["stats_cache"], preprocess=o["preprocess"]),
            gates=Gates(max_accuracy_drop=o["max_accuracy_drop"], min_cosine=o["min_cosine"],
                        require_speedup=o["require_speedup"]),
        )
        from quantkit.api import quantize as run
        from quantkit.report.render import render_text

        quiet, as_json = o["quiet"], o["as_json"]

        def status(msg: str) -> None:
            if not quiet:
                click.echo(f"quantkit: {msg}", err=True)

        result = run(cfg, status=status, progress=None if quiet else TerminalProgress())
        if as_json:
            click.echo(json.dumps(result.report, indent=2))
        if not quiet:
            click.echo(render_text(result.report), err=as_json)
        if result.gate_failures:
            raise AccuracyGateError("; ".join(result.gate_failures))
    except QuantkitError as e:
        if o["verbose"]:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
        raise
    except Exception as e:
        if o["verbose"]:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"internal error: {type(e).__name__}: {first} (rerun with --verbose and report it)", err=True)
        sys.exit(1)


class TerminalProgress:
    """A bar on a terminal; on a pipe or CI log, a plain line every 10% (or 10 s)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bar = None

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.last_pct, self.last_t = -10, time.monotonic()
        if self.tty:
            self.bar = click.progressbar(length=self.total, label=f"quantkit: {label}", file=self.stream,
                                         show_pos=True)
            self.bar.__enter__()

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        pct = 100 * self.done // self.total
        if pct >= self.last_pct + 10 or time.monotonic() - self.last_t > 10:
            click.echo(f"quantkit: {self.label} {self.done}/{self.total} samples ({pct}%)", file=self.stream)
            self.last_pct, self.last_t = pct, time.monotonic()

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# ---- model updates: `quantkit delta` and `quantkit apply` (quantkit/delta/) -------------------------


def _fail(e: Exception, verbose: bool) -> None:
    """The quantize command's error handling: typed errors become their exit code, the rest exit 1."""
    if verbose:
        traceback.print_exc()
    if isinstance(e, QuantkitError):
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    click.echo(f"internal error: {type(e).__name__}: {first} (rerun with --verbose and report it)", err=True)
    sys.exit(1)


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
    try:
        from quantkit.config import Gates
        from quantkit.delta.files import dumps
        from quantkit.delta.make import DeltaConfig, make_delta
        from quantkit.delta.render import render_delta

        cfg = DeltaConfig(base=base, new=new, output=o["output"], method=o["method"], density=o["density"],
                          topk_values=o["topk_values"], rank=o["rank"], exact_below=o["exact_below"],
                          eval=o["eval_"], batch_size=o["batch_size"], residual=o["residual"],
                          gates=Gates(max_accuracy_drop=o["max_accuracy_drop"], min_cosine=o["min_cosine"]),
                          report=o["report"], force=o["force"], threads=o["threads"])
        quiet = o["quiet"]
        result = make_delta(cfg, status=lambda m: None if quiet else click.echo(f"quantkit: {m}", err=True))
        if o["as_json"]:
            click.echo(dumps(result.report))
        if not quiet:
            click.echo(render_delta(result.report), err=o["as_json"])
        if result.gate_failures:
            raise AccuracyGateError("; ".join(result.gate_failures))
    except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
        raise
    except Exception as e:  # noqa: BLE001 - typed errors exit with their code, the rest exit 1
        _fail(e, o["verbose"])


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
    try:
        from quantkit.delta.apply import ApplyConfig
        from quantkit.delta.apply import apply as run

        info = run(ApplyConfig(base=base, update=update, output=output, force=force))
        if not quiet:
            click.echo(f"quantkit: wrote {info['output']} ({info['tensors_changed']} of {info['tensors']} "
                       f"tensor(s) updated from {info['update_bytes']} bytes)", err=True)
    except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
        raise
    except Exception as e:  # noqa: BLE001 - typed errors exit with their code, the rest exit 1
        _fail(e, verbose)


# ---- end of model updates ------------------------------------------------------------------------


def main() -> None:
    cli()
