"""Seeded generation from checkpoints: the one-step student and the teacher's samplers, in batches.

Image s (an integer seed) starts from latents z_s = Philox normal stream under the fixed key LATENT_KEY at
counters s * C*H*W + arange(C*H*W): a pure function of s (and the image shape), so seed s gives the same image
at any batch size, any world size, in any order. Every sampler here is a deterministic per-sample map of its
latents (sampling.py), which carries that property to the images. The Proximal-FID corruption of generated
image s is likewise keyed by s (evaluation.proximal).

generate() writes a sampler's images of a list of seeds to a directory of PNGs, an EDM zip or an npz (writers.py);
under torchrun each process generates a strided share of the seeds (split_seeds).
"""

import contextlib
import dataclasses
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checks, functional
from .data.datasets import _encode_png, to_uint8
from .distributed import gather_interleaved, world
from .networks import build_network
from .networks.presets import NetworkConfig
from .options import Options
from .reference.philox import corrupt_noise
from .rundir import is_network_snapshot, load_checkpoint
from .sampling import ambient_sample, dct_ode_sample, edm_heun, one_step
from .writers import WRITERS, output_kind

LATENT_KEY = 0x5EED_1A7E_17D5_0001  # a fixed 63-bit Philox key (evaluation.proximal has the other)
MAX_SEED = 2**32 - 1

PRECISIONS = ("fp32", "bf16")  # the generator's arithmetic: fp32, or the network under bf16 autocast
SAMPLERS = ("one-step", "heun", "ambient-full", "ambient-truncated", "dct-ode")
# Samplers that fit each observation model's teacher: EDM Heun and DSD's Ambient samplers assume the noise-only
# process; a blur + noise teacher is sampled on its DCT process's PF-ODE.
TEACHER_SAMPLERS = {"noise": ("ambient-truncated", "ambient-full", "heun"), "blur": ("dct-ode",)}


def parse_seeds(spec):
    """'0-49999', '3,7,10-12' or an iterable of ints -> list of distinct ints in [0, 2^32), in the given order."""
    if isinstance(spec, str):
        seeds = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ValueError(f"seeds: expected a list like '0-49999' or '1,5,10-19', got {spec!r}")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ValueError(f"seeds: range {part!r} ends before it starts")
            if hi > MAX_SEED:  # before building the list: a huge range must not exhaust memory first
                raise ValueError(f"seeds: expected seeds in [0, {MAX_SEED}], got {part!r}")
            seeds.extend(range(lo, hi + 1))
    else:
        try:
            seeds = [int(s) for s in spec]
        except (TypeError, ValueError) as e:
            raise ValueError(f"seeds: expected a string like '0-49999' or a list of ints, got {spec!r}") from e
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    if min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise ValueError(f"seeds: expected seeds in [0, {MAX_SEED}], got range [{min(seeds)}, {max(seeds)}]")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds: expected distinct seeds (a repeated seed would repeat its image)")
    return seeds


def seed_index(seeds, device=None):
    """seeds (a list, range or tensor) as an int64 tensor on device."""
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64)
    return torch.as_tensor(list(seeds), dtype=torch.int64, device=device)


def seed_latents(seeds, chw, device=None):
    """float32 latents [len(seeds), C, H, W]; row b is a pure function of seeds[b] (see module doc).
    On CUDA the fused Philox kernel draws them (bit-compatible with the reference stream)."""
    index = seed_index(seeds, device)
    if index.device.type == "cuda":
        zeros = torch.zeros(index.shape[0], *chw, device=index.device)
        return functional.corrupt(zeros, 1.0, seed=LATENT_KEY, index=index)
    return corrupt_noise(LATENT_KEY, index, chw, device=index.device)


@dataclasses.dataclass
class Sampler:
    """A loaded checkpoint network and how to sample it: __call__(z) -> float32 images in [-1, 1].

    kind 'one-step': x = G(sigma_init z, sigma_init) with the student's EMA; the others run the teacher (a
    Phase I EMA, or the teacher inside a Phase II checkpoint) for `steps` steps. options: the run's options
    dict; corruption: its observation model (for Proximal FID)."""

    net: torch.nn.Module
    kind: str
    steps: int
    options: dict
    config: object
    corruption: object
    precision: str = "fp32"

    @property
    def chw(self):
        return (self.config.in_channels, self.config.img_resolution, self.config.img_resolution)

    @torch.no_grad()
    def __call__(self, z):
        sigma = self.options["sigma"]
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.kind == "one-step":
                x = one_step(self.net, z, self.options["sigma_init"])
            elif self.kind == "heun":
                x = edm_heun(self.net, z, self.steps)
            elif self.kind == "dct-ode":
                x = dct_ode_sample(self.net, z, self.corruption, self.steps)
            else:
                x = ambient_sample(self.net, z, sigma, self.steps, truncate=self.kind == "ambient-truncated")
        return x.float()  # to_uint8 rounds x * 127.5 + 127.5: EDM's floor(x * 127.5 + 128), as its PNGs

    def images(self, seeds, device=None):
        """uint8 images [len(seeds), C, H, W] of these seeds on device."""
        device = device if device is not None else next(self.net.parameters()).device
        return to_uint8(self(seed_latents(seeds, self.chw, device)))


