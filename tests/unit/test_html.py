"""The HTML report: compact histograms keep mass and mark the chosen range, per-node weight error
matches an independent computation, the page is built from the JSON alone with every section,
escapes report text, fetches nothing; `quantkit report` renders, replays and fails cleanly."""

import json
import re
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import quantkit
from quantkit.calibrate.observers import HistogramObserver, MinMaxObserver
from quantkit.cli import cli
from quantkit.config import QuantConfig
from quantkit.report.histograms import compact, histograms
from quantkit.report.weight_error import weight_errors

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def report(tmp_path_factory, request):
    d = request.config.rootpath / "sample_models" / "digits_transformer"
    out = tmp_path_factory.mktemp("html")
    q = quantkit.quantize(d / "model.onnx", calib=d / "calib.npz", eval=d / "eval.npz", output=out / "q.onnx",
                          report=out / "r.json", method="auto", no_speed_guard=True)
    return q.report, out


def test_compact_histogram_keeps_every_count_and_the_span():
    rng = np.random.default_rng(0)
    obs = HistogramObserver()
    for _ in range(4):
        obs.update(rng.normal(0, 1, 5000).astype(np.float32))
    counts, edges = compact(obs.counts, obs.edges, 64)
    assert counts.sum() == obs.counts.sum() == 20000
    assert len(counts) == 64 and len(edges) == 65 and np.all(np.diff(edges) > 0)
    assert edges[0] <= obs.lo and edges[-1] >= obs.hi
    assert edges[-1] - edges[0] < 1.01 * (obs.hi - obs.lo) + 2 * obs.width  # the occupied span, not the grid


def test_histograms_rank_by_clipping_and_measure_the_clipped_share():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 100_000).astype(np.float32)
    a, b, m = HistogramObserver(), HistogramObserver(), MinMaxObserver()
    for o in (a, b, m):
        o.update(x)
    acts = {"tight": {"range": [-1.0, 1.0], "method": "mse"}, "wide": {"range": [float(x.min()), float(x.max())],
                                                                    "method": "minmax"},
            "nohist": {"range": [-1.0, 1.0], "method": "minmax"}}
    rows = histograms({"tight": a, "wide": b, "nohist": m}, acts)
    assert [r["tensor"] for r in rows] == ["tight", "wide"]  # minmax observers keep no histogram
    expected = float(np.mean((x < -1) | (x > 1)))  # ~0.317 for a standard normal
    assert rows[0]["clipped_share"] == pytest.approx(expected, abs=0.01)
    assert rows[1]["clipped_share"] == 0.0 and rows[1]["clipped_span"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["clipped_span"] == pytest.approx(1 - 2 / (x.max() - x.min()), rel=1e-6)
    assert sum(rows[0]["counts"]) == a.counts.sum()  # (a strided sample, weighted: ~100,000)
    assert len(histograms({"tight": a}, {"tight": acts["tight"]}, limit=0)) == 0


def _matmul_model(w: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 32] y) { y = MatMul(x, w) }""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return ir.serde.deserialize_model(proto)


def test_weight_error_matches_an_independent_int8_and_int4_rounding():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.2, (64, 32)).astype(np.float32)
    model = _matmul_model(w)
    (int8,) = weight_errors(model, QuantConfig(), set())
    scale = np.abs(w).max(axis=0) / 127  # per output column, symmetric
    deq = np.clip(np.rint(w / scale), -127, 127) * scale
    want = 10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum((w - deq).astype(np.float64) ** 2))
    assert int8["weight_sqnr_db"] == pytest.approx(want, abs=0.01)
    assert int8["scheme"] == "int8 per-channel" and int8["node"] == "" and int8["weights"] == w.size
    (int4,) = weight_errors(model, QuantConfig(weights="int4", activations="none"), set())
    assert "int4 blocks of 32" in int4["scheme"]
    # 4 bits fewer is ~24 dB less; blocks of 32 claw a few dB back
    assert 12 < int8["weight_sqnr_db"] - int4["weight_sqnr_db"] < 26
    assert weight_errors(model, QuantConfig(), {""}) == []  # nodes left float are not listed


def _svgs(page: str) -> int:
    return len(re.findall(r"<svg[\s>]", page))


