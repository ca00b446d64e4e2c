"""Checkpoint files: small network snapshots every --snapshot-kimg and the full state only in last.pt (plus
--state-kimg copies pruned to --keep), the printed disk estimate, snapshots accepted by generate / fid / eval /
--teacher, a full disk failing clearly with last.pt intact and no *.tmp left, a torn metrics.jsonl line, and safe
loading: a file that needs unpickling is refused and its code never runs."""

import builtins
import errno
import json
import os
import pickle
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from runs import smooth_images

import dsd_fast.evaluation.features as features_module
from dsd_fast import rundir
from dsd_fast.cli import main
from dsd_fast.evaluation import save_reference
from dsd_fast.generation import load_sampler
from dsd_fast.networks import resolve_config
from dsd_fast.rundir import RunDir, atomic_write_bytes, load_checkpoint
from dsd_fast.training import Options, train
from dsd_fast.training.loop import disk_use

CONFIG = resolve_config("cpu-tiny")
BATCH = 2
# Phase I and Phase II 2 steps each; a snapshot after every step, a state copy every 2 steps, the newest kept.
RUN = dict(preset="cpu-tiny", batch=BATCH, lr=1e-3, g_lr=1e-4, lr_rampup_kimg=0, log_every=1, grid_images=0,
           sample_steps=2, snapshot_kimg=0.002, state_kimg=0.004, keep=1, pretrain_kimg=0.004, distill_kimg=0.004)
PLAIN = (torch.Tensor, str, int, float, bool, type(None))


def _options(**kw):
    return Options(**{**RUN, "seed": random.getrandbits(24), **kw})


def _kimg(step):
    return f"{step * BATCH / 1000:010.3f}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckptdata") / "data.npz"
    np.savez(path, x=smooth_images(8).numpy())
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ckpt") / "run"
    assert train(_options(dataset=data), phases=("pretrain", "distill"), outdir=path, progress=False) == "done"
    return path


def _plain(x, where="state"):
    """Assert x is built of tensors and plain containers only (what torch.load(weights_only=True) reads)."""
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, (str, int)), (where, k)
            _plain(v, f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _plain(v, f"{where}[{i}]")
    else:
        assert isinstance(x, PLAIN), (where, type(x))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_snapshots_state_copies_and_last(run):
    """Every step a network snapshot (the EMA and what samples it, nothing to train with); the full state in
    last.pt; of the state copies (Phase I step 2, Phase II step 2) only the newest is kept; every file holds
    tensors and plain containers only."""
    pt = sorted(n for n in os.listdir(run) if n.endswith(".pt"))
    assert pt == sorted([*(f"pretrain-{_kimg(s)}kimg.pt" for s in (1, 2)),
                         *(f"distill-{_kimg(s)}kimg.pt" for s in (1, 2)), f"distill-{_kimg(2)}kimg-state.pt",
                         "last.pt"])
    last = load_checkpoint(run / "last.pt")
    assert (last["contents"], last["phase"], last["step"]) == ("state", "distill", 2)
    assert _same(load_checkpoint(run / f"distill-{_kimg(2)}kimg-state.pt")["G"], last["G"])
    for phase, key, steps in (("pretrain", "ema", 2), ("distill", "G_ema", 2)):
        for step in range(1, steps + 1):
            snap = load_checkpoint(run / f"{phase}-{_kimg(step)}kimg.pt")
            assert set(snap) == {"contents", "phase", "step", "kimg", "options", "net_config", key}
            assert (snap["contents"], snap["phase"], snap["step"]) == ("network", phase, step)
            assert snap["kimg"] == step * BATCH / 1000 and snap["options"]["corruption"] == "noise"
    # The last snapshot of each phase is the network last.pt carries on (the teacher, the student EMA).
    assert _same(load_checkpoint(run / f"pretrain-{_kimg(2)}kimg.pt")["ema"], last["teacher"])
    assert _same(load_checkpoint(run / f"distill-{_kimg(2)}kimg.pt")["G_ema"], last["G_ema"])
    # Phase II's state is 4 networks + 2 Adam states (~8 networks); a snapshot is 1.
    assert os.path.getsize(run / "last.pt") > 7 * os.path.getsize(run / f"distill-{_kimg(2)}kimg.pt")
    for name in pt:
        _plain(load_checkpoint(run / name), name)


def test_disk_estimate(run, tmp_path, capsys):
    """The estimate disk_use() makes from parameter counts and dtypes is within 2 % of the files written; a run
    prints it at its start."""
    o = Options.from_dict(json.load(open(run / "options.json")))
    use = disk_use(o, CONFIG, ("pretrain", "distill"))
    assert (use["snapshots"], use["states"]) == (4, 1)
    sizes = {n: os.path.getsize(run / n) for n in os.listdir(run) if n.endswith(".pt")}
    assert use["total"] == pytest.approx(sum(sizes.values()), rel=0.02)
    assert use["snapshot_bytes"] == pytest.approx(sizes[f"pretrain-{_kimg(1)}kimg.pt"], rel=0.02)
    assert use["last_bytes"] == pytest.approx(sizes["last.pt"], rel=0.02)
    fp64 = disk_use(Options(**{**o.to_dict(), "precision": "fp64"}), CONFIG, ("pretrain", "distill"))
    assert 1.9 < fp64["snapshot_bytes"] / use["snapshot_bytes"] < 2  # float64 weights; the same zip overhead
    assert disk_use(Options(**{**o.to_dict(), "keep": None}), CONFIG, ("pretrain", "distill"))["states"] == 2

    out = tmp_path / "new"
    assert train(_options(pretrain_kimg=0.002), outdir=out, data=_gpu_data(), progress=True) == "done"
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("disk:"))
    assert re.search(rf"1 network snapshots x .* \+ last.pt .* expected in {re.escape(str(out))}.*free", line), line


