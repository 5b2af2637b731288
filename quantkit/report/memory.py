"""The run's whole-process peak resident memory, for the report."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)


def section(model_bytes: int, streamed: bool) -> dict:
    """`streamed`: weights were read and written one tensor at a time (quantize/streaming.py).
    The peak covers everything up to the report, the interpreter and its libraries included."""
    peak = peak_rss_bytes()
    return {"peak_rss_bytes": peak, "model_bytes": model_bytes,
            "peak_to_model": peak / model_bytes if peak and model_bytes else None, "streamed": streamed}
