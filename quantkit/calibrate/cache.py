"""Calibration statistics cache (`--stats-cache PATH`): the per-tensor histograms of one
calibration pass, saved so a later run with another range method or other exclusions skips the
forward passes. A cache is only used for the same model file and calibration data."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from quantkit.calibrate.observers import HistogramObserver
from quantkit.errors import InputError

FORMAT = "quantkit-stats-3"


def fingerprint(model: Path, calib: Path, calib_samples: int | None, batch: int) -> dict:
    """What the statistics depend on: the model's bytes (hashed) and the data files' identity."""
    h = hashlib.sha256()
    with open(model, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    files = sorted(calib.iterdir()) if calib.is_dir() else [calib]
    data = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"format": FORMAT, "model_sha256": h.hexdigest(), "data": data,
            "calib_samples": calib_samples, "batch_size": batch}


def load(path: Path, key: dict) -> tuple[dict[str, HistogramObserver], str | None]:
    """The cached observers, or an empty dict and the reason the cache was not used."""
    if not path.exists():
        return {}, None
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("key", {}).get("format") != FORMAT:
                raise KeyError("format")
            if meta["key"] != key:
                return {}, "the stats cache was made for another model or calibration data; recollecting"
            return {name: HistogramObserver.from_state({k: z[f"{i}/{k}"] for k in _FIELDS})
                    for i, name in enumerate(meta["tensors"])}, None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        raise InputError(f"{path} is not a quantkit stats cache; remove it or choose another "
                         "--stats-cache path") from None


_FIELDS = ("counts", "origin", "width", "lo", "hi", "nonfinite", "count", "extreme", "bulk_absmax", "channel_sum",
           "channel_n", "channel_axis")


def save(path: Path, key: dict, observers: dict[str, HistogramObserver]) -> None:
    arrays = {"meta": np.frombuffer(json.dumps({"key": key, "tensors": list(observers)}).encode(), np.uint8)}
    for i, obs in enumerate(observers.values()):
        for k, v in obs.state().items():
            arrays[f"{i}/{k}"] = np.asarray(v)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # the stub binds **arrays to allow_pickle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
