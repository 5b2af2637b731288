"""The report's charts as static inline SVG, drawn with matplotlib's object API (no pyplot, no
global state): nothing to load at view time, no script.

Every function takes plain report data and returns an `<svg>` element as text.
"""

from __future__ import annotations

import io
import math

BLUE, ORANGE, GREY, RED, GREEN = "#3465a4", "#f57900", "#888a85", "#cc0000", "#4e9a06"


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=96, layout=layout)  # type: ignore[arg-type]


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    # text stays text (selectable, small); a fixed hash salt and no date make the output reproducible
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "quantkit", "font.size": 9}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def label(text: str, width: int = 40) -> str:
    """A tick label: mathtext off ($ escaped), long names shortened in the middle."""
    text = str(text) or "(unnamed)"
    if len(text) > width:
        text = text[: width // 2 - 1] + "..." + text[-(width // 2 - 2):]
    return text.replace("$", r"\$")


def ranked_bars(rows: list[dict], value: str, xlabel: str, limit: int = 30) -> str:
    """Horizontal bars, one per node, in the order given (worst first at the top)."""
    rows = [r for r in rows if r.get(value) is not None][:limit]
    fig = _figure(7.5, 0.9 + 0.24 * max(len(rows), 1))
    ax = fig.add_subplot()
    names = [label(f"{r['node']}  ({r.get('scheme') or r.get('op_type')})", 56) for r in rows]
    vals = [r[value] for r in rows]
    ax.barh(range(len(rows)), vals, color=BLUE, height=0.7)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.1f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    return _svg(fig)


def histogram(h: dict) -> str:
    """One activation histogram (log counts), the chosen range marked, the clipped tails shaded."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(3.6, 2.3, layout=None)  # fixed margins: a layout engine triples the drawing time here
    fig.subplots_adjust(left=0.15, right=0.97, top=0.88, bottom=0.25)
    ax = fig.add_subplot()
    edges, counts = h["edges"], h["counts"]
    ax.set_yscale("log")
    ax.stairs([max(c, 0.5) for c in counts], edges, baseline=0.5, fill=True, color=BLUE)
    lo, hi = h["range"]
    for x in (lo, hi):
        ax.axvline(x, color=RED, linewidth=1.2)
    x0, x1 = edges[0], edges[-1]
    if lo > x0:
        ax.axvspan(x0, lo, color=RED, alpha=0.12, linewidth=0)
    if hi < x1:
        ax.axvspan(hi, x1, color=RED, alpha=0.12, linewidth=0)
    ax.set_xlim(min(x0, lo), max(x1, hi))
    ax.set_title(label(h["tensor"], 34), fontsize=9)
    ax.set_xlabel(f"{h.get('method') or ''}: [{lo:.3g}, {hi:.3g}], {100 * h['clipped_share']:.2g}% clipped",
                  fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    return _svg(fig)


def speed_trials(trials: list[dict]) -> str:
    """Per guard trial: fp32, the placement with the group, and without it (ms per batch)."""
    trials = [t for t in trials if t.get("with_ms") is not None]
    fig = _figure(7.5, 1.2 + 0.5 * max(len(trials), 1))
    ax = fig.add_subplot()
    series = (("fp32", "fp32_ms", GREY), ("quantized with the group", "with_ms", BLUE),
              ("without it", "without_ms", ORANGE))
    for k, (name, key, color) in enumerate(series):
        ys = [i + (k - 1) * 0.27 for i in range(len(trials))]
        xs = [t.get(key) if t.get(key) is not None else math.nan for t in trials]
        ax.barh(ys, xs, height=0.26, color=color, label=name)
    ax.set_yticks(range(len(trials)), [label(t["group"], 44) for t in trials])
    ax.invert_yaxis()
    ax.set_xlabel("ms per batch (median, interleaved)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return _svg(fig)


def size_speed(report: dict) -> str:
    """The written model against fp32: size in bytes and time per batch, side by side."""
    m, lat = report["model"], report.get("latency") or {}
    fig = _figure(7.5, 1.7)
    a, b = fig.subplots(1, 2)
    unit, div = ("MiB", 1 << 20) if m["bytes_before"] >= 10 << 20 else ("KiB", 1 << 10)
    a.barh([0, 1], [m["bytes_before"] / div, m["bytes_after"] / div], color=[GREY, GREEN])
    a.set_yticks([0, 1], ["fp32", "quantized"])
    a.invert_yaxis()
    a.set_xlabel(f"size ({unit})")
    if lat.get("fp32_ms") is not None:
        b.barh([0, 1], [lat["fp32_ms"], lat["quantized_ms"]], color=[GREY, GREEN])
        b.set_yticks([0, 1], ["fp32", "quantized"])
        b.invert_yaxis()
        b.set_xlabel(f"ms per batch of {lat.get('batch_size')}")
    else:
        b.set_axis_off()
    return _svg(fig)


def loss_curve(curve: list[dict], best_step: int | None = None) -> str:
    """--finetune: running training loss and held-out loss per step (log scale), the kept step marked."""
    fig = _figure(7.5, 2.6)
    ax = fig.add_subplot()
    train = [(p["step"], p["train_loss"]) for p in curve if p.get("train_loss") is not None]
    held = [(p["step"], p["heldout_loss"]) for p in curve if p.get("heldout_loss") is not None]
    if train:
        ax.plot(*zip(*train), color=BLUE, label="training loss (running mean)")
    if held:
        ax.plot(*zip(*held), color=ORANGE, marker="o", markersize=3, label="held-out loss")
    if best_step is not None:
        ax.axvline(best_step, color=GREEN, linewidth=1, linestyle="--", label=f"kept: step {best_step}")
    if any(v > 0 for _, v in train + held):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _svg(fig)
