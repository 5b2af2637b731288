"""Quantization schemes behind one interface, and the placement that maps nodes to schemes.

A scheme (static int8 QDQ, dynamic int8, weight-only int4/int8...) answers, in the order the
pipeline asks:

  refuse(op)          why it cannot rewrite a planned op (None: it can)
  prepare_model(m)    graph changes it needs first (e.g. the opset blocked int4 needs)
  requests(plan)      the statistics it needs, on which tensors (calibrate/collect.py gathers
                      every algorithm's requests in one pass)
  use(stats)          turn statistics into what its rewrite needs (ranges, Hessians); returns
                      tensors that must stay float and notes
  tune(trial)         optional choices measured on candidate models (--keep-int8 auto)
  rewrite(m, ops)     edit the graph for the ops assigned to it
  report(rw)          its part of the report

`Placement` holds the schemes of one run and assigns each planned op to the first scheme that
takes it, so a later per-node placement can mix schemes in one model by ordering or choosing
schemes per node; api.py only talks to the placement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from quantkit.calibrate.collect import Statistics, StatRequest
from quantkit.config import QuantConfig
from quantkit.graph.ir_edit import Editor, drop_unused
from quantkit.quantize import lower as lower_mod
from quantkit.quantize import qparams as qp
from quantkit.quantize.plan import OpKind, Plan, QuantizedOp, SchemeName, make_plan

WEIGHT_ONLY_INT8_BLOCK = 128  # block along K of the weight-only int8 alternative (one float scale per 128 weights)


@dataclass
class ActivationQParams:
    scale: float
    zero_point: int
    qtype: str
    range: tuple[float, float]


@dataclass
class RewriteResult:
    activations: dict[str, ActivationQParams] = field(default_factory=dict)
    quantized_nodes: list[str] = field(default_factory=list)
    float_bias: list[str] = field(default_factory=list)  # nodes whose bias stayed float (int32 overflow)
    bias_corrected: list[str] = field(default_factory=list)
    gptq: list[str] = field(default_factory=list)  # weight-only nodes rounded with GPTQ
    notes: list[str] = field(default_factory=list)
    # node -> (how its weight was rounded, blockwise.RoundingError), measured while rounding it:
    # report/weight_error.py rounds again only the nodes missing here
    weight_error: dict[str, tuple] = field(default_factory=dict)

    def merge(self, other: RewriteResult) -> None:
        self.activations.update(other.activations)
        self.weight_error.update(other.weight_error)
        for name in ("quantized_nodes", "float_bias", "bias_corrected", "gptq", "notes"):
            getattr(self, name).extend(getattr(other, name))


@dataclass
class Findings:
    """What a scheme learnt from the statistics: tensors that must stay float, notes."""

    masks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# Builds the model with a variant of a scheme in that scheme's place; returns its output SQNR in dB.
Trial = Callable[["Scheme"], float]


class Scheme:
    name: SchemeName

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.memo = qp.WeightMemo()  # quantized weights, reused by every build of this run

    def refuse(self, op: QuantizedOp) -> str | None:
        return None

    def prepare_model(self, model: ir.Model) -> ir.Model:
        return model

    def requests(self, plan: Plan) -> list[StatRequest]:
        return []

    def use(self, stats: Statistics) -> Findings:
        return Findings()

    def tune(self, plan: Plan, trial: Trial, status: Callable[[str], None]) -> list[str]:
        return []

    def rewrite(self, model: ir.Model, ops: list[QuantizedOp], edit: Editor) -> RewriteResult:
        raise NotImplementedError

    def report(self, rw: RewriteResult) -> tuple[dict | None, dict]:
        """(its calibration section or None, per-tensor activation entries)."""
        return None, {}


class Placement:
    """The schemes of one run. Ops go to the first scheme that takes them; an op no scheme
    takes stays float with the last scheme's reason."""

    def __init__(self, config: QuantConfig, schemes: list[Scheme], alternates: list[Scheme] | None = None) -> None:
        self.config = config
        self.schemes = schemes
        # schemes that take an op only when a per-node override names them (the accuracy budget)
        self.alternates = alternates or []
        self.float_tensors: dict[str, str] = {}  # found in the graph or from calibration
        self.overrides: dict[str, str] = {}  # node (budget.op_key) -> scheme name, or "float"
        self.override_reason = "left float by the accuracy budget"
        # biases folded into onnxruntime's integer MatMul kernels (quantize/lower.py); off while a model
        # still has to be fine-tuned, which trains the plain QDQ graph
        self.lower = config.format.value == "ort"

    def plan(self, model: ir.Model) -> Plan:
        plan = make_plan(model, self.config)
        kept = []
        for op in plan.ops:
            reason = None
            for scheme in self.schemes:
                reason = scheme.refuse(op)
                if reason is None:
                    op.scheme = scheme.name
                    kept.append(op)
                    break
            else:
                plan.skip(op, reason or "no scheme takes it")
        plan.ops = self._override(plan, kept)
        plan.keep_float(self.float_tensors)
        return plan

    def _override(self, plan: Plan, ops: list[QuantizedOp]) -> list[QuantizedOp]:
        """Per-node choices: an op named in `overrides` goes to that scheme, or stays float."""
        from quantkit.quantize.budget import FLOAT, op_key

        by_name = {s.name.value: s for s in [*self.schemes, *self.alternates]}
        kept = []
        for op in ops:
            want = self.overrides.get(op_key(op))
            if want is None:
                kept.append(op)
            elif want == FLOAT:
                plan.skip(op, self.override_reason)
            elif want in by_name and by_name[want].refuse(op) is None:
                op.scheme = by_name[want].name
                kept.append(op)
            else:
                plan.skip(op, f"the plan asks for {want}, which cannot rewrite this op")
        return self._region_follows(plan, kept) if self.overrides else kept

    @staticmethod
    def _region_follows(plan: Plan, ops: list[QuantizedOp]) -> list[QuantizedOp]:
        """An int8-region op (Add, Concat, Split... without weights) stays only while every input still comes
        out of an op static int8 writes (or of a region op kept before it): once the ops feeding it leave
        static int8, it would only dequantize and requantize between float ops."""
        int8 = {id(v) for op in ops if op.kind != OpKind.INT8_REGION and op.scheme == SchemeName.STATIC
                for v in op.qdq_outputs}
        kept = []
        for op in ops:
            if op.kind == OpKind.INT8_REGION:
                if not all(id(v) in int8 for v in op.inputs):
                    plan.skip(op, "its inputs left static int8 (accuracy budget)")
                    continue
                int8.update(id(v) for v in op.qdq_outputs)
            kept.append(op)
        return kept

    def kinds(self, model: ir.Model, droppable: bool = False) -> set[OpKind]:
        """The op groups of the plan; `droppable`: only groups with an op `build` can leave float (one the
        accuracy budget did not move to weight-only int8)."""
        compressed = self._compressed() if droppable else frozenset()
        return {op.kind for op in self.plan(model.clone()).ops if op.key not in compressed}

    def _compressed(self) -> frozenset[str]:
        """The ops the accuracy budget moved to weight-only int8: compression, which timing never undoes."""
        return frozenset(k for k, v in self.overrides.items() if v == SchemeName.WEIGHT_ONLY.value)

    def prepare_model(self, model: ir.Model) -> ir.Model:
        for scheme in self.schemes:
            model = scheme.prepare_model(model)
        return model

    def requests(self, model: ir.Model) -> list[StatRequest]:
        plan = self.plan(model)
        return [r for s in [*self.schemes, *self.alternates] for r in s.requests(plan)]

    def use(self, stats: Statistics) -> list[str]:
        notes: list[str] = []
        for scheme in [*self.schemes, *self.alternates]:
            found = scheme.use(stats)
            self.float_tensors.update(found.masks)
            notes += found.notes
        return notes

    def tune(self, model: ir.Model, sqnr: Callable[[ir.Model], float], status: Callable[[str], None]) -> list[str]:
        """Let each scheme measure variants of itself: `sqnr(model)` scores a candidate."""
        plan = self.plan(model.clone())
        notes: list[str] = []
        for i, scheme in enumerate(self.schemes):
            def trial(variant: Scheme, i: int = i) -> float:
                other = Placement(self.config, [*self.schemes[:i], variant, *self.schemes[i + 1:]])
                other.float_tensors = self.float_tensors
                return sqnr(other.build(model, set(), "")[0])

            notes += scheme.tune(plan, trial, status)
        return notes

    def rewrite(self, model: ir.Model, plan: Plan, lower: bool = True) -> RewriteResult:
        """Each scheme rewrites its own ops; one editor names everything in this model. `lower=False`
        keeps the plain QDQ form (the accuracy search reads each op's own output tensor)."""
        edit = Editor(model.graph)
        result = RewriteResult()
        for scheme in [*self.schemes, *self.alternates]:
            ops = [op for op in plan.ops if op.scheme == scheme.name]
            if ops:
                result.merge(scheme.rewrite(model, ops, edit))
        drop_unused(model)
        if lower and self.lower:
            lower_mod.lower(model)
        return result

    def build(self, model: ir.Model, drop: set[OpKind], reason: str,
              lower: bool = True) -> tuple[ir.Model, Plan, RewriteResult]:
        """A rewritten copy of `model` with the ops of the `drop` kinds left float, but for the ops the
        accuracy budget moved to weight-only int8: that is compression, which timing never undoes (the speed
        guard decides about int8 kernels; dropping those ops made a layout detector ~3.6x smaller become 1.08x)."""
        m = model.clone()
        plan = self.plan(m)
        plan.drop(drop, reason, keep=self._compressed())
        return m, plan, self.rewrite(m, plan, lower)

    def report(self, rw: RewriteResult) -> tuple[dict | None, dict]:
        calibration: dict | None = None
        activations: dict = {}
        for scheme in self.schemes:
            c, a = scheme.report(rw)
            if c is not None:
                calibration = {**(calibration or {}), **c}
            activations.update(a)
        return calibration, activations


