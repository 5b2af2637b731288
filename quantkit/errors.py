"""Typed errors. Each carries the process exit code that cli.py turns it into.

Exit codes (documented in README.md):
  0  success
  1  internal error (a bug in quantkit: rerun with --verbose and report the traceback)
  2  usage error: bad or conflicting options, output exists without --force
  3  bad input: unreadable model file, calibration/eval data that does not match the model
  4  unsupported model: the model cannot be quantized by quantkit at all
  5  gate failed: the quantized model fell short of --max-accuracy-drop / --min-cosine
"""

from __future__ import annotations

import signal


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line
    errors that quote a library's complaint."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class QuantkitError(Exception):
    exit_code = 1


class ConfigError(QuantkitError):
    exit_code = 2


class InputError(QuantkitError):
    exit_code = 3


class UnsupportedModelError(QuantkitError):
    exit_code = 4


class AccuracyGateError(QuantkitError):
    exit_code = 5


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: unwinds like Ctrl-C, so every temporary file is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


# Signals the CLI's handler received. The handler raises Interrupted at once, but Python drops an
# exception raised while it runs a __del__ or a finalizer (the garbage collector can be in one when
# the signal lands): the run would go on to the end. So the signal is also recorded here, and every
# status line and the moment outputs are placed raise it again.
_received: list[int] = []


def signal_received(signum: int) -> None:
    _received.append(signum)


def clear_signals() -> None:
    _received.clear()


def raise_if_interrupted() -> None:
    if _received:
        raise Interrupted(_received[0])
