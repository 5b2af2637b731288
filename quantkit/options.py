"""The `quantize` options in one place: the command line, the TOML config file and the Python API
all go through this table to build a RunConfig, so the three cannot drift apart.

An option's key is its long flag with underscores (`--calib-samples` -> `calib_samples`); config
files may spell it with dashes too. `effective_config(cfg)` maps a RunConfig back to keys and
values, which is what the report records so that a run can be replayed from its report.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import ConfigError


@dataclass(frozen=True)
class Option:
    key: str
    kind: str  # path, str, int, float, bool, list, alpha (float or "auto")
    default: object = None


OPTIONS = {o.key: o for o in (
    Option("model", "path"),
    Option("calib", "path"),
    Option("output", "path"),  # default: MODEL.<weights>.onnx beside the model
    Option("eval", "path"),
    Option("report", "path"),
    Option("html", "path"),
    Option("per_tensor", "bool", False),
    Option("activations", "str"),  # default: uint8, or none with int4 weights
    Option("weights", "str", "int8"),
    Option("block_size", "int", 32),
    Option("asymmetric", "bool", False),
    Option("algorithm", "str", "rtn"),
    Option("accuracy_level", "int", 4),
    Option("format", "str", "ort"),
    Option("keep_int8", "list", ()),
    Option("method", "str", "minmax"),
    Option("percentile", "float", 99.99),
    Option("stats_cache", "path"),
    Option("smoothquant", "alpha"),
    Option("bias_correction", "bool", False),
    Option("weight_rounding", "str", "rtn"),
    Option("exclude", "list", ()),
    Option("preprocess", "str"),
    Option("calib_samples", "int"),
    Option("batch_size", "int"),
    Option("batch_axis", "list", ()),
    Option("max_accuracy_drop", "float"),
    Option("min_cosine", "float"),
    Option("require_speedup", "float"),
    Option("min_sqnr", "float"),
    Option("plan", "path"),
    Option("from_plan", "path"),
    Option("threads", "int"),
    Option("latency_runs", "int"),
    Option("no_speed_guard", "bool", False),
    Option("model_class", "str"),
    Option("allow_pickle", "bool", False),
    Option("input", "list", ()),
    Option("output_names", "list", ()),
    Option("save_fp32", "path"),
    Option("force", "bool", False),
    # pruning before quantization (quantkit/prune)
    Option("prune", "float"),
    Option("prune_structure", "str", "channel"),
    Option("prune_method", "str"),
    Option("prune_allocation", "str", "uniform"),
    Option("prune_refit", "str", "one-shot"),
    Option("prune_train_steps", "int"),
    Option("prune_train_data", "path"),
    Option("prune_joint_steps", "int"),
    Option("prune_joint_loss", "str"),
    Option("prune_fixed", "bool", False),
    # --finetune (recovery training; the other three apply only with it)
    Option("finetune", "int"),
    Option("lr", "float"),
    Option("finetune_data", "path"),
    Option("finetune_labels_weight", "float"),
    Option("finetune_rounding", "int"),
)}

FINETUNE_ONLY = {"lr": "--lr", "finetune_data": "--finetune-data", "finetune_labels_weight": "--finetune-labels-weight",
                 "finetune_rounding": "--finetune-rounding"}


def _finetune(o: dict):
    """The Finetune config, or None; its options without --finetune are usage errors."""
    from quantkit.config import Finetune

    if o["finetune"] is None:
        given = [flag for key, flag in FINETUNE_ONLY.items() if o[key] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --finetune STEPS, which was not given")
        return None
    extra = {k: v for k, v in (("lr", o["lr"]), ("data", o["finetune_data"]),
                               ("labels_weight", o["finetune_labels_weight"]),
                               ("rounding", o["finetune_rounding"])) if v is not None}
    return Finetune(steps=o["finetune"], **extra)


def _check(key: str, value, kind: str):
    """A value of the option's type, or a ConfigError naming the key."""
    def bad(what: str):
        return ConfigError(f"option '{key}' must be {what}, got {value!r}")

    if value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind == "alpha":
        if value in ("auto", "off") or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad('a number, "auto" or "off"')
    if kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise bad("a string or a list of strings")
        return tuple(p.strip() for v in items for p in v.split(",") if p.strip())
    if kind == "path":
        if not isinstance(value, (str, Path)):
            raise bad("a path")
        return Path(value)
    if not isinstance(value, str):
        raise bad("a string")
    return value


