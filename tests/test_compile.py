"""--compile: a torch.compile'd Phase I step computes what the eager one does (CPU inductor; on a GPU the same
path runs with Triton code generation)."""

import random

import torch
from runs import smooth_images

from dsd_fast.data import GPUData
from dsd_fast.networks import resolve_config
from dsd_fast.training import Options, Pretrain

# cpu-tiny with two resolution levels instead of three (attention kept): a cold inductor compile on CPU costs
# per distinct kernel shape, and this test is the suite's longest.
CONFIG = resolve_config("cpu-tiny", channel_mult=(1, 2), attn_resolutions=(16,))


def test_compiled_pretrain_steps_match_eager():
    images = smooth_images(6)
    seed = random.getrandbits(24)
    runs = {}
    for compile in (False, True):
        o = Options(preset="cpu-tiny", batch=3, seed=seed, lr=1e-3, lr_rampup_kimg=0, grid_images=0, compile=compile)
        data = GPUData(images, device="cpu", corruption=o.make_corruption(), seed=o.seed)
        phase = Pretrain(o, CONFIG, data, torch.device("cpu"))
        w0 = torch.cat([p.detach().flatten() for p in phase.net.parameters()])
        losses = [phase.step(k)[1]["loss"] for k in range(2)]
        runs[compile] = losses, torch.cat([p.detach().flatten() for p in phase.net.parameters()])
    (eager, w_eager), (compiled, w_compiled) = runs[False], runs[True]
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (eager, compiled)
    # The same initial weights, and the two updates agree: Adam's first steps move each weight by ~lr whatever the
    # gradient's size, so a weight whose gradient is at rounding level may move differently; relative to the
    # whole update the difference must be tiny.
    moved, differ = (w_eager - w0).norm(), (w_eager - w_compiled).norm()
    assert moved > 0 and differ <= 1e-2 * moved, (differ, moved)


def test_compiled_distill_steps_match_eager():
    """--compile in Phase II: the fake score's network + loss and the whole generator loss (G, injection, both
    score nets, SiD loss) compiled end to end compute what eager does (and the Phase I part above)."""
    from dsd_fast.networks import build_network
    from dsd_fast.training import Distill

    seed = random.getrandbits(24)
    torch.manual_seed(seed)
    teacher = build_network(CONFIG).state_dict()
    runs = {}
    for compile in (False, True):
        o = Options(preset="cpu-tiny", batch=2, seed=seed, g_lr=1e-4, grid_images=0, compile=compile)
        phase = Distill(o, CONFIG, None, torch.device("cpu"), teacher)
        runs[compile] = [phase.step(k)[1] for k in range(2)]
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "fake_loss"):
            assert abs(eager[key] - compiled[key]) <= 1e-5 * abs(eager[key]), (key, eager, compiled)
