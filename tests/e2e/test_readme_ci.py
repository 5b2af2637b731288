"""The README's CI section works as written: its quantkit.toml (pointed at the sample CNN) and the
quantize command of both CI jobs run, pass their gates and leave every file the jobs keep."""

import re
import shlex

import pytest
from click.testing import CliRunner

from quantkit import options
from quantkit.cli import cli

yaml = pytest.importorskip("yaml")
pytest.importorskip("matplotlib")


def _blocks(lang: str, readme: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", readme, flags=re.DOTALL)


def _jobs(readme: str) -> list[tuple[str, list[str]]]:
    """(the quantize command, the artifact paths) of each CI job in the README."""
    out = []
    for text in _blocks("yaml", readme):
        doc = yaml.safe_load(text)
        if "jobs" in doc:  # GitHub Actions
            steps = doc["jobs"]["quantize"]["steps"]
            cmd = next(s["run"] for s in steps if "quantkit quantize" in s.get("run", ""))
            paths = next(s["with"]["path"] for s in steps if "upload-artifact" in s.get("uses", "")).split()
        else:  # GitLab CI
            job = doc["quantize"]
            cmd = next(c for c in job["script"] if "quantkit quantize" in c)
            paths = job["artifacts"]["paths"]
            assert job["artifacts"]["when"] == "always"
        out.append((cmd, paths))
    return out


def test_both_ci_jobs_run_as_written(samples, tmp_path, monkeypatch, request):
    readme = (request.config.rootpath / "README.md").read_text()
    (toml,) = _blocks("toml", readme)
    cnn = samples / "digits_cnn"
    toml = (toml.replace('"model.onnx"', f'"{cnn / "model.onnx"}"')
                .replace('"data/calib.npz"', f'"{cnn / "calib.npz"}"')
                .replace('"data/eval.npz"', f'"{cnn / "eval.npz"}"'))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quantkit.toml").write_text(toml)
    assert options.read_toml(tmp_path / "quantkit.toml")["html"].name == "report.html"
    jobs = _jobs(readme)
    assert len(jobs) == 2
    for cmd, paths in jobs:
        args = shlex.split(cmd)
        assert args[:2] == ["quantkit", "quantize"]
        r = CliRunner().invoke(cli, [*args[1:], "--force", "-q"])
        assert r.exit_code == 0, r.output
        for p in paths:
            assert (tmp_path / p).is_file(), p
            (tmp_path / p).unlink()
