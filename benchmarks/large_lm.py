"""Decoder language models to int4: quantkit against ONNX Runtime's MatMulNBits quantizer (RTN, and
GPTQ through Intel Neural Compressor) on the same ONNX files.

    python benchmarks/large_lm.py big      [--layers 22 --dim 2048 --ffn 5632 --vocab 32000] [--gptq]
    python benchmarks/large_lm.py trained  [--train-seconds 240]
    (either: [--repeat N] best of N, tools in rounds; [--cache DIR]; [--timeout S] [--rss-limit-gb G]
    stop a tool past S seconds or G GiB resident, default 1200 s and 8 GiB; [--only TEXT] the tools
    whose label contains TEXT)

big: a Llama-architecture decoder (tests/tiny_llama.py: RMSNorm, rotary, grouped-query attention
32/4 heads, SwiGLU, untied embeddings, past key/value inputs) with RANDOM weights, ~1.1B parameters
by default, exported here with torch.onnx's dynamo exporter to ONNX with external data: peak memory,
time and size (accuracy figures on random weights mean little and are printed for completeness).
trained: a byte-level decoder of the same architecture (~0.5M parameters: 2 layers, dim 128) trained here for a few
minutes on Python standard-library docstrings (benchmarks/_real_data.sentences), scored on held-out
text: next-token top-1 agreement with fp32, mean KL divergence, perplexity.

Every tool runs as its own process; its peak RSS is the kernel's wait4 figure (benchmarks/_measure).
Files are kept in benchmarks/.cache/large_lm (override with --cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _measure import python, quantkit_cmd, run_measured  # noqa: E402


def _shape(a):
    from tiny_llama import LlamaShape

    return LlamaShape(vocab=a.vocab, dim=a.dim, layers=a.layers, heads=32, kv_heads=4, ffn=a.ffn, tied=False)


def export_big(a) -> None:
    """(run in its own process) the random decoder, exported with external data, and its data."""
    import torch
    from tiny_llama import build, cache_names, make_data

    s = _shape(a)
    model = build(s, cache=True)
    folder = a.cache / "big"
    folder.mkdir(parents=True, exist_ok=True)
    ids, pos = torch.zeros(2, 4, dtype=torch.long), torch.arange(3, 7)[None].repeat(2, 1)
    kv = [torch.zeros(2, s.kv_heads, 3, s.head_dim) for _ in range(2 * s.layers)]
    b, t, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    shapes = ({0: b, 1: t}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in kv))
    prog = torch.onnx.export(model, (ids, pos, *kv), dynamo=True, optimize=False, dynamic_shapes=shapes,
                             input_names=["input_ids", "position_ids", *cache_names(s, "past")],
                             output_names=["logits", *cache_names(s, "present")])
    (folder / "exported").mkdir(exist_ok=True)
    prog.save(str(folder / "exported" / "model.onnx"), external_data=True)
    del prog
    fold(folder)
    make_data(model, folder / "calib.npz", 8, past=8, seq=16, seed=1)
    make_data(model, folder / "eval.npz", 8, past=8, seq=16, seed=2)
    print(sum(x.numel() for x in model.parameters()))


def fold(folder: Path) -> None:
    """The exporter (optimize=False, which keeps its memory near the model's size) writes Linear layers
    as MatMul(x, Transpose(W)): fold the transposes into the weights, tensor by tensor (quantkit's own
    canonicalize pass and streamed writer), so both quantizers see MatMuls with constant weights."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from quantkit.graph.canonicalize import fold_weight_transposes
    from quantkit.load.external import write_model
    from quantkit.load.onnx import load_onnx

    model = load_onnx(folder / "exported" / "model.onnx", keep_on_disk=True)
    print("folded transposes:", fold_weight_transposes(model))
    RemoveUnusedNodesPass()(model)
    write_model(model, folder / "model.onnx")


def _windows(data: np.ndarray, n: int, seq: int, rng) -> dict[str, np.ndarray]:
    starts = rng.integers(0, len(data) - seq - 1, n)
    win = np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)
    return {"input_ids": win[:, :-1], "position_ids": np.broadcast_to(np.arange(seq), (n, seq)).copy(),
            "targets": win[:, 1:]}


