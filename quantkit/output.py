"""Writing results: into a temporary file (or directory) beside the destination, then renamed,
so that a failure at any point leaves no partial file and never a half-replaced one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from quantkit import runtime
from quantkit.errors import ConfigError


def check_destination(path: Path, force: bool, what: str, inputs: list[Path]) -> None:
    path = Path(path)
    for src in inputs:
        if src is not None and path.resolve() == Path(src).resolve():
            raise ConfigError(f"{what} {path} is one of the inputs; choose another path")
    if not path.parent.is_dir():
        raise ConfigError(f"{what} directory {path.parent} does not exist; create it first")
    if path.exists() and not force:
        raise ConfigError(f"{what} {path} already exists; pass --force to overwrite it")


def write_model(model: ir.Model, path: Path) -> list[Path]:
    """Save atomically; a model too large to inline gets `<name>.data` beside it."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        runtime.save(model, tmp / path.name)
        written = []
        for f in sorted(tmp.iterdir()):  # the data file first, so the .onnx never points at nothing
            if f.name != path.name:
                os.replace(f, path.parent / f.name)
                written.append(path.parent / f.name)
        os.replace(tmp / path.name, path)
        written.append(path)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's files are private, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json(data: dict, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_copy(src: Path, path: Path) -> None:
    """Copy a file into place atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
