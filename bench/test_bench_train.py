"""Training-step ladder: img/s of one full optimiser step of Phase I (Pretrain: data batch, sigma_t and noise draws,
forward, backward, Adam, EMA) and Phase II (Distill, loss sid: the fake-score step then the generator step, each
with its Adam update, and the generator EMA), as each rung adds one speed-up:

    eager-fp32          fp32 with TF32 off (as EDM runs), eager, DSD_FAST_BACKEND=reference
    bf16                bf16 autocast over fp32 weights
    bf16+compile        + torch.compile of the networks (inductor)
    bf16+compile+fused  + DSD_FAST_BACKEND=auto: the fused Triton / CUDA-extension ops, in both phases: corrupt
                        (data batch, fake-step observations), add_noise / dct_inject_seeded (injection),
                        ambient_loss_precond / dct_ambient_loss (Phase I and fake-score loss), sid_generator_loss
                        (tests/test_training.py::test_fused_rung_steps_run_the_fused_ops counts them)

Phases are constructed directly on fresh random weights (the speed does not depend on them); the data are random
uint8 images in a GPUData resident on the device in every rung (no host loader in any timed step). Phase I runs
every rung with sigma_sampling clamp and truncated: useful_fraction is the fraction of training samples whose
sigma_t carries information (estimated from the training sampler itself), and useful img/s = img/s x that
fraction compares the two samplings. Phase II uses the default (truncated) sampling.

CUDA: cifar10 (DDPM++ 32x32, batch 512) and afhq (DDPM++ 64x64, batch 256). batch_gpu (the gradient-accumulation
round) is 256 / 128 for Phase I and half that for Phase II, whose generator step holds the activations of three
UNets (saved for backward, measured with saved-tensor hooks, fp32: ~125 MB per 32x32 image for one UNet, ~350 MB
for the generator step, so 256 rounds would not fit in 80 GB); $DSD_FAST_BENCH_BATCH_GPU overrides both.
Each case runs 3 warm-up steps (the compile happens there) and 10 timed steps. An eager fp32 Phase II step of
cifar10 is ~240 TFLOP (estimated at ~5 s on an H100 without TF32) and every compiled case compiles its networks
afresh: run the suite in parts under a 10-minute limit, e.g. -k 'pretrain and cifar10'.
CPU: cpu-tiny, batch 4, rungs eager-fp32 and bf16 only (inductor would compile for minutes; tests/test_compile.py
covers the compiled step): a check that the suite runs, not a measurement.

flops_per_image is the network's own count (torch.utils.flop_counter, matmul / convolution / attention FLOPs of
every forward and backward one eager fp32 step really runs, divided by its batch); tflops = flops_per_image x
img/s, mfu = tflops / peak_tflops (bench/results/ceilings.json's measured bf16 matmul rate for this device if
present, else the H100's measured 790 TFLOP/s of bench/NOTES.md; None on CPU). The records carry img/s, not
bytes: render_table.py prints them in its training-step table, not in the bandwidth one.

The anchor (Phase I only): edm-fp32 and edm-fp16 run EDM's own training step (bench/edm_anchor.py: NVlabs/edm's
code from a git-ignored checkout, never committed; skipped without one) on the same network, batch and resident
data. It has no observation sigma: its useful_fraction is the clamp sampling's, since the DSD authors' EDM-based
code clamps sigma_t. peak_mem_mb: the case's peak allocated device memory (CUDA).
Selection for a time-boxed run (bench/gpu_check_train.sh): $DSD_FAST_BENCH_PRESETS and $DSD_FAST_BENCH_RUNGS
(comma lists) keep those cases only; $DSD_FAST_BENCH_STEPS="timed,warmup" replaces the step counts.
"""

import functools
import gc
import itertools
import json
import math
import os
from pathlib import Path