def load_sampler(ckpt, sampler=None, steps=18, device="cpu", precision="fp32"):
    """Sampler from a checkpoint file (or a run directory: its last.pt): a full training state or a network
    snapshot (<phase>-<kimg>kimg.pt, best.ckpt). sampler None: 'one-step' for a Phase II checkpoint, the
    corruption's first teacher sampler for a Phase I one. A Phase II full state serves both the student (one-step)
    and its teacher (any teacher sampler); a Phase II network snapshot holds the student only."""
    if isinstance(ckpt, (str, os.PathLike)) and os.path.isdir(ckpt):
        ckpt = os.path.join(ckpt, "last.pt")
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"ckpt: checkpoint {os.fspath(ckpt)!r} does not exist")
    checks.choice("precision", precision, PRECISIONS)
    checks.integer("steps", steps, 1)
    state = load_checkpoint(ckpt)
    phase = state.get("phase")
    if phase not in ("pretrain", "distill") or "options" not in state or "net_config" not in state:
        raise ValueError(f"ckpt: {os.fspath(ckpt)!r} is not a dsd-fast training checkpoint")
    options = Options.from_dict(state["options"])
    snapshot = is_network_snapshot(state)
    teacher_samplers = () if snapshot and phase == "distill" else TEACHER_SAMPLERS[options.corruption]
    allowed = (("one-step",) if phase == "distill" else ()) + teacher_samplers
    sampler = allowed[0] if sampler is None else sampler
    if sampler not in allowed:
        what = f"a {'Phase II' if phase == 'distill' else 'Phase I'} checkpoint of a '{options.corruption}' run"
        hint = (" (a network snapshot: it holds the student only; sample the teacher from the run's last.pt or its "
                "Phase I snapshot)" if not teacher_samplers else "")
        raise ValueError(f"sampler: expected one of {allowed} for {what}, got {sampler!r}{hint}")
    config = NetworkConfig(**state["net_config"])
    net = build_network(config)
    weights = state["G_ema"] if sampler == "one-step" else state["teacher" if phase == "distill" else "ema"]
    net.load_state_dict(weights)
    net = net.to(device).eval().requires_grad_(False)
    return Sampler(net, sampler, steps, options.to_dict(), config, options.make_corruption(), precision)


def split_seeds(seeds, rank, world_size):
    """This rank's share of seeds: a strided slice, so every rank's batches stay full until the end."""
    return seeds[rank::world_size]


def batches(seeds, batch):
    checks.integer("batch", batch, 1)
    for i in range(0, len(seeds), batch):
        yield seeds[i:i + batch]


def generate(sampler, seeds, out, *, batch=256, overwrite=False, progress=True):
    """Write the sampler's images of these seeds to out (a directory of {seed:06d}.png, a .zip or a .npz). Under
    torch.distributed every rank calls this with the same arguments and generates its share of the seeds.
    Returns the number of images written (all ranks together)."""
    seeds = parse_seeds(seeds)
    checks.integer("batch", batch, 1)
    kind = output_kind(out, seeds, overwrite)
    rank, size = world()
    if size > 1:
        dist.barrier()  # every rank has checked out before any rank writes to it
    device = next(sampler.net.parameters()).device
    C, H, W = sampler.chw
    shares = [split_seeds(seeds, r, size) for r in range(size)]
    gather = kind != "dir" and size > 1
    writes = kind == "dir" or rank == 0
    # PIL releases the GIL while encoding: PNGs encode on a thread pool (2 threads: 1.6x the rate of 1, measured on
    # 2 busy cores), and a background thread writes batch k while the device generates batch k + 1.
    pool = ThreadPoolExecutor(min(8, max(1, (os.cpu_count() or 1) // size)))
    writer = (WRITERS[kind](os.fspath(out), seeds, (H, W, C), lambda x: pool.map(_encode_png, x)) if writes else
              contextlib.nullcontext())
    bar = tqdm(total=len(seeds), desc="generate", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    pending = None
    with pool, writer as write, bar, ThreadPoolExecutor(1) as background:
        for start in range(0, len(shares[0]), batch):  # rank 0 holds the most seeds: every rank runs this many steps
            chunks = [share[start:start + batch] for share in shares]
            chunk = chunks[rank]
            images = (sampler.images(chunk, device) if chunk else
                      torch.empty(0, C, H, W, dtype=torch.uint8, device=device))
            if gather:
                images = gather_interleaved(images, [len(c) for c in chunks])
                chunk = seeds[start * size:start * size + sum(map(len, chunks))]
            if writes:
                images = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
                if pending is not None:
                    pending.result()  # one batch in flight at most; a failed write stops the loop here
                pending = background.submit(write, chunk, images)
            bar.update(sum(map(len, chunks)))
        if pending is not None:
            pending.result()
    if size > 1:
        dist.barrier()  # the output is complete when rank 0 returns
    return len(seeds)
