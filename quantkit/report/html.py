"""The report as one self-contained HTML page: tables and static inline SVG charts (matplotlib),
built from the JSON report alone, so `quantkit report report.json --html out.html` can render a
report written earlier. No script, no fonts or styles fetched: the page needs no network.
"""

from __future__ import annotations

import re
from html import escape

from quantkit.errors import ConfigError

ACT_X_ACT = "MatMul (activation x activation)"  # the group name quantize/plan.py gives these
FOLD = 20  # placement tables longer than this start folded

STYLE = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;max-width:1120px;
margin:24px auto;padding:0 20px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#666;margin:0 0 14px}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
.pass{color:#2e7d32}.fail{color:#c62828}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{color:#555;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:6px}.grid svg{width:345px;height:auto}
svg{max-width:100%;height:auto}summary{cursor:pointer;color:#3465a4}.note{color:#555}code{font-size:12px}
"""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--html needs matplotlib: pip install 'quantkit[html]' (or matplotlib>=3.7)") from None


def _num(x, spec: str = ".4g", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: list[str], rows: list[list], numeric: frozenset[int] | set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=n>{escape(str(c))}</td>" if i in numeric
                                    else f"<td>{escape(str(c))}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _card(value: str, caption: str, cls: str = "") -> str:
    return f'<div class="card"><b class="{cls}">{escape(value)}</b><span>{escape(caption)}</span></div>'


def _summary(r: dict) -> str:
    from quantkit.report import charts

    m, lat, g = r["model"], r.get("latency") or {}, r.get("gates") or {}
    first = (r.get("outputs") or [{}])[0]
    cards = [_card(f"{_num(m.get('compression'), '.2f')}x",
                   f"smaller: {_size(m['bytes_before'])} -> {_size(m['bytes_after'])}")]
    if lat.get("speedup") is not None:
        verdict = "faster" if lat["speedup"] >= 1 else "SLOWER"
        cards.append(_card(f"{lat['speedup']:.2f}x", f"{verdict}: {lat['fp32_ms']:.3f} -> {lat['quantized_ms']:.3f} ms "
                           f"per batch of {lat.get('batch_size')}", "" if lat["speedup"] >= 1 else "fail"))
    if first.get("accuracy_drop_points") is not None:
        cards.append(_card(f"{first['accuracy_drop_points']:+.2f} pts",
                           f"accuracy drop: {first['accuracy_fp32']:.2f}% -> "
                           f"{first['accuracy_quantized']:.2f}%"))
    if first.get("cosine_mean") is not None:
        cards.append(_card(f"{first['cosine_mean']:.4f}", f"mean cosine of '{first['name']}' to fp32"))
    if g:
        cards.append(_card("passed" if g.get("passed") else "FAILED", "gates", "pass" if g.get("passed") else "fail"))
    gates = [f"{k} = {g[k]}" for k in ("max_accuracy_drop", "min_cosine", "require_speedup") if g.get(k) is not None]
    lines = [f"gates set: {', '.join(gates) or 'none'}"] + [f"gate failed: {f}" for f in g.get("failures", [])]
    ev, cal = r.get("evaluation") or {}, r.get("calibration")
    lines.append(f"evaluated on {ev.get('samples')} sample(s) from {ev.get('source')}"
                 + (" (the calibration data: figures are optimistic)" if ev.get("on_calibration_data") else ""))
    if cal:
        lines.append(f"calibrated on {cal['samples']} sample(s) of {cal['source']} with {cal['method']} "
                     f"in {cal['seconds']:.2f} s")
    items = "".join(f"<li>{escape(x)}</li>" for x in lines)
    return (f'<h2>Summary</h2><div class="cards">{"".join(cards)}</div><ul class="note">{items}</ul>'
            + charts.size_speed(r))


def _outputs(r: dict) -> str:
    rows = []
    for o in r.get("outputs", []):
        if "exact_match" in o:
            rows.append([o["name"], "exact match", _num(o["exact_match"]), "", "", "", "", ""])
            continue
        rows.append([o["name"], _num(o.get("cosine_mean"), ".5f"), _num(o.get("cosine_min"), ".5f"),
                     _num(o.get("sqnr_db"), ".1f", "inf"), _num(o.get("max_abs_error"), ".3g"),
                     _num(o.get("top1_agreement"), ".4f"), _num(o.get("accuracy_fp32"), ".2f"),
                     _num(o.get("accuracy_quantized"), ".2f")])
    header = ["output", "cosine mean", "cosine min", "SQNR dB", "max abs error", "top-1 agreement",
              "accuracy fp32 %", "accuracy quantized %"]
    return "<h2>Outputs: quantized against fp32</h2>" + _table(header, rows, set(range(1, 8)))


def _sensitivity(r: dict) -> str:
    from quantkit.report import charts

    sens = [s for s in r.get("sensitivity") or [] if s.get("own_sqnr_db") is not None]
    if sens:
        moved = (r.get("placement") or {}).get("moved") or {}
        note = ('<p class="note">The noise each quantized op adds itself (its input and weight rounding, measured '
                "against the float op on the very inputs it received), as SQNR: lower hurts more. "
                f"{len(moved)} op(s) were moved out of static int8 to meet the target "
                f"({escape(str((r.get('placement') or {}).get('target', '')))}).</p>")
        return ("<h2>Per-layer sensitivity</h2>" + note
                + charts.ranked_bars(sens, "own_sqnr_db", "own SQNR dB of each op (lower hurts more)"))
    out = [('<h2>Per-layer sensitivity</h2><p class="note">Per-node sensitivity (the noise each op adds) was not '
           "measured in this run (it is measured for static int8).</p>")]
    rows = r.get("weight_error") or []
    if rows:
        out.append('<p class="note">Instead: the <b>weight</b> quantization error of each quantized node, the SQNR '
                   "of its weight after rounding under its scheme (worst first). It shows which weights lost the "
                   "most precision, not how much each node moves the model's output.</p>")
        out.append(charts.ranked_bars(rows, "weight_sqnr_db", "weight SQNR dB (lower = more weight error)"))
    return "".join(out)


def _scheme_of(schemes: dict[str, str], node: str) -> str:
    """weight_error names the float nodes; weight-only rewrites rename them <name>_int4 / _int8."""
    return schemes.get(node) or schemes.get(re.sub(r"_int[48]$", "", node)) or "-"


def _fold(table: str, rows: int, what: str) -> str:
    """A long table starts folded: a <details> element, which opens without any script."""
    return f"<details><summary>the {rows} {what}</summary>{table}</details>" if rows > FOLD else table


def _placement(r: dict) -> str:
    n = r.get("nodes") or {}
    scheme = {w["node"]: w["scheme"] for w in r.get("weight_error") or []}
    act = (r.get("config") or {}).get("activations", "")
    both = f"{act} x {act}" if act else "-"
    q = [[x["node"] or "(unnamed)", x["op_type"], x["kind"],
          both if x["kind"] == ACT_X_ACT else _scheme_of(scheme, x["node"]),
          "-" if x["kind"] == ACT_X_ACT else "per-channel" if x.get("per_channel") else "per-tensor"]
         for x in n.get("quantized", [])]
    f = [[x["node"] or "(unnamed)", x["op_type"], x["reason"]] for x in n.get("float", [])]
    out = [f"<h2>Placement</h2><p>{len(q)} node(s) quantized, {len(f)} weighted node(s) kept float.</p>",
           _fold(_table(["node", "op type", "group", "scheme", "weight scales"], q), len(q), "quantized nodes")]
    if f:
        out.append("<h3>Kept float</h3>" + _fold(_table(["node", "op type", "why"], f), len(f), "nodes kept float"))
    t = [[x["tensor"], x["reason"]] for x in r.get("float_tensors", [])]
    if t:
        out.append("<h3>Tensors kept float</h3>" + _table(["tensor", "why"], t))
    out.append(_placement_trials(r.get("placement") or {}))
    return "".join(out)


def _placement_trials(p: dict) -> str:
    """The candidates the accuracy budget scored: how many ops left static int8, and what it cost."""
    trials = p.get("trials") or []
    if not trials:
        return ""
    rows = []
    for t in trials:
        moved = t.get("moved") or {}
        floats = sum(v == "float" for v in moved.values())
        worst = min(t.get("figures") or [{}], key=lambda f: f.get("cosine", 1.0))
        rows.append([len(moved) - floats, floats, _num(worst.get("cosine"), ".5f"), _num(worst.get("sqnr_db"), ".1f"),
                     "meets" if t.get("meets_target") else (t.get("shortfall") or "misses")])
    intro = (f'<p class="note">Target: {escape(str(p.get("target", "")))} (searched for '
             f'{escape(str(p.get("searched_for", "")))} on {p.get("probe_samples", "?")} calibration samples). '
             "Each row is one candidate placement the search scored, in order.</p>")
    return ("<h3>Placement search</h3>" + intro
            + _table(["ops to dynamic int8", "ops to float", "worst cosine", "worst SQNR dB", "target"], rows,
                     {0, 1, 2, 3}))


def _histograms(r: dict) -> str:
    from quantkit.report import charts

    hs = r.get("histograms") or []
    head = "<h2>Activation ranges</h2>"
    if not hs:
        why = ("this run had no calibrated activations" if not r.get("calibration") else
               "the calibration method kept no histograms (minmax keeps only min and max; percentile, entropy, "
               "mse and auto keep histograms)")
        return head + f'<p class="note">No histograms: {escape(why)}.</p>'
    intro = (f'<p class="note">The {len(hs)} quantized tensors whose chosen range cuts off the largest part of the '
             "observed range; red lines mark the chosen range, shaded tails are clipped (log counts).</p>")
    return head + intro + '<div class="grid">' + "".join(charts.histogram(h) for h in hs) + "</div>"


def _speed(r: dict) -> str:
    from quantkit.report import charts

    g = r.get("speed_guard")
    if not g:
        return '<h2>Speed guard</h2><p class="note">Not run (--no-speed-guard, or nothing to time).</p>'
    trials = g.get("trials") or []
    rows = [[t["group"], _num(t.get("fp32_ms"), ".3f"), _num(t.get("with_ms"), ".3f"), _num(t.get("without_ms"), ".3f"),
             t.get("decision", "")] for t in trials]
    dropped = ", ".join(g.get("dropped") or []) or "none"
    out = [f"<h2>Speed guard</h2><p>Groups left float because the model ran faster without them: {escape(dropped)}."
           + (" int8 cannot win on this model: no placement clearly beat fp32." if g.get("int8_cannot_win") else "")
           + "</p>"]
    if trials:
        out.append(charts.speed_trials(trials))
        out.append(_table(["group", "fp32 ms", "with ms", "without ms", "decision"], rows, {1, 2, 3}))
    return "".join(out)


def _finetune(r: dict) -> str:
    """--finetune: accuracy before and after training, and the loss curve."""
    from quantkit.report import charts

    ft = r.get("finetune")
    if not ft:
        return ""
    after = {o["name"]: o for o in r.get("outputs", [])}
    rows = []
    for b in ft.get("before", []):
        a = after.get(b["name"], {})
        for key, label, spec in (("cosine_mean", "cosine mean", ".5f"), ("sqnr_db", "SQNR dB", ".2f"),
                                 ("top1_agreement", "top-1 agreement", ".4f"),
                                 ("accuracy_quantized", "accuracy %", ".2f")):
            if b.get(key) is not None or a.get(key) is not None:
                rows.append([b["name"], label, _num(b.get(key), spec), _num(a.get(key), spec)])
    stop = (f"interrupted at step {ft['steps_done']} of {ft['steps']}" if ft.get("interrupted")
            else f"{ft['steps_done']} step(s)")
    exact = ft.get("torch_vs_onnxruntime") or {}
    lines = [f"{stop} in {ft['seconds']:.1f} s on {ft['train_batches']} batch(es) of {ft['batch_size']} from "
             f"{ft['data']}; kept step {ft['best_step']} (lowest held-out loss, {ft['heldout_batches']} batch(es))",
             f"held-out distillation loss {_num(ft['heldout_loss_before'])} -> {_num(ft['heldout_loss_after'])}",
             f"written model against the trained torch graph: SQNR {_num(exact.get('sqnr_db'), '.1f', 'inf')} dB"]
    rd = ft.get("rounding")
    if rd:
        lines.insert(1, f"learned rounding first ({rd['iterations']} iterations per layer): {rd['layers_improved']} of "
                        f"{rd['layers']} int4 layer(s) improved, mean layer error {_num(rd['layer_error_before'])} -> "
                        f"{_num(rd['layer_error_after'])}, held-out loss {_num(rd['heldout_loss_before'])} -> "
                        f"{_num(rd['heldout_loss_after'])}")
    tr = ft.get("trimming") or {}
    if tr.get("applied"):
        lines.insert(1, f"padding trimmed: training batches of similar length, cut after their last real token "
                        f"({tr['mean_length']:.1f} positions on average instead of {tr['length']})")
    elif tr.get("length"):
        lines.insert(1, f"padding not trimmed: {tr['reason']}")
    items = "".join(f"<li>{escape(x)}</li>" for x in lines)
    return ("<h2>Fine-tuning</h2>" + f'<ul class="note">{items}</ul>'
            + _table(["output", "figure", "before fine-tuning", "after"], rows, {2, 3})
            + charts.loss_curve(ft.get("curve", []), ft.get("best_step")))


def render_html(report: dict) -> str:
    """The whole page. Every string from the report goes through html.escape (or matplotlib's own
    XML escaping inside the SVG)."""
    require_matplotlib()
    m = report["model"]
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in report.get("notes", []))
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>quantkit report: {escape(str(m['input']))}</title><style>{STYLE}</style></head><body>",
        (f"<h1>quantkit report</h1><p class=sub>{escape(str(m['input']))} &rarr; {escape(str(m['output']))} "
        f"&middot; quantkit {escape(str(report.get('quantkit_version')))}, onnxruntime "
        f"{escape(str(report.get('onnxruntime_version')))}</p>"),
        _summary(report), _outputs(report), _finetune(report), _sensitivity(report), _placement(report),
        _histograms(report),
        _speed(report), f"<h2>Notes</h2><ul>{notes or '<li>none</li>'}</ul>",
        "</body></html>\n",
    ]
    return "".join(parts)
