"""`quantkit delta BASE NEW -o update.qkd`, top to bottom:

read both models -> same architecture? -> deltas (+ carried residual) -> encodings per tensor
(fixed method, or `auto` searched against the eval target) -> pack (xz, checksum, base
fingerprint) -> write -> apply(BASE, update) measured against NEW -> residual state -> report
"""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quantkit import __version__
from quantkit.config import Gates
from quantkit.delta import container, residual, select, tensors
from quantkit.delta import encodings as enc
from quantkit.delta.apply import apply_records
from quantkit.errors import ConfigError
from quantkit.output import Outputs, check_destinations
from quantkit.report.gates import check_gates

DEFAULT_TARGET = Gates(min_cosine=0.999)  # what `auto` aims for when no gate is given
RESIDUAL_NOTE = ("with --residual the update carries the previous residual: apply(BASE, update) aims at NEW "
                 "plus what earlier updates did not send")


@dataclass(frozen=True)
class DeltaConfig:
    base: Path
    new: Path
    output: Path
    method: str = "auto"
    density: float = 0.01
    topk_values: str = "fp32"  # or int8: top-k values as int8 with one scale per tensor
    rank: int = 8
    exact_below: int = select.MIN_LOSSY  # float tensors with fewer elements are sent bit-exact
    eval: Path | None = None
    batch_size: int | None = None
    residual: Path | None = None
    gates: Gates = field(default_factory=Gates)
    report: Path | None = None
    force: bool = False
    threads: int | None = None
    zip_baseline: bool = True  # measure a zipped fp32 delta for the report (deflate over every weight)

    def __post_init__(self) -> None:
        if self.method not in ("auto", *enc.LOSSY):
            raise ConfigError(f"--method must be auto or one of {', '.join(enc.LOSSY)}, got {self.method!r}")
        if self.topk_values not in ("fp32", "int8"):
            raise ConfigError(f"--topk-values must be fp32 or int8, got {self.topk_values!r}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"--density must be in (0, 1], got {self.density}")
        if self.rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {self.rank}")
        if self.exact_below < 0:
            raise ConfigError(f"--exact-below must be >= 0, got {self.exact_below}")
        if self.method == "auto" and self.eval is None:
            raise ConfigError("--method auto measures each choice on data: pass --eval (or pick a --method)")
        if self.eval is None and (self.gates.min_cosine is not None or self.gates.max_accuracy_drop is not None):
            raise ConfigError("--min-cosine/--max-accuracy-drop are measured on data: pass --eval")
        if self.gates.require_speedup is not None:
            raise ConfigError("--require-speedup does not apply to updates")


@dataclass
class Result:
    report: dict
    gate_failures: list[str]


def _check_files(cfg: DeltaConfig) -> None:
    check_destinations({"output": cfg.output, "--report": cfg.report}, [cfg.base, cfg.new, cfg.eval], cfg.force)
    if cfg.residual is not None:  # read, then rewritten: it may exist, but may not be any other file
        check_destinations({"--residual": cfg.residual},
                           [cfg.base, cfg.new, cfg.eval, cfg.output, cfg.report], force=True)


def make_delta(cfg: DeltaConfig, status: Callable[[str], None] = lambda s: None) -> Result:
    t0 = time.perf_counter()
    _check_files(cfg)
    base, new = tensors.read(cfg.base), tensors.read(cfg.new)
    tensors.check_same_architecture(base, new, cfg.base, cfg.new)
    if cfg.eval is not None and base.kind != "onnx":
        raise ConfigError(f"--eval runs the models in onnxruntime, so it needs ONNX models; {cfg.base} is a "
                          f"{base.kind} file")
    with tempfile.TemporaryDirectory(prefix="quantkit-delta-") as tmp:
        evaluator = None
        if cfg.eval is not None:
            # onnxruntime only when measuring
            from quantkit.delta.evaluate import Evaluator
            evaluator = Evaluator(cfg.new, cfg.eval, cfg.batch_size, Path(tmp), cfg.threads)
            if cfg.gates.max_accuracy_drop is not None and not evaluator.has_labels:
                raise ConfigError(f"--max-accuracy-drop needs labels: add a 'labels' array to {cfg.eval}")
        return _run(cfg, base, new, evaluator, status, t0)


def _deltas(base, new, carried: dict[str, np.ndarray], exact_below: int) -> dict[str, np.ndarray]:
    """Float deltas of the tensors that take a lossy encoding: float, large enough, and not part
    of a quantized weight (scales of int4 blocks can be large; they still go exact)."""
    out, quantized = {}, tensors.quantized_weights(base)
    for name, b in base.arrays.items():
        if select.lossy_eligible(b, exact_below) and name not in quantized:
            d = new.arrays[name].astype(np.float64) - b.astype(np.float64)
            out[name] = d + carried[name] if name in carried else d
    return out


def _run(cfg: DeltaConfig, base, new, evaluator, status, t0: float) -> Result:
    carried = residual.load(cfg.residual, base.arrays)
    deltas = _deltas(base, new, carried, cfg.exact_below)
    target = cfg.gates if cfg.gates != Gates() else DEFAULT_TARGET
    auto_log, outputs = None, None
    if cfg.method == "auto":
        status(f"auto: measuring encodings of {len(deltas)} tensor(s)")
        menus = {n: select.menu(d, base.arrays[n], new.arrays[n] if n not in carried else None)
                 for n, d in deltas.items()}

        def passes(choice):
            outs = evaluator.compare(base, _reconstruct(base, new, choice))
            return not check_gates(outs, target), outs

        choices, outputs, auto_log = select.search(menus, passes, status)
    else:
        choices = {n: select.encode_fixed(d, cfg.method, cfg.density, cfg.rank, cfg.topk_values)
                   for n, d in deltas.items()}
    records = _records(base, new, choices)
    update = container.Update(base.kind, tensors.fingerprint(base), records,
                              {"quantkit_version": __version__, "method": cfg.method})
    data = container.pack(update)
    with Outputs(cfg.force) as out:
        out.stage_bytes(data, cfg.output)
        out.commit()
    status(f"wrote {cfg.output} ({len(data)} bytes)")
    if evaluator is not None and outputs is None:
        outputs = evaluator.compare(base, apply_records(base, update, cfg.output))
    if cfg.residual is not None:
        residual.save(cfg.residual, {n: d - enc.decode(choices[n], d.shape) if choices[n].method != "exact"
                                     else np.zeros_like(d) for n, d in deltas.items()})
    report = _report(cfg, base, new, records, choices, deltas, len(data), outputs, evaluator, auto_log, target)
    failures = check_gates(outputs or [], cfg.gates)
    report["gates"] = {**asdict(cfg.gates), "passed": not failures, "failures": failures}
    report["seconds"] = time.perf_counter() - t0
    if cfg.report is not None:
        with Outputs(cfg.force) as out:
            out.stage_json(report, cfg.report)
            out.commit()
    return Result(report, failures)


def _reconstruct(base, new, choice: dict[str, enc.Encoded]) -> dict[str, np.ndarray]:
    """The weights apply() would produce: lossy tensors from the choice, the rest exactly NEW."""
    arrays = dict(new.arrays)
    for n, e in choice.items():
        arrays[n] = enc.reconstruct(base.arrays[n], e)
    return arrays


def _records(base, new, choices: dict[str, enc.Encoded]) -> list[container.Record]:
    records = []
    for name, b in base.arrays.items():
        e = choices.get(name)
        if e is None:
            n = new.arrays[name]
            same = np.array_equal(np.ascontiguousarray(b).view(np.uint8), np.ascontiguousarray(n).view(np.uint8))
            e = enc.Encoded("unchanged") if same else enc.encode_exact(b, n)
        records.append(container.Record(name, e))
    return records


def zipped_fp32_delta(base, new) -> int:
    """What a plain `zip` of the update would cost: deflate over (new - base) in float32, and
    the bit-exact difference of non-float tensors."""
    z = zlib.compressobj(6)
    size = 0
    for name, b in base.arrays.items():
        n = new.arrays[name]
        if np.issubdtype(b.dtype, np.floating):
            d = (n.astype(np.float32) - b.astype(np.float32)).tobytes()
        else:
            d = enc.encode_exact(b, n).arrays["d"].tobytes()
        size += len(z.compress(d))
    return size + len(z.flush())


def _report(cfg, base, new, records, choices, deltas, update_bytes, outputs, evaluator, auto_log, target) -> dict:
    new_bytes = tensors.file_bytes(cfg.new)
    zipped = zipped_fp32_delta(base, new) if cfg.zip_baseline else None
    rows = []
    for r in records:
        a = base.arrays[r.name]
        lossy = r.name in deltas and r.encoded.method != "exact"
        err = select.relative_error(deltas[r.name], r.encoded) if lossy else 0.0
        rows.append({"name": r.name, "shape": list(a.shape), "dtype": a.dtype.name, "encoding": r.encoded.method,
                     "params": r.encoded.params, "payload_bytes": r.encoded.nbytes, "relative_error": err})
    tally: dict[str, int] = {}
    for r in rows:
        tally[r["encoding"]] = tally.get(r["encoding"], 0) + 1
    return {
        "quantkit_version": __version__, "command": "delta", "kind": base.kind,
        "base": str(cfg.base), "new": str(cfg.new), "output": str(cfg.output),
        "method": cfg.method, "density": cfg.density, "topk_values": cfg.topk_values, "rank": cfg.rank,
        "exact_below": cfg.exact_below,
        "residual": str(cfg.residual) if cfg.residual is not None else None,
        "bytes": {"update": update_bytes, "new_model": new_bytes, "zipped_fp32_delta": zipped,
                  "times_smaller_than_new": new_bytes / update_bytes,
                  "times_smaller_than_zipped_delta": zipped / update_bytes if zipped else None},
        "encodings": tally, "tensors": rows,
        "auto": {"target": asdict(target), "tried": auto_log} if auto_log is not None else None,
        "evaluation": {"source": str(cfg.eval), "samples": evaluator.samples} if evaluator is not None else None,
        "outputs": outputs or [],
        "notes": [RESIDUAL_NOTE] if cfg.residual is not None else [],
    }