def _gpu_data(n=5):
    from dsd_fast.data import GPUData

    return GPUData(smooth_images(n), device="cpu", corruption=Options(**RUN).make_corruption(), seed=0)


def test_prune_keeps_the_newest_by_phase_then_kimg(tmp_path):
    names = ["pretrain-000010.000kimg-state.pt", "pretrain-000002.000kimg-state.pt",
             "distill-000000.500kimg-state.pt", "distill-000001.000kimg-state.pt", "pretrain-000002.000kimg.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    run = RunDir(tmp_path)
    assert run.state_copies(("pretrain", "distill")) == [names[1], names[0], names[2], names[3]]
    run.prune_states(2, ("pretrain", "distill"))
    assert sorted(os.listdir(tmp_path)) == sorted([names[2], names[3], names[4]])  # snapshots are never pruned
    run.prune_states(None, ("pretrain", "distill"))
    assert len(os.listdir(tmp_path)) == 3


def _npz(path):
    with np.load(path) as f:
        return f["images"]


def test_snapshots_feed_generate_fid_eval_and_teacher(run, data, tmp_path, monkeypatch):
    """A snapshot gives the same images, FID and eval table as the full state holding the same network, and
    serves as --teacher."""
    cli = CliRunner()

    def ok(*args):
        r = cli.invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output + repr(r.exception)
        return r.output

    teacher, student = run / f"pretrain-{_kimg(2)}kimg.pt", run / f"distill-{_kimg(2)}kimg.pt"
    for ckpt, sampler in ((teacher, "ambient-truncated"), (student, "one-step")):  # each one's default sampler
        ok("generate", "--ckpt", ckpt, "--seeds", "0-2", "--steps", 2, "--out", tmp_path / "a.npz", "--overwrite")
        ok("generate", "--ckpt", run / "last.pt", "--sampler", sampler, "--seeds", "0-2", "--steps", 2,
           "--out", tmp_path / "b.npz", "--overwrite")
        np.testing.assert_array_equal(_npz(tmp_path / "a.npz"), _npz(tmp_path / "b.npz"))
    r = cli.invoke(main, ["generate", "--ckpt", str(student), "--sampler", "heun", "--out", str(tmp_path / "c.npz")])
    assert r.exit_code == 1 and "for a Phase II checkpoint" in r.output and "student only" in r.output

    cheap = lambda images: F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)
    monkeypatch.setattr(features_module, "feature_network", lambda *args, **kwargs: cheap)
    x = torch.from_numpy(np.load(data)["x"])
    save_reference(tmp_path / "ref.npz", cheap(x), corrupted=False, resize_mode="gpu")
    fids = []
    for ckpt in (student, run / "last.pt"):
        ok("fid", "--ckpt", ckpt, "--ref", tmp_path / "ref.npz", "--mode", "gpu", "--num", 3, "--repeats", 1,
           "--json", tmp_path / "fid.json")
        fids.append(json.load(open(tmp_path / "fid.json"))["mean"])
    assert fids[0] == fids[1]

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    tables = []
    for flags in ([], ["--ckpt", copy / f"distill-{_kimg(2)}kimg.pt"]):
        ok("eval", copy, "--num", 3, "--steps", 2, "--grid-images", 0, "--batch", 3, *flags)
        tables.append(json.load(open(copy / "eval.json")))
    assert [r["fid"] for r in tables[0]["rows"]] == [r["fid"] for r in tables[1]["rows"]]
    assert tables[1]["teacher_ckpt"] == str(copy / "last.pt")
    os.remove(copy / "last.pt")
    r = cli.invoke(main, ["eval", str(copy), "--ckpt", str(copy / f"distill-{_kimg(2)}kimg.pt"), "--num", "3"])
    assert r.exit_code == 1 and "network snapshot (the student only)" in r.output, r.output

    out = tmp_path / "distill"
    assert train(_options(teacher=str(teacher), distill_kimg=0.002), phases=("distill",),
                 outdir=out, progress=False) == "done"
    assert _same(load_checkpoint(out / "last.pt")["teacher"], load_checkpoint(teacher)["ema"])


