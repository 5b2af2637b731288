"""What the user asked for, as frozen dataclasses validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import ConfigError

ACTIVATION_TYPES = ("uint8", "int8", "dynamic", "none")
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: the scheme, independent of files."""

    per_channel: bool = True
    activations: str = "uint8"  # uint8 asymmetric, int8 symmetric, or dynamic (quantized at run time)
    method: str = "minmax"
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()
    attention_matmuls: bool = True  # also quantize activation x activation MatMuls
    bias_correction: bool = False  # shift biases by the mean error int8 weights introduce
    smoothquant: float | str | None = None  # None: off; "auto": alpha searched per layer; or alpha
    weights: str = "int8"  # int8, or int4 (weight-only: activations "none")
    block_size: int = 32  # weight-only: rows of K sharing one scale
    symmetric: bool = True  # weight-only blocks: symmetric (implicit zero point) or asymmetric
    algorithm: str = "rtn"  # weight-only rounding: rtn (round to nearest) or gptq (needs --calib)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 (fastest on CPU), 0 = unset/fp32
    format: str = "ort"  # ort (MatMulNBits/GatherBlockQuantized) or qdq (DequantizeLinear, opset 21)
    keep_int8: tuple[str, ...] = ()  # weight-only: node names/op types kept at 8 bits

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATION_TYPES:
            raise ConfigError(
                f"--activations must be one of {', '.join(ACTIVATION_TYPES)}, got {self.activations!r}"
            )
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.weights not in ("int8", "int4"):
            raise ConfigError(f"--weights must be int8 or int4, got {self.weights!r}")
        if self.weights == "int4" and self.activations != "none":
            raise ConfigError("int4 weights are weight-only: use --activations none (the default with --weights int4)")
        if self.activations == "none":
            if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
                raise ConfigError(f"--block-size must be a power of two from 16 to 256, got {self.block_size}")
            if self.algorithm not in ("rtn", "gptq"):
                raise ConfigError(f"--algorithm must be rtn or gptq, got {self.algorithm!r}")
            if self.format not in ("ort", "qdq"):
                raise ConfigError(f"--format must be ort or qdq, got {self.format!r}")
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise ConfigError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.bias_correction and self.activations == "dynamic":
            raise ConfigError("--bias-correction needs calibration data; it does not apply to --activations dynamic")
        if self.smoothquant is not None and self.smoothquant != "auto":
            try:
                alpha = float(self.smoothquant)
            except ValueError:
                raise ConfigError(f"--smoothquant takes an alpha in (0, 1) or nothing, got {self.smoothquant!r}") from None
            if not 0.0 < alpha < 1.0:
                raise ConfigError(f"--smoothquant alpha must be in (0, 1), got {alpha}")
            object.__setattr__(self, "smoothquant", alpha)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"--percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class DataConfig:
    """Where calibration and evaluation data come from and how they are batched."""

    calib: Path | None = None
    eval: Path | None = None
    calib_samples: int | None = None
    stats_cache: Path | None = None
    preprocess: str | None = None  # image folders: resize=...,crop=...,mean=...,std=...,layout=...
    batch_size: int | None = None  # None: 8, or the model's fixed batch size

    def __post_init__(self) -> None:
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Gates:
    """CI gates checked after the report is written."""

    max_accuracy_drop: float | None = None  # in percentage points
    min_cosine: float | None = None
    require_speedup: float | None = None  # fp32 latency / int8 latency must reach this

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ConfigError("--max-accuracy-drop must be >= 0 (percentage points)")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError("--min-cosine must be between -1 and 1")
        if self.require_speedup is not None and self.require_speedup <= 0:
            raise ConfigError("--require-speedup must be > 0 (e.g. 1.0: not slower than fp32)")


@dataclass(frozen=True)
class RunConfig:
    model: Path
    output: Path
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gates: Gates = field(default_factory=Gates)
    report: Path | None = None
    force: bool = False
    latency_runs: int = 20
    threads: int | None = None  # onnxruntime intra-op threads for timing; None: its default
    speed_guard: bool = True
    # PyTorch inputs
    model_class: str | None = None  # package.module:factory building the module for a checkpoint
    allow_pickle: bool = False  # allow torch.load of a whole pickled module (runs code from the file)
    inputs: tuple[str, ...] = ()  # NAME:SHAPE:DTYPE signatures; default: taken from the data
    save_fp32: Path | None = None  # keep the exported fp32 ONNX here
    output_names: tuple[str, ...] = ()  # names for the exported model's outputs
    html: Path | None = None  # the report as an HTML page here (written by quantkit.run: the CLI and quantkit.quantize)
