"""Safe writes for `delta` and `apply`, with numpy, onnx and the standard library only.

quantkit/output.py imports onnx_ir and onnxruntime at module level, and `apply` must run on a
device without them, so the few rules it needs live here, in output.py's terms: destinations
are checked before any work (a regular file or nothing, an existing directory, not one of the
inputs, absent unless --force); results are written in full to a temporary file beside the
destination and then placed, with a rename under --force and create-exclusive (a hard link)
without it, so a failure or a concurrent run leaves no partial or overwritten file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path

from quantkit.errors import ConfigError


def _identity(path: Path) -> tuple:
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_destinations(outputs: dict[str, Path | None], inputs: list[Path | None], force: bool) -> None:
    """outputs: what (for messages) -> path; ConfigError (exit 2) for one that may not be written."""
    taken = {_identity(Path(p)): f"input {p}" for p in inputs if p is not None}
    for what, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file (a symlink, directory or device); "
                              "choose a file path")
        if not path.parent.is_dir():
            raise ConfigError(f"{what} directory {path.parent} does not exist; create it first")
        ident = _identity(path)
        if ident in taken:
            raise ConfigError(f"{what} {path} is one of the inputs ({taken[ident]}); choose another path")
        if st is not None and not force:
            raise ConfigError(f"{what} {path} already exists; pass --force to overwrite it")
        taken[ident] = f"{what} {path}"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def place(staged: Path, dest: Path, force: bool) -> None:
    """Move a fully written file into place: a rename with --force, else create-exclusive."""
    os.chmod(staged, _umask_mode())
    if force:
        os.replace(staged, dest)
        return
    try:
        os.link(staged, dest)  # fails if dest exists, even when another run created it meanwhile
    except FileExistsError:
        raise ConfigError(f"{dest} appeared while quantkit was running (another run?); nothing was "
                          "overwritten, pass --force to replace it") from None
    except OSError:  # a filesystem without hard links: claim the name with O_EXCL, then rename over it
        try:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise ConfigError(f"{dest} appeared while quantkit was running (another run?); nothing was "
                              "overwritten, pass --force to replace it") from None
        os.replace(staged, dest)
        return
    os.unlink(staged)


def write_bytes(data: bytes, path: Path, force: bool) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        place(Path(tmp), path, force)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finite(value):
    """JSON has no NaN or Infinity: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(data: dict) -> str:
    return json.dumps(_finite(data), indent=2, allow_nan=False)


def write_json(data: dict, path: Path, force: bool) -> None:
    write_bytes((dumps(data) + "\n").encode(), path, force)
