"""Toy 2-D DSD (the paper's Fig. 4 and Fig. 6) with the public ops of dsd_fast.functional.

Data: a 2-D distribution on a 1-D set (default: an Archimedean spiral r = 0.1 theta, theta in [pi, 4 pi], uniform
in arc length; `--data circle` a unit circle, `--data ring8` 8 tight Gaussians on it). Only the observations
y = x + sigma eps (one fixed draw per point, functional.corrupt) are used for training.

Phase I (Algorithm 2): a small MLP F under EDM preconditioning, D(x; s) = c_skip x + c_out F(c_in x; c_noise),
on [B, 2, 1, 1] tensors, trained with functional.ambient_loss_precond, sigma_t from the log-normal truncated to
sigma_t > sigma (reference.edm.sigma_truncated_lognormal), x_t = functional.add_noise(y, sigma_t, sigma).
Teachers (Algorithm 3, sampling.ambient_sample): Ambient-Full and Ambient-Truncated.
Phase II (Algorithm 1, SiD): G(z) = D_G(sigma_init z; sigma_init) and the fake score f_psi both start from the
teacher; f_psi is trained with the same ambient loss on corrupted generator samples y~ = x_g + sigma eps, G with
functional.sid_generator_loss at Karras levels sigma_t (reference.edm.karras_sigma / karras_t).
Model selection: the generator EMA is scored every --eval-every steps by a proximal metric, computed from noisy
data only: the sliced W2 between its samples corrupted with sigma_hat and the observations (the toy analogue of
Proximal FID); the best-scoring EMA is the reported DSD.

Metrics against fresh clean points: sliced Wasserstein-2 (a distribution distance) and the mean distance of
the samples to the clean support (which rewards shrinkage onto the set, even a collapsed one). Every sampler is
a deterministic map of its latents, drawn low-discrepancy (Sobol), which takes the sliced W2's sampling floor from
~0.01 (iid, 8k samples: as large as the gaps between methods) to 1e-4. Fig. 6: the whole pipeline again with an
assumed sigma_hat in {0.5, 1, 1.5} x sigma (same observations, same seeds).

Where the defaults leave SiD's image settings (measured on seed 0, README "Toy 2-D"): generator-step levels
sigma_t >= sigma_hat (SiD's sigma_min = 0.002 puts 20-30 % of the steps where the ambient teacher never trained;
at sigma = 0.15 its student drifted away from the support after 2k steps); lr 1e-3 with a cosine decay for both
Phase II nets (1e-4 constant was 3x too slow here, 1e-3 constant unstable); alpha = 1.0 (1.2 was no different);
random Fourier features of the input (without them Ambient-Truncated's distance to the spiral doubles).

    python examples/toy_2d.py --seed 1 --outdir examples/results/toy_2d   # full size (7-8 min on 2 cores)
    python examples/toy_2d.py --small --sigma 0.15 --outdir /tmp/toy     # CI size (~40 s)
"""

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from dsd_fast import functional
from dsd_fast.reference import edm
from dsd_fast.sampling import ambient_sample, one_step

METHODS = ("Observation", "Ambient-Full", "Ambient-Truncated", "DSD")


