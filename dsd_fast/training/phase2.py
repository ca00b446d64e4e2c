"""Phase II: denoising score distillation (DSD Algorithm 1, SiD Eq. 10) into a one-step generator
G_theta(z) = D_theta(sigma_init z; sigma_init), with teacher f_phi (frozen) and fake score f_psi both started
from the Phase I EMA.

Dropout (SiD's handling): the teacher f_phi is always in eval mode. The fake score f_psi is in train mode for
its own ambient update (dropout regularises it as in Phase I) and in eval mode, with its parameters frozen,
inside the generator step, so f_phi and f_psi are evaluated alike there. G is in train mode for both steps
(it is trained), its EMA is evaluated in eval mode for grids and checkpoints.

Generator-step levels follow SiD's Karras/t_max schedule (DESIGN.md) with sigma_min = options.g_sigma_min: SiD's
0.002 by default, which includes sigma_t below the observation sigma that the ambient teacher never saw during
Phase I; g_sigma_min="sigma" keeps every generator level >= sigma.
"""

import copy
import math
import types

import torch

from .. import functional
from ..distributed import Parallel
from ..networks import build_network
from ..reference.edm import karras_sigma, karras_t
from ..rundir import network_snapshot
from ..sampling import one_step
from .ema import EMA, ema_beta
from .loop import (
    autocast,
    compiled,
    compute_dtype,
    derive_seed,
    normal,
    seed_dropout,
    set_precision,
    steps_for,
    uniform,
)
from .phase1 import (
    accumulate,
    ambient_training_loss,
    grid_latents,
    network_loss,
    sample_sigma_t,
    save_data_grid,
)
from .update import NonFinite, adam, guarded_step, make_fused


def lr_decay(options, k):
    """The Phase II lr factor at step k (options.g_lr_schedule): 1, or the cosine from 1 at k = 0 towards 0 at
    the last of the distill_kimg steps."""
    if options.g_lr_schedule == "constant":
        return 1.0
    total = steps_for(options.distill_kimg, options.batch)
    return 0.5 * (1 + math.cos(math.pi * min(k, total) / max(total, 1)))


def check_teacher(state, config, source):
    """state: a Phase I checkpoint, full state or network snapshot (its EMA is the teacher). Raises ValueError
    unless it holds a network of exactly config's architecture."""
    if not isinstance(state, dict) or state.get("phase") != "pretrain" or "ema" not in state:
        raise ValueError(f"teacher: {source} is not a Phase I (pretrain) checkpoint or network snapshot")
    saved = state.get("net_config") or {}
    if saved != vars(config):
        diff = sorted(k for k in vars(config) if saved.get(k) != vars(config)[k])
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, expected {vars(config)[k]!r}" for k in diff)
        raise ValueError(f"teacher: {source} holds a different network architecture ({detail})")