import edm_anchor
import pytest
import torch
from common import CUDA, DEVICE, ROUNDS, WARMUP_ROUNDS, environment, sync
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsd_fast.data import GPUData
from dsd_fast.networks import build_network, resolve_config
from dsd_fast.training import Distill, Options, Pretrain
from dsd_fast.training.loop import derive_seed
from dsd_fast.training.phase1 import sample_sigma_t

RUNGS = {  # the ladder, in order: name -> (precision, compile, DSD_FAST_BACKEND)
    "eager-fp32": ("fp32", False, "reference"),
    "bf16": ("bf16", False, "reference"),
    "bf16+compile": ("bf16", True, "reference"),
    "bf16+compile+fused": ("bf16", True, "auto"),
}
SAMPLINGS = ("clamp", "truncated")
CEILINGS = Path(__file__).resolve().parent / "results" / "ceilings.json"  # written by bench/ceilings.py
# Without a measured ceiling for this device: the H100's measured bf16 matmul rate the project compares against
# (bench/NOTES.md; the datasheet's dense peak is 989 TFLOP/s, which no matmul reaches).
FALLBACK_PEAK_TFLOPS = 790.0

if CUDA:
    # preset -> (batch, Phase I batch_gpu, Phase II batch_gpu)
    PRESETS = {"cifar10": (512, 256, 128), "afhq": (256, 128, 64)}
    LADDER = list(RUNGS)
    # A step is ~0.1-5 s of work on GBs of data: no cache effects to average out, and 30 rounds (common.ROUNDS)
    # would triple the timed part of a suite that already needs splitting into 10-minute runs.
    STEP_ROUNDS, STEP_WARMUP = 10, 3
    FLOP_BATCH, SIGMA_DRAWS = 8, 2**20
else:
    PRESETS = {"cpu-tiny": (4, 4, 4)}
    LADDER = ["eager-fp32", "bf16"]
    STEP_ROUNDS, STEP_WARMUP = ROUNDS, WARMUP_ROUNDS
    FLOP_BATCH, SIGMA_DRAWS = 2, 2**16

EDM_RUNGS = {"edm-fp32": False, "edm-fp16": True}  # the anchor: EDM's own step, rung -> its --fp16


def _selected(name, values, known):
    """values, restricted to the comma list in $name if set. A name outside `known` is an error (a typo must not
    give an empty run); a known one this device does not run (a compiled rung on a CPU) is left out."""
    wanted = os.environ.get(name)
    if not wanted:
        return list(values)
    wanted = wanted.split(",")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; expected some of {list(known)}")
    return [v for v in values if v in wanted]


if os.environ.get("DSD_FAST_BENCH_STEPS"):
    STEP_ROUNDS, STEP_WARMUP = (int(v) for v in os.environ["DSD_FAST_BENCH_STEPS"].split(","))
_PRESETS = _selected("DSD_FAST_BENCH_PRESETS", PRESETS, [*PRESETS, "cifar10", "afhq", "cpu-tiny"])
_RUNGS = _selected("DSD_FAST_BENCH_RUNGS", [*EDM_RUNGS, *LADDER], [*EDM_RUNGS, *RUNGS])
CASES = [pytest.param("pretrain", preset, rung, "clamp", id=f"pretrain-{preset}-{rung}")
         for preset in _PRESETS for rung in EDM_RUNGS if rung in _RUNGS]
CASES += [pytest.param("pretrain", preset, rung, sampling, id=f"pretrain-{preset}-{rung}-{sampling}")
          for preset in _PRESETS for rung in LADDER if rung in _RUNGS for sampling in SAMPLINGS]
CASES += [pytest.param("distill", preset, rung, "truncated", id=f"distill-{preset}-{rung}")
          for preset in _PRESETS for rung in LADDER if rung in _RUNGS]


