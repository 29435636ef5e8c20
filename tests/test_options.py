"""cli/options.py: the shared value types, the plan flags, the sweep flags made from the spec schema,
and no command module reaching into another for them."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from loraplan.cli import COMMANDS, build_parser, main
from loraplan.cli.options import (
    dropout,
    examples_count,
    int_list,
    positive_float,
    positive_int,
    share,
    size,
    size_text,
)
from loraplan.sweeps.spec import DataSettings, SweepSpec, TrainingSettings

GiB = 1 << 30


@pytest.mark.parametrize("kind, text, value", [
    (positive_int, "8", 8), (positive_float, "2e-4", 2e-4), (int_list, "4,8, 16", [4, 8, 16]),
    (dropout, "0", 0.0), (dropout, "0.05", 0.05), (share, "1", 1.0), (share, "0.9", 0.9),
    (size, "24GiB", 24 * GiB), (size, "80GB", 80 * GiB), (size, "40960MiB", 40 * GiB),
    (examples_count, "5k", 5000), (examples_count, "50,000", 50_000), (examples_count, "1.2M", 1_200_000),
])
def test_value_types(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize("kind, text, words", [
    (positive_int, "0", "positive integer"), (positive_int, "8.5", "positive integer"),
    (positive_float, "-1", "positive number"), (positive_float, "lots", "positive number"),
    (int_list, "8,x", "positive integer"), (dropout, "1", "[0, 1)"), (dropout, "x", "[0, 1)"),
    (share, "90", "not a percentage"), (share, "0", "(0, 1]"), (size, "lots", "24GiB"),
    (examples_count, "2.5", "whole number"), (examples_count, "many", "such as 5000"),
])
def test_bad_values_raise_argparse_errors(kind, text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=None) as e:
        kind(text)
    assert words in str(e.value)


@pytest.mark.parametrize("n", [24 * GiB, 40960 << 20, 1536 << 20, 12345])
def test_size_text_reads_back(n):
    assert size(size_text(n)) == n


def test_every_command_builds_its_parser():
    for command in COMMANDS:
        sub = build_parser(command)._subparsers._group_actions[0].choices[command]
        assert sub.get_default("_run") is not None and "--help" in sub.format_help()


def test_sweep_flags_come_from_the_spec_schema():
    parser = build_parser("sweep")
    sweep = parser._subparsers._group_actions[0].choices["sweep"]
    help_of = {flag: action.help for action in sweep._actions for flag in action.option_strings}
    steps = TrainingSettings.model_fields["max_steps"]
    assert help_of["--max-steps"] == f"{steps.description} (default {steps.default})"
    assert help_of["--lr"].startswith(TrainingSettings.model_fields["learning_rate"].description)
    assert help_of["--trust-remote-code"] == SweepSpec.model_fields["trust_remote_code"].description
    formats = next(a for a in sweep._actions if "--format" in a.option_strings).choices
    assert formats == list(DataSettings.model_fields["format"].annotation.__args__)
    args = parser.parse_args(["sweep", "m", "--out", "x", "--max-steps", "7", "--grad-ckpt"])
    from loraplan.cli.sweep import overrides_from_args

    assert overrides_from_args(args) == {"training.max_steps": 7, "training.grad_ckpt": True}


@pytest.mark.parametrize("argv, words", [
    (["sweep", "m", "--out", "x", "--max-steps", "0"], ["--max-steps", "positive integer"]),
    (["sweep", "m", "--out", "x", "--format", "csv"], ["--format", "invalid choice"]),
    (["memory", "builtin:llama-3.2-1b", "--seq-len", "-5"], ["--seq-len", "positive integer"]),
    (["memory", "builtin:llama-3.2-1b", "--gpu-memory", "lots"], ["--gpu-memory", "cannot read the GPU memory size"]),
    (["recommend", "--task", "code", "--examples", "5", "--seq-len", "x"], ["--seq-len", "positive integer"]),
    (["count", "builtin:llama-3.2-1b", "--lora-dropout", "1.5"], ["--lora-dropout", "[0, 1)"]),
    (["probe", "m", "--data", "d", "--batches", "0"], ["--batches", "positive integer"]),
    (["compress", "a", "--energy", "90", "--out", "x"], ["--energy", "not a percentage"]),
])
def test_bad_flags_are_one_line_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


def test_commands_take_shared_flags_from_options_only():
    """No command module imports another command module (they used to import cli/count.py for its flags)."""
    cli = Path(__file__).resolve().parents[1] / "src" / "loraplan" / "cli"
    commands = {module for module, _ in COMMANDS.values()}
    for file in cli.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module not in commands, f"{file.name} imports the command module .{node.module}"
