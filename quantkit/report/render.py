"""The report as a terminal table."""

from __future__ import annotations


def _fmt(x, spec=".4f", none="-"):
    return none if x is None else format(x, spec)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def output_table(outputs: list[dict], reference: str, candidate: str) -> list[str]:
    """The per-output comparison rows (quantize's and delta's reports share them)."""
    lines = [f"  {'output':<20} {'cosine':>8} {'min cos':>8} {'SQNR dB':>8} {'max err':>9} {'top-1':>7} "
             f"{reference:>9} {candidate:>9}"]
    for o in outputs:
        if "exact_match" in o:
            lines.append(f"  {o['name'][:20]:<20} exact match {o['exact_match']:.4f}")
            continue
        lines.append(
            f"  {o['name'][:20]:<20} {_fmt(o['cosine_mean']):>8} {_fmt(o['cosine_min']):>8} "
            f"{_fmt(o['sqnr_db'], '.1f', '-inf' if o.get('nonfinite') else 'inf'):>8} "
            f"{_fmt(o['max_abs_error'], '.3g'):>9} "
            f"{_fmt(o.get('top1_agreement'), '.3f'):>7} {_fmt(o.get('accuracy_fp32'), '.2f'):>9} "
            f"{_fmt(o.get('accuracy_quantized'), '.2f'):>9}"
        )
    return lines


def render_text(report: dict) -> str:
    m, lat = report["model"], report["latency"]
    lines = [f"quantkit {report['quantkit_version']}: {m['input']} -> {m['output']}", ""]
    lines.append(f"  size      {_size(m['bytes_before'])} -> {_size(m['bytes_after'])}"
                 f"  ({_fmt(m['compression'], '.2f')}x smaller)")
    if lat:
        verdict = "faster" if lat["speedup"] and lat["speedup"] >= 1 else "SLOWER"
        lines.append(f"  latency   {lat['fp32_ms']:.3f} ms -> {lat['quantized_ms']:.3f} ms per batch of "
                     f"{lat['batch_size']}  ({_fmt(lat['speedup'], '.2f')}x, {verdict}; median of {lat['runs']}"
                     f"{' evaluation batch(es)' if lat.get('timed') == 'evaluation batches' else ''})")
    q, f = report["nodes"]["quantized"], report["nodes"]["float"]
    lines.append(f"  nodes     {len(q)} quantized to int8, {len(f)} weighted node(s) kept float")
    cal, ev = report["calibration"], report["evaluation"]
    if cal:
        lines.append(f"  calib     {cal['samples']} sample(s), {cal['method']}, {cal['seconds']:.2f} s")
    else:
        lines.append("  calib     none (dynamic activations)")
    guard = report.get("speed_guard")
    if guard and guard["dropped"]:
        lines.append(f"  speed     left float because faster that way: {', '.join(guard['dropped'])}")
    from quantkit.prune.report import render_lines

    lines += render_lines(report.get("pruning"))
    where = "calibration data" if ev["on_calibration_data"] else ev["source"]
    lines.append(f"  eval      {ev['samples']} sample(s) from {where}")
    lines.append("")
    vs_pruned = report.get("outputs_vs_pruned")
    if vs_pruned is not None:
        lines.append("  against the original model:")
    lines += output_table(report["outputs"], "acc fp32", "acc int8")
    if vs_pruned is not None:
        lines += ["", "  against the pruned float model (--prune-fixed: what the accuracy gates read):"]
        lines += output_table(vs_pruned, "acc pruned", "acc int8")
    for o in report["outputs"]:
        if o.get("nonfinite"):
            lines.append(f"  NON-FINITE: output '{o['name']}' has {o['nonfinite']} NaN/Inf value(s) where fp32 "
                         "is finite")
    if f:
        lines.append("")
        lines.append("  kept float:")
        for s in f:
            lines.append(f"    {s['op_type']:<14} {s['node'] or '(unnamed)':<30} {s['reason']}")
    for t in report.get("float_tensors", []):
        lines.append(f"  float tensor {t['tensor']}: {t['reason']}")
    for n in report["notes"]:
        lines.append(f"  note: {n}")
    g = report["gates"]
    if g["failures"]:
        lines.append("")
        lines += [f"  GATE FAILED: {x}" for x in g["failures"]]
    return "\n".join(lines)
