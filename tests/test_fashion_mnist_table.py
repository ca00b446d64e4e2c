"""examples/fashion_mnist_table.py (the issue-18 Table-2 run): its three stages are valid `dsd-fast` command lines
at full and smoke size (click parses each, runs nothing); the results folder is only written at the end."""

import importlib.util
from pathlib import Path

import click
import pytest

from dsd_fast.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist_table.py"
_spec = importlib.util.spec_from_file_location("fashion_mnist_table", SCRIPT)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


@pytest.mark.parametrize("flags", [[], ["--smoke"], ["--fake-steps", "4", "--fake-lr", "1e-3", "--num", "2000",
                                                             "--g-lr-schedule", "cosine"]])
def test_stages_are_valid_commands(tmp_path, flags):
    args = table.parse(["--out", str(tmp_path / "out"), *flags])
    stages = table.commands(args, tmp_path / "run")
    assert [phase for phase, _ in stages] == ["pretrain", "distill", "eval"]
    for _, argv in stages:
        command = main.commands[argv[0]]
        with command.make_context(argv[0], argv[1:]) as ctx:  # raises click.UsageError on a bad flag or value
            assert isinstance(ctx, click.Context)
    eval_argv = stages[2][1]
    assert eval_argv[eval_argv.index("--num") + 1] == str(args.num)
    if "--smoke" in flags:
        assert args.num == 8 and args.distill_kimg == 0.064
    else:
        assert args.num >= 1000  # the floor of generated images per row


def test_existing_run_is_refused(tmp_path):
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds a run"):
        table.main(["--out", str(tmp_path / "out"), "--run", str(tmp_path / "run"), "--smoke"])
    assert not (tmp_path / "out").exists()
