"""Where a one-step student's residual noise comes from (README, "Fashion-MNIST at sigma = 0.2").

Three measurements, printed as markdown tables:
- band power: the radial power spectrum of image sets (clean data, its corrupted copy, teacher and student
  samples): mean |FFT|^2 / (H W) per frequency band, each image's mean removed, so white noise of std s reads s^2
  in every band;
- pass-through: the least-squares gain beta of the student's high-pass output on the high-pass latent z
  (high-pass: x minus its 3x3 mean): how much of z the generator copies into its pixels;
- loss slope: dL/dgamma at gamma = 0 of the Phase II generator loss (SiD) for G'(z) = G(z) - gamma z, with the
  checkpoint's own teacher and fake score, per band of generator levels sigma_t: > 0 means the loss, as trained,
  asks for more pass-through, not less.

    .venv/bin/python tools/noise_anatomy.py --data fashion-mnist --sigma 0.2 \\
        --set teacher=TEACHER.pt:ambient-truncated --set student=STUDENT.pt --slope STUDENT_RUN/last.pt
"""

import argparse
import math
import shlex
import sys
import time

import numpy as np
import torch

from dsd_fast import functional
from dsd_fast.data import load_images, resolve_source
from dsd_fast.generation import load_sampler
from dsd_fast.networks import NetworkConfig
from dsd_fast.options import Options
from dsd_fast.reference.edm import karras_sigma, karras_t
from dsd_fast.rundir import atomic_write_bytes, code_commit, load_checkpoint
from dsd_fast.sampling import one_step
from dsd_fast.training.phase2 import Distill
from dsd_fast.training.update import guarded_step

BANDS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.75))  # cycles / pixel; 0.75 > the corner's 0.707
LEVEL_BANDS = ((0.0, 1.0), (0.0, 0.25), (0.25, 0.5), (0.5, 1.0))  # u of sigma_t = karras(karras_t(u, t_max))


