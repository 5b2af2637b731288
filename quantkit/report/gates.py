"""CI gates: compare the report's figures with the thresholds the user set."""

from __future__ import annotations

from quantkit.config import Gates


def check_gates(outputs: list[dict], gates: Gates, latency: dict | None = None) -> list[str]:
    """One line per failed gate; empty when every gate passed. A non-finite value where fp32 is
    finite fails every gate that was set."""
    failures = []
    if any(v is not None for v in (gates.max_accuracy_drop, gates.min_cosine, gates.require_speedup, gates.min_sqnr)):
        for out in outputs:
            if out.get("nonfinite"):
                failures.append(f"output '{out['name']}': {out['nonfinite']} non-finite value(s) (NaN/Inf) "
                                "where fp32 is finite")
    if gates.min_sqnr is not None:
        for out in outputs:
            sqnr = out.get("sqnr_db", "absent")
            if sqnr != "absent" and sqnr is not None and sqnr < gates.min_sqnr:
                failures.append(f"output '{out['name']}': SQNR {sqnr:.1f} dB (< --min-sqnr {gates.min_sqnr:g})")
    if gates.max_accuracy_drop is not None and outputs:
        first = outputs[0]
        drop = first.get("accuracy_drop_points")
        if drop is None:
            failures.append(f"output '{first['name']}': no accuracy figure (labels or class scores missing)")
        elif drop > gates.max_accuracy_drop:
            failures.append(f"output '{first['name']}': accuracy dropped {drop:.2f} points "
                            f"(> --max-accuracy-drop {gates.max_accuracy_drop:g})")
    if gates.min_cosine is not None:
        for out in outputs:
            cos = out.get("cosine_mean")
            if cos is not None and cos < gates.min_cosine:
                failures.append(f"output '{out['name']}': mean cosine {cos:.5f} "
                                f"(< --min-cosine {gates.min_cosine:g})")
    if gates.require_speedup is not None:
        speedup = (latency or {}).get("speedup")
        if speedup is None:
            failures.append("no latency measured, so --require-speedup cannot be checked")
        elif speedup < gates.require_speedup:
            failures.append(f"speedup {speedup:.2f}x over fp32 (< --require-speedup {gates.require_speedup:g})")
    return failures
