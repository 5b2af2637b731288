"""What the user asked for, as frozen dataclasses validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from quantkit.errors import ConfigError


class Choice(str, Enum):
    """A config choice: compares equal to its CLI spelling and prints as it."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [c.value for c in cls]

    @classmethod
    def parse(cls, value: str | Choice, option: str):
        try:
            return cls(value)
        except ValueError as e:
            raise ConfigError(f"{option} must be one of {', '.join(cls.values())}, got {value!r}") from e


class Activations(Choice):
    UINT8 = "uint8"  # asymmetric static
    INT8 = "int8"  # symmetric static
    DYNAMIC = "dynamic"  # quantized at run time
    NONE = "none"  # weight-only

    @property
    def static(self) -> bool:
        return self in (Activations.UINT8, Activations.INT8)


class Method(Choice):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    AUTO = "auto"


class Weights(Choice):
    INT8 = "int8"
    INT4 = "int4"


class Algorithm(Choice):
    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # rounding against the layers' calibration inputs
    AWQ = "awq"  # activation-aware input-channel scales, then round to nearest (quantize/awq.py)


class Rounding(Choice):
    """How static int8 weights are rounded onto their per-channel grid."""

    GPTQ = "gptq"  # against the layers' calibration inputs (quantize/gptq_channel.py)
    RTN = "rtn"  # to nearest


class Format(Choice):
    ORT = "ort"  # onnxruntime contrib ops (MatMulNBits, GatherBlockQuantized)
    QDQ = "qdq"  # standard DequantizeLinear with blocked int4 (opset 21)