def placement_for(config: QuantConfig, trainable: bool = False) -> Placement:
    """The schemes the config asks for (one per run today; a per-node search may give several).
    `trainable` (--finetune): no per-token alternative, whose MatMulInteger + Round decomposition the
    fine-tuning graph cannot run (the outlier-channel split, dynamic int8 and weight-only int8 it can)."""
    from quantkit.config import Activations, Weights
    from quantkit.quantize.dynamic import DynamicScheme
    from quantkit.quantize.outlier_split import SplitScheme
    from quantkit.quantize.per_token import PerTokenScheme
    from quantkit.quantize.qdq import StaticScheme
    from quantkit.quantize.weight_only import WeightOnlyScheme

    scheme = {Activations.DYNAMIC: DynamicScheme, Activations.NONE: WeightOnlyScheme}.get(
        config.activations, StaticScheme)
    # static int8 may hand single ops to dynamic int8 when the accuracy budget asks for it
    alternates: list[Scheme] = []
    if scheme is StaticScheme:
        # int8 weights in blocks along K with float activations (MatMulNBits, 8 bits), rounded to nearest
        int8_blocks = QuantConfig(activations=Activations.NONE, weights=Weights.INT8, block_size=WEIGHT_ONLY_INT8_BLOCK,
                                  exclude=config.exclude, accuracy_level=config.accuracy_level, format=config.format)
        alternates = [SplitScheme(config), DynamicScheme(config),
                      *([] if trainable else [PerTokenScheme(config)]), WeightOnlyScheme(int8_blocks)]
    main = scheme(config)
    for alt in alternates:  # one memo: an op moved to an alternative keeps its weight's int8 (GPTQ) codes
        alt.memo = main.memo
    return Placement(config, [main], alternates)