def sub_seed(seed, *purpose):
    """A 63-bit seed from (seed, purpose): independent streams per use."""
    digest = hashlib.sha256(":".join(map(str, (seed, *purpose))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed, *purpose):
    return torch.Generator().manual_seed(sub_seed(seed, *purpose))


def as_image(x):
    """[B, 2] -> [B, 2, 1, 1], the ops' NCHW layout."""
    return x.reshape(-1, 2, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Data: from_uniform(u [n, dims]) -> [n, 2]; distance(x [n, 2]) -> [n], the distance to the clean support.

def sobol(n, dims, seed):
    """n points of a scrambled Sobol sequence in [0, 1)^dims (float64), kept off 0 and 1."""
    u = torch.quasirandom.SobolEngine(dims, scramble=True, seed=seed % 2**31).draw(n, dtype=torch.float64)
    return u.clamp(1e-12, 1 - 1e-12)


def normal(u):
    """N(0, 1) draws from uniforms u (inverse CDF), float32."""
    return torch.special.ndtri(u).float()


def latents(n, seed):
    """n low-discrepancy pairs (z [n, 2, 1, 1], eps [n, 2]) of N(0, I) draws from one 4-D Sobol sequence: the
    samplers' latents z and the proximal metric's noise eps, jointly low-discrepancy (two separate Sobol
    sequences would be correlated, sharing their first dimension's base sequence). A deterministic map of such
    latents (every sampler here) has a far smaller sampling error than with iid latents."""
    g = normal(sobol(n, 4, seed))
    return as_image(g[:, :2]), g[:, 2:]


class Data:
    def sample(self, n, gen):
        """n iid points."""
        return self.from_uniform(torch.rand(n, self.dims, generator=gen, dtype=torch.float64))

    def reference(self, n, seed):
        """n low-discrepancy points (Sobol): the clean reference of the metrics."""
        return self.from_uniform(sobol(n, self.dims, seed))


class Curve(Data):
    """Uniform (in arc length) on a polyline; distance = to the nearest segment."""

    dims = 1

    def __init__(self, pts):
        self.pts = pts.double()
        seg = (self.pts[1:] - self.pts[:-1]).norm(dim=1)
        self.s = torch.cat([seg.new_zeros(1), seg.cumsum(0)])

    def from_uniform(self, u):
        u = u[:, 0] * self.s[-1]
        i = torch.searchsorted(self.s, u).clamp(1, len(self.s) - 1)
        w = ((u - self.s[i - 1]) / (self.s[i] - self.s[i - 1]))[:, None]
        return (self.pts[i - 1] + w * (self.pts[i] - self.pts[i - 1])).float()

    def distance(self, x, chunk=2048):
        x, p = x.double(), self.pts
        out = []
        for xc in x.split(chunk):
            j = torch.cdist(xc, p).argmin(1)  # nearest vertex, then its two segments exactly
            best = torch.full((len(xc),), math.inf, dtype=x.dtype)
            for a, b in ((j - 1, j), (j, j + 1)):
                a, b = a.clamp(0, len(p) - 1), b.clamp(0, len(p) - 1)
                pa, d = p[a], p[b] - p[a]
                t = (((xc - pa) * d).sum(1) / (d * d).sum(1).clamp(min=1e-30)).clamp(0, 1)
                best = torch.minimum(best, (xc - pa - t[:, None] * d).norm(dim=1))
            out.append(best)
        return torch.cat(out).float()


def spiral(a=0.1, theta0=math.pi, theta1=4 * math.pi, n_grid=4001):
    """Archimedean spiral r = a theta: 1.5 turns, r from 0.31 to 1.26, arms 2 pi a = 0.63 apart (length 7.4).
    4001 vertices: the polyline is within 2e-6 of the curve."""
    th = torch.linspace(theta0, theta1, n_grid, dtype=torch.float64)
    return Curve(torch.stack([a * th * th.cos(), a * th * th.sin()], 1))


class Circle(Data):
    """Unit circle, uniform in angle; distance = | |x| - 1 |."""

    dims = 1

    def from_uniform(self, u):
        phi = 2 * math.pi * u[:, 0]
        return torch.stack([phi.cos(), phi.sin()], 1).float()

    def distance(self, x):
        return (x.norm(dim=1) - 1).abs()


class Ring8(Data):
    """8 Gaussians (std 0.01) on the unit circle; distance = to the nearest centre."""

    dims, std = 3, 0.01

    def __init__(self):
        phi = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        self.centres = torch.stack([phi.cos(), phi.sin()], 1)

    def from_uniform(self, u):
        k = (u[:, 0] * 8).long().clamp(max=7)
        return (self.centres[k] + self.std * torch.special.ndtri(u[:, 1:])).float()

    def distance(self, x):
        return torch.cdist(x, self.centres.float()).min(1).values


DATA = {"spiral": spiral, "circle": Circle, "ring8": Ring8}


# ----------------------------------------------------------------------------------------------------
# Metrics.

def projections(x, n_dirs=128):
    """Sorted projections [n_dirs, n] of 2-D points x [n, 2] on n_dirs evenly spaced directions (float64)."""
    phi = torch.arange(n_dirs, dtype=torch.float64) * (math.pi / n_dirs)
    p = torch.stack([phi.cos(), phi.sin()], 1) @ x.double().T
    return torch.from_numpy(np.sort(p.numpy(), axis=1))  # numpy's sort: 2x torch's on CPU (measured)


def _quantiles(v, m):
    """The m quantiles (k + 1/2) / m, k < m, of each row of sorted v [K, n], linearly interpolated."""
    n = v.shape[1]
    pos = ((torch.arange(m, dtype=v.dtype) + 0.5) * (n / m) - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = pos - lo
    return v[:, lo] * (1 - w) + v[:, hi] * w


def w2_sorted(pa, pb):
    """Sliced W2 from sorted projections pa [K, n], pb [K, m] (quantile-matched if n != m): sqrt of the mean
    over the K directions of the 1-D W2^2."""
    if pa.shape[1] != pb.shape[1]:
        m = max(pa.shape[1], pb.shape[1])
        pa, pb = _quantiles(pa, m), _quantiles(pb, m)
    return ((pa - pb) ** 2).mean().sqrt().item()


def sliced_w2(a, b):
    """Sliced Wasserstein-2 between 2-D samples a [n, 2] and b [m, 2]."""
    return w2_sorted(projections(a), projections(b))


def scores(x, clean, data):
    """The clean-data metrics of samples x [n, 2]; clean: the clean reference's projections()."""
    return dict(sw2=w2_sorted(projections(x), clean), dist=data.distance(x).mean().item())


# ----------------------------------------------------------------------------------------------------
# Networks.

class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (reference.edm.precond) on [B, 2, 1, 1]; F an MLP of
    (c_in x, random Fourier features of c_in x, c_noise, Fourier features of c_noise)."""

    def __init__(self, width=128, depth=3, n_fourier=0, fourier_scale=1.0, n_freq=4, seed=0):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq))
        B = torch.randn(2, n_fourier, generator=torch.Generator().manual_seed(seed)) * (2 * math.pi * fourier_scale)
        self.register_buffer("B", B)
        layers, d_in = [], 3 + 2 * n_freq + 2 * n_fourier
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SiLU()]
            d_in = width
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def F(self, x_in, c_noise):
        x, c = x_in.flatten(1), c_noise.reshape(-1, 1).to(x_in.dtype)
        xb, cf = x @ self.B, c * self.freqs
        h = torch.cat([x, xb.sin(), xb.cos(), c, cf.sin(), cf.cos()], 1)
        return as_image(self.net(h))

    def raw(self, x, sigma):
        """F(c_in x; c_noise), the raw output that functional.ambient_loss_precond takes."""
        return self.F(edm.c_in(sigma.reshape(-1, 1, 1, 1)) * x, edm.c_noise(sigma))

    def forward(self, x, sigma):
        return edm.precond(self.F, x, sigma)


class EMA:
    """Exponential moving average of a network's parameters; half-life in steps, ramped up as EDM's (at most
    `rampup` x the steps so far) so that the average does not lag far behind early on; 0: no averaging."""

    def __init__(self, net, halflife, rampup=0.25):
        self.net = copy.deepcopy(net).requires_grad_(False)
        self.halflife, self.rampup, self.k = halflife, rampup, 0

    @torch.no_grad()
    def update(self, net):
        self.k += 1
        h = min(self.halflife, self.rampup * self.k) if self.rampup > 0 else self.halflife
        beta = 0.5 ** (1 / h) if h > 0 else 0.0
        for p_ema, p in zip(self.net.parameters(), net.parameters(), strict=True):
            p_ema.lerp_(p, 1 - beta)


def cosine_lr(base, k, steps, warmup):
    """Linear warm-up over `warmup` steps, then a cosine decay to base / 20 at the last step."""
    if k < warmup:
        return base * (k + 1) / warmup
    f = (k - warmup) / max(steps - warmup, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f)))


def ambient_step_loss(net, y, sigma, gen, seed, offset):
    """Phase I / fake-score loss (Eq. 3) on a batch y [B, 2, 1, 1] of observations at noise level sigma."""
    sigma_t = edm.sigma_truncated_lognormal(torch.rand(len(y), generator=gen), sigma)
    x_t = functional.add_noise(y, sigma_t, sigma, seed=seed, offset=offset)
    return functional.ambient_loss_precond(net.raw(x_t, sigma_t), x_t, y, sigma_t, sigma).mean()


def pretrain(y, sigma, a, seed, log):
    """Phase I on observations y [N, 2, 1, 1] with assumed noise sigma; returns the EMA teacher."""
    torch.manual_seed(sub_seed(seed, "init"))
    net = Denoiser(a.width, a.depth, a.fourier, a.fourier_scale, seed=sub_seed(seed, "fourier") % 2**32)
    ema = EMA(net, a.ema_pretrain)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr, betas=(0.9, 0.99))
    gen, noise_seed = generator(seed, "phase1"), sub_seed(seed, "phase1-noise")
    for k in range(a.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(a.lr, k, a.pretrain_steps, a.pretrain_steps // 20)
        idx = torch.randint(len(y), (a.batch,), generator=gen)
        loss = ambient_step_loss(net, y[idx], sigma, gen, noise_seed, k * a.batch * 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        if log and (k + 1) % max(a.pretrain_steps // 4, 1) == 0:
            print(f"  phase I  step {k + 1:6d}  loss {loss.item():.4f}", flush=True)
    return ema.net.eval()


def teacher_samples(teacher, z, sigma, steps):
    """Ambient-Full and Ambient-Truncated (Algorithm 3) from the same latents z [n, 2, 1, 1]. Full runs EDM's
    Karras grid down to 0.002; Truncated runs the grid that ends at sigma_min = sigma, so it returns
    x0_hat = D(x_sigma; sigma) at the observation level (on the 0.002 grid it would stop at the first level above
    sigma, up to 1.14 sigma at 100 steps). The 1e-9 keeps the grid's last level from rounding below sigma, which
    would stop the sampler a step early."""
    full = ambient_sample(teacher, z, sigma, steps, truncate=False)
    trunc = ambient_sample(teacher, z, sigma, steps, truncate=True, sigma_min=sigma * (1 + 1e-9))
    return full.flatten(1), trunc.flatten(1)


def distill(teacher, sigma, a, seed, prox, clean_eval, log):
    """Phase II (Algorithm 1 with SiD). prox(x [n, 2], eps [n, 2]) -> proximal metric of generated samples x
    (noisy data only); clean_eval(x) -> clean metrics, logged in the history but never used for selection. Returns the
    best EMA generator by the proximal metric and the history."""
    G, fake = copy.deepcopy(teacher).train().requires_grad_(True), copy.deepcopy(teacher).train().requires_grad_(True)
    G_ema = EMA(G, a.ema_distill)
    adam = dict(betas=(0.0, 0.999), eps=1e-8)  # SiD: no first-moment momentum
    opt_G = torch.optim.Adam(G.parameters(), lr=a.g_lr, **adam)
    opt_f = torch.optim.Adam(fake.parameters(), lr=a.fake_lr, **adam)
    gen, noise_seed = generator(seed, "phase2"), sub_seed(seed, "phase2-noise")
    corrupt_seed = sub_seed(seed, "phase2-y")
    z_eval, eps_eval = latents(a.n_select, sub_seed(seed, "z-select"))
    B, history, best = a.batch, [], None

    def evaluate(k):
        nonlocal best
        with torch.no_grad():
            x = one_step(G_ema.net, z_eval, a.sigma_init).flatten(1)
        row = dict(step=k, prox=prox(x, eps_eval), **clean_eval(x[: a.samples]))
        history.append(row)
        if best is None or row["prox"] < best[0]["prox"]:
            best = (row, copy.deepcopy(G_ema.net))
        if log:
            print(f"  phase II step {k:6d}  proximal SW2 {row['prox']:.4f}  SW2 {row['sw2']:.4f}  "
                  f"dist {row['dist']:.4f}", flush=True)

    evaluate(0)
    for k in range(a.distill_steps):
        if a.distill_decay:
            for opt, base in ((opt_G, a.g_lr), (opt_f, a.fake_lr)):
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(base, k, a.distill_steps, 0)
        # Fake-score step: the Phase I loss on generated samples corrupted like the data (y~ = x_g + sigma eps,
        # one fresh corruption per generated sample).
        with torch.no_grad():
            x_g = one_step(G, torch.randn(B, 2, 1, 1, generator=gen), a.sigma_init)
        y_g = functional.corrupt(x_g, sigma, seed=corrupt_seed, index=torch.arange(k * B, (k + 1) * B))
        loss_f = ambient_step_loss(fake, y_g, sigma, gen, noise_seed, k * B * 2)
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        opt_f.step()
        # Generator step: SiD loss at Karras levels, gradients through x_g and both frozen nets' inputs.
        fake.requires_grad_(False)
        x_g = one_step(G, torch.randn(B, 2, 1, 1, generator=gen), a.sigma_init)
        sigma_min = sigma if a.gen_levels == "ambient" else 0.002
        sigma_t = edm.karras_sigma(edm.karras_t(torch.rand(B, generator=gen), a.t_max), sigma_min=sigma_min)
        x_t = x_g + sigma_t.reshape(-1, 1, 1, 1) * torch.randn(B, 2, 1, 1, generator=gen)  # forward process
        # weight None: SiD's per-sample w_g = 1 / mean|x_g - f_phi|; "level": 1 / c_out(sigma_t), the same scale
        # (|x_g - f_phi| ~ c_out for a sample on the data) but equal for every sample at a level.
        weight = 1 / edm.c_out(sigma_t) if a.g_weight == "level" else None
        loss_g = functional.sid_generator_loss(teacher(x_t, sigma_t), fake(x_t, sigma_t), x_g, a.alpha, weight).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_G.step()
        fake.requires_grad_(True)
        G_ema.update(G)
        if (k + 1) % a.eval_every == 0 or k + 1 == a.distill_steps:
            evaluate(k + 1)
    return best[1].eval(), best[0], history


# ----------------------------------------------------------------------------------------------------
# One pipeline: data at sigma, everything trained with an assumed sigma_hat.

def pipeline(data, sigma, sigma_hat, a, seed, log=True):
    t0 = time.time()
    x_train = data.sample(a.n_train, generator(seed, "x-train"))
    y = functional.corrupt(as_image(x_train), sigma, seed=sub_seed(seed, "corrupt"), index=torch.arange(a.n_train))
    # Fresh clean points, never seen in training, and the observations, as sorted projections (computed once).
    clean = projections(data.reference(a.n_ref, sub_seed(seed, "x-ref")))
    y_all = projections(y.flatten(1))

    def prox(x, eps):
        """Proximal SW2: samples x corrupted with sigma_hat eps vs all observations (needs no clean data)."""
        return w2_sorted(projections(x + sigma_hat * eps), y_all)

    def clean_eval(x):
        return scores(x, clean, data)

    if log:
        print(f"sigma {sigma}  sigma_hat {sigma_hat}", flush=True)
    teacher = pretrain(y, sigma_hat, a, seed, log)
    t1 = time.time()
    z, eps = latents(a.samples, sub_seed(seed, "z"))  # the same latents for both teachers and the student
    full, trunc = teacher_samples(teacher, z, sigma_hat, a.sample_steps)
    G, best, history = distill(teacher, sigma_hat, a, seed, prox, clean_eval, log)
    with torch.no_grad():
        dsd = one_step(G, z, a.sigma_init).flatten(1)
    # Observation: p_Y sampled like the rest (low-discrepancy clean points + sigma x low-discrepancy normals, and
    # the metric's noise, from one Sobol sequence), so that no row carries more sampling error than another; the
    # training set is an iid draw of the same.
    d = data.dims
    u = sobol(a.samples, d + 4, sub_seed(seed, "obs"))
    obs = data.from_uniform(u[:, :d]) + sigma * normal(u[:, d:d + 2])
    samples = dict(zip(METHODS, (obs, full, trunc, dsd), strict=True))
    rows = {m: dict(**clean_eval(x), prox=prox(x, normal(u[:, d + 2:]) if m == "Observation" else eps))
            for m, x in samples.items()}
    # What a perfect sampler scores (uses clean data: a yardstick, never used for selection).
    u = sobol(a.n_select, d + 2, sub_seed(seed, "oracle"))
    x_clean = data.from_uniform(u[:, :d])
    rows = {"Clean": dict(**clean_eval(x_clean[: a.samples]), prox=prox(x_clean, normal(u[:, d:]))), **rows}
    rows["DSD"].update(step=best["step"])
    t2 = time.time()
    return dict(sigma=sigma, sigma_hat=sigma_hat, rows=rows, history=history,
                seconds=dict(phase1=t1 - t0, phase2=t2 - t1)), samples


# ----------------------------------------------------------------------------------------------------
# Output: markdown table, PNG panels.

def floors(data, a, seed):
    """The clean metric's floor: SW2 of a clean sample of the evaluation size against the reference, drawn iid and
    low-discrepancy (as every row of the table)."""
    ref = projections(data.reference(a.n_ref, sub_seed(seed, "floor-ref")))
    return dict(iid=w2_sorted(projections(data.sample(a.samples, generator(seed, "floor-iid"))), ref),
                qmc=w2_sorted(projections(data.reference(a.samples, sub_seed(seed, "floor-qmc"))), ref))


def table(results, floor, a):
    lines = ["| σ | σ̂ | method | sliced W2 ↓ | mean dist. to support ↓ | proximal SW2 ↓ |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for m in ("Clean", *METHODS):
            v = r["rows"][m]
            name = f"DSD (step {v['step']})" if m == "DSD" else m
            lines.append(f"| {r['sigma']:g} | {r['sigma_hat']:g} | {name} | {v['sw2']:.4f} | {v['dist']:.4f} | "
                         f"{v['prox']:.4f} |")
    lines.append("")
    lines.append(f"{a.samples} samples per row, from the same low-discrepancy latents (Sobol); sliced W2 against "
                 f"{a.n_ref} low-discrepancy clean points. Floor (a clean sample of {a.samples} against them): "
                 f"{floor['qmc']:.4f} low-discrepancy, {floor['iid']:.4f} iid. Proximal SW2: samples + σ̂ ε against "
                 f"the {a.n_train} observations (no clean data needed); DSD is the generator EMA with the lowest "
                 f"proximal SW2 of {a.n_select} samples, checked every {a.eval_every} steps.")
    return "\n".join(lines) + "\n"


def panel(x, support, title, size=300, extent=1.5):
    """A scatter of points x [n, 2] (2 x 2 px, darker where they pile up) over the clean support (light grey)."""
    def pix(p):
        q = ((p.numpy() / extent + 1) / 2 * (size - 2)).round().astype(np.int64)
        keep = (q >= 0).all(1) & (q < size - 1).all(1)
        return q[keep, 0], size - 2 - q[keep, 1]

    img = np.full((size, size, 3), 255.0)
    u, v = pix(support)
    img[v, u] = (170, 170, 170)
    count = np.zeros((size, size))
    u, v = pix(x)
    for du in (0, 1):
        for dv in (0, 1):
            np.add.at(count, (v + dv, u + du), 1.0)
    shade = (1 - np.exp(-count / 1.5))[..., None]
    img = img * (1 - shade) + np.array([15.0, 45.0, 150.0]) * shade
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(im).text((6, 4), title, fill=(0, 0, 0))
    return im


def figure(panels, path):
    """Panels side by side, as an 8-bit palette PNG (a few tens of KB)."""
    w, h = panels[0].size
    out = Image.new("RGB", (w * len(panels) + 4 * (len(panels) - 1), h), (255, 255, 255))
    for i, p in enumerate(panels):
        out.paste(p, (i * (w + 4), 0))
    out.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, optimize=True)


# ----------------------------------------------------------------------------------------------------

SMALL = dict(n_train=8192, n_select=8192, samples=2048, n_ref=16384, pretrain_steps=2000,
             distill_steps=1500, eval_every=250, sample_steps=100, sweep=[], sigma_large=0)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI preset (< 60 s): " + json.dumps(SMALL))
    p.add_argument("--data", choices=sorted(DATA), default="spiral")
    p.add_argument("--sigma", type=float, default=0.05, help="observation noise (Fig. 4: 0.05)")
    p.add_argument("--sigma-large", type=float, default=0.15, help="a second, larger sigma (0: skip)")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.5, 1.5],
                   help="Fig. 6: sigma_hat / sigma factors besides 1 (none: skip)")
    p.add_argument("--n-train", type=int, default=65536, help="observations (the whole training set)")
    p.add_argument("--samples", type=int, default=8192, help="samples per method for the metrics")
    p.add_argument("--n-ref", type=int, default=65536, help="clean reference points of the metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default="examples/results/toy_2d")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--fourier", type=int, default=16, help="random Fourier features of the input (0: none)")
    p.add_argument("--fourier-scale", type=float, default=1.0, help="their frequency std, cycles per unit")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=2e-3, help="Phase I Adam lr (warm-up, cosine decay)")
    p.add_argument("--ema-pretrain", type=float, default=200, help="Phase I EMA half-life, steps")
    p.add_argument("--sample-steps", type=int, default=200, help="Algorithm 3 Karras steps")
    p.add_argument("--distill-steps", type=int, default=4000)
    p.add_argument("--g-lr", type=float, default=1e-3, help="generator Adam lr (beta1 = 0, as SiD)")
    p.add_argument("--fake-lr", type=float, default=1e-3, help="fake-score Adam lr (beta1 = 0, as SiD)")
    p.add_argument("--distill-decay", action=argparse.BooleanOptionalAction, default=True,
                   help="cosine decay of both Phase II lrs to 1/20 (SiD: constant)")
    p.add_argument("--alpha", type=float, default=1.0, help="SiD alpha")
    p.add_argument("--ema-distill", type=float, default=200, help="generator EMA half-life, steps (0: none)")
    p.add_argument("--g-weight", choices=("sid", "level"), default="sid",
                   help="generator-loss weight: SiD's 1 / mean|x_g - f_phi| per sample, or 1 / c_out(sigma_t)")
    p.add_argument("--sigma-init", type=float, default=2.5)
    p.add_argument("--t-max", type=float, default=800)
    p.add_argument("--gen-levels", choices=("ambient", "sid"), default="ambient",
                   help="generator-step levels: Karras sigma_min = sigma_hat (the levels the ambient teacher learnt), "
                        "or SiD's 0.002")
    p.add_argument("--n-select", type=int, default=65536, help="generator samples per proximal-metric checkpoint")
    p.add_argument("--eval-every", type=int, default=500, help="proximal-metric checkpoint interval, steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny MLPs)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    a = p.parse_args(argv)
    if a.small:
        defaults = {k: p.get_default(k) for k in SMALL}
        for k, v in SMALL.items():
            if getattr(a, k) == defaults[k]:
                setattr(a, k, v)
    if not a.sweep:
        a.sweep = []
    return a


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    data = DATA[a.data]()
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(a.sigma, a.sigma)] + [(a.sigma, f * a.sigma) for f in a.sweep]
    if a.sigma_large > 0:
        runs.append((a.sigma_large, a.sigma_large))
    results, figs = [], []
    for sigma, sigma_hat in runs:
        # One seed per sigma: the sigma_hat sweep trains on the same observations, from the same initialisation
        # and noise streams; only the assumed sigma_hat differs.
        res, samples = pipeline(data, sigma, sigma_hat, a, sub_seed(a.seed, "sigma", sigma))
        results.append(res)
        figs.append(samples)
    floor = floors(data, a, a.seed)
    support = data.sample(20000, generator(a.seed, "support"))
    n_show = min(a.samples, 2048)

    def four(i, path):
        sig = results[i]["sigma"]
        figure([panel(figs[i][m][:n_show], support, f"{m}  (sigma = {sig:g})") for m in METHODS], path)

    four(0, out / "toy_2d.png")
    if a.sigma_large > 0:
        four(len(runs) - 1, out / "toy_2d_large.png")
    if a.sweep:
        order = sorted(range(1 + len(a.sweep)), key=lambda i: runs[i][1])
        figure([panel(figs[i]["DSD"][:n_show], support, f"DSD, assumed sigma = {runs[i][1]:g} (data {a.sigma:g})")
                for i in order], out / "toy_2d_sweep.png")
    md = table(results, floor, a)
    (out / "toy_2d.md").write_text(md)
    summary = dict(args=vars(a), floor=floor, results=results, seconds=time.time() - t0)
    (out / "toy_2d.json").write_text(json.dumps(summary, indent=1))
    print(md)
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('toy_2d*')))} to {out} in {time.time() - t0:.0f} s")
    if a.json:
        print(json.dumps(dict(floor=floor, results=[{k: r[k] for k in ("sigma", "sigma_hat", "rows")}
                                                             for r in results])))
    return summary


if __name__ == "__main__":
    main()
