"""Calibration and evaluation data, streamed a batch at a time.

Accepted forms (batch on axis 0):
  * `.npz` with one array per graph input (and optionally `labels`),
  * `.npy` holding the single input of a single-input model,
  * a directory of such files, read one after the other.

Arrays are read from disk batch by batch (also inside compressed `.npz` files), so memory is
bounded by one batch, never by the size of the data set.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.errors import ConfigError, InputError

LABELS = "labels"
# language models: the id of the token that should follow each position, [samples, seq] like the
# token ids (already shifted by one); negative ids are not scored (report/lm.py)
TARGETS = "targets"
DATA_SUFFIXES = (".npz", ".npy", ".pt")


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the model declares it; None marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    batch_axis: int | None = 0  # the axis samples are stacked on; None: fed whole to every batch

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.dtype}[?]"
        return f"{self.dtype}[{', '.join('?' if d is None else str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class _Member:
    """One array in one file: where to read it and what the header says."""

    path: Path
    key: str  # npz member key, or "" for a .npy file
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    array: np.ndarray | None = None  # already in memory (a .pt file's tensor)

    def open(self):
        if not self.key:
            f = open(self.path, "rb")  # noqa: SIM115 - the reader owns and closes it
        else:
            zf = zipfile.ZipFile(self.path)
            f = zf.open(self.key + ".npy")
        _read_header(f, self.path)
        return f

    def where(self) -> str:
        return f"{self.path}" + (f" (array '{self.key}')" if self.key else "")


def _check_length(path: Path, key: str, shape, dtype: np.dtype, header: int, size: int) -> None:
    """A header that promises more bytes than the file holds: truncated (or forged)."""
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need > size:
        what = f"{path}" + (f" (array '{key}')" if key else "")
        raise InputError(f"{what} is truncated: its header declares shape {tuple(shape)} ({need} bytes) "
                         f"but it holds {size}; re-save the data")


def _read_header(f, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"{path} is not a readable numpy array file: {e}") from e
    if dtype.hasobject:
        raise InputError(f"{path} holds Python objects (pickled data); save plain numeric arrays")
    return tuple(shape), fortran, dtype


def _pt_members(path: Path) -> dict[str, _Member]:
    """A .pt file holding a tensor (the single input) or a dict of tensors keyed by input name.
    Loaded with weights_only=True: tensors only, no code runs. The file is read whole; a directory
    of them is still streamed one file at a time."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{path}: reading .pt data needs torch (pip install torch==2.13.0)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path} is not a readable tensor file ({str(e).splitlines()[0][:200]})") from None
    items = {"": obj} if isinstance(obj, torch.Tensor) else obj
    if not isinstance(items, dict) or not all(isinstance(v, torch.Tensor) for v in items.values()):
        raise InputError(f"{path} must hold a tensor or a dict of tensors keyed by input name")
    out = {}
    for k, t in items.items():
        a = t.detach().cpu().numpy()
        out[str(k)] = _Member(path, str(k), a.dtype, a.shape, False, np.ascontiguousarray(a))
    return out


def _members(path: Path) -> dict[str, _Member]:
    if path.suffix == ".pt":
        return _pt_members(path)
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            shape, fortran, dtype = _read_header(f, path)
            _check_length(path, "", shape, dtype, f.tell(), os.path.getsize(path))
        return {"": _Member(path, "", dtype, shape, fortran)}
    if path.suffix == ".npz":
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{path} is not a readable .npz file: {e}") from e
        out = {}
        with zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                try:
                    with zf.open(info) as f:
                        shape, fortran, dtype = _read_header(f, path)
                        header = f.tell()
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                    raise InputError(f"{path}: array '{key}' cannot be read ({e}); re-save the data") from e
                _check_length(path, key, shape, dtype, header, info.file_size)
                out[key] = _Member(path, key, dtype, shape, fortran)
        return out
    raise InputError(f"{path}: unsupported data file; use .npz (one array per input), .npy or .pt")