@pytest.fixture(autouse=True)
def _free_phases():
    """Each case builds its own networks and optimisers: free them (and their device memory) before the next."""
    yield
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def batch_gpu(phase_name, preset):
    _, pretrain, distill = PRESETS[preset]
    default = pretrain if phase_name == "pretrain" else distill
    return int(os.environ.get("DSD_FAST_BENCH_BATCH_GPU", default))


@functools.cache
def teacher_state(preset):
    """Phase II's teacher: a fresh network's weights."""
    return build_network(resolve_config(preset)).state_dict()


def make_phase(phase_name, preset, batch, batch_gpu, precision, compile, sampling):
    config = resolve_config(preset)
    o = Options(preset=preset, batch=batch, batch_gpu=batch_gpu, precision=precision, compile=compile,
                sigma_sampling=sampling, loss="sid", grid_images=0)
    images = torch.randint(0, 256, (4 * batch, config.in_channels, config.img_resolution, config.img_resolution),
                           dtype=torch.uint8, device=DEVICE)
    data = GPUData(images, device=DEVICE, corruption=o.make_corruption(), seed=o.seed)
    if phase_name == "pretrain":
        return Pretrain(o, config, data, DEVICE)
    return Distill(o, config, data, DEVICE, teacher_state(preset))


@functools.cache
def flops_per_image(phase_name, preset):
    """FLOPs of one eager fp32 step (reference backend) of a FLOP_BATCH-image phase, per image. Attention runs as
    the math kernel here: its matmuls are counted on every device (the CPU's fused attention kernel is not in
    FlopCounterMode's table), and a fused kernel's recomputation does not count as useful work."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSD_FAST_BACKEND", "reference")
        phase = make_phase(phase_name, preset, FLOP_BATCH, FLOP_BATCH, "fp32", False, "truncated")
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            phase.step(0)
    return counter.get_total_flops() / FLOP_BATCH


@functools.cache
def useful_fraction(sampling):
    """Fraction of training samples whose sigma_t carries information, from SIGMA_DRAWS draws of the training
    sampler (float32, as fp32 and bf16 runs draw). A sample is useful when sigma_t lies above the smallest float32
    above sigma: at or below it, the injected noise std sqrt(sigma_t^2 - sigma^2) is ~1e-4 x sigma and the ambient
    loss is ~0. Clamped samples sit at the clamp floor (float32(sigma) or that next float: not useful; ~36.6% at
    sigma = 0.2); truncated samples lie above it by construction (the inverse-CDF floor is that next float too,
    reached only by rounding at u ~ 0)."""
    o = Options(preset=next(iter(PRESETS)), sigma_sampling=sampling)
    sigma_t = sample_sigma_t(o, derive_seed(o.seed, "sigma_t", 0), SIGMA_DRAWS, DEVICE)
    sigma = torch.tensor(o.sigma, dtype=sigma_t.dtype, device=DEVICE)
    floor = sigma.nextafter(torch.tensor(math.inf, dtype=sigma_t.dtype, device=DEVICE))
    return (sigma_t > floor).double().mean().item()


@functools.cache
def peak():
    """(peak TFLOP/s, source) for the MFU: (None, None) on CPU."""
    if not CUDA:
        return None, None
    if CEILINGS.exists():
        ceilings = json.loads(CEILINGS.read_text())
        if ceilings.get("device") == environment()["device"]:
            return ceilings["bf16_matmul_TFLOPs"], "bench/results/ceilings.json (measured bf16 matmul)"
    return FALLBACK_PEAK_TFLOPS, "H100 measured bf16 ceiling from bench/NOTES.md (no ceilings.json for this device)"


@pytest.mark.parametrize("phase_name,preset,rung,sampling", CASES)
def test_train_step(benchmark, monkeypatch, phase_name, preset, rung, sampling):
    if rung in EDM_RUNGS:
        _edm_step(benchmark, preset, rung)
        return
    precision, compile, backend_name = RUNGS[rung]
    batch, round_size = PRESETS[preset][0], batch_gpu(phase_name, preset)
    flops, useful = flops_per_image(phase_name, preset), useful_fraction(sampling)
    monkeypatch.setenv("DSD_FAST_BACKEND", backend_name)
    torch.compiler.reset()  # a compiled rung compiles afresh: no graphs or dynamic-shape guesses from earlier cases
    _reset_peak()
    phase = make_phase(phase_name, preset, batch, round_size, precision, compile, sampling)
    steps, finite = itertools.count(), []

    def step(k):
        finite.append(phase.step(k)[0])
        sync()

    benchmark.group = f"train step {phase_name} {preset}"
    benchmark.pedantic(step, setup=lambda: ((next(steps),), {}), rounds=STEP_ROUNDS, warmup_rounds=STEP_WARMUP)
    assert finite and all(finite), f"non-finite losses (skipped updates) in {finite.count(False)} steps"
    _record(benchmark, phase_name, preset, rung, precision, compile, backend_name, sampling, batch, round_size,
            flops, useful)


def _reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEVICE)


def _record(benchmark, phase_name, preset, rung, precision, compile, backend_name, sampling, batch, round_size,
            flops, useful):
    """The case's extra_info: what ran, the rates, the MFU and the peak memory."""
    config = resolve_config(preset)
    peak_tflops, peak_source = peak()
    benchmark.extra_info.update(
        environment(), compile_backend="inductor" if compile else None, phase=phase_name, preset=preset,
        resolution=config.img_resolution, channels=config.in_channels, batch=batch, batch_gpu=round_size, rung=rung,
        precision=precision, compile=compile, backend=backend_name, sigma_sampling=sampling,
        useful_fraction=useful, flops_per_image=flops, peak_tflops=peak_tflops, peak_source=peak_source,
        measurement="cuda" if CUDA else "cpu smoke (not a measurement)",
        peak_mem_mb=torch.cuda.max_memory_allocated(DEVICE) / 2**20 if CUDA else None)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        rate = batch / median
        tflops = flops * rate / 1e12
        benchmark.extra_info.update(median_ms=median * 1e3, img_per_s=rate, useful_img_per_s=rate * useful,
                                    tflops=tflops, mfu=None if peak_tflops is None else tflops / peak_tflops)


