"""Phase I: ambient-Tweedie pretraining of the teacher D_theta on corrupted data only (DSD Algorithm 2, Eq. 3;
paper 004 Section 3 for blur + noise). One code path for every observation model, through the corruption
object and the public fused ops under it: x_t = corruption.inject_seeded(y, sigma_t, seed, offset) (add_noise /
dct_inject: the noise drawn in-kernel from the Philox stream of the step, at the global sample position),
loss = corruption.precond_ambient_loss(F(x_t), x_t, y, sigma_t) on the raw network output (ambient_loss_precond
for noise: EDM's preconditioning fused into the loss).
"""

import contextlib
import math
import os

import torch

from ..distributed import Parallel
from ..networks import build_network
from ..reference.edm import above, sigma_clamp, sigma_truncated_lognormal
from ..rundir import network_snapshot
from ..sampling import ambient_sample, dct_ode_sample
from .ema import EMA, ema_beta
from .loop import autocast, compiled, compute_dtype, derive_seed, normal, seed_dropout, set_precision, uniform
from .update import NonFinite, adam, guarded_step, make_fused


def sample_sigma_t(options, key, n, device, start=0, dtype=torch.float32):
    """Training levels sigma_t > sigma of samples start..start+n-1: the log-normal truncated by inverse CDF
    (default), or clamped (parity with the reference code, where clamped samples carry zero loss)."""
    u = uniform(key, n, device, start).to(dtype)
    if options.sigma_sampling == "clamp":
        # sigma_t = sigma exactly gives a zero-variance injection; inject needs sigma_t > sigma. The floor is the
        # next float above sigma in the sample's own dtype: float64's nextafter would round back to sigma in fp32.
        return above(sigma_clamp(u, options.sigma), options.sigma)
    return sigma_truncated_lognormal(u, options.sigma)


def ambient_training_loss(D, corruption, y, sigma_t, seed, offset, precision, net_loss=None):
    """Per-sample ambient loss [B] of denoiser D (an EDMPrecond, or what wraps one) on observations y [B] at levels
    sigma_t, the injection noise the Philox stream `seed` from flat element `offset` on. net_loss: network_loss
    (possibly compiled) to use; the injection stays outside it (one fused op, and its seed and offset change every
    step: a compiled graph would specialise on them)."""
    x_t = corruption.inject_seeded(y, sigma_t, seed, offset)
    if net_loss is None:
        return network_loss(D, corruption, x_t, y, sigma_t, precision)
    return net_loss(x_t, y, sigma_t)


def network_loss(D, corruption, x_t, y, sigma_t, precision):
    """The part of the ambient loss after the injection: raw network output, then the fused preconditioned loss."""
    with autocast(precision, y.device):
        F_x = D(x_t, sigma_t, raw=True)
    return corruption.precond_ambient_loss(F_x.to(y.dtype), x_t, y, sigma_t)


def lr_at(options, lr, nimg):
    """EDM's linear ramp-up, evaluated at the images seen after this step (EDM uses the count before it, which
    makes step 0 a no-op)."""
    return lr * min(nimg / max(options.lr_rampup_kimg * 1000, 1e-8), 1.0)


def accumulate(loss_fn, n, batch_gpu, *tensors, no_sync=contextlib.nullcontext, offsets=False):
    """Gradient accumulation over rounds of batch_gpu samples; each round backpropagates sum(loss) / n so the
    gradient is the batch mean whatever batch_gpu is (DDP/FSDP then average over ranks). no_sync(): context of
    the non-final rounds (no gradient communication). offsets: also pass loss_fn the round's first sample
    position in the rank's share (a Python int: a noise offset read without a device sync). Returns the summed
    per-sample loss (detached, on the device)."""
    total = 0.0
    rounds = list(zip(*(t.split(batch_gpu) for t in tensors), strict=True))
    for i, parts in enumerate(rounds):
        with no_sync() if i < len(rounds) - 1 else contextlib.nullcontext():
            loss = loss_fn(*parts, i * batch_gpu) if offsets else loss_fn(*parts)
            loss.sum().div(n).backward()
        total = total + loss.detach().sum()
    return total