class _Reader:
    """Reads consecutive samples of one array. Axis-0 arrays stream from the open file; arrays
    batched on another axis (a recurrent state [layers, N, H]) or in Fortran order are loaded whole
    and sliced; arrays fed whole are returned as they are."""

    def __init__(self, member: _Member, axis: int | None):
        self.member, self.axis, self.pos, self.f = member, axis, 0, None
        self.array = member.array
        if self.array is None and (axis != 0 or member.fortran):
            self.array = self._load_whole()
        elif self.array is None:
            self.f = member.open()
        self.row_shape = member.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * member.dtype.itemsize

    def _load_whole(self) -> np.ndarray:
        m = self.member
        try:
            arr = np.load(m.path) if not m.key else np.load(m.path)[m.key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise InputError(f"{m.where()} cannot be read ({e}); re-save the data") from e
        return np.ascontiguousarray(arr)

    def read(self, n: int) -> np.ndarray:
        if self.axis is None:
            return self.array
        if self.f is None:
            index = [slice(None)] * self.array.ndim
            index[self.axis] = slice(self.pos, self.pos + n)
            self.pos += n
            return np.ascontiguousarray(self.array[tuple(index)])
        try:
            buf = self.f.read(n * self.row_bytes)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a bad CRC shows at the end
            raise InputError(f"{self.member.where()} cannot be read ({e}); re-save the data") from e
        if self.row_bytes and len(buf) != n * self.row_bytes:
            raise InputError(f"{self.member.where()} ends early: {len(buf) // self.row_bytes} of {n} "
                             "sample(s) could be read; the file is truncated, re-save the data")
        return np.frombuffer(buf, dtype=self.member.dtype).reshape((n, *self.row_shape)).copy()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _File:
    """One data file: its arrays keyed by graph input name."""

    def __init__(self, path: Path, inputs: list[InputSpec]):
        self.path = path
        members = _members(path)
        if "" in members:
            if len(inputs) != 1:
                raise InputError(
                    f"{path} is a .npy file but the model has several inputs; "
                    "use a .npz with one array per input name"
                )
            members = {inputs[0].name: members.pop("")}
        if not members:
            raise InputError(f"{path} holds no arrays")
        self.members = members
        self.axes: dict[str, int | None] = {s.name: s.batch_axis for s in inputs} | {LABELS: 0, TARGETS: 0}
        counts = {}
        for k, m in members.items():
            axis = self.axes.get(k, -1)
            if axis is None or axis == -1:  # fed whole, or not read at all
                continue
            if len(m.shape) <= axis:
                raise InputError(f"{path}: array '{k}' has shape {m.shape}, with no axis {axis} to take samples "
                                 f"from; give it a batch axis, or --batch-axis {k}=none to feed it whole")
            counts[k] = m.shape[axis]
        if len(set(counts.values())) > 1:
            raise InputError(
                f"{path}: arrays have different sample counts on their batch axes: "
                + ", ".join(f"{k}={v}" for k, v in counts.items())
            )
        self.samples = next(iter(counts.values()), 1)  # only whole inputs: one sample, fed as it is

    def batches(self, batch_size: int, limit: int, keys: set[str]) -> Iterator[dict[str, np.ndarray]]:
        """Batched arrays come first in each dict (callers count samples from the first one)."""
        order = sorted((k for k in self.members if k in keys), key=lambda k: self.axes.get(k) is None)
        readers = {k: _Reader(self.members[k], self.axes.get(k, 0)) for k in order}
        try:
            done, left = 0, min(limit, self.samples)
            while left > 0:
                n = min(batch_size, left)
                batch = {k: r.read(n) for k, r in readers.items()}
                self._check_values(batch, done)
                yield batch
                done, left = done + n, left - n
        finally:
            for r in readers.values():
                r.close()

    def _check_values(self, batch: dict[str, np.ndarray], first: int) -> None:
        for k, a in batch.items():
            if k == LABELS:
                batch[k] = class_ids(a, f"{self.path}: '{LABELS}'", first)
            elif k == TARGETS and not np.issubdtype(a.dtype, np.integer):
                raise InputError(f"{self.path}: '{TARGETS}' holds {a.dtype} values; next-token ids must be integers")
            elif np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
                axis = self.axes.get(k)
                sample = f"sample {first + index[axis]}, " if axis is not None else ""
                raise InputError(f"{self.path}: input '{k}' holds {a[index]} at {sample}index {index}; "
                                 "quantkit needs finite data (a mask should use a large finite value)")


def class_ids(labels: np.ndarray, what: str, first: int = 0) -> np.ndarray:
    """Labels as int64 class ids: integers >= 0, or one-hot rows (exactly one 1, zeros elsewhere)."""
    if labels.ndim == 2:
        if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()):
            raise InputError(f"{what} is 2-D but not one-hot (one 1 per row, zeros elsewhere); "
                             "give class ids, one per sample")
        return labels.argmax(axis=1).astype(np.int64)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise InputError(f"{what} must hold one integer class id per sample (or one-hot rows), "
                         f"got {labels.dtype} with shape {labels.shape}")
    if labels.size and labels.min() < 0:
        bad = int(np.argmax(labels < 0))
        raise InputError(f"{what} holds a negative class id {labels[bad]} at sample {first + bad}")
    return labels.astype(np.int64)


def assign_batch_axes(specs: list[InputSpec], overrides: dict[str, int | None]) -> list[InputSpec]:
    """Each input's batch axis: --batch-axis if given; else its first dynamic axis. An input with
    no dynamic axis (a scalar, a fixed config tensor) is fed whole to every batch, unless no input
    has a dynamic axis at all: a fully static model takes its fixed batch on axis 0."""
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"--batch-axis names {', '.join(sorted(unknown))}, which the model does not take; "
                          f"its inputs are {', '.join(s.name for s in specs)}")
    any_dynamic = any(s.shape is None or None in s.shape for s in specs)
    out = []
    for s in specs:
        if s.name in overrides:
            axis = overrides[s.name]
            if axis is not None and s.shape is not None and not 0 <= axis < len(s.shape):
                raise ConfigError(f"--batch-axis {s.name}={axis}: the input has rank {len(s.shape)}")
        elif s.shape is None:
            axis = 0
        elif None in s.shape:
            axis = s.shape.index(None)
        else:
            axis = 0 if s.shape and not any_dynamic else None
        out.append(dataclasses.replace(s, batch_axis=axis))
    return out


