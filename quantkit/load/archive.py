"""Inspect a PyTorch zip archive before torch loads it: nothing in it may be unpickled unless the
pickle only rebuilds tensors.

torch.export.load unpickles several members of a `.pt2` archive with `weights_only=False`
(sample inputs, weights and constants saved with `use_pickle`, opaque constants), so a crafted
archive runs code the moment it is loaded. We read every pickle in the archive (also those inside
nested `torch.save` zips) with `pickletools`, which parses opcodes without executing anything, and
collect the globals the pickle would import. A pickle may only name the globals that rebuild
tensors; TorchScript archives may also name their own compiled classes (`__torch__.*`), which
torch.jit's C++ loader resolves without running Python. Anything else is refused unless the user
passed --allow-pickle.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

# What torch.save writes for tensors, storages and state dicts (torch's own weights_only set).
TENSOR_GLOBALS = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor", "torch._utils._rebuild_parameter",
    "collections.OrderedDict", "torch.Size", "torch.device",
    *(f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                     "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped")),
})
# TorchScript archives: classes compiled by TorchScript and its list helpers, resolved in C++.
TORCHSCRIPT_PREFIXES = ("__torch__.", "torch.jit._pickle.")

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
               "STRING"}
_NESTED_LIMIT = 3  # zips inside zips: torch.save bytes inside a .pt2 are one level


def pickle_globals(data: bytes) -> set[str]:
    """The `module.name` globals a pickle would import. A global built at run time (STACK_GLOBAL
    not fed by two literal strings) or an extension-registry code cannot be known: reported as
    '<unknown>'. A pickle that does not parse is '<unparsable>'."""
    found: set[str] = set()
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.add(str(arg).replace(" ", ".", 1))
            elif name == "STACK_GLOBAL":
                found.add(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<unknown>")
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.add("<unknown>")
            if name in _STRING_OPS:
                strings.append(str(arg))
            elif name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                strings.clear()  # STACK_GLOBAL's names must be the two ops right before it
    except Exception:  # pickletools raises ValueError and more on malformed input
        found.add("<unparsable>")
    return found


def _is_pickle(data: bytes, name: str) -> bool:
    return name.endswith(".pkl") or (len(data) >= 2 and data[0] == 0x80 and data[1] <= 5)


def unsafe_globals(path: Path, torchscript: bool) -> list[tuple[str, str]]:
    """(member, global) pairs that loading the archive would import and that are not tensor
    rebuilders (or TorchScript classes in a TorchScript archive)."""
    with zipfile.ZipFile(path) as zf:
        return _scan(zf, torchscript, "", 0)


def _scan(zf: zipfile.ZipFile, torchscript: bool, prefix: str, depth: int) -> list[tuple[str, str]]:
    bad = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        data = zf.read(info.filename)
        where = prefix + info.filename
        if data[:4] == b"PK\x03\x04" and depth < _NESTED_LIMIT:
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as inner:
                    bad += _scan(inner, torchscript, where + "!", depth + 1)
            except zipfile.BadZipFile:
                bad.append((where, "<unparsable>"))
            continue
        if not _is_pickle(data, info.filename):
            continue
        for g in sorted(pickle_globals(data)):
            if g in TENSOR_GLOBALS or (torchscript and g.startswith(TORCHSCRIPT_PREFIXES)):
                continue
            bad.append((where, g))
    return bad
