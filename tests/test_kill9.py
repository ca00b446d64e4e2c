"""kill -9 survived: `dsd-fast train` in a subprocess (cpu-tiny, batch 2, a network snapshot and last.pt after every
step, a kept state copy every 2 steps with --keep 1) is SIGKILLed again and again -- in the middle of checkpoint and
snapshot writes, between a write and its rename, in the middle of a metrics.jsonl line, and from outside at a random
time -- and resumed each time. After every kill no half-written file is under a final name; at the end the resumed
run's losses and files equal an uninterrupted run's.

The kill points are drawn from Python's `random` (seeded by the root conftest): tests/kill9_child.py kills itself
at a byte count / rename / line of its writes, so where those kills land does not depend on the machine's speed.
The outside kills do land wherever the timing puts them, which is the point: every moment must be safe."""

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
from runs import smooth_images

from dsd_fast.rundir import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "kill9_child.py")
TIMEOUT = 300  # seconds per child process, against a hang only: ~4 s each is typical on 2 idle cores
# Phase I 3 steps, Phase II 4 steps: last.pt + a snapshot every step, a state copy every 2.
FLAGS = ["--preset", "cpu-tiny", "--batch", "2", "--lr", "1e-3", "--g-lr", "1e-4", "--lr-rampup-kimg", "0",
         "--log-every", "1", "--grid-images", "2", "--sample-steps", "2", "--snapshot-kimg", "0.002",
         "--state-kimg", "0.004", "--keep", "1", "--pretrain-kimg", "0.006", "--distill-kimg", "0.008"]


def _env():
    # One thread: the reference and the resumed runs round alike, and the two cores stay free for the parent.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}


def _start(run, spec, args, log):
    spec = json.dumps({"run": str(run), **spec})
    return subprocess.Popen([sys.executable, CHILD, spec, "train", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=log, text=True)


def _wait_for_line(proc, text, timeout):
    """Read the child's stdout until a line containing text (True), or EOF / timeout (False)."""
    end = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < end:
            if sel.select(timeout=end - time.monotonic()):
                line = proc.stdout.readline()
                if not line:
                    return False
                if text in line:
                    return True
    return False


def _finish(proc, log, expect):
    """Wait for the child; its exit must be one of expect (0: finished, -SIGKILL: killed)."""
    try:
        proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    log.flush()
    with open(log.name) as f:
        tail = f.read()[-4000:]
    assert proc.returncode in expect, f"exit {proc.returncode}, expected one of {expect}:\n{tail}"
    return proc.returncode


def _run(run, spec, args, log, outside_kill=None):
    """One child to its end. outside_kill: seconds after the child starts training to SIGKILL it from here."""
    proc = _start(run, spec, args, log)
    if outside_kill is not None and _wait_for_line(proc, "disk:", TIMEOUT):
        time.sleep(outside_kill)
        proc.send_signal(signal.SIGKILL)  # a no-op if it has exited meanwhile
    return _finish(proc, log, (0, -signal.SIGKILL) if spec["kind"] != "none" or outside_kill else (0,))


def check_files(run, keep):
    """What a crash may leave: *.tmp files (resume deletes them), a torn last metrics line (resume drops it);
    every file under a final name is complete."""
    names = os.listdir(run)
    for name in names:
        path = os.path.join(run, name)
        if name.endswith(".tmp"):
            continue
        if name.endswith((".pt", ".ckpt")):
            state = load_checkpoint(path)  # a half-written zip does not load
            assert state["phase"] in ("pretrain", "distill"), name
        elif name.endswith(".png"):
            with PIL.Image.open(path) as im:
                im.load()
        elif name == "options.json":
            json.load(open(path))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = f.read().split("\n")
    for line in lines[:-1]:
        json.loads(line)
    assert sum(name.endswith("kimg-state.pt") for name in names) <= keep + 1  # + the one being pruned after


def _losses(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _kills():
    """The kill of each child in turn, in a seeded random order. An outside kill may come before the first
    last.pt, which leaves nothing to resume: the first child is killed inside a write instead."""
    kinds = ["bytes"] * 3 + ["replace", "metrics", "outside", "outside"]
    random.shuffle(kinds)
    kinds.insert(0, kinds.pop(kinds.index("bytes")))
    out = []
    for kind in kinds:
        if kind == "bytes":
            out.append(dict(kind="bytes", at=1 + random.getrandbits(23)))  # within ~1 step of writes
        elif kind == "replace":
            out.append(dict(kind="replace", at=1 + random.getrandbits(2), before=bool(random.getrandbits(1))))
        elif kind == "metrics":
            out.append(dict(kind="metrics", at=1 + random.getrandbits(1)))
        else:
            out.append(dict(kind="none", outside=random.getrandbits(10) / 1000 * 1.5))  # 0 to 1.5 s in
    return out


def test_kill9_during_training_and_checkpoint_writes_then_resume(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=smooth_images(5).permute(0, 2, 3, 1).numpy())
    args = [*FLAGS, "--dataset", str(data), "--seed", str(random.getrandbits(24))]
    log = open(tmp_path / "stderr.log", "w")

    ref = tmp_path / "ref"
    _run(ref, dict(kind="none"), [*args, "--outdir", str(ref)], log)

    run = tmp_path / "run"
    kills, first = _kills(), True
    for spec in kills:
        cli = [*args, "--outdir", str(run)] if first else ["--resume", str(run)]
        outside = spec.pop("outside", None)
        code = _run(run, spec, cli, log, outside_kill=outside)
        first = False
        check_files(run, keep=1)
        if code == 0:
            break  # the run finished before this kill point: nothing left to interrupt
    assert _run(run, dict(kind="none"), ["--resume", str(run)], log) == 0

    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    got, want = _losses(run), _losses(ref)
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in want]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "fake_loss", "lr"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a, b)
    checkpoints = lambda d: sorted(n for n in os.listdir(d) if n.endswith((".pt", ".png")))
    assert checkpoints(run) == checkpoints(ref)  # the same snapshots, grids and (pruned) state copy
    final, final_ref = load_checkpoint(run / "last.pt"), load_checkpoint(ref / "last.pt")
    assert (final["phase"], final["step"]) == (final_ref["phase"], final_ref["step"]) == ("distill", 4)
