"""--config FILE: one option table shared by the CLI, the TOML file and the Python API; flags override
the file; unknown keys and wrong types are usage errors naming the key; the effective configuration
a report records replays to the same RunConfig."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit import options
from quantkit.cli import CLI_KEYS, CLI_ONLY, cli
from quantkit.errors import ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def test_every_cli_option_is_in_the_table_with_the_same_default(monkeypatch):
    """The drift check: a flag added to the CLI without the table (or with another default) fails here."""
    raw = {}

    def grab(ctx, model, o):
        raw.update(o)
        raise ConfigError("captured")

    monkeypatch.setattr("quantkit.cli._given_options", grab)
    assert CliRunner().invoke(cli, ["quantize", "m.onnx"]).exit_code == 2
    assert {CLI_KEYS.get(n, n) for n in raw if n not in CLI_ONLY} | {"model"} == set(options.OPTIONS)
    for name, value in raw.items():
        if name not in CLI_ONLY:
            opt = options.OPTIONS[CLI_KEYS.get(name, name)]
            assert (() if opt.kind == "list" and not value else value) == opt.default, name


def _capture(monkeypatch):
    """Replace the pipeline: record the options the CLI built, stop with a usage error."""
    seen = {}

    def fake_run(opts, status=None, progress=None):
        seen.update(opts)
        raise ConfigError("captured")

    monkeypatch.setattr("quantkit.run.run", fake_run)
    return seen


def test_flags_given_on_the_command_line_override_the_file_and_defaults_do_not(tmp_path, monkeypatch):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "m.onnx"\ncalib = "c.npz"\nmethod = "percentile"\ncalib-samples = 64\n'
                   'weights = "int4"\nexclude = ["Gemm", "head*"]\nsmoothquant = 0.5\n')
    seen = _capture(monkeypatch)
    r = CliRunner().invoke(cli, ["quantize", "--config", str(cfg), "--method", "entropy", "--weights", "int8"])
    assert r.exit_code == 2 and "captured" in r.output
    assert seen["method"] == "entropy"  # flag beats file
    assert seen["weights"] == "int8"  # an explicit flag equal to the default still beats the file
    assert seen["calib_samples"] == 64 and seen["model"] == Path("m.onnx") and seen["calib"] == Path("c.npz")
    assert seen["exclude"] == ("Gemm", "head*") and seen["smoothquant"] == 0.5
    assert "percentile" not in seen and "block_size" not in seen  # untouched defaults are not "given"


def test_model_argument_beats_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "from_file.onnx"\n')
    seen = _capture(monkeypatch)
    CliRunner().invoke(cli, ["quantize", "arg.onnx", "--config", str(cfg)])
    assert seen["model"] == Path("arg.onnx")


@pytest.mark.parametrize("text, message", [
    ('calib_sample = 5\n', "unknown key in"),
    ('block_size = "32"\n', "'block_size' must be an integer"),
    ('per_tensor = 1\n', "'per_tensor' must be true or false"),
    ('exclude = [1, 2]\n', "'exclude' must be a string or a list of strings"),
    ('[gates]\nmin_cosine = 0.9\n', "unknown table [gates]"),
    ('calib = \n', "not valid TOML"),
])
def test_bad_config_files_are_usage_errors_naming_the_key(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = CliRunner().invoke(cli, ["quantize", "m.onnx", "--config", str(cfg)])
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.count("\n") == 1


def test_unknown_key_suggests_the_close_one(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('calib_sample = 5\n')
    with pytest.raises(ConfigError, match="'calib_sample'.*did you mean 'calib_samples'"):
        options.read_toml(cfg)


def test_missing_config_file_and_missing_model(tmp_path):
    r = CliRunner().invoke(cli, ["quantize", "m.onnx", "--config", str(tmp_path / "none.toml")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(cli, ["quantize", "--calib", "c.npz"])
    assert r.exit_code == 2 and "no model given" in r.output


def test_a_quantize_table_is_accepted(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[quantize]\nmodel = "m.onnx"\nthreads = 2\n')
    assert options.read_toml(cfg) == {"model": Path("m.onnx"), "threads": 2}


def test_effective_config_round_trips_through_toml(tmp_path):
    given = options.normalize({
        "model": "m.pt2", "calib": "c.npz", "eval": "e.npz", "output": "q.onnx", "report": "r.json",
        "html": "r.html", "weights": "int4", "block_size": 64, "asymmetric": True, "algorithm": "gptq",
        "keep_int8": "auto,head*", "exclude": ["Conv"], "calib_samples": 100, "batch_size": 4,
        "max_accuracy_drop": 0.5, "min_cosine": 0.99, "require_speedup": 1.1, "threads": 2,
        "no_speed_guard": True, "input": ["x:Bx1x8x8:float32"], "output_names": "logits", "force": True,
        "accuracy_level": 0, "format": "qdq", "preprocess": "scale=1/255",
    })
    cfg = options.run_config(given)
    saved = options.effective_config(cfg)
    path = tmp_path / "replay.toml"
    path.write_text(options.to_toml(saved))
    again = options.run_config(options.read_toml(path))
    assert again == cfg
    assert options.effective_config(again) == saved
    assert saved["weights"] == "int4" and saved["keep_int8"] == ["auto", "head*"] and "per_tensor" not in saved


def test_effective_config_of_defaults_is_minimal():
    cfg = options.run_config({"model": Path("m.onnx"), "calib": Path("c.npz")})
    assert options.effective_config(cfg) == {"model": "m.onnx", "calib": "c.npz", "output": "m.int8.onnx",
                                             "activations": "uint8"}


def test_toml_strings_are_escaped(tmp_path):
    text = options.to_toml({"exclude": ['a"b', "c\\d"], "model": "x\ny"})
    assert tomllib.loads(text) == {"exclude": ['a"b', "c\\d"], "model": "x\ny"}


@pytest.mark.parametrize(("given", "activations", "weights", "expected", "written"), [
    (None, None, "int8", "auto", None),  # static: on by default, searched; the default is not written out
    ("off", None, "int8", None, "off"),
    (0.5, "int8", "int8", 0.5, 0.5),
    (None, "dynamic", "int8", None, None),  # no calibration activations to smooth
    (None, None, "int4", None, None),
])
def test_smoothquant_is_on_by_default_for_static_int8_and_off_turns_it_off(given, activations, weights, expected,
                                                                          written):
    o = options.normalize({"model": "m.onnx", "calib": "c.npz", "smoothquant": given, "activations": activations,
                           "weights": weights})
    cfg = options.run_config(o)
    assert cfg.quant.smoothquant == expected
    assert options.effective_config(cfg).get("smoothquant") == written


def test_prune_fixed_from_a_file_round_trips_and_needs_prune(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "m.onnx"\ncalib = "c.npz"\nprune = 0.3\nprune_fixed = true\nmin_cosine = 0.9987\n')
    cfg = options.run_config(options.read_toml(path))
    assert cfg.prune.fixed and cfg.prune.ratio == 0.3
    saved = options.effective_config(cfg)
    assert saved["prune_fixed"] is True
    replay = tmp_path / "replay.toml"
    replay.write_text(options.to_toml(saved))
    assert options.run_config(options.read_toml(replay)) == cfg
    path.write_text('model = "m.onnx"\ncalib = "c.npz"\nprune_fixed = true\n')
    r = CliRunner().invoke(cli, ["quantize", "--config", str(path)])
    assert r.exit_code == 2 and "--prune-fixed keeps the --prune ratio as given" in r.output
    assert r.output.count("\n") == 1
