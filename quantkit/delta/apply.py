"""`quantkit apply BASE update.qkd -o NEW2`: base + decoded update, written atomically.

Imports numpy and onnx only (torch for .pt state_dicts, safetensors for .safetensors), never
onnxruntime, so it runs on a device that has just those."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.delta import container, tensors
from quantkit.delta.encodings import METHODS, reconstruct
from quantkit.errors import ConfigError, InputError
from quantkit.output import check_destinations


@dataclass(frozen=True)
class ApplyConfig:
    base: Path
    update: Path
    output: Path
    force: bool = False


def apply_records(base: tensors.ModelTensors, update: container.Update, where: Path) -> dict[str, np.ndarray]:
    """The new weights: each record decoded onto its base tensor; tensors without a record stay."""
    arrays = dict(base.arrays)
    for r in update.records:
        a = base.arrays.get(r.name)
        if a is None:
            raise InputError(f"{where} updates tensor '{r.name}', which the base does not have")
        if r.encoded.method not in METHODS:
            raise InputError(f"{where}: tensor '{r.name}' uses encoding '{r.encoded.method}', unknown to this "
                             "quantkit: upgrade quantkit")
        arrays[r.name] = reconstruct(a, r.encoded)
    return arrays


def check_base(base: tensors.ModelTensors, header: dict, base_path: Path, update_path: Path) -> None:
    if header.get("kind") != base.kind:
        raise InputError(f"{update_path} is an update for a {header.get('kind')} model but {base_path} is a "
                         f"{base.kind} file")
    if header.get("base_fingerprint") != tensors.fingerprint(base):
        raise InputError(f"{update_path} was made against another base than {base_path} (weights fingerprint "
                         "differs); apply it to the model it was made from")


def apply(cfg: ApplyConfig) -> dict:
    for p, what in ((cfg.base, "base model"), (cfg.update, "update")):
        if not Path(p).is_file():
            raise InputError(f"{what} {p} does not exist")
    check_destinations({"output": cfg.output}, [cfg.base, cfg.update], cfg.force)
    base = tensors.read(cfg.base)
    if cfg.output.suffix == ".onnx" and base.kind != "onnx":
        raise ConfigError(f"the base is a {base.kind} file and the output is written in that form: "
                          f"name it other than {cfg.output.name}")
    data = Path(cfg.update).read_bytes()
    header, _ = container.read_header(data, cfg.update)
    check_base(base, header, cfg.base, cfg.update)
    update = container.unpack(data, cfg.update)
    arrays = apply_records(base, update, cfg.update)
    tensors.write(base, arrays, cfg.output, cfg.force)
    changed = sum(1 for r in update.records if r.encoded.method != "unchanged")
    return {"base": str(cfg.base), "update": str(cfg.update), "output": str(cfg.output), "kind": base.kind,
            "tensors_changed": changed, "tensors": len(arrays), "update_bytes": len(data)}