def test_resume_refuses_a_network_snapshot_as_last_pt(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.copy(copy / f"distill-{_kimg(2)}kimg.pt", copy / "last.pt")
    with pytest.raises(ValueError, match="last.pt is a network snapshot, not a training state"):
        train(None, phases=("pretrain", "distill"), resume=copy, progress=False)


class FullDisk:
    """A file on a disk that has `room` bytes left: a write past it writes what fits, then fails with ENOSPC."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fill_disk(monkeypatch, room, name):
    """Every write of a file called `name` (through atomic_write_bytes) runs out of disk after `room` bytes."""
    init = rundir._RecordingFile.__init__
    monkeypatch.setattr(rundir._RecordingFile, "__init__",
                        lambda self, f: init(self, FullDisk(f, room) if os.path.basename(f.name) == name else f))


def test_full_disk_is_a_clear_error_and_keeps_last_pt(data, tmp_path, monkeypatch):
    o = _options(dataset=data)
    run = tmp_path / "run"
    assert train(o, outdir=run, progress=False) == "done"
    before = (run / "last.pt").read_bytes()
    limit = 1 + random.getrandbits(20) % (len(before) - 1)  # the disk fills somewhere inside the new last.pt
    _fill_disk(monkeypatch, limit, "last.pt.tmp")
    longer = Options(**{**o.to_dict(), "pretrain_kimg": 0.008})
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(run / 'last.pt'))}: No space left on device "
                                      r"\(its previous version is unchanged\)") as e:
        train(longer, resume=run, progress=False)
    assert e.value.errno == errno.ENOSPC
    assert (run / "last.pt").read_bytes() == before and not list(run.glob("*.tmp"))

    r = CliRunner().invoke(main, ["pretrain", "--resume", str(run), "--kimg", "0.008"])
    assert r.exit_code == 1 and "Error: " in r.output and "cannot write" in r.output and "last.pt" in r.output
    assert (run / "last.pt").read_bytes() == before and not list(run.glob("*.tmp"))
    monkeypatch.undo()
    assert train(longer, resume=run, progress=False) == "done"  # once there is room again


def test_atomic_write_reports_the_os_error_not_torchs(tmp_path, monkeypatch):
    """torch.save turns a failed write into RuntimeError('unexpected pos ...'); the OSError must come through."""
    path = tmp_path / "x.pt"
    path.write_bytes(b"old")
    _fill_disk(monkeypatch, 100, "x.pt.tmp")
    with pytest.raises(OSError, match=r"cannot write .*x.pt: No space left on device"):
        atomic_write_bytes(path, lambda f: torch.save({"w": torch.zeros(1000)}, f))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.pt"]
    with pytest.raises(ZeroDivisionError):  # any other failure: raised as it is, no .tmp left either
        atomic_write_bytes(path, lambda f: 1 / 0)
    assert os.listdir(tmp_path) == ["x.pt"]


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    lines = [json.dumps(dict(phase="pretrain", step=s, loss=1.0)) for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[2][:7])  # killed in the middle of appending a line
    RunDir(tmp_path).truncate_metrics(("pretrain", "distill"), "pretrain", 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    path.write_text(lines[0] + "\n" + lines[1][:5] + "\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        RunDir(tmp_path).truncate_metrics(("pretrain", "distill"), "pretrain", 2)


class RunsShell:
    """Unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    """Unpickling it would run Python code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _evil_files(tmp_path, marker):
    """Files that would run code if unpickled: torch zip archives and bare pickles (two protocols)."""
    files = {}
    for cls in (RunsShell, RunsPython):
        payload = dict(phase="pretrain", options={}, net_config={}, ema=cls(marker))
        files[f"{cls.__name__}.pt"] = lambda f, p=payload: torch.save(p, f)
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            files[f"{cls.__name__}-p{protocol}.pkl"] = lambda f, p=payload, q=protocol: pickle.dump(p, f, protocol=q)
    for name, write in files.items():
        with open(tmp_path / name, "wb") as f:
            write(f)
    return [tmp_path / name for name in files]


def test_a_file_that_needs_unpickling_is_refused_and_never_runs(data, tmp_path):
    marker = tmp_path / "marker"
    evil = _evil_files(tmp_path, marker)
    assert not marker.exists()
    for path in evil:
        with pytest.raises(ValueError, match=r"is not a dsd_fast checkpoint: reading it needs unpickling .*refused"):
            load_checkpoint(path)
        with pytest.raises(ValueError, match="not a dsd_fast checkpoint"):
            load_sampler(path)
    assert not marker.exists()

    cli = CliRunner()
    save_reference(tmp_path / "ref.npz", torch.rand(4, 3), corrupted=False, resize_mode="gpu")
    evil_run = tmp_path / "evil_run"  # a run directory whose last.pt is one of them
    evil_run.mkdir()
    (evil_run / "options.json").write_text(_options(dataset=data).to_json())
    shutil.copy(evil[0], evil_run / "last.pt")
    commands = [["generate", "--ckpt", evil[0], "--seeds", "0-1", "--out", tmp_path / "out.npz"],
                ["generate", "--ckpt", evil_run, "--out", tmp_path / "out.npz"],
                ["fid", "--ckpt", evil[1], "--ref", tmp_path / "ref.npz", "--mode", "gpu"],
                ["distill", "--teacher", evil[0], "--outdir", tmp_path / "d"],
                ["eval", evil_run, "--num", 2],
                ["train", "--resume", evil_run]]
    for args in commands:
        r = cli.invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and "not a dsd_fast checkpoint" in r.output, (args, r.output)
    assert not marker.exists() and not (tmp_path / "out.npz").exists() and not (tmp_path / "d").exists()

    # The files are live: an unpickling load does run them.
    for path in (evil[0], tmp_path / "RunsPython.pt"):
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()


def test_code_commit_names_head_or_the_given_commit(monkeypatch):
    monkeypatch.setenv("DSD_FAST_COMMIT", "abc123 (copied tree)")
    assert rundir.code_commit() == "abc123 (copied tree)"
    monkeypatch.delenv("DSD_FAST_COMMIT")
    root = os.path.dirname(os.path.dirname(os.path.abspath(rundir.__file__)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        assert rundir.code_commit() == "unknown (not a git checkout)"
    else:
        assert re.fullmatch(re.escape(head.stdout.strip()) + r"(\+dirty)?", rundir.code_commit())