def band_power(x, bands=BANDS):
    """x [N, C, H, W] float: the mean of |FFT2(x - mean_HW x)|^2 / (H W) over images, channels and the nonzero
    frequencies (fftfreq radius, cycles / pixel) in each [lo, hi) band; the zero frequency, 0 by construction, is
    left out. Parseval: one band over every frequency reads the mean per-image pixel variance (ddof 1)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a float [N, C, H, W] tensor, got {x.dtype} of shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    x = x.double()
    p = (torch.fft.fft2(x - x.mean((2, 3), keepdim=True)).abs() ** 2).mean((0, 1)) / (h * w)
    r = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.fftfreq(w, dtype=torch.float64)[None, :] ** 2)
    out = []
    for lo, hi in bands:
        mask = (r >= lo) & (r < hi) & (r > 0)
        if not mask.any():
            raise ValueError(f"bands: [{lo}, {hi}) holds no frequency of a {h}x{w} image")
        out.append(float(p[mask].mean()))
    return out


def high_pass(x):
    """x minus its 3x3 mean (the window shrunk at the border)."""
    return x - torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def passthrough_gain(x_g, z):
    """The least-squares beta of high_pass(x_g) on high_pass(z): x_g = c z + (anything uncorrelated with z)
    reads c."""
    if x_g.shape != z.shape:
        raise ValueError(f"x_g: expected the latents' shape {tuple(z.shape)}, got {tuple(x_g.shape)}")
    hz, hx = high_pass(z.double()), high_pass(x_g.double())
    return float((hz * hx).sum() / (hz * hz).sum())


def loss_slope(G, f_phi, f_psi, corruption, z, sigma_t, eps, sigma_init, alpha):
    """dL/dgamma at gamma = 0, L the batch mean of the SiD generator loss for x_g = G(z) - gamma z: the generator
    loss of Phase II (training/phase2.py, loss "sid") with f_phi, f_psi and G frozen."""
    gamma = torch.zeros((), dtype=z.dtype, requires_grad=True)
    x_g = one_step(G, z, sigma_init) - gamma * z
    x_t = corruption.forward(x_g, sigma_t, eps)
    loss = functional.sid_generator_loss(f_phi(x_t, sigma_t), f_psi(x_t, sigma_t), x_g, alpha).mean()
    (slope,) = torch.autograd.grad(loss, gamma)
    return float(slope)


def phase2(path):
    """The Phase II trainer (training/phase2.py) restored from a full training state (a run's last.pt) on the CPU:
    its teacher f_phi, fake score f_psi and generator G as they were, f_psi's optimiser included."""
    state = load_checkpoint(path)
    if state.get("phase") != "distill" or not all(k in state for k in ("teacher", "fake", "G", "fake_opt")):
        raise ValueError(f"slope: {path} is not a Phase II full training state (a distill run's last.pt)")
    options, config = Options.from_dict(state["options"]), NetworkConfig(**state["net_config"])
    if options.loss != "sid":
        raise ValueError(f"slope: {path} was trained with loss {options.loss!r}; the slope is defined for 'sid'")
    distill = Distill(options, config, None, torch.device("cpu"), state["teacher"])
    distill.load_state_dict(state)
    return distill


def refresh_fake(distill, steps, lr):
    """`steps` more f_psi updates (the run's own fake-score step) at lr with G frozen; returns their mean loss."""
    o, c = distill.options, distill.config
    shape = (o.batch, c.in_channels, c.img_resolution, c.img_resolution)
    first = distill.completed * o.fake_steps  # the keys after the run's own fake updates: fresh draws
    distill.f_psi.train().requires_grad_(True)
    total = 0.0
    for k in range(first, first + steps):
        loss = distill.f_psi_step(k, o.batch, shape)
        guarded_step(distill.f_psi_opt, loss, lr)
        total = total + loss.detach()
    return float(total) / steps


def slope_table(distill, batches, batch, seed, fixed=()):
    """Markdown rows: the loss slope's mean and standard error over `batches` batches, per band of levels drawn as
    the generator step draws them, then at each fixed level in `fixed`. The seed fixes every draw, so two tables
    of one seed are paired."""
    o, c = distill.options, distill.config
    nets = [distill.G, distill.f_phi, distill.f_psi]
    for net in nets:
        net.eval().requires_grad_(False)
    karras = lambda u: karras_sigma(karras_t(u, o.t_max), sigma_min=o.generator_sigma_min())
    g = torch.Generator().manual_seed(seed)
    levels = [(f"[{float(karras(torch.tensor(lo))):.3g}, {float(karras(torch.tensor(hi))):.3g}]",  # rises with u
               lambda n, lo=lo, hi=hi: karras(lo + (hi - lo) * torch.rand(n, generator=g))) for lo, hi in LEVEL_BANDS]
    levels += [(f"{s:g} (fixed)", lambda n, s=s: torch.full((n,), float(s))) for s in fixed]
    rows = ["| generator levels σ_t | dL/dγ (mean ± s.e.) |", "|---|---:|"]
    for label, draw in levels:
        slopes = []
        for _ in range(batches):
            z = torch.randn(batch, c.in_channels, c.img_resolution, c.img_resolution, generator=g)
            sigma_t = draw(batch)
            eps = torch.randn(z.shape, generator=g)
            slopes.append(loss_slope(*nets, distill.corruption, z, sigma_t, eps, o.sigma_init, o.alpha))
        a = np.array(slopes)
        rows.append(f"| {label} | {a.mean():+.3g} ± {a.std(ddof=1) / math.sqrt(len(a)):.2g} |")
    return rows


def _floats(text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated levels, got {text!r}") from None
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected levels > 0, got {text!r}")
    return values


def _refresh(text):
    n, _, lr = text.partition(":")
    try:
        n, lr = int(n), (float(lr) if lr else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[:LR], got {text!r}") from None
    if n < 1 or (lr is not None and not lr > 0):
        raise argparse.ArgumentTypeError(f"expected N >= 1 and LR > 0, got {text!r}")
    return n, lr


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist", help="Clean data set: a preset name or a path.")
    p.add_argument("--sigma", type=float, default=None, help="Also the data corrupted with this noise std.")
    p.add_argument("--set", action="append", default=[], metavar="NAME=CKPT[:SAMPLER]",
                   help="Samples of a checkpoint (sampler: one-step, ambient-truncated, ...; its default if none).")
    p.add_argument("--num", type=int, default=256, help="Images per set.")
    p.add_argument("--steps", type=int, default=18, help="Teacher sampler steps.")
    p.add_argument("--slope", default=None, metavar="LAST_PT", help="A Phase II full state: the loss slope.")
    p.add_argument("--slope-batches", type=int, default=20)
    p.add_argument("--slope-sigma-t", type=_floats, default=(), metavar="S,S,...",
                   help="Also the slope at these fixed generator levels.")
    p.add_argument("--refresh-fake", type=_refresh, default=None, metavar="N[:LR]",
                   help="Then N more fake-score updates with G frozen (at LR; the run's fake lr if none) and the "
                        "slope again.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Also write the tables to this markdown file.")
    args = p.parse_args(argv)
    if args.num < 2 or args.slope_batches < 2:
        p.error(f"--num and --slope-batches: expected >= 2, got {args.num} and {args.slope_batches}")
    if args.sigma is not None and not args.sigma > 0:
        p.error(f"--sigma: expected a noise std > 0, got {args.sigma}")
    if (args.slope_sigma_t or args.refresh_fake) and not args.slope:
        p.error("--slope-sigma-t / --refresh-fake: expected --slope LAST_PT as well")
    names = [s.partition("=")[0] for s in args.set]
    for s, name in zip(args.set, names, strict=True):
        if "=" not in s or not name:
            p.error(f"--set: expected NAME=CKPT[:SAMPLER], got {s!r}")
        if names.count(name) > 1 or name.startswith(("clean data", "data + ")):
            p.error(f"--set: expected a name of its own, got {name!r} twice or a data row's name")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    start = time.time()
    g = torch.Generator().manual_seed(args.seed)
    x = load_images(resolve_source(args.data), max_images=args.num).double() / 127.5 - 1
    sets = {"clean data": x}
    if args.sigma is not None:
        sets[f"data + σ={args.sigma:g} noise"] = x + args.sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
    z = torch.randn(args.num, *x.shape[1:], generator=g)
    gains = {}
    for spec in args.set:
        name, _, ckpt = spec.partition("=")
        ckpt, _, sampler = ckpt.rpartition(":") if ":" in ckpt else (ckpt, "", "")
        sample = load_sampler(ckpt, sampler or None, steps=args.steps)
        with torch.no_grad():
            sets[name] = sample(z).clamp(-1, 1).double()
        if sample.kind == "one-step":  # beta is defined for the student's one step from z
            gains[name] = passthrough_gain(sets[name], z)
    head = " | ".join(f"{lo:g}-{hi:g}" for lo, hi in BANDS)
    lines = [f"Band power, {args.num} images per set (cycles / pixel; white noise of std s reads s²):", "",
             f"| set | {head} | pass-through β |", "|---|" + "---:|" * (len(BANDS) + 1)]
    for name, images in sets.items():
        cells = " | ".join(f"{p:.4f}" for p in band_power(images))
        lines.append(f"| {name} | {cells} | {gains[name]:+.4f} |" if name in gains else f"| {name} | {cells} | |")
    if args.slope:
        distill = phase2(args.slope)
        table = lambda: slope_table(distill, args.slope_batches, 32, args.seed, args.slope_sigma_t)
        lines += ["", f"Loss slope of {args.slope} (G, its teacher and fake score; {args.slope_batches} batches of 32 "
                      "per row):", ""] + table()
        if args.refresh_fake:
            n, lr = args.refresh_fake
            lr = distill.options.fake_lr if lr is None else lr
            loss = refresh_fake(distill, n, lr)
            lines += ["", f"The same after {n} more fake-score updates at lr {lr:g} with G frozen (their mean loss "
                          f"{loss:.4g}; the same draws as above):", ""] + table()
    command = shlex.join(["python", "tools/noise_anatomy.py", *argv])
    made = f"Made by `{command}` (seed {args.seed}) at commit {code_commit()} in {time.time() - start:.0f} s."
    text = "\n".join([made, ""] + lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_bytes(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
