"""docs/report.png: the HTML report of the benchmark encoder (benchmarks/_encoder.py, trained and
cached on first use), rendered by headless Chromium.

    python benchmarks/html_screenshot.py [--sample encoder|digits_transformer] [--out docs/report.png] [--keep DIR]
    python benchmarks/html_screenshot.py --from-report DIR/report.json     # re-render a kept report only

Runs `quantkit.quantize` with --method auto (so the report holds histograms), the default speed
guard and an accuracy gate, writes the page, screenshots it at 1200 px wide and crops the blank
tail. Needs matplotlib, Pillow and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 6000) -> None:
    with tempfile.TemporaryDirectory(prefix="quantkit-chromium-") as profile:
        subprocess.run(["/usr/bin/chromium", *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=300)


def crop(png: Path, margin: int = 24) -> tuple[int, int]:
    """Cut the blank rows below the page; a 256-colour palette keeps the file small."""
    from PIL import Image, ImageChops

    img = Image.open(png).convert("RGB")
    box = ImageChops.difference(img, Image.new("RGB", img.size, (255, 255, 255))).getbbox()
    bottom = min(img.height, (box[3] if box else img.height) + margin)
    img.crop((0, 0, img.width, bottom)).quantize(colors=256).save(png, optimize=True)
    return img.width, bottom


def main() -> None:
    import quantkit

    from _encoder import make

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "report.png")
    ap.add_argument("--keep", type=Path, help="keep the report JSON and HTML in this directory")
    ap.add_argument("--sample", choices=["encoder", "digits_transformer"], default="encoder")
    ap.add_argument("--from-report", type=Path, help="render this JSON report instead of running quantkit")
    a = ap.parse_args()
    os.chdir(HERE.parent)  # paths in the page relative to the repository root
    with tempfile.TemporaryDirectory(prefix="quantkit-shot-") as tmp:
        work = a.keep or Path(tmp)
        if a.from_report:
            report = quantkit.run.load_report(a.from_report)
            page = Path(tmp) / "report.html"
            quantkit.run.write_html(report, page)
        else:
            data = Path(os.path.relpath(make() if a.sample == "encoder" else HERE.parent / "sample_models" / a.sample))
            q = quantkit.quantize(data / "model.onnx", calib=data / "calib.npz", eval=data / "eval.npz",
                                  output=work / f"{a.sample}.int8.onnx", report=work / "report.json",
                                  html=work / "report.html", method="auto", max_accuracy_drop=1.0, force=True,
                                  check_gates=False)
            report, page = q.report, q.html
        a.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(page, a.out)
        w, h = crop(a.out)
    first = report["outputs"][0]
    print(f"{a.out}: {w}x{h}; compression {report['model']['compression']:.2f}x, speedup "
          f"{report['latency']['speedup']:.2f}x, accuracy {first.get('accuracy_fp32')} -> "
          f"{first.get('accuracy_quantized')}, gates passed: {report['gates']['passed']}")


if __name__ == "__main__":
    main()