def normalize(options: dict, where: str = "option") -> dict:
    """Keys checked (dashes accepted), values typed; unknown keys are ConfigErrors naming the key."""
    out = {}
    for raw, value in options.items():
        key = str(raw).replace("-", "_")
        if key not in OPTIONS:
            near = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f"did you mean '{near[0]}'?" if near else "see `quantkit quantize --help` for the options"
            raise ConfigError(f"unknown {where} '{raw}'; {hint}")
        out[key] = _check(raw, value, OPTIONS[key].kind)
    return out


def run_config(options: dict):
    """The RunConfig for these (normalized) options; anything not given takes its default."""
    from quantkit.config import Activations, DataConfig, Gates, PruneConfig, QuantConfig, RunConfig, parse_batch_axes

    o = {k: opt.default for k, opt in OPTIONS.items()} | {k: v for k, v in options.items() if v is not None}
    if o["model"] is None:
        raise ConfigError("no model given: pass MODEL (or `model = \"...\"` in the --config file)")
    model = Path(o["model"])
    if len(set(o["output_names"])) != len(o["output_names"]):
        raise ConfigError(f"--output-names has a name twice: {','.join(o['output_names'])}")
    return RunConfig(
        model=model, output=o["output"] or model.with_name(f"{model.stem}.{o['weights']}.onnx"),
        report=o["report"], force=o["force"], threads=o["threads"], latency_runs=o["latency_runs"],
        speed_guard=not o["no_speed_guard"],
        model_class=o["model_class"], allow_pickle=o["allow_pickle"], inputs=o["input"],
        output_names=o["output_names"], save_fp32=o["save_fp32"], html=o["html"],
        plan_out=o["plan"], plan_in=o["from_plan"], finetune=_finetune(o),
        quant=QuantConfig(
            per_channel=not o["per_tensor"], method=o["method"], percentile=o["percentile"],
            activations=Activations.parse(o["activations"] or ("none" if o["weights"] == "int4" else "uint8"),
                                          "--activations"),
            weights=o["weights"], block_size=o["block_size"], symmetric=not o["asymmetric"],
            algorithm=o["algorithm"], accuracy_level=o["accuracy_level"], format=o["format"],
            keep_int8=o["keep_int8"], exclude=o["exclude"], bias_correction=o["bias_correction"],
            weight_rounding=o["weight_rounding"],
            smoothquant=_smoothquant(o["smoothquant"], o["activations"], o["weights"])),
        data=DataConfig(calib=o["calib"], eval=o["eval"], calib_samples=o["calib_samples"],
                        batch_size=o["batch_size"], stats_cache=o["stats_cache"], preprocess=o["preprocess"],
                        batch_axes=parse_batch_axes(o["batch_axis"])),
        gates=Gates(max_accuracy_drop=o["max_accuracy_drop"], min_cosine=o["min_cosine"],
                    require_speedup=o["require_speedup"], min_sqnr=o["min_sqnr"]),
        prune=PruneConfig(ratio=o["prune"], structure=o["prune_structure"], method=o["prune_method"],
                          allocation=o["prune_allocation"], refit=o["prune_refit"],
                          train_steps=o["prune_train_steps"], train_data=o["prune_train_data"],
                          joint_steps=o["prune_joint_steps"], joint_loss=o["prune_joint_loss"],
                          fixed=o["prune_fixed"]),
    )