class DataSource:
    """A .npz/.npy file or a directory of them. Headers are read (and checked) up front; the
    data itself is only read while iterating `batches`."""

    def __init__(self, path: Path, inputs: list[InputSpec]):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"data path {self.path} does not exist")
        if self.path.is_dir():
            paths = sorted(p for p in self.path.iterdir() if p.suffix in DATA_SUFFIXES)
            if not paths:
                raise InputError(f"directory {self.path} has no .npz, .npy or .pt files")
        else:
            paths = [self.path]
        self.files = [_File(p, inputs) for p in paths]
        self.inputs = inputs
        self.extra_keys: list[str] = []
        for f in self.files:
            self._check(f)
        self.has_labels = all(LABELS in f.members for f in self.files)
        if self.samples == 0:
            raise InputError(f"{self.path} holds no samples (its arrays have 0 entries on the batch axis)")

    @property
    def samples(self) -> int:
        return sum(f.samples for f in self.files)

    def _check(self, f: _File) -> None:
        keys = sorted(f.members)
        for spec in self.inputs:
            m = f.members.get(spec.name)
            if m is None:
                raise InputError(
                    f"{f.path} has no array for input '{spec.name}'; it has: {', '.join(keys) or 'none'}"
                )
            if m.dtype != spec.dtype:
                raise InputError(
                    f"{f.path}: input '{spec.name}' is {m.dtype} but the model expects {spec.dtype}; "
                    f"convert it with arr.astype(np.{spec.dtype})"
                )
            _check_shape(f.path, spec, m.shape)
        names = {s.name for s in self.inputs}
        for k in keys:
            if k not in names and k not in (LABELS, TARGETS) and k not in self.extra_keys:
                self.extra_keys.append(k)
        if LABELS in f.members:
            m = f.members[LABELS]
            if len(m.shape) not in (1, 2) or not (np.issubdtype(m.dtype, np.number) or m.dtype == np.bool_):
                raise InputError(f"{f.path}: '{LABELS}' must hold one integer class id per sample (or one-hot "
                                 f"rows), got {m.dtype} with shape {m.shape}")
            if len(m.shape) == 1 and not (np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_):
                raise InputError(f"{f.path}: '{LABELS}' holds {m.dtype} values; class ids must be integers")

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of input name -> array (plus 'labels' when present), at most `limit`
        samples in all. Extra arrays the model does not take are not read."""
        left = self.samples if limit is None else min(limit, self.samples)
        wanted = {s.name for s in self.inputs} | {LABELS, TARGETS}
        for f in self.files:
            if left <= 0:
                break
            for batch in f.batches(batch_size, left, wanted):
                left -= len(next(iter(batch.values())))
                yield batch


def _check_shape(path: Path, spec: InputSpec, shape: tuple[int, ...]) -> None:
    if spec.shape is None:
        return
    if spec.batch_axis is None:
        if len(shape) != len(spec.shape) or any(w is not None and w != g for w, g in zip(spec.shape, shape)):
            raise InputError(f"{path}: input '{spec.name}' has no batch axis in the model {spec.describe()}, so "
                             f"it is fed whole to every batch, but its array has shape {shape}; save it with "
                             f"the model's shape, or use --batch-axis {spec.name}=K")
        return
    if len(shape) != len(spec.shape):
        raise InputError(
            f"{path}: input '{spec.name}' has shape {shape} (rank {len(shape)}) "
            f"but the model expects rank {len(spec.shape)} {spec.describe()}, batch on axis {spec.batch_axis}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        if axis != spec.batch_axis and want is not None and got != want:
            raise InputError(
                f"{path}: input '{spec.name}' has size {got} on axis {axis} "
                f"but the model expects {want} {spec.describe()}"
            )


def peek_specs(path: Path, single_name: str) -> list[InputSpec]:
    """The input signature a data file implies (for models that do not declare one, such as
    PyTorch modules): one spec per array but `labels`, batch axis dynamic, and the second axis of
    rank-2/3 arrays dynamic too (sequence length). A .npy file is the single input `single_name`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data path {path} does not exist")
    first = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)[:1] if path.is_dir() else [path]
    if not first:
        raise InputError(f"directory {path} has no .npz, .npy or .pt files")
    specs = []
    for key, m in _members(first[0]).items():
        if key == LABELS:
            continue
        shape = [None, *m.shape[1:]]
        if len(shape) in (2, 3):
            shape[1] = None
        specs.append(InputSpec(key or single_name, m.dtype, tuple(shape)))
    return specs


def complete_batches(source, batch: int, limit: int | None, fixed: bool):
    """Batches of the data; a model with a fixed batch size cannot take the short last one."""
    for b in source.batches(batch, limit):
        if fixed and len(next(iter(b.values()))) != batch:
            return
        yield b
