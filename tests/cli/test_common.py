"""The shared script skeleton: --help lists parameters with units, --show-config, one-line errors."""

from typer.testing import CliRunner

from spread_tools.cli.common import (
    ConfigFile,
    Output,
    Overwrite,
    ShowConfig,
    Words,
    command_settings,
    make_app,
    parse_words,
    require_files,
    user_errors,
)
from spread_tools.config import P
from spread_tools.errors import InputError

SCHEMA = {"d_min": P(2.5, "high-resolution limit", units="Å"),
          "restraints": {"fp": {"mean": P(0.0, "mean", units="e-", optional=True)}}}

app = make_app("demo", "A demo script.")


@app.command(**command_settings(SCHEMA))
def run(words: Words = None, output: Output = None, config: ConfigFile = None,
        show_config: ShowConfig = False, overwrite: Overwrite = False):
    with user_errors("demo"):
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        require_files(files, ["model"], "demo")
        if cfg.d_min <= 0:
            raise InputError(f"parameter d_min: must be positive, got {cfg.d_min}")
        print(f"ok {files[0].name} {cfg.d_min} {cfg.restraints.fp.mean}")


runner = CliRunner()


def test_help_lists_parameters_with_units():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "d_min=2.5" in result.output and "Å" in result.output


def test_show_config_prints_toml():
    result = runner.invoke(app, ["--show-config", "fp.mean=None"])
    assert result.exit_code == 0
    assert 'mean = "None"' in result.output and "d_min = 2.5" in result.output


def test_runs_and_reports_user_errors_in_one_line(tmp_path):
    model = tmp_path / "m.pdb"
    model.write_text("x")
    ok = runner.invoke(app, [str(model), "d_min=3"])
    assert ok.exit_code == 0 and "ok m.pdb 3.0 0.0" in ok.output
    for args, fragment in ([[str(tmp_path / "nope.pdb")], "nope.pdb: no such file"],
                           [[str(model), "d_min=-1"], "parameter d_min: must be positive"],
                           [[str(model), "dmin=1"], "unknown parameter dmin"],
                           [[], "expects 1 input file"]):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2
        lines = [ln for ln in bad.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("demo: error:") and fragment in lines[0]
