"""The HTML report in a real browser: headless Chromium loads the page with every host unresolvable
(so anything fetched would fail and be logged), logs no console message, renders every chart as SVG
in the DOM, and a screenshot shows them. Skipped where /usr/bin/chromium is absent (.ci/run
installs Debian's chromium package)."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

import quantkit

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed "
                                "(apt-get install chromium; .ci/run does)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]


def chromium(page: Path, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="quantkit-chromium-") as profile:
        return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                              capture_output=True, text=True, timeout=180, check=False)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def page(tmp_path_factory, request):
    pytest.importorskip("matplotlib")
    d = request.config.rootpath / "sample_models" / "digits_transformer"
    out = tmp_path_factory.mktemp("browser")
    q = quantkit.quantize(d / "model.onnx", calib=d / "calib.npz", eval=d / "eval.npz", output=out / "q.onnx",
                          html=out / "report.html", method="auto", check_gates=False)
    return out / "report.html", q.report


def test_the_console_check_catches_errors(tmp_path):
    """The check below can fail: a script error and a blocked fetch are both logged."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="https://example.com/x.png"><script>nothere();</script></body></html>')
    r = chromium(bad, "--dump-dom")
    assert any("nothere is not defined" in m for m in console_messages(r.stderr)), r.stderr[-2000:]


def test_page_loads_without_console_messages_and_renders_every_chart(page):
    path, report = page
    r = chromium(path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_messages(r.stderr) == []
    dom = r.stdout
    # what the speed guard keeps depends on this machine's timings, so the count follows the report:
    # size/speed; the per-layer section's one chart (sensitivity when measured, else the weight error
    # when any node stayed quantized: a guard that dropped every group leaves only the sensitivity);
    # one per histogram; the guard's trials
    measured = any(s.get("own_sqnr_db") is not None for s in report["sensitivity"] or [])
    charts = 1 + (measured or bool(report["weight_error"])) + len(report["histograms"]) + 1
    assert report["histograms"] and report["speed_guard"]["trials"]
    assert len(re.findall(r"<svg[\s>]", dom)) == charts
    # real drawing inside every chart (axes, bars, lines are paths); how many follows the charts drawn
    assert dom.count("<path") > 5 * charts and "ms per batch (median, interleaved)" in dom


def test_screenshot_shows_the_charts(page, tmp_path):
    image = pytest.importorskip("PIL.Image")
    path, _ = page
    shot = tmp_path / "shot.png"
    r = chromium(path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert shot.is_file(), r.stderr[-2000:]
    img = image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 100  # not blank: text, bars, antialiasing
    counts = {c: n for n, c in colors}
    # the charts' own colours are on screen: bars (#3465a4), fp32 (#888a85) and quantized (#4e9a06) sizes
    for rgb in ((0x34, 0x65, 0xA4), (0x88, 0x8A, 0x85), (0x4E, 0x9A, 0x06)):
        assert counts.get(rgb, 0) > 500, rgb
