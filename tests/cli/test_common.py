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


def test_malformed_option_is_one_line_naming_the_script():
    import typer

    from spread_tools.cli.common import make_app
    demo = make_app("demo2", "Demo.")

    @demo.command(**command_settings(SCHEMA, usage="MODEL -o OUT [key=value ...]",
                                     example="demo2 model.pdb -o out.h5 d_min=3"))
    def run2(words: Words = None, n: int = typer.Option(1, "--n")):
        print("ran")

    for argv, fragment in ((["--n", "abc"], "Invalid value for '--n'"),
                           (["--nope"], "No such option: --nope")):
        bad = runner.invoke(demo, argv)
        assert bad.exit_code == 2
        lines = [ln for ln in bad.output.splitlines() if ln.strip()]
        assert len(lines) == 1, bad.output
        assert lines[0].startswith("demo2: error: command line:") and fragment in lines[0]
        assert lines[0].endswith("(see demo2 --help)")
    help_text = runner.invoke(demo, ["--help"]).output
    assert "Usage: " in help_text and "MODEL -o OUT [key=value ...]" in help_text
    assert "Example:" in help_text and "demo2 model.pdb -o out.h5 d_min=3" in help_text


def test_os_errors_become_one_line(tmp_path):

    from spread_tools.cli.common import make_app
    demo = make_app("demo3", "Demo.")

    @demo.command()
    def run3(words: Words = None):
        with user_errors("demo3"):
            open(tmp_path / "missing" / "x.txt")

    bad = runner.invoke(demo, [])
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1
    assert lines[0] == f"demo3: error: {tmp_path / 'missing' / 'x.txt'}: No such file or directory"


def test_every_script_help_names_inputs_and_example():
    import importlib
    for name, usage_word in (("cache_sf", "MODEL.pdb"), ("simulate_data", "SF_CACHE.h5"),
                             ("import_dials", "EXPT REFL"), ("refine_fdp", "DATASET.h5"),
                             ("plot_curves", "RESULT.h5")):
        app = importlib.import_module(f"spread_tools.cli.{name}").app
        out = runner.invoke(app, ["--help"]).output
        usage = out.split("Usage:", 1)[1].splitlines()[0]
        assert usage_word in usage and "-o" in usage, (name, usage)
        assert "Example:" in out and f"  {name} " in out, name
        assert "-q, --quiet" in out or "--quiet" in out, name
        assert "Output file." not in out, name                 # -o is described per script


def test_resume_command(monkeypatch):
    from spread_tools.cli.common import resume_command
    monkeypatch.setattr("sys.argv", ["/opt/env/bin/refine_fdp", "a b.h5", "--sf-cache", "c.h5"])
    assert resume_command("refine_fdp") == "refine_fdp 'a b.h5' --sf-cache c.h5 --resume"
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert "--resume" in resume_command("refine_fdp")
