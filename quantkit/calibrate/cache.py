"""Calibration statistics cache (`--stats-cache PATH`): the per-tensor histograms of one
calibration pass, saved so a later run with another range method or other exclusions skips the
forward passes. A cache is only used for the same model file and calibration data."""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from quantkit.calibrate.observers import HistogramObserver
from quantkit.errors import InputError
from quantkit.load.onnx import file_sha256
from quantkit.output import Outputs

FORMAT = "quantkit-stats-3"


def fingerprint(model: Path, calib: Path, calib_samples: int | None, batch: int) -> dict:
    """What the statistics depend on: the model's bytes (hashed) and the data files' identity."""
    files = sorted(calib.iterdir()) if calib.is_dir() else [calib]
    data = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"format": FORMAT, "model_sha256": file_sha256(model), "data": data,
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
            states = {name: {k: z[f"{i}/{k}"] for k in _FIELDS} for i, name in enumerate(meta["tensors"])}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"{path} is not a quantkit stats cache; remove it or choose another --stats-cache "
                         "path") from e
    for name, state in states.items():
        flaw = _flaw(state)
        if flaw:
            return {}, f"the stats cache failed its integrity check (tensor '{name}': {flaw}); recollecting"
    return {name: HistogramObserver.from_state(state) for name, state in states.items()}, None


def _flaw(state: dict) -> str | None:
    """What makes a cached histogram impossible, or None. A cache is a file anyone can edit: NaN
    ranges or negative counts would silently become nonsense scales."""
    counts, count = np.asarray(state["counts"]), int(state["count"])
    if counts.ndim != 1 or not 1 <= counts.size <= 1 << 16 or not np.issubdtype(counts.dtype, np.integer):
        return "histogram bins malformed"
    if (counts < 0).any() or count < 0 or int(state["nonfinite"]) < 0 or int(state["extreme"]) < 0:
        return "negative counts"
    floats = [float(state[k]) for k in ("origin", "width", "bulk_absmax")]
    if count and not (all(np.isfinite(floats)) and np.isfinite([float(state["lo"]), float(state["hi"])]).all()):
        return "non-finite range"
    if count and (float(state["width"]) <= 0 or float(state["lo"]) > float(state["hi"])):
        return "empty or inverted range"
    if not np.isfinite(np.asarray(state["channel_sum"], dtype=np.float64)).all() or int(state["channel_n"]) < 0:
        return "non-finite channel means"
    return None


_FIELDS = ("counts", "origin", "width", "lo", "hi", "nonfinite", "count", "extreme", "bulk_absmax", "channel_sum",
           "channel_n", "channel_axis")


def save(path: Path, key: dict, observers: dict[str, HistogramObserver]) -> None:
    arrays = {"meta": np.frombuffer(json.dumps({"key": key, "tensors": list(observers)}).encode(), np.uint8)}
    for i, obs in enumerate(observers.values()):
        for k, v in obs.state().items():
            arrays[f"{i}/{k}"] = np.asarray(v)

    def write(staged: Path) -> None:
        with open(staged, "wb") as f:  # a file object: numpy would append ".npz" to a bare path
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwargs

    with Outputs(force=True) as out:  # the cache the user named is ours to update in place
        out.stage_written(path, write)
        out.commit()
