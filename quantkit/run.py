"""The Python API, for notebooks and scripts: the same options, validation and errors as the CLI.

    import quantkit
    q = quantkit.quantize("model.onnx", calib="calib.npz", eval="eval.npz", output="model.int8.onnx",
                          max_accuracy_drop=0.5, html="report.html")
    q.report["outputs"][0]["accuracy_drop_points"], q.path, q.model  # q.model: the onnx.ModelProto

Errors are the exceptions of quantkit.errors (ConfigError, InputError, UnsupportedModelError); a
failed gate raises AccuracyGateError after the model, report and page are written, with the result
on the exception as `.result` (or pass check_gates=False and read `q.gate_failures`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantkit import options as opts
from quantkit.errors import AccuracyGateError, InputError


@dataclass
class Quantized:
    report: dict
    path: Path  # the quantized model
    html: Path | None = None
    gate_failures: list[str] = field(default_factory=list)
    _model: object = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    @property
    def model(self):
        """The quantized model as an onnx.ModelProto, loaded on first use."""
        if self._model is None:
            import onnx

            self._model = onnx.load(str(self.path))
        return self._model


def quantize(model, *, check_gates: bool = True, status: Callable[[str], None] | None = None,
             progress=None, **options) -> Quantized:
    """Quantize `model` (a path) with the `quantkit quantize` options as keyword arguments, named
    like the long flags (`calib_samples=256`, `exclude=["Gemm"]`, `eval=...`)."""
    given = opts.normalize({"model": model, **options}, where="option")
    result = run(given, status=status, progress=progress)
    if check_gates and result.gate_failures:
        err = AccuracyGateError("; ".join(result.gate_failures))
        err.result = result  # type: ignore[attr-defined]  # the written result, for callers that want it
        raise err
    return result


def run(options: dict, status: Callable[[str], None] | None = None, progress=None) -> Quantized:
    """Normalized options -> the pipeline (which writes the model, the report and the HTML page
    together). Shared by the CLI and the API."""
    cfg = opts.run_config(options)
    from quantkit.api import quantize as pipeline

    result = pipeline(cfg, status=status or (lambda s: None), progress=progress)
    return Quantized(result.report, Path(cfg.output), cfg.html, list(result.gate_failures))


def write_html(report: dict, path: Path, force: bool) -> None:
    """Render the page and put it in place atomically."""
    from quantkit.output import Outputs
    from quantkit.report.html import render_html

    with Outputs(force) as out:
        out.stage_text(render_html(report), Path(path))
        out.commit()


def load_report(path: Path) -> dict:
    """A JSON report written by `quantize --report`, checked enough to render."""
    import json

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"report file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path} is not a JSON report: {str(e).splitlines()[0]}") from None
    needed = ("model", "outputs", "nodes", "notes", "latency", "evaluation", "gates")
    missing = [k for k in needed if not isinstance(report, dict) or k not in report]
    if missing:
        raise InputError(f"{path} is not a quantkit report (no {', '.join(missing)}); write one with quantize --report")
    return report


def write_config(report: dict, path: Path, force: bool) -> None:
    """The run's effective configuration as a TOML file that `quantize --config` replays."""
    from quantkit.output import Outputs

    if "effective_config" not in report:
        raise InputError("this report has no effective_config (written by an older quantkit); nothing to replay")
    with Outputs(force) as out:
        out.stage_text(opts.to_toml(report["effective_config"]), Path(path))
        out.commit()