class Distill:
    name = "distill"

    def __init__(self, options, config, data, device, teacher_state, *, par=None):
        """teacher_state: the teacher's weights (a state dict of build_network(config)). par: this process's
        Parallel (None: a single process on device). G and f_psi are wrapped (DDP) or sharded (FSDP); the frozen
        teacher is replicated as it is on every rank."""
        self.options, self.config, self.data, self.device = options, config, data, device
        self.par = par = Parallel(device, precision=options.precision) if par is None else par
        self.n, self.batch_gpu = par.batch_split(options.batch, options.batch_gpu)
        self.corruption = options.make_corruption()
        set_precision(options.precision)
        self.dtype = compute_dtype(options.precision)
        self.f_phi = build_network(config).to(device, self.dtype)  # the teacher
        try:
            self.f_phi.load_state_dict(teacher_state)
        except RuntimeError as e:
            raise ValueError(f"teacher: weights do not fit the {config} network: {e}") from e
        self.f_phi.eval().requires_grad_(False)
        self.f_psi = copy.deepcopy(self.f_phi).train().requires_grad_(True)  # the fake score
        self.G = copy.deepcopy(self.f_phi).train().requires_grad_(True)
        self.G_ema = EMA(self.G, par.average)
        # What trains f_psi and G: DDP-wrapped or sharded, their gradients averaged over ranks.
        self.synced = types.SimpleNamespace(f_psi=par.wrap(self.f_psi), G=par.wrap(self.G))
        betas = (0.0, 0.999)  # SiD: no first-moment momentum
        self.f_psi_opt = adam(self.f_psi.parameters(), options.fake_lr, betas)
        self.G_opt = adam(self.G.parameters(), options.g_lr, betas)
        # --compile: each step's loss end to end: the fake score's network + loss, and the whole generator loss
        # (G, the injection at the step's levels, both score nets, the SiD / DMD / SDS loss) with their backward.
        self.f_psi_loss = compiled(options, lambda x_t, y, s: network_loss(self.synced.f_psi, self.corruption, x_t, y,
                                                                        s, options.precision))
        self.generator_loss_fn = compiled(options, self.generator_loss)
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
                    teacher=self.f_phi.state_dict(), fake=par.state_dict(self.f_psi), G=par.state_dict(self.G),
                    G_ema=par.state_dict(self.G_ema.net), fake_opt=par.optim_state_dict(self.f_psi, self.f_psi_opt),
                    G_opt=par.optim_state_dict(self.G, self.G_opt), options=self.options.to_dict(),
                    net_config=vars(self.config).copy())

    def network_state(self):
        """The network snapshot: the student EMA (what generate, fid and eval use); a collective under FSDP."""
        return network_snapshot(self, "G_ema", self.par.state_dict(self.G_ema.net))

    def load_state_dict(self, state):
        par = self.par
        for net, name in ((self.f_psi, "fake"), (self.G, "G"), (self.G_ema.net, "G_ema")):  # the file's keys
            par.load_state_dict(net, state[name])
        par.load_optim_state_dict(self.f_psi, self.f_psi_opt, state["fake_opt"])
        par.load_optim_state_dict(self.G, self.G_opt, state["G_opt"])
        make_fused(self.f_psi_opt)
        make_fused(self.G_opt)
        self.completed, self.bad = state["step"], NonFinite(self.device, state["nonfinite"])

    def generate(self, z):
        with autocast(self.options.precision, z.device):
            return one_step(self.synced.G, z, self.options.sigma_init).to(z.dtype)

    def f_psi_step(self, k, n, shape):
        """Update f_psi with the Phase I loss on generated images corrupted like the data: y~ = A x_g + sigma eps.
        k: the fake update's index (step * fake_steps + j), which keys its draws. Returns the loss (the global
        batch mean)."""
        o, dev, par = self.options, self.device, self.par
        key = lambda purpose: derive_seed(o.seed, purpose, k)
        start = par.rank * n  # this rank's first sample in the step's global batch
        with torch.no_grad():
            z = normal(key("z_fake"), shape, dev, start, self.dtype)
            x_g = torch.cat([self.generate(z_r) for z_r in z.split(self.batch_gpu)])
        # The fused corrupt op keyed by global sample position: the stream normal(key("eps_y"), ...) would draw.
        y = self.corruption.corrupt(x_g, key("eps_y"), torch.arange(start, start + n, device=dev))
        sigma_t = sample_sigma_t(o, key("sigma_fake"), n, dev, start, self.dtype)
        seed, chw = key("eps_fake"), math.prod(shape[1:])
        self.f_psi_opt.zero_grad(set_to_none=True)
        loss_fn = lambda y_r, s_r, j: ambient_training_loss(self.synced.f_psi, self.corruption, y_r, s_r, seed,
                                                            (start + j) * chw, o.precision, self.f_psi_loss)
        total = accumulate(loss_fn, n, self.batch_gpu, y, sigma_t, no_sync=lambda: par.no_sync(self.synced.f_psi),
                           offsets=True)
        return par.sum(total) / (n * par.world_size)

    def generator_loss(self, z, sigma_t, eps):
        """Per-sample generator loss [B] (sid, dmd or sds); gradients reach G through x_g and through the
        inputs x_t of the two frozen score nets."""
        x_g = self.generate(z)
        x_t = self.corruption.forward(x_g, sigma_t, eps)
        with autocast(self.options.precision, z.device):
            f_phi = self.f_phi(x_t, sigma_t).to(x_t.dtype)
            # f_psi is frozen here and called outside DDP, whose reducer would wait for its gradients; its own
            # update (f_psi_step) calls the synced wrapper.
            f_psi = self.f_psi(x_t, sigma_t).to(x_t.dtype)
        if self.options.loss == "sid":
            return functional.sid_generator_loss(f_phi, f_psi, x_g, self.options.alpha)
        if self.options.loss == "dmd":
            return functional.dmd_loss(f_phi, f_psi, x_g)
        return functional.sds_loss(f_phi, x_t, eps, x_g, sigma_t)

    def generator_step(self, k, n, shape):
        """The generator update's gradients; returns the loss (the global batch mean)."""
        o, dev, par = self.options, self.device, self.par
        key = lambda purpose: derive_seed(o.seed, purpose, k)
        start = par.rank * n
        z = normal(key("z_gen"), shape, dev, start, self.dtype)
        t = karras_t(uniform(key("t_gen"), n, dev, start).to(self.dtype), o.t_max)
        sigma_t = karras_sigma(t, sigma_min=o.generator_sigma_min())
        eps = normal(key("eps_gen"), shape, dev, start, self.dtype)
        self.G_opt.zero_grad(set_to_none=True)
        self.f_psi.eval().requires_grad_(False)
        try:
            total = accumulate(self.generator_loss_fn, n, self.batch_gpu, z, sigma_t, eps,
                               no_sync=lambda: par.no_sync(self.synced.G))
            return par.sum(total) / (n * par.world_size)
        finally:
            self.f_psi.train().requires_grad_(True)

    def step(self, k):
        """fake_steps fake-score updates then one generator update: (finite, metrics), device tensors (no host
        sync). A non-finite loss skips that update (counted once per step)."""
        o, n = self.options, self.n
        shape = (n, self.config.in_channels, self.config.img_resolution, self.config.img_resolution)
        nimg = (k + 1) * o.batch
        # SiD: no learning-rate ramp-up (both nets start from the trained teacher)
        decay = lr_decay(o, k)
        g_lr, fake_lr = o.g_lr * decay, o.fake_lr * decay
        seed_dropout(o.seed, k, self.par.rank)
        fake_ok, fake_losses = True, []
        for j in range(o.fake_steps):
            fake_losses.append(self.f_psi_step(k * o.fake_steps + j, n, shape))
            fake_ok = fake_ok & guarded_step(self.f_psi_opt, fake_losses[-1], fake_lr)
        fake_loss = sum(fake_losses) / len(fake_losses)
        g_loss = self.generator_step(k, n, shape)
        g_ok = guarded_step(self.G_opt, g_loss, g_lr)
        self.G_ema.update(self.G, ema_beta(nimg, o.batch, o.g_ema_halflife_kimg, o.g_ema_rampup_ratio), g_ok)
        finite = fake_ok & g_ok
        self.bad.add(finite, k)
        self.completed = k + 1
        return finite, dict(loss=g_loss, fake_loss=fake_loss, lr=g_lr, fake_lr=fake_lr)

    def snapshot(self, run):
        save_data_grid(self, run)
        z = grid_latents(self.options, self.config, self.device)
        if z is not None:
            with torch.no_grad():
                x = one_step(self.G_ema.net, z, self.options.sigma_init)
            run.save_grid(x, f"{self.name}-{self.completed * self.options.batch / 1000:010.3f}kimg-student.png")