# kept for callers that listed the spellings
ACTIVATION_TYPES = tuple(Activations.values())
METHODS = tuple(Method.values())


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: the scheme, independent of files. Choices may be given as their
    spellings ("uint8") and are stored as enums."""

    per_channel: bool = True
    activations: Activations = Activations.UINT8
    method: Method = Method.MINMAX
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()
    attention_matmuls: bool = True  # also quantize activation x activation MatMuls
    bias_correction: bool = False  # shift biases by the mean error int8 weights introduce
    weight_rounding: Rounding = Rounding.RTN  # static int8 weights: to nearest, or GPTQ codes on the per-channel grid
    smoothquant: float | str | None = None  # None: off; "auto": alpha searched per layer; or alpha
    weights: Weights = Weights.INT8  # int8, or int4 (weight-only: activations "none")
    block_size: int = 32  # weight-only: rows of K sharing one scale
    symmetric: bool = True  # weight-only blocks: symmetric (implicit zero point) or asymmetric
    algorithm: Algorithm = Algorithm.RTN  # weight-only rounding (gptq needs --calib)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 (fastest on CPU), 0 = unset/fp32
    format: Format = Format.ORT
    keep_int8: tuple[str, ...] = ()  # weight-only: node names/op types kept at 8 bits

    def __post_init__(self) -> None:
        for name, kind in (("activations", Activations), ("method", Method), ("weights", Weights),
                           ("algorithm", Algorithm), ("format", Format), ("weight_rounding", Rounding)):
            object.__setattr__(self, name, kind.parse(getattr(self, name), f"--{name}"))
        if self.weights == Weights.INT4 and self.activations != Activations.NONE:
            raise ConfigError("int4 weights are weight-only: use --activations none (the default with --weights int4)")
        if self.activations == Activations.NONE:
            self._check_weight_only()
        if self.bias_correction and self.activations == Activations.DYNAMIC:
            raise ConfigError("--bias-correction needs calibration data; it does not apply to --activations dynamic")
        if self.smoothquant is not None and self.smoothquant != "auto":
            try:
                alpha = float(self.smoothquant)
            except ValueError as e:
                raise ConfigError(f"--smoothquant takes an alpha in (0, 1) or nothing, got {self.smoothquant!r}") from e
            if not 0.0 < alpha < 1.0:
                raise ConfigError(f"--smoothquant alpha must be in (0, 1), got {alpha}")
            object.__setattr__(self, "smoothquant", alpha)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"--percentile must be in (50, 100], got {self.percentile}")
        self._check_applicable()

    def _check_applicable(self) -> None:
        """An option set away from its default must act on the chosen mode: never ignored silently."""
        default = QuantConfig.__dataclass_fields__
        weight_only = ("block_size", "symmetric", "algorithm", "accuracy_level", "keep_int8")
        static = ("method", "percentile", "bias_correction", "weight_rounding")
        flag = {"block_size": "--block-size", "symmetric": "--asymmetric", "algorithm": "--algorithm",
                "accuracy_level": "--accuracy-level", "format": "--format", "keep_int8": "--keep-int8",
                "method": "--method", "percentile": "--percentile", "bias_correction": "--bias-correction",
                "weight_rounding": "--weight-rounding"}
        changed = [k for k in (*weight_only, *static) if getattr(self, k) != default[k].default]
        if self.format != default["format"].default and self.activations == "dynamic":
            raise ConfigError("--format qdq applies to static and weight-only quantization; dynamic int8 runs on "
                              "onnxruntime's DynamicQuantizeMatMul in either format")
        for k in changed:
            if k in weight_only and self.activations != "none":
                raise ConfigError(f"{flag[k]} applies to weight-only quantization (--weights int4 or "
                                  f"--activations none), not to --activations {self.activations}")
            if k in static and self.activations not in ("uint8", "int8"):
                raise ConfigError(f"{flag[k]} applies to static activations (uint8/int8), not to "
                                  f"--activations {self.activations}")
        if "percentile" in changed and self.method != "percentile":
            raise ConfigError(f"--percentile applies to --method percentile, not to --method {self.method}")

    def _check_weight_only(self) -> None:
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two from 16 to 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")


@dataclass(frozen=True)
class DataConfig:
    """Where calibration and evaluation data come from and how they are batched."""

    calib: Path | None = None
    eval: Path | None = None
    calib_samples: int | None = None
    stats_cache: Path | None = None
    preprocess: str | None = None  # image folders: resize=...,crop=...,mean=...,std=...,layout=...
    batch_size: int | None = None  # None: 8, or the model's fixed batch size
    batch_axes: dict[str, int | None] = field(default_factory=dict)  # --batch-axis NAME=K (None: fed whole)

    def __post_init__(self) -> None:
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.preprocess:
            from quantkit.calibrate.images import Preprocess

            Preprocess.parse(self.preprocess)  # bad steps are usage errors, found before any work


@dataclass(frozen=True)
class Gates:
    """CI gates checked after the report is written."""

    max_accuracy_drop: float | None = None  # in percentage points
    min_cosine: float | None = None
    require_speedup: float | None = None  # fp32 latency / int8 latency must reach this
    min_sqnr: float | None = None  # dB, every float output

    def __post_init__(self) -> None:
        for flag, value in (("--max-accuracy-drop", self.max_accuracy_drop), ("--min-cosine", self.min_cosine),
                            ("--require-speedup", self.require_speedup), ("--min-sqnr", self.min_sqnr)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}: such a gate could never fail")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ConfigError("--max-accuracy-drop must be >= 0 (percentage points)")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError("--min-cosine must be between -1 and 1")
        if self.require_speedup is not None and self.require_speedup <= 0:
            raise ConfigError("--require-speedup must be > 0 (e.g. 1.0: not slower than fp32)")


class PruneStructure(Choice):
    CHANNEL = "channel"  # output channels / FFN neurons, with the consumers refitted
    HEAD = "head"  # whole attention heads
    UNSTRUCTURED = "unstructured"  # single weights zeroed
    SEMI = "2:4"  # two of every four consecutive input weights zeroed


class PruneMethod(Choice):
    MAGNITUDE = "magnitude"  # |w|
    WANDA = "wanda"  # |w| x input activation norm
    SPARSEGPT = "sparsegpt"  # OBS-style: zero and compensate the rest of the row


class PruneAllocation(Choice):
    UNIFORM = "uniform"  # the same ratio in every group
    SENSITIVITY = "sensitivity"  # per group, from each group's measured output noise (prune/sensitivity.py)


class PruneRefit(Choice):
    ONE_SHOT = "one-shot"  # every group measured on the unpruned model, refit towards its own output
    SEQUENTIAL = "sequential"  # group after group on the pruned model, refit towards the original (prune/sequential.py)
    TRAIN = "train"  # sequential, then each block's kept parameters trained towards the original (prune/blocktrain.py)
    JOINT = "joint"  # train, then every pruned block's kept parameters trained together on the outputs (prune/joint.py)

    @property
    def trains(self) -> bool:
        """The blocks are trained (torch needed)."""
        return self in (PruneRefit.TRAIN, PruneRefit.JOINT)


class PruneJointLoss(Choice):
    OUTPUTS = "outputs"  # per-sample cosine of the outputs over real positions + their squared error
    POOLED = "pooled"  # outputs + 1 - cosine of the mask-aware mean-pooled (sentence) vector


@dataclass(frozen=True)
class PruneConfig:
    """--prune RATIO: the fraction of channels / heads / weights removed before quantization."""

    ratio: float | None = None  # None: no pruning
    structure: PruneStructure = PruneStructure.CHANNEL
    method: PruneMethod | None = None  # unstructured / 2:4 only; default wanda
    allocation: PruneAllocation = PruneAllocation.UNIFORM  # channel only
    refit: PruneRefit = PruneRefit.ONE_SHOT  # channel only
    train_steps: int | None = None  # --prune-refit train: Adam steps per block (None: blocktrain.Settings.steps)
    train_data: Path | None = None  # --prune-refit train: more data for the block training only
    joint_steps: int | None = None  # --prune-refit joint: Adam steps of the joint phase (None: joint.Settings.steps)
    joint_loss: PruneJointLoss | None = None  # --prune-refit joint: what it matches (None: outputs)
    # --prune-fixed: the ratio as given (no search); the accuracy targets steer quantization, measured
    # (placement and gates) against the pruned float model
    fixed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "structure", PruneStructure.parse(self.structure, "--prune-structure"))
        object.__setattr__(self, "allocation", PruneAllocation.parse(self.allocation, "--prune-allocation"))
        object.__setattr__(self, "refit", PruneRefit.parse(self.refit, "--prune-refit"))
        if self.method is not None:
            object.__setattr__(self, "method", PruneMethod.parse(self.method, "--prune-method"))
        sparse = self.structure in (PruneStructure.UNSTRUCTURED, PruneStructure.SEMI)
        if self.structure == PruneStructure.SEMI and self.ratio is None:
            object.__setattr__(self, "ratio", 0.5)
        if self.joint_loss is not None:
            object.__setattr__(self, "joint_loss", PruneJointLoss.parse(self.joint_loss, "--prune-joint-loss"))
        self._check_training()
        if self.ratio is None:
            if self.fixed:
                raise ConfigError("--prune-fixed keeps the --prune ratio as given: it needs --prune RATIO "
                                  "(e.g. --prune 0.3)")
            if self.structure != PruneStructure.CHANNEL or self.method is not None:
                raise ConfigError("--prune-structure and --prune-method need --prune RATIO (e.g. --prune 0.3)")
            return
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"--prune must be a fraction in (0, 1), got {self.ratio}")
        if self.structure == PruneStructure.SEMI and self.ratio != 0.5:
            raise ConfigError(f"--prune-structure 2:4 removes exactly half the weights: use --prune 0.5, "
                              f"not {self.ratio}")
        if self.allocation != PruneAllocation.UNIFORM and self.structure != PruneStructure.CHANNEL:
            raise ConfigError(f"--prune-allocation {self.allocation} applies to --prune-structure channel, "
                              f"not {self.structure}")
        if self.refit != PruneRefit.ONE_SHOT and self.structure != PruneStructure.CHANNEL:
            raise ConfigError(f"--prune-refit {self.refit} applies to --prune-structure channel, not {self.structure}")
        if self.method is not None and not sparse:
            raise ConfigError(f"--prune-method applies to --prune-structure unstructured or 2:4; {self.structure} "
                              "ranks channels by calibration statistics")

    def _check_training(self) -> None:
        """The block-training and joint-phase options, each only with the --prune-refit that uses it."""
        for refits, flags in (((PruneRefit.TRAIN, PruneRefit.JOINT), (("--prune-train-steps", self.train_steps),
                                                                     ("--prune-train-data", self.train_data))),
                              ((PruneRefit.JOINT,), (("--prune-joint-steps", self.joint_steps),
                                                     ("--prune-joint-loss", self.joint_loss)))):
            given = [flag for flag, v in flags if v is not None]
            if given and self.refit not in refits:
                raise ConfigError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to "
                                  f"--prune-refit {' or '.join(r.value for r in refits)}, not {self.refit}")
        for flag, steps in (("--prune-train-steps", self.train_steps), ("--prune-joint-steps", self.joint_steps)):
            if steps is not None and steps < 1:
                raise ConfigError(f"{flag} must be at least 1, got {steps}")

    @property
    def enabled(self) -> bool:
        return self.ratio is not None

    @property
    def sparse(self) -> bool:
        """Single weights zeroed (the file then stores them as a bitmask)."""
        return self.enabled and self.structure in (PruneStructure.UNSTRUCTURED, PruneStructure.SEMI)


@dataclass(frozen=True)
class Finetune:
    """--finetune: recovery training of the quantized graph against the fp32 model (PyTorch inputs)."""

    steps: int
    lr: float = 1e-4  # Adam, latent weights; scales train at 10x this (log-scale)
    data: Path | None = None  # default: the calibration data
    labels_weight: float = 0.0  # share of cross-entropy on labels in the loss (0: distillation only)
    # iterations of learned rounding of int4 MatMulNBits weights before training (0: none)
    rounding: int = 100

    def __post_init__(self) -> None:
        if self.rounding < 0:
            raise ConfigError(f"--finetune-rounding takes a number of iterations >= 0, got {self.rounding}")
        if self.steps < 1:
            raise ConfigError(f"--finetune takes a number of training steps >= 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.labels_weight <= 1.0:
            raise ConfigError(f"--finetune-labels-weight must be in [0, 1], got {self.labels_weight}")


@dataclass(frozen=True)
class RunConfig:
    model: Path
    output: Path
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gates: Gates = field(default_factory=Gates)
    report: Path | None = None
    force: bool = False
    # timed runs of each model for the report's latency; None: 20 (large streamed models: their
    # evaluation batches' own times, no extra runs)
    latency_runs: int | None = None
    threads: int | None = None  # onnxruntime intra-op threads for timing; None: its default
    speed_guard: bool = True
    # PyTorch inputs
    model_class: str | None = None  # package.module:factory building the module for a checkpoint
    allow_pickle: bool = False  # allow torch.load of a whole pickled module (runs code from the file)
    inputs: tuple[str, ...] = ()  # NAME:SHAPE:DTYPE signatures; default: taken from the data
    save_fp32: Path | None = None  # keep the exported fp32 ONNX here
    output_names: tuple[str, ...] = ()  # names for the exported model's outputs
    html: Path | None = None  # the report as an HTML page here (written by quantkit.run: the CLI and quantkit.quantize)
    plan_out: Path | None = None  # --plan: write the chosen per-node placement here
    plan_in: Path | None = None  # --from-plan: replay this placement, no search
    prune: PruneConfig = field(default_factory=PruneConfig)  # --prune: before quantization
    finetune: Finetune | None = None  # --finetune STEPS: train the quantized graph (PyTorch inputs)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.latency_runs is not None and self.latency_runs < 1:
            raise ConfigError(f"--latency-runs must be at least 1, got {self.latency_runs}")


def parse_batch_axes(items: tuple[str, ...]) -> dict[str, int | None]:
    """--batch-axis NAME=K (K an axis, or `none` to feed the array whole)."""
    out: dict[str, int | None] = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value or not (value.lower() == "none" or value.isdigit()):
            raise ConfigError(f"--batch-axis {item!r}: expected NAME=K with K an axis (0, 1, ...) or NAME=none")
        out[name] = None if value.lower() == "none" else int(value)
    return out