def train_small(a) -> None:
    """A byte-level decoder trained on docstrings for --train-seconds, exported without a cache."""
    import torch
    from _real_data import sentences
    from tiny_llama import LlamaShape, TinyLlama, export

    torch.manual_seed(0)
    text = np.frombuffer("\n".join(sentences()).encode(), np.uint8)
    cut = int(len(text) * 0.9)
    train, held = text[:cut], text[cut:]
    torch.set_num_threads(2)
    model = TinyLlama(LlamaShape(vocab=256, dim=128, layers=2, heads=4, kv_heads=2, ffn=352), cache=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng, t0, step = np.random.default_rng(0), time.time(), 0
    while time.time() - t0 < a.train_seconds:
        batch = {k: torch.from_numpy(v) for k, v in _windows(train, 16, 64, rng).items()}
        logits = model(batch["input_ids"], batch["position_ids"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch["targets"].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    model.eval()
    folder = a.cache / "trained"
    folder.mkdir(parents=True, exist_ok=True)
    export(model, folder / "model.onnx")
    np.savez(folder / "calib.npz", **_windows(train, 128, 64, np.random.default_rng(1)))
    np.savez(folder / "eval.npz", **_windows(held, 128, 64, np.random.default_rng(2)))
    print(json.dumps({"steps": step, "last_train_loss": float(loss.detach()), "text_bytes": len(text),
                      "parameters": sum(p.numel() for p in model.parameters())}))


def lm_figures(fp32: Path, quantized: Path, data: Path) -> dict:
    """Top-1 agreement, KL and perplexity of `quantized` against `fp32` (one session at a time)."""
    import onnxruntime as ort

    from quantkit.report.lm import Tracker

    d = dict(np.load(data))
    batches = [{k: v[i:i + 4] for k, v in d.items()} for i in range(0, len(d["input_ids"]), 4)]

    def outputs(path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in s.get_inputs()}
        return [s.run(["logits"], {k: v for k, v in b.items() if k in names})[0] for b in batches]

    ref = outputs(fp32)
    tracker = Tracker(["logits"])
    for b, r, q in zip(batches, ref, outputs(quantized)):
        tracker.update([r], [q], b)
    return tracker.result()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def tools(folder: Path, out: Path, gptq: bool, big: bool) -> list[tuple[str, list[str]]]:
    """(label, command) of every run: quantkit's default command and ONNX Runtime's quantizer on the
    same file; with gptq, the GPTQ rows (and on the trained model AWQ and --keep-int8 auto)."""
    m, calib, ev = folder / "model.onnx", folder / "calib.npz", folder / "eval.npz"
    common = ["--eval", ev, "--no-speed-guard", "--force", "-q"]
    rows = [("quantkit int4 RTN", quantkit_cmd("quantize", m, "--weights", "int4", "-o", out / "qk_rtn.onnx",
                                               "--report", out / "qk_rtn.json", *common)),
            ("onnxruntime MatMulNBits RTN", [python(), str(ROOT / "benchmarks/ort_nbits.py"), str(m),
                                             str(out / "ort_rtn.onnx"), "--algo", "rtn"])]
    if not gptq:
        return rows
    rows.append(("quantkit int4 GPTQ", quantkit_cmd("quantize", m, "--weights", "int4", "--algorithm", "gptq",
                                                    "--calib", calib, "-o", out / "qk_gptq.onnx",
                                                    "--report", out / "qk_gptq.json", *common)))
    if not big:
        rows += [("quantkit int4 AWQ", quantkit_cmd("quantize", m, "--weights", "int4", "--algorithm", "awq",
                                                    "--calib", calib, "-o", out / "qk_awq.onnx",
                                                    "--report", out / "qk_awq.json", *common)),
                 ("quantkit int4 RTN, --keep-int8 auto", quantkit_cmd(
                     "quantize", m, "--weights", "int4", "--keep-int8", "auto", "--calib", calib,
                     "-o", out / "qk_keep.onnx", "--report", out / "qk_keep.json", *common))]
    rows.append(("onnxruntime MatMulNBits GPTQ", [python(), str(ROOT / "benchmarks/ort_nbits.py"), str(m),
                                                  str(out / "ort_gptq.onnx"), "--algo", "gptq", "--calib",
                                                  str(calib)]))
    return rows


def _target(cmd: list) -> Path:
    return Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else Path(cmd[3])


def _stages(cmd: list) -> str:
    """quantkit's own account of where the time went (the report's stage_seconds)."""
    if "--report" not in cmd:
        return ""
    rep = json.loads(Path(cmd[cmd.index("--report") + 1]).read_text())
    lat = rep.get("latency") or {}
    return (f"stages {rep.get('stage_seconds')}; latency {lat.get('fp32_ms', 0):.0f} -> "
            f"{lat.get('quantized_ms', 0):.0f} ms ({lat.get('timed', 'timed runs')}, {lat.get('runs')})")


def compare(folder: Path, gptq: bool, big: bool, repeat: int, timeout: float | None, rss_gb: float | None,
            only: str | None = None) -> None:
    """Every tool `repeat` times, in rounds (A, B, A, B...) so that the load of the shared machine hits
    each alike; the table gives the best time, every time, and the largest peak."""
    out = folder / "out"
    out.mkdir(exist_ok=True)
    model = folder / "model.onnx"
    size = _size(model)
    print(f"model {model}: {size / 2**20:.0f} MiB\n")
    runs: dict[str, list] = {}
    commands = [(label, cmd) for label, cmd in tools(folder, out, gptq, big) if only is None or only in label]
    for i in range(repeat):
        for label, cmd in commands:
            load = os.getloadavg()[0]
            r = run_measured([str(c) for c in cmd], timeout=timeout, rss_limit_gb=rss_gb)
            print(f"round {i + 1} {label}: {r.seconds:.1f} s, peak {r.peak_rss_mb:.0f} MB, exit {r.returncode} "
                  f"{r.stopped} (load {load:.1f} -> {os.getloadavg()[0]:.1f}) "
                  f"{_stages(cmd) if r.returncode == 0 else r.stderr.strip().splitlines()[-1:]}", flush=True)
            runs.setdefault(label, []).append(r)
    print("\n| tool | best s | all s | peak RSS MB | peak / model | size MB | top-1 agreement | KL mean | "
          "perplexity (fp32) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, cmd in commands:
        _row(label, cmd, runs[label], model, size, folder)


def _row(label: str, cmd: list, rs: list, model: Path, size: int, folder: Path) -> None:
    done = [r for r in rs if r.returncode == 0]
    if not done:
        r = rs[-1]
        print(f"| {label} | {r.stopped or f'failed (exit {r.returncode})'} at {r.seconds:.0f} s, peak "
              f"{r.peak_rss_mb:.0f} MB |")
        return
    target = _target(cmd)
    lm = lm_figures(model, target, folder / "eval.npz")
    ppl = (f"{lm['perplexity_quantized']:.3f} ({lm['perplexity_fp32']:.3f})" if "perplexity_fp32" in lm else "-")
    peak = max(r.peak_rss_mb for r in done)
    print(f"| {label} | {min(r.seconds for r in done):.1f} | {', '.join(f'{r.seconds:.1f}' for r in rs)} | "
          f"{peak:.0f} | {peak * 2**20 / size:.2f}x | {_size(target) / 2**20:.0f} | {lm['top1_agreement']:.4f} | "
          f"{lm['kl_mean']:.5f} | {ppl} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["big", "trained", "_export-big", "_train", "_fold"])
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks/.cache/large_lm")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--train-seconds", type=float, default=240)
    ap.add_argument("--no-gptq", action="store_true", help="trained: skip the GPTQ/AWQ rows")
    ap.add_argument("--gptq", action="store_true", help="big: also quantkit's and ONNX Runtime's GPTQ")
    ap.add_argument("--repeat", type=int, default=1, help="run every tool this many times (best-of-N)")
    ap.add_argument("--timeout", type=float, default=1200, help="stop a tool after this many seconds")
    ap.add_argument("--rss-limit-gb", type=float, default=8, help="stop a tool past this resident memory")
    ap.add_argument("--only", help="run only the tools whose label contains this")
    a = ap.parse_args()
    if a.which == "_export-big":
        return export_big(a)
    if a.which == "_train":
        return train_small(a)
    if a.which == "_fold":
        return fold(a.cache / "big")
    folder = a.cache / a.which
    if not (folder / "model.onnx").exists():
        step = "_export-big" if a.which == "big" else "_train"
        flags = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("cache", "layers", "dim", "ffn", "vocab",
                                                                       "train_seconds")]
        r = run_measured([python(), __file__, step, *flags])
        print(f"{step}: {r.seconds:.0f} s, peak {r.peak_rss_mb:.0f} MB: {r.stdout.strip()} {r.stderr[-400:]}")
    big = a.which == "big"
    compare(folder, gptq=a.gptq if big else not a.no_gptq, big=big, repeat=a.repeat, timeout=a.timeout,
            rss_gb=a.rss_limit_gb, only=a.only)


if __name__ == "__main__":
    main()
