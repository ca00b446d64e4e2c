"""Phase I: ambient-Tweedie pretraining of the teacher D_theta on corrupted data only (DSD Algorithm 2, Eq. 3;
paper 004 Section 3 for blur + noise). One code path for every observation model, through the corruption
object: x_t = corruption.inject(y, sigma_t, eps), loss = corruption.ambient_loss(D(x_t, sigma_t), x_t, y, sigma_t).
"""

import math
import os

import torch

from ..networks import build_network
from ..reference.edm import sigma_clamp, sigma_truncated_lognormal
from ..sampling import ambient_sample, dct_ode_sample
from .ema import EMA, ema_beta
from .grids import save_grid
from .loop import autocast, derive_seed, normal, seed_dropout, set_precision, uniform


def sample_sigma_t(options, key, n, device):
    """Training levels sigma_t > sigma: the log-normal truncated by inverse CDF (default), or clamped (parity
    with the reference code, where clamped samples carry zero loss)."""
    u = uniform(key, n, device)
    if options.sigma_sampling == "clamp":
        # sigma_t = sigma exactly gives a zero-variance injection; inject needs sigma_t > sigma.
        return sigma_clamp(u, options.sigma).clamp(min=math.nextafter(options.sigma, math.inf))
    return sigma_truncated_lognormal(u, options.sigma)


def ambient_training_loss(D, corruption, y, sigma_t, eps, precision):
    """Per-sample ambient loss [B] of denoiser D on observations y at levels sigma_t with injection noise eps."""
    x_t = corruption.inject(y, sigma_t, eps)
    with autocast(precision, y.device):
        x0_hat = D(x_t, sigma_t)
    return corruption.ambient_loss(x0_hat.float(), x_t, y, sigma_t)


def lr_at(options, lr, nimg):
    """EDM's linear ramp-up, evaluated at the images seen after this step (EDM uses the count before it, which
    makes step 0 a no-op)."""
    return lr * min(nimg / max(options.lr_rampup_kimg * 1000, 1e-8), 1.0)


def accumulate(loss_fn, n, batch_gpu, *tensors):
    """Gradient accumulation over rounds of batch_gpu samples; each round backpropagates sum(loss) / n so the
    gradient is the batch mean whatever batch_gpu is. Returns the summed per-sample loss (detached)."""
    total = 0.0
    for parts in zip(*(t.split(batch_gpu) for t in tensors), strict=True):
        loss = loss_fn(*parts)
        loss.sum().div(n).backward()
        total = total + loss.detach().sum()
    return total


class Pretrain:
    name = "pretrain"

    def __init__(self, options, config, data, device, *, rank=0, world_size=1):
        self.options, self.config, self.data, self.device = options, config, data, device
        self.rank, self.world_size = rank, world_size
        self.corruption = options.make_corruption()
        set_precision(options.precision)
        torch.manual_seed(derive_seed(options.seed, "init"))
        self.net = build_network(config).to(device).train()
        self.ema = EMA(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=options.lr, betas=(0.9, 0.999), eps=1e-8)
        self.D = torch.compile(self.net) if options.compile else self.net
        self.completed = 0
        self.nonfinite = 0

    def state_dict(self):
        return dict(phase=self.name, step=self.completed, nonfinite=self.nonfinite, net=self.net.state_dict(),
                    ema=self.ema.state_dict(), opt=self.opt.state_dict(), options=self.options.to_dict(),
                    net_config=vars(self.config).copy())

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.completed, self.nonfinite = state["step"], state["nonfinite"]

    def step(self, k):
        """One optimiser step k: (finite, metrics). A non-finite loss skips the update (counted)."""
        o, dev = self.options, self.device
        n = o.batch // self.world_size
        seed_dropout(o.seed, k, self.rank)
        y, _ = self.data.batch(k, n, self.rank, self.world_size)
        sigma_t = sample_sigma_t(o, derive_seed(o.seed, "sigma_t", k, self.rank), n, dev)
        eps = normal(derive_seed(o.seed, "eps", k, self.rank), y.shape, dev)
        self.opt.zero_grad(set_to_none=True)
        loss_fn = lambda y_r, s_r, e_r: ambient_training_loss(self.D, self.corruption, y_r, s_r, e_r, o.precision)
        loss = (accumulate(loss_fn, n, o.batch_gpu, y, sigma_t, eps) / n).item()
        lr = lr_at(o, o.lr, (k + 1) * o.batch)
        finite = math.isfinite(loss)
        if finite:
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.step()
            self.ema.update(self.net, ema_beta((k + 1) * o.batch, o.batch, o.ema_halflife_kimg, o.ema_rampup_ratio))
        else:
            self.nonfinite += 1
        self.opt.zero_grad(set_to_none=True)
        self.completed = k + 1
        return finite, dict(loss=loss, lr=lr)

    def snapshot(self, run):
        """Noisy data grid (once) and teacher samples from the EMA (Ambient-Truncated for noise, the DCT
        process's PF-ODE for blur + noise), from latents fixed for the whole run."""
        save_data_grid(self, run)
        z = grid_latents(self.options, self.config, self.device)
        if z is None:
            return
        if self.options.corruption == "noise":
            x = ambient_sample(self.ema.net, z, self.options.sigma, self.options.sample_steps, truncate=True)
        else:
            x = dct_ode_sample(self.ema.net, z, self.corruption, self.options.sample_steps)
        save_grid(x, run.file(f"{self.name}-{self.completed * self.options.batch / 1000:010.3f}kimg-teacher.png"))


def grid_latents(options, config, device):
    if options.grid_images == 0:
        return None
    R, C = config.img_resolution, config.in_channels
    return normal(derive_seed(options.seed, "grid"), (options.grid_images, C, R, R), device)


def save_data_grid(phase, run):
    path = run.file("data.png")
    if phase.data is not None and phase.options.grid_images and not os.path.exists(path):
        y, _ = phase.data.batch(0, min(phase.options.grid_images, len(phase.data)))
        save_grid(y, path)
