"""Writing results safely.

* Destinations are checked before any work: each must be a regular file or not exist yet (never a
  symlink, device, FIFO or directory), in a directory we can write to, distinct from every input and
  from every other output, and absent unless --force.
* Every result is first written in full to a temporary file beside its destination (`stage_*`);
  only when all of them are written are they moved into place together (`commit`). A failure while
  writing (a full disk) leaves nothing behind.
* Without --force the move is create-exclusive (a hard link, which fails if the name exists), so
  two runs racing to the same path cannot silently overwrite each other; the loser's outputs are
  rolled back. With --force it is an atomic rename over the old file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit.errors import ConfigError, InputError, raise_if_interrupted

if TYPE_CHECKING:  # `quantkit apply` writes through here on devices without onnx-ir or onnxruntime
    import onnx_ir as ir


def _identity(path: Path) -> tuple:
    """Two paths name the same file when they resolve alike or share an inode (hard links)."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _expand(inputs: list[Path | None]) -> list[Path]:
    """Input files; a directory of data stands for the files in it."""
    out = []
    for p in inputs:
        if p is None:
            continue
        p = Path(p)
        out += sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    return out


def check_destinations(outputs: dict[str, Path | None], inputs: list[Path | None], force: bool) -> None:
    """outputs: what (for messages) -> path. Raises ConfigError (exit 2) for a destination that may
    not be written, InputError (exit 3) for one whose directory cannot be written."""
    given = {what: Path(p) for what, p in outputs.items() if p is not None}
    taken = {_identity(p): f"input {p}" for p in _expand(inputs)}
    for what, path in given.items():
        ident = _identity(path)
        if ident in taken:
            raise ConfigError(f"{what} {path} is the same file as the {taken[ident]}; choose another path")
        _check_one(what, path, force)
        taken[ident] = f"{what} {path}"
    for path in {p.parent.resolve() for p in given.values()}:
        _probe_writable(path)


def _check_one(what: str, path: Path, force: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a device or special file"
        raise ConfigError(f"{what} {path} is {kind}; quantkit writes only regular files, choose a file path")
    if not path.parent.is_dir():
        raise ConfigError(f"{what} directory {path.parent} does not exist; create it first")
    if st is not None and not force:
        raise ConfigError(f"{what} {path} already exists; pass --force to overwrite it")


def _probe_writable(directory: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write in {directory}: {e.strerror or e}; choose a writable directory") from e


def finite_json(value):
    """JSON has no NaN or Infinity: non-finite floats become null, everywhere in the report."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(data: dict) -> str:
    return json.dumps(finite_json(data), indent=2, allow_nan=False)


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's files are private, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class Outputs:
    """Results staged beside their destinations, then committed together (see the module doc).
    Use as a context manager: whatever was staged but not committed is removed on exit."""

    def __init__(self, force: bool):
        self.force = force
        self._dirs: list[Path] = []
        self._pending: list[tuple[Path, Path]] = []  # (staged file, destination), data files first

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc) -> None:
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _stage_dir(self, path: Path) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        self._dirs.append(d)
        return d

    def _writing(self, path: Path, write) -> None:
        try:
            write()
        except OSError as e:
            why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise InputError(f"could not write {path}: {why}; nothing was written") from e

    def stage_written(self, path: Path, write: Callable[[Path], object]) -> Path:
        """`write(staged_path)` writes the file, and maybe sidecar files beside it (an ONNX
        model's external data): all of them are staged, the sidecars placed first. Returns the
        staged path (readable until commit, e.g. to evaluate a model where it was written)."""
        path = Path(path)
        d = self._stage_dir(path)
        self._writing(path, lambda: write(d / path.name))
        for f in sorted(d.iterdir()):  # the data file first, so the .onnx never points at nothing
            if f.name != path.name:
                self._pending.append((f, path.parent / f.name))
        self._pending.append((d / path.name, path))
        return d / path.name

    def stage_model(self, model: ir.Model, path: Path) -> None:
        """A model too large to inline gets `<name>.data` beside it (staged too)."""
        from quantkit import runtime

        self.stage_written(path, lambda p: runtime.save(model, p))

    def stage_json(self, data: dict, path: Path) -> None:
        self.stage_text(dumps(data) + "\n", path)

    def stage_text(self, text: str, path: Path) -> None:
        self.stage_bytes(text.encode("utf-8"), path)

    def stage_bytes(self, data: bytes, path: Path) -> None:
        self.stage_written(path, lambda p: p.write_bytes(data))

    def stage_copy(self, src: Path, path: Path) -> None:
        self.stage_written(path, lambda p: shutil.copyfile(src, p))

    def commit(self) -> list[Path]:
        raise_if_interrupted()  # nothing is placed after a signal, even one whose exception Python dropped
        placed: list[Path] = []
        try:
            for staged, dest in self._pending:
                os.chmod(staged, _umask_mode())
                self._place(staged, dest)
                placed.append(dest)
        except BaseException:
            if not self.force:  # ours alone: created exclusively a moment ago
                for p in placed:
                    p.unlink(missing_ok=True)
            raise
        self._pending = []
        return placed

    def _place(self, staged: Path, dest: Path) -> None:
        if self.force:
            if dest.is_symlink() or (dest.exists() and not dest.is_file()):
                raise ConfigError(f"{dest} became a symlink or special file while quantkit ran; not replacing it")
            os.replace(staged, dest)
            return
        try:
            os.link(staged, dest)  # create-exclusive: fails if dest exists, even when created meanwhile
        except FileExistsError as e:
            raise ConfigError(f"{dest} appeared while quantkit was running (another run?); "
                              "nothing was overwritten, pass --force to replace it") from e
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            self._place_without_links(staged, dest)
            return
        staged.unlink()

    @staticmethod
    def _place_without_links(staged: Path, dest: Path) -> None:
        """Filesystems without hard links: claim the name with O_EXCL, then fill it."""
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError as e:
            raise ConfigError(f"{dest} appeared while quantkit was running (another run?); "
                              "nothing was overwritten, pass --force to replace it") from e
        try:
            with os.fdopen(fd, "wb") as out, open(staged, "rb") as src:
                shutil.copyfileobj(src, out)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