def _smoothquant(value, activations: str | None, weights: str):
    """--smoothquant: on by default ("auto", alpha searched per LayerNorm -> MatMul group; nothing
    to do on models without one) for static activations, where outlier channels of a LayerNorm
    output cost the most; "off" turns it off."""
    if value == "off":
        return None
    if value is None and activations in (None, "uint8", "int8") and weights != "int4":
        return "auto"
    return value


def _smoothquant_option(q) -> str | float | None:
    """The --smoothquant value that gives `q.smoothquant` back (None: the default)."""
    static = q.activations in ("uint8", "int8")  # Activations is a str enum
    if static:
        return "off" if q.smoothquant is None else (None if q.smoothquant == "auto" else q.smoothquant)
    return q.smoothquant


def effective_config(cfg) -> dict:
    """The options that reproduce `cfg`, TOML-ready: defaults left out, paths as strings, no nulls."""
    q, d, g = cfg.quant, cfg.data, cfg.gates
    values = {
        "model": cfg.model, "calib": d.calib, "output": cfg.output, "eval": d.eval, "report": cfg.report,
        "html": cfg.html, "per_tensor": not q.per_channel, "activations": q.activations, "weights": q.weights,
        "block_size": q.block_size, "asymmetric": not q.symmetric, "algorithm": q.algorithm,
        "accuracy_level": q.accuracy_level, "format": q.format, "keep_int8": q.keep_int8, "method": q.method,
        "percentile": q.percentile, "stats_cache": d.stats_cache, "smoothquant": _smoothquant_option(q),
        "bias_correction": q.bias_correction, "weight_rounding": q.weight_rounding, "exclude": q.exclude,
        "preprocess": d.preprocess,
        "calib_samples": d.calib_samples, "batch_size": d.batch_size, "max_accuracy_drop": g.max_accuracy_drop,
        "min_cosine": g.min_cosine, "require_speedup": g.require_speedup, "min_sqnr": g.min_sqnr,
        "batch_axis": tuple(f"{k}={'none' if v is None else v}" for k, v in d.batch_axes.items()),
        "plan": cfg.plan_out, "from_plan": cfg.plan_in, "threads": cfg.threads, "latency_runs": cfg.latency_runs,
        "no_speed_guard": not cfg.speed_guard, "model_class": cfg.model_class, "allow_pickle": cfg.allow_pickle,
        "input": cfg.inputs, "output_names": cfg.output_names, "save_fp32": cfg.save_fp32,
        "force": cfg.force,
        "prune": cfg.prune.ratio, "prune_structure": cfg.prune.structure.value,
        "prune_method": cfg.prune.method.value if cfg.prune.method is not None else None,
        "prune_allocation": cfg.prune.allocation.value, "prune_refit": cfg.prune.refit.value,
        "prune_train_steps": cfg.prune.train_steps, "prune_train_data": cfg.prune.train_data,
        "prune_joint_steps": cfg.prune.joint_steps,
        "prune_joint_loss": cfg.prune.joint_loss.value if cfg.prune.joint_loss is not None else None,
        "prune_fixed": cfg.prune.fixed,
    }
    if cfg.finetune is not None:
        ft, default = cfg.finetune, type(cfg.finetune)(steps=1)
        values.update(finetune=ft.steps, lr=ft.lr if ft.lr != default.lr else None, finetune_data=ft.data,
                      finetune_labels_weight=ft.labels_weight if ft.labels_weight != default.labels_weight else None)
    out = {}
    for key, value in values.items():
        if value is None or value == OPTIONS[key].default:
            continue
        out[key] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def read_toml(path: Path) -> dict:
    """A --config file: a flat TOML table of options (a [quantize] table is accepted too)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config file {path} is not valid TOML: {e}") from None
    if set(data) == {"quantize"} and isinstance(data["quantize"], dict):
        data = data["quantize"]
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"--config file {path}: unknown table [{key}]; options go at the top level")
    return normalize(data, where=f"key in {path}")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} has no TOML form")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    s = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def to_toml(config: dict) -> str:
    """A flat mapping of option values as TOML text (what `quantkit report --config-out` writes)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items())