def _edm_step(benchmark, preset, rung):
    """The anchor: EDM's own Phase I step (bench/edm_anchor.py) on our preset's network, batch and batch_gpu."""
    reason = edm_anchor.why_not()
    if reason is not None:
        pytest.skip(reason)
    fp16 = EDM_RUNGS[rung]
    config, batch, round_size = resolve_config(preset), PRESETS[preset][0], batch_gpu("pretrain", preset)
    _reset_peak()
    with edm_anchor.edm_backend_flags():
        images = torch.randint(0, 256, (4 * batch, config.in_channels, config.img_resolution, config.img_resolution),
                               dtype=torch.uint8, device=DEVICE)
        edm = edm_anchor.EDMStep(config, batch, round_size, fp16, images, DEVICE)
        ours = build_network(config)
        assert edm_anchor.parameter_count(edm.net) == sum(p.numel() for p in ours.parameters()), \
            "EDM's network and ours differ in size: the anchor would not time the same network"
        del ours
        steps, losses = itertools.count(), []

        def step(k):
            losses.append(edm.step(k))
            sync()

        benchmark.group = f"train step pretrain {preset}"
        benchmark.pedantic(step, setup=lambda: ((next(steps),), {}), rounds=STEP_ROUNDS, warmup_rounds=STEP_WARMUP)
    assert losses and torch.stack(losses).isfinite().all(), "EDM's step gave a non-finite loss"
    _record(benchmark, "pretrain", preset, rung, "fp16" if fp16 else "fp32", False, "edm (NVlabs/edm)", "clamp",
            batch, round_size, flops_per_image("pretrain", preset), useful_fraction("clamp"))
