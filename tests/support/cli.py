"""Running the real CLI in-process and checking its one-line errors."""

from __future__ import annotations

from loraplan.cli import main


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `loraplan ARGV`, without what the test printed before."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, argv, *words):
    """`loraplan ARGV` fails with exit code 2 and one `error:` line holding every word; returns it."""
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
