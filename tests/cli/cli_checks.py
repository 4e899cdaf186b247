"""Assertions shared by the command-line tests."""


def assert_one_line_error(result, script, fragment):
    """A typer CliRunner result is exit status 2 with one line ``<script>: error: ...fragment...``."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"{script}: error:") and fragment in lines[0], lines[0]