def test_page_has_every_section_from_the_json_alone(report):
    from quantkit.report.html import render_html

    rep, _ = report
    page = render_html(json.loads(json.dumps(rep)))
    for title in ("Summary", "Outputs: quantized against fp32", "Per-layer sensitivity", "Placement",
                  "Activation ranges", "Speed guard", "Notes"):
        assert f"<h2>{title}</h2>" in page
    assert "own SQNR dB of each op" in page  # static int8 runs measure per-op sensitivity
    assert "<h3>Placement search</h3>" in page and page.count("meets") + page.count("misses") >= 1
    without = render_html({**json.loads(json.dumps(rep)), "sensitivity": []})
    assert "was not measured in this run" in without and "weight SQNR dB" in without
    assert len(rep["histograms"]) == 12
    assert _svgs(page) == 1 + 1 + 12  # size/speed, weight error, histograms (no speed guard in this run)
    for node in rep["nodes"]["quantized"]:
        assert f"<td>{node['node']}</td>" in page
    assert f"{rep['outputs'][0]['cosine_mean']:.5f}" in page
    # nothing fetched at view time: no script, stylesheet link, image or remote URL
    assert not re.search(r"<script|<link|<img|<iframe|src=|url\((?!#)", page)  # url(#clip) is in-page
    assert not re.search(r"(href|src)=\"https?:", page)


def test_report_text_is_escaped(report):
    from quantkit.report.html import render_html

    rep = json.loads(json.dumps(report[0]))
    rep["notes"].append("<script>alert(1)</script>")
    rep["nodes"]["float"].append({"node": "<b>x</b>", "op_type": "MatMul", "reason": "a & b"})
    rep["histograms"][0]["tensor"] = "</svg><script>bad()</script>"
    page = render_html(rep)
    assert "<script" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page


def test_measured_sensitivity_is_charted_instead(report):
    from quantkit.report.html import render_html

    rep = json.loads(json.dumps(report[0]))
    rep["sensitivity"] = [{"node": "node_MatMul_7", "op_type": "MatMul", "kind": "matmul", "own_sqnr_db": 21.5},
                          {"node": "node_MatMul_9", "op_type": "MatMul", "kind": "matmul", "own_sqnr_db": 30.25}]
    page = render_html(rep)
    assert "was not measured" not in page and "own SQNR dB of each op" in page
    assert ">21.5<" in page and ">30.2<" in page  # bar annotations


def test_minmax_runs_say_why_there_are_no_histograms(report):
    from quantkit.report.html import render_html

    rep = json.loads(json.dumps(report[0]))
    rep["histograms"] = []
    assert "minmax keeps only min and max" in render_html(rep)


def test_report_command_renders_html_and_replays_the_config(report, tmp_path):
    rep, out = report
    r = CliRunner().invoke(cli, ["report", str(out / "r.json"), "--html", str(tmp_path / "p.html"),
                                 "--config-out", str(tmp_path / "run.toml")])
    assert r.exit_code == 0, r.output
    assert _svgs((tmp_path / "p.html").read_text()) == 14
    assert tomllib.loads((tmp_path / "run.toml").read_text()) == rep["effective_config"]
    again = CliRunner().invoke(cli, ["report", str(out / "r.json"), "--html", str(tmp_path / "p.html")])
    assert again.exit_code == 2 and "--force" in again.output
    text = CliRunner().invoke(cli, ["report", str(out / "r.json")])
    assert text.exit_code == 0 and "SQNR dB" in text.output


def test_report_command_input_errors(tmp_path):
    assert CliRunner().invoke(cli, ["report", str(tmp_path / "none.json")]).exit_code == 3
    (tmp_path / "x.json").write_text('{"a": 1}')
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "x.json")])
    assert r.exit_code == 3 and "not a quantkit report" in r.output


def test_missing_matplotlib_is_a_usage_error(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    r = CliRunner().invoke(cli, ["report", str(report[1] / "r.json"), "--html", str(tmp_path / "p.html")])
    assert r.exit_code == 2 and "pip install 'quantkit[html]'" in r.output
    assert not (tmp_path / "p.html").exists()


def test_placement_shows_each_nodes_scheme_also_for_renamed_weight_only_nodes(report):
    from quantkit.report.html import render_html

    rep = json.loads(json.dumps(report[0]))
    first = next(n for n in rep["nodes"]["quantized"] if n["kind"] == "MatMul")
    scheme = next(w["scheme"] for w in rep["weight_error"] if w["node"] == first["node"])
    first["node"] += "_int4"  # what the weight-only rewrite calls its MatMulNBits node
    page = render_html(rep)
    assert re.search(rf"<td>{first['node']}</td><td>MatMul</td><td>MatMul</td><td>{scheme}</td>", page)
    assert "<td>uint8 x uint8</td>" in page  # activation x activation MatMuls
