"""The `delta` report as a terminal table."""

from __future__ import annotations

from quantkit.report.render import _fmt, _size, output_table


def render_delta(report: dict) -> str:
    b = report["bytes"]
    lines = [f"quantkit {report['quantkit_version']}: delta {report['base']} -> {report['new']} "
             f"= {report['output']}", ""]
    zipped = "" if b["zipped_fp32_delta"] is None else (
        f"; {b['times_smaller_than_zipped_delta']:.1f}x smaller than a zipped fp32 delta "
        f"{_size(b['zipped_fp32_delta'])}")
    lines.append(f"  update    {_size(b['update'])}  ({b['times_smaller_than_new']:.1f}x smaller than the new model "
                 f"{_size(b['new_model'])}{zipped})")
    lines.append("  encodings " + ", ".join(f"{k} {v}" for k, v in sorted(report["encodings"].items())))
    auto = report.get("auto")
    if auto:
        tgt = {k: v for k, v in auto["target"].items() if v is not None}
        lines.append(f"  auto      target {tgt}; tried " + ", ".join(
            f"tau {t['tau']:g} {'ok' if t['passed'] else 'miss'}" for t in auto["tried"]))
    ev = report["evaluation"]
    if ev:
        lines.append(f"  eval      {ev['samples']} sample(s) from {ev['source']}: apply(BASE, update) against NEW")
    lines.append("")
    lines.append(f"  {'tensor':<40} {'shape':<16} {'encoding':<10} {'bytes':>10} {'rel err':>8}")
    for t in report["tensors"]:
        if t["encoding"] == "unchanged":
            continue
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(f"  {t['name'][-40:]:<40} {shape[:16]:<16} {t['encoding']:<10} {t['payload_bytes']:>10} "
                     f"{_fmt(t['relative_error'], '.4f'):>8}")
    unchanged = report["encodings"].get("unchanged", 0)
    if unchanged:
        lines.append(f"  ({unchanged} unchanged tensor(s) not listed)")
    if report["outputs"]:
        lines.append("")
        lines += output_table(report["outputs"], "acc new", "acc appl")
    for n in report["notes"]:
        lines.append(f"  note: {n}")
    if report["gates"]["failures"]:
        lines.append("")
        lines += [f"  GATE FAILED: {x}" for x in report["gates"]["failures"]]
    return "\n".join(lines)
