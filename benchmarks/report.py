"""Run every benchmark and write BENCHMARKS.md from their output, so each figure in it comes from
a script anyone can rerun.

    python benchmarks/report.py [--only calib_memory,calib_methods,compare_int8,compare_int4]

Sections whose script is not rerun (--only) keep their previous text.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "BENCHMARKS.md"

SECTIONS = [
    ("compare_int8", "int8: quantkit vs ONNX Runtime on three models (issue 4)",
     ["--threads", "1"],
     "Static and dynamic int8 from both tools on the same models and calibration data, scored by the same "
     "code. Cosine is the encoder's mean-pooled output and the CNNs' logits; speedup is fp32 time / int8 "
     "time at batch 8 (sequence 128) on one thread; quantize s and peak RSS are the whole quantizer "
     "process (quantkit's includes its own evaluation, latency measurement and speed guard)."),
    ("compare_int4", "int4 weight-only: quantkit vs ONNX Runtime's MatMulNBits quantizer (issue 5)",
     ["--threads", "1"],
     "The BERT-style encoder, symmetric blocks of 32. Size ratio counts the whole file: quantkit also "
     "stores the embedding tables in int4 (GatherBlockQuantized), ONNX Runtime's quantizer leaves them "
     "float by default."),
    ("calib_methods", "Calibration methods: quantkit vs ONNX Runtime's calibrators (issue 3)",
     [],
     "Same 256 calibration samples, batch 8. ONNX Runtime runs under a 16 GB address-space limit."),
    ("calib_memory", "Calibration memory as the calibration set grows 10x (issue 2)",
     ["--samples", "32", "--factor", "10"],
     "A conv net with large activations (3x64x64 input, 32-128 channels), random images, batch 8."),
]


def machine() -> str:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import os

    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def kept_sections(old: str) -> list[str]:
    """Sections this script does not run (e.g. "Real pretrained models", written from
    benchmarks/real_models.py's output) are carried over verbatim."""
    ours = {title for _, title, _, _ in SECTIONS}
    heads = list(re.finditer(r"^## (.*)$", old, re.MULTILINE))
    ends = [h.start() for h in heads[1:]] + [len(old)]
    return [old[h.start():e].rstrip() + "\n" for h, e in zip(heads, ends) if h.group(1) not in ours]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(s[0] for s in SECTIONS))
    args = ap.parse_args()
    only = set(args.only.split(","))
    old = OUT.read_text() if OUT.exists() else ""
    parts = ["# Benchmarks\n",
             "Every figure here is printed by a script in `benchmarks/`, run by `python benchmarks/report.py`, "
             "which runs quantkit and the peer tool on the same model and data in the same run. Each section "
             "names the command that produced it (from the repository root, in the venv of the README's "
             "second command). Models other than the bundled samples are built and trained by the scripts "
             "themselves (`benchmarks/_encoder.py`, `benchmarks/_mobilenet.py`) and cached in "
             f"`benchmarks/.cache/`.\n\nMachine: {machine()}.\n"]
    for name, title, extra, text in SECTIONS:
        cmd = f"python benchmarks/{name}.py {' '.join(extra)}".strip()
        if name in only:
            print(f"running {cmd}", file=sys.stderr)
            res = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra], capture_output=True, text=True,
                                 cwd=ROOT)
            body = res.stdout.strip() if res.returncode == 0 else f"(failed: {res.stderr.strip()[-500:]})"
        else:
            found = re.search(rf"## {re.escape(title)}\n.*?`{re.escape(cmd)}`\n\n.*?\n\n(.*?)(?=\n## |\Z)", old, re.S)
            body = found.group(1).strip() if found else "(not run yet)"
        parts.append(f"## {title}\n\n`{cmd}`\n\n{text}\n\n{body}\n")
    parts += kept_sections(old)
    OUT.write_text("\n".join(parts))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
