"""Calibration and evaluation data, streamed a batch at a time.

Accepted forms (batch on axis 0):
  * `.npz` with one array per graph input (and optionally `labels`),
  * `.npy` holding the single input of a single-input model,
  * a directory of such files, read one after the other.

Arrays are read from disk batch by batch (also inside compressed `.npz` files), so memory is
bounded by one batch, never by the size of the data set.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.errors import InputError

LABELS = "labels"
DATA_SUFFIXES = (".npz", ".npy", ".pt")


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the model declares it; None marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

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
            f = open(self.path, "rb")  # noqa: SIM115 (returned open to the caller, who closes it)
        else:
            zf = zipfile.ZipFile(self.path)
            f = zf.open(self.key + ".npy")
        _read_header(f, self.path)
        return f


def _read_header(f, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise InputError(f"{path} is not a readable numpy array file: {e}") from None
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
        return {"": _Member(path, "", dtype, shape, fortran)}
    if path.suffix == ".npz":
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{path} is not a readable .npz file: {e}") from None
        out = {}
        with zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    shape, fortran, dtype = _read_header(f, path)
                key = name[: -len(".npy")]
                out[key] = _Member(path, key, dtype, shape, fortran)
        return out
    raise InputError(f"{path}: unsupported data file; use .npz (one array per input), .npy or .pt")


class _Reader:
    """Reads consecutive rows (samples) of one array from an open stream."""

    def __init__(self, member: _Member):
        self.member = member
        if member.array is not None:
            self.f, self.array, self.pos = None, member.array, 0
        elif member.fortran:
            # Fortran order is not row-contiguous; such files are rare and loaded whole.
            self.f = None
            arr = np.load(member.path) if not member.key else np.load(member.path)[member.key]
            self.array = np.ascontiguousarray(arr)
            self.pos = 0
        else:
            self.f = member.open()
        self.row_shape = member.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * member.dtype.itemsize

    def read(self, n: int) -> np.ndarray:
        if self.f is None:
            out = self.array[self.pos : self.pos + n]
            self.pos += n
            return out
        buf = self.f.read(n * self.row_bytes)
        rows = len(buf) // self.row_bytes if self.row_bytes else n
        return np.frombuffer(buf, dtype=self.member.dtype).reshape((rows, *self.row_shape)).copy()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _File:
    """One data file: its arrays keyed by graph input name."""

    def __init__(self, path: Path, single_input: str | None):
        self.path = path
        members = _members(path)
        if "" in members:
            if single_input is None:
                raise InputError(
                    f"{path} is a .npy file but the model has several inputs; "
                    "use a .npz with one array per input name"
                )
            members = {single_input: members.pop("")}
        if not members:
            raise InputError(f"{path} holds no arrays")
        self.members = members
        counts = {k: (m.shape[0] if m.shape else 0) for k, m in members.items()}
        if any(len(m.shape) == 0 for m in members.values()):
            scalar = next(k for k, m in members.items() if len(m.shape) == 0)
            raise InputError(f"{path}: array '{scalar}' is a scalar; arrays need the batch on axis 0")
        if len(set(counts.values())) > 1:
            raise InputError(
                f"{path}: arrays have different sample counts on axis 0: "
                + ", ".join(f"{k}={v}" for k, v in counts.items())
            )
        self.samples = next(iter(counts.values()))

    def batches(self, batch_size: int, limit: int, keys: set[str]) -> Iterator[dict[str, np.ndarray]]:
        readers = {k: _Reader(m) for k, m in self.members.items() if k in keys}
        try:
            left = min(limit, self.samples)
            while left > 0:
                n = min(batch_size, left)
                yield {k: r.read(n) for k, r in readers.items()}
                left -= n
        finally:
            for r in readers.values():
                r.close()


class DataSource:
    """A .npz/.npy file or a directory of them. Headers are read (and checked) up front; the
    data itself is only read while iterating `batches`."""

    def __init__(self, path: Path, inputs: list[InputSpec]):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"data path {self.path} does not exist")
        single = inputs[0].name if len(inputs) == 1 else None
        if self.path.is_dir():
            paths = sorted(p for p in self.path.iterdir() if p.suffix in DATA_SUFFIXES)
            if not paths:
                raise InputError(f"directory {self.path} has no .npz, .npy or .pt files")
        else:
            paths = [self.path]
        self.files = [_File(p, single) for p in paths]
        self.inputs = inputs
        self.extra_keys: list[str] = []
        for f in self.files:
            self._check(f)
        self.has_labels = all(LABELS in f.members for f in self.files)

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
            if spec.shape is None:
                continue
            if len(m.shape) != len(spec.shape):
                raise InputError(
                    f"{f.path}: input '{spec.name}' has shape {m.shape} (rank {len(m.shape)}) "
                    f"but the model expects rank {len(spec.shape)} {spec.describe()}, batch on axis 0"
                )
            for axis, (got, want) in enumerate(zip(m.shape[1:], spec.shape[1:]), start=1):
                if want is not None and got != want:
                    raise InputError(
                        f"{f.path}: input '{spec.name}' has size {got} on axis {axis} "
                        f"but the model expects {want} {spec.describe()}"
                    )
        names = {s.name for s in self.inputs}
        for k in keys:
            if k not in names and k != LABELS and k not in self.extra_keys:
                self.extra_keys.append(k)
        if LABELS in f.members and len(f.members[LABELS].shape) == 0:
            raise InputError(f"{f.path}: 'labels' must have one entry per sample")

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of input name -> array (plus 'labels' when present), at most `limit`
        samples in all. Extra arrays the model does not take are not read."""
        left = self.samples if limit is None else min(limit, self.samples)
        wanted = {s.name for s in self.inputs} | {LABELS}
        for f in self.files:
            if left <= 0:
                break
            for batch in f.batches(batch_size, left, wanted):
                left -= len(next(iter(batch.values())))
                yield batch


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