class Pretrain:
    name = "pretrain"

    def __init__(self, options, config, data, device, *, par=None):
        """par: this process's Parallel (None: a single process on device)."""
        self.options, self.config, self.data, self.device = options, config, data, device
        self.par = Parallel(device, precision=options.precision) if par is None else par
        self.n, self.batch_gpu = self.par.batch_split(options.batch, options.batch_gpu)
        self.corruption = options.make_corruption()
        set_precision(options.precision)
        torch.manual_seed(derive_seed(options.seed, "init"))  # the same initial weights on every rank
        self.dtype = compute_dtype(options.precision)
        self.net = build_network(config).to(device, self.dtype).train()
        self.ema = EMA(self.net, self.par.average)
        self.trained = self.par.wrap(self.net)
        self.opt = adam(self.net.parameters(), options.lr, (0.9, 0.999))
        # --compile: network, preconditioning and fused loss (and their backward) as one compiled graph.
        self.net_loss = compiled(options, lambda x_t, y, s: network_loss(self.trained, self.corruption, x_t, y, s,
                                                                      options.precision))
        self.completed = 0
        self.bad = NonFinite(device)

    @property
    def nonfinite(self):
        """Non-finite steps so far (a sync: read at checkpoints)."""
        return int(self.bad.total)

    def state_dict(self):
        """The full training state (last.pt): unsharded tensors and plain containers; a collective under FSDP,
        complete on rank 0."""
        par = self.par
        return dict(contents="state", phase=self.name, step=self.completed, nonfinite=self.nonfinite,
                    net=par.state_dict(self.net),
                    ema=par.state_dict(self.ema.net), opt=par.optim_state_dict(self.net, self.opt),
                    options=self.options.to_dict(), net_config=vars(self.config).copy())

    def network_state(self):
        """The network snapshot: the teacher EMA (what generate, fid and --teacher use); a collective under FSDP."""
        return network_snapshot(self, "ema", self.par.state_dict(self.ema.net))

    def load_state_dict(self, state):
        self.par.load_state_dict(self.net, state["net"])
        self.par.load_state_dict(self.ema.net, state["ema"])
        self.par.load_optim_state_dict(self.net, self.opt, state["opt"])
        make_fused(self.opt)
        self.completed, self.bad = state["step"], NonFinite(self.device, state["nonfinite"])

    def teacher_state(self):
        """The EMA's full state dict on every rank (Phase II's teacher)."""
        return self.par.state_dict(self.ema.net, everywhere=True)

    def step(self, k):
        """One optimiser step k: (finite, metrics), device tensors (no host sync). A non-finite loss skips the
        update (counted)."""
        o, dev, par, n = self.options, self.device, self.par, self.n
        seed_dropout(o.seed, k, par.rank)
        y, _ = self.data.batch(k, n, par.rank, par.world_size)
        y = y.to(self.dtype)
        start = par.rank * n  # this rank's first sample in the step's global batch
        sigma_t = sample_sigma_t(o, derive_seed(o.seed, "sigma_t", k), n, dev, start, self.dtype)
        seed, chw = derive_seed(o.seed, "eps", k), math.prod(y.shape[1:])
        self.opt.zero_grad(set_to_none=True)
        loss_fn = lambda y_r, s_r, j: ambient_training_loss(self.trained, self.corruption, y_r, s_r, seed,
                                                            (start + j) * chw, o.precision, self.net_loss)
        total = accumulate(loss_fn, n, self.batch_gpu, y, sigma_t, no_sync=lambda: par.no_sync(self.trained),
                           offsets=True)
        loss = par.sum(total) / o.batch  # stays on the device: the loop reads it when it logs
        lr = lr_at(o, o.lr, (k + 1) * o.batch)
        finite = guarded_step(self.opt, loss, lr)
        self.ema.update(self.net, ema_beta((k + 1) * o.batch, o.batch, o.ema_halflife_kimg, o.ema_rampup_ratio),
                        finite)
        self.bad.add(finite, k)
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
        run.save_grid(x, f"{self.name}-{self.completed * self.options.batch / 1000:010.3f}kimg-teacher.png")


def grid_latents(options, config, device):
    if options.grid_images == 0:
        return None
    R, C = config.img_resolution, config.in_channels
    return normal(derive_seed(options.seed, "grid"), (options.grid_images, C, R, R), device,
                  dtype=compute_dtype(options.precision))


def save_data_grid(phase, run):
    if phase.data is not None and phase.options.grid_images and not os.path.exists(run.file("data.png")):
        y, _ = phase.data.batch(0, min(phase.options.grid_images, len(phase.data)))
        run.save_grid(y, "data.png")
