"""Weights that stay on disk: read one tensor at a time, written one tensor at a time.

onnx_ir's ExternalTensor maps the whole data file and keeps the mapping (and every page it
touched, which counts as resident memory) until released; over a whole model that is the model's
size again. `ReadTensor` reads its bytes with plain file reads each time it is asked and keeps
nothing, so a weight lives exactly as long as the numpy array made from it; the page cache (not
the process) holds the file.

`write_model` writes a model whose weights are partly on disk (the input's data file, a spill
file) and partly in memory (new quantized tensors) as one `.onnx` plus one `.onnx.data`, copying
tensor by tensor in bounded chunks; afterwards every written initializer is a ReadTensor on the
new file, so the in-memory copies are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from quantkit import runtime

ALIGN = 4096  # page-aligned offsets let onnxruntime map a tensor instead of copying it
INLINE_BYTES = 1024  # tensors this small stay inside the .onnx
CHUNK = 16 << 20


class ReadTensor(ir.ExternalTensor):
    """An external tensor read from its file on every access, never cached or mapped."""

    def _read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset or 0)
            return f.read(self.nbytes)

    def numpy(self) -> np.ndarray:
        if self.dtype.bitwidth < 8:  # packed 4-bit data: let onnx_ir unpack it (mapped once, released)
            plain = ir.ExternalTensor(self.location, self.offset, self.length, self.dtype, shape=self.shape,
                                      name=self.name, base_dir=self.base_dir)
            arr = np.array(plain.numpy())
            plain.release()
            return arr
        dt = np.dtype(self.dtype.numpy()).newbyteorder("<")
        arr = np.empty(self.shape.numpy(), dt)  # read straight into it: no zero-filled buffer first
        view = arr.reshape(-1).view(np.uint8).data  # a memoryview of the array itself
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset or 0)
            done = 0
            while done < self.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.path} ended {self.nbytes - done} bytes early")
                done += n
        return arr

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def tobytes(self) -> bytes:
        return self._read()


def read_ahead(items: list, read: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """(item, read(item)) for each item, the next item read on a thread while the caller works on
    the current one: file reads release the GIL, so reading a weight from disk overlaps with
    rounding the one before. At most the current value and the next are held."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, items[0])
        for i, item in enumerate(items):
            value = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(read, items[i + 1])
            yield item, value
            value = None


def _reader(t: ir.ExternalTensor) -> ReadTensor:
    return ReadTensor(t.location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name, base_dir=t.base_dir)


def read_lazily(model: ir.Model) -> int:
    """Swap every mapped external initializer for a ReadTensor; returns their total bytes."""
    total = 0
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor) and not isinstance(t, ReadTensor):
                t.release()
                v.const_value = _reader(t)
                total += t.nbytes
    return total


def external_folders(model: ir.Model) -> set[Path]:
    """Folders of the files the model's external initializers live in."""
    return {Path(v.const_value.path).resolve().parent for g in model.graphs() for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def in_memory_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))


def _copy_range(src: str, offset: int, length: int, out) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{src} ended {left} bytes early")
            out.write(chunk)
            left -= len(chunk)


def _append(t: ir.TensorProtocol, out) -> int:
    """Write one tensor's bytes at the next aligned offset of `out`; returns that offset."""
    pos = out.tell()
    if t.nbytes >= ALIGN:
        out.write(b"\0" * (-pos % ALIGN))
    offset = out.tell()
    if isinstance(t, ir.ExternalTensor):
        _copy_range(t.path, t.offset or 0, t.nbytes, out)
    else:
        out.write(t.tobytes())
    return offset


def write_model(model: ir.Model, path: Path) -> None:
    """Save as `path` + `path.name`.data, streaming every weight; the model's initializers then
    read from the new file (in-memory tensors are released)."""
    path = Path(path)
    location = path.name + ".data"
    with open(path.parent / location, "wb") as out:
        for graph in model.graphs():
            for v in graph.initializers.values():
                t = v.const_value
                if t is None or (t.nbytes <= INLINE_BYTES and not isinstance(t, ir.ExternalTensor)):
                    continue
                offset = _append(t, out)
                v.const_value = ReadTensor(location, offset, t.nbytes, t.dtype, shape=ir.Shape(t.shape.numpy()),
                                           name=t.name, base_dir=str(path.parent))
        out.flush()
        os.fsync(out.fileno())
    with runtime.unpublished(model):
        ir.save(model, path)
