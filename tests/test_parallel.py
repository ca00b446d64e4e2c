"""Multi-process training on CPU (gloo): `torchrun --nproc-per-node 2 -m dsd_fast train` with --parallel ddp and
fsdp gives the per-step losses of the 1-process run with the same global batch (Phase I and II, through a resume
across the phase boundary), and rank 0 alone writes the run directory."""

import json
import random

import numpy as np
import pytest
import torch
from runs import torchrun

from dsd_fast.distributed import Parallel
from dsd_fast.rundir import load_checkpoint
from dsd_fast.training import Options, train

# batch 4 on 2 ranks with batch_gpu 1: two accumulation rounds per rank (the first under no_sync); the 1-process
# reference runs four rounds of 1, so every per-sample forward is the same computation and the runs differ only
# in the order gradients are summed. A snapshot (checkpoint, EMA grid) after every step: under FSDP both are
# collectives between updates. lr is high so that a wrong Phase I update shows in the next step's loss.
# fp64: Phase II's generator loss is a near-cancelling difference (f_psi starts equal to f_phi) and Adam maps
# rounding-level gradient differences to ~lr steps, so in fp32 even 1-process runs that differ only in batch_gpu
# disagree by ~3e-4 relative in it (2 processes: ~2e-3). In fp64 the summation-order rounding is ~1e-16: every
# loss agrees to better than 1e-12 (measured), and the test asks 1e-8, well inside the 1e-4.
TOLERANCE = 1e-8
COMMON = dict(preset="cpu-tiny", batch=4, lr=1e-2, lr_rampup_kimg=0, log_every=1, grid_images=4,
              sample_steps=2, snapshot_kimg=0.004, sigma=0.3, precision="fp64")
PRETRAIN_KIMG, DISTILL_KIMG = 0.012, 0.008  # 3 + 2 steps


def _images(n):
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4), size=32, mode="bilinear")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run: (data path, seed, per-step metrics, final checkpoint)."""
    path = tmp_path_factory.mktemp("par")
    np.savez(path / "data.npz", x=_images(7))  # 7 images: the batches cross epoch ends
    seed = random.getrandbits(24)
    o = Options(**COMMON, dataset=str(path / "data.npz"), seed=seed, batch_gpu=1, pretrain_kimg=PRETRAIN_KIMG,
                distill_kimg=DISTILL_KIMG)
    metrics = []
    assert train(o, phases=("pretrain", "distill"), outdir=path / "ref", progress=False,
                 on_step=lambda k, m: metrics.append(m)) == "done"
    return path / "data.npz", seed, metrics, load_checkpoint(path / "ref" / "last.pt")



@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(parallel, reference, tmp_path):
    data, seed, ref, ref_state = reference
    run = tmp_path / "run"
    flags = ["--preset", "cpu-tiny", "--batch", 4, "--batch-gpu", 1, "--lr", 1e-2, "--lr-rampup-kimg", 0,
             "--log-every", 1, "--grid-images", 4, "--sample-steps", 2, "--snapshot-kimg", 0.004, "--sigma", 0.3,
             "--precision", "fp64", "--seed", seed, "--dataset", data, "--parallel", parallel]
    # Phase I for 2 steps, then resume (every rank loads last.pt) for a 3rd step and on into Phase II.
    torchrun("pretrain", *flags, "--kimg", 0.008, "--outdir", run)
    torchrun("train", "--resume", run, "--pretrain-kimg", PRETRAIN_KIMG, "--distill-kimg", DISTILL_KIMG)
    # Rank 0 alone logs: one line per step.
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [(r["phase"], r["step"]) for r in lines] == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3),
                                                        ("distill", 1), ("distill", 2)]
    assert len(ref) == len(lines)
    for a, b in zip(ref, lines, strict=True):
        for key in a:
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (b["phase"], b["step"], key, ref, lines)
    for name in ("data.png", "pretrain-000000.012kimg-teacher.png", "distill-000000.008kimg-student.png"):
        assert (run / name).is_file(), name
    # The checkpoint holds full (unsharded) tensors under every mode: the 1-process run's keys and shapes. (The
    # weights themselves are not compared: Adam turns rounding-level gradient differences into ~lr steps.)
    state = load_checkpoint(run / "last.pt")
    assert state["phase"] == "distill" and state["step"] == 2
    for name in ("teacher", "G", "G_ema", "fake"):
        assert {k: (type(v), v.shape) for k, v in state[name].items()} == \
            {k: (type(v), v.shape) for k, v in ref_state[name].items()}, name
    for name in ("G_opt", "fake_opt"):
        got, want = state[name]["state"], ref_state[name]["state"]
        assert {k: v["exp_avg_sq"].shape for k, v in got.items()} == {k: v["exp_avg_sq"].shape for k, v in want.items()}


def test_batch_split_errors():
    par = Parallel("cpu", world_size=2)
    assert par.batch_split(8, 2) == (4, 2) and par.batch_split(8, 8) == (4, 4)
    for batch, batch_gpu in ((6, 2), (3, 3), (1, 1)):
        with pytest.raises(ValueError, match="batch, batch_gpu.*world_size=2"):
            par.batch_split(batch, batch_gpu)
    with pytest.raises(ValueError, match="parallel: 'fsdp' needs a process group"):
        train(Options(preset="cpu-tiny", parallel="fsdp"), outdir="unused", progress=False)
