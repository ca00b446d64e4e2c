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

import numpy as np
import torch

from dsd_fast import functional
from dsd_fast.data import load_images, resolve_source
from dsd_fast.generation import load_sampler
from dsd_fast.networks import NetworkConfig, build_network
from dsd_fast.options import Options
from dsd_fast.reference.edm import karras_sigma, karras_t
from dsd_fast.rundir import atomic_write_bytes, load_checkpoint
from dsd_fast.sampling import one_step

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


def phase2_nets(path):
    """(options, {teacher, fake, G}) of a Phase II full training state (a run's last.pt), in eval mode, frozen."""
    state = load_checkpoint(path)
    if state.get("phase") != "distill" or not all(k in state for k in ("teacher", "fake", "G")):
        raise ValueError(f"slope: {path} is not a Phase II full training state (a distill run's last.pt)")
    options, config = Options.from_dict(state["options"]), NetworkConfig(**state["net_config"])
    if options.loss != "sid":
        raise ValueError(f"slope: {path} was trained with loss {options.loss!r}; the slope is defined for 'sid'")
    nets = {}
    for key in ("teacher", "fake", "G"):
        nets[key] = build_network(config)
        nets[key].load_state_dict(state[key])
        nets[key].eval().requires_grad_(False)
    return options, nets


def slope_table(path, batches, batch, seed):
    """Markdown rows: the loss slope's mean and standard error over `batches` batches per band of levels."""
    options, nets = phase2_nets(path)
    corruption, s_min, ch = options.make_corruption(), options.generator_sigma_min(), nets["G"].img_channels
    res = nets["G"].img_resolution
    g = torch.Generator().manual_seed(seed)
    rows = ["| generator levels σ_t | dL/dγ (mean ± s.e.) |", "|---|---:|"]
    for lo, hi in LEVEL_BANDS:
        slopes = []
        for _ in range(batches):
            z = torch.randn(batch, ch, res, res, generator=g)
            u = lo + (hi - lo) * torch.rand(batch, generator=g)
            s = karras_sigma(karras_t(u, options.t_max), sigma_min=s_min)
            eps = torch.randn(z.shape, generator=g)
            slopes.append(loss_slope(nets["G"], nets["teacher"], nets["fake"], corruption, z, s, eps,
                                     options.sigma_init, options.alpha))
        s_lo, s_hi = (float(karras_sigma(karras_t(torch.tensor([v], dtype=torch.float64), options.t_max),
                                         sigma_min=s_min)) for v in (lo, hi))  # sigma_t rises with u
        a = np.array(slopes)
        rows.append(f"| [{s_lo:.3g}, {s_hi:.3g}] | {a.mean():+.3g} ± {a.std(ddof=1) / math.sqrt(len(a)):.2g} |")
    return rows


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Also write the tables to this markdown file.")
    args = p.parse_args(argv)
    if args.num < 2 or args.slope_batches < 2:
        p.error(f"--num and --slope-batches: expected >= 2, got {args.num} and {args.slope_batches}")
    if args.sigma is not None and not args.sigma > 0:
        p.error(f"--sigma: expected a noise std > 0, got {args.sigma}")
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
        lines += ["", f"Loss slope of {args.slope} (G, its teacher and fake score; {args.slope_batches} batches of 32 "
                      "per row):", ""] + slope_table(args.slope, args.slope_batches, 32, args.seed)
    command = shlex.join(["python", "tools/noise_anatomy.py", *argv])
    text = "\n".join([f"Made by `{command}` (seed {args.seed}).", ""] + lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_bytes(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
