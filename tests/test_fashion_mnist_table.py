"""examples/fashion_mnist_table.py (the issue-18 Table-2 run): its three stages are valid `dsd-fast` command lines
at full and smoke size (click parses each, runs nothing); the results folder is only written at the end."""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import click
import pytest

from dsd_fast.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist_table.py"
_spec = importlib.util.spec_from_file_location("fashion_mnist_table", SCRIPT)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


@pytest.mark.parametrize("flags", [[], ["--smoke"], ["--fake-steps", "4", "--fake-lr", "1e-3", "--num", "2000",
                                                             "--g-lr-schedule", "cosine",
                                                             "--g-ema-rampup-ratio", "0.3"]])
def test_stages_are_valid_commands(tmp_path, flags):
    args = table.parse(["--out", str(tmp_path / "out"), *flags])
    stages = table.commands(args, tmp_path / "run")
    assert [phase for phase, _ in stages] == ["pretrain", "distill", "eval"]
    for _, argv in stages:
        command = main.commands[argv[0]]
        with command.make_context(argv[0], argv[1:]) as ctx:  # raises click.UsageError on a bad flag or value
            assert isinstance(ctx, click.Context)
    distill_argv = stages[1][1]
    ratio = distill_argv[distill_argv.index("--g-ema-rampup-ratio") + 1]
    assert float(ratio) == (0.3 if "0.3" in flags else 0.05)
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


def test_resumed_argv(tmp_path):
    argv = ["pretrain", "--kimg", "70", "--outdir", str(tmp_path / "teacher"), "--device", "cpu"]
    assert table.resumed(argv) == argv  # nothing there yet: a new run
    (tmp_path / "teacher").mkdir()
    with pytest.raises(SystemExit, match="without a checkpoint last.pt"):
        table.resumed(argv)
    (tmp_path / "teacher" / "last.pt").write_bytes(b"")
    assert table.resumed(argv) == ["pretrain", "--kimg", "70", "--resume", str(tmp_path / "teacher"), "--device",
                                   "cpu"]


# Stands in for dsd-fast: logs its argv, writes what each stage leaves, fails the eval while FAIL_EVAL exists.
FAKE = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
with open(LOG, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[0] == "eval":
    if Path(FAIL_EVAL).exists():
        sys.exit(3)
    Path(argv[1], "eval.md").write_text("| Method | FID |\\n")
    Path(argv[1], "eval.json").write_text("{}")
    sys.exit(0)
d = Path(argv[argv.index("--outdir" if "--outdir" in argv else "--resume") + 1])
d.mkdir(exist_ok=True)
for name in ("last.pt", "options.json", "data.png", "x-teacher.png", "x-student.png"):
    (d / name).write_text("")
"""


def test_stopped_table_resumes(tmp_path):
    log, fail = tmp_path / "log.jsonl", tmp_path / "fail-eval"
    fake = tmp_path / "fake_dsd.py"
    fake.write_text(f"LOG = {str(log)!r}\nFAIL_EVAL = {str(fail)!r}\n" + FAKE)
    fail.write_text("")
    flags = ["--out", str(tmp_path / "out"), "--run", str(tmp_path / "run"), "--smoke", "--dsd-fast",
             shlex.join([sys.executable, str(fake)])]
    with pytest.raises(table.subprocess.CalledProcessError):
        table.main(flags)
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(SystemExit, match="continue it with --resume"):
        table.main(flags)
    fail.unlink()
    table.main([*flags, "--resume"])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["pretrain", "distill", "eval", "pretrain", "distill", "eval"]
    assert all("--outdir" in c for c in calls[:2]) and all("--resume" in c for c in calls[3:5])
    out = tmp_path / "out"
    wall = json.loads((out / "wall.json").read_text())
    assert wall["invocations"] == 2 and set(wall["seconds"]) == {"pretrain", "distill", "eval", "total"}
    assert "--resume" not in (out / "command.txt").read_text()
    assert (out / "eval.md").is_file() and (out / "teacher-grid.png").is_file()
