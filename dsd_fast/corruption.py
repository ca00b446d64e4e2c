"""Observation models y = A x + sigma eps and their diffusion processes at EDM noise level s = sigma_t.

In DCT coordinates Y = D X every process here is diagonal (paper 004, Sections 2.2 and 3):
Y_s = Lambda_s Y_0 + Psi_s eta, with Psi_s = s and the observation at level n (s = sigma): Lambda_n, Psi_n.
Ambient training (Phase I) needs only observations: X_s is injected from y, and the network's x0_hat is
mapped to a prediction of y (generalised Tweedie, paper 004 Section 3), with r = Lambda_s/Lambda_n and
rho = Psi_n^2/Psi_s^2:
    inject:               Y_s   = r Y_n + sqrt(Psi_s^2 - r^2 Psi_n^2) eta
    adjusted_prediction:  Y_n^  = rho r Y_s + Lambda_n (1 - rho r^2) D x0_hat.
"""

import torch

from dsd_fast import checks, functional
from dsd_fast.reference.dct import blur_eigenvalues, dct_adjusted_prediction, dct_blur, dct_inject
from dsd_fast.reference.edm import added_variance, blur_excess, c_out, c_skip, edm_weight
from dsd_fast.reference.losses import ambient_prediction

SCHEDULES = ("fixed", "linear")


def _check_images(name, x, *others):
    """x must be a floating NCHW tensor; others (name, tensor) must match its shape, dtype and device."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4):
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating-point NCHW tensor, got {got}")
    for other_name, other in others:
        if not isinstance(other, torch.Tensor) or other.shape != x.shape:
            got = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise ValueError(f"{other_name}: expected shape {tuple(x.shape)} (like {name}), got {got}")
        if other.dtype != x.dtype or other.device != x.device:
            raise ValueError(f"{other_name}: expected {x.dtype} on {x.device} (like {name}), "
                             f"got {other.dtype} on {other.device}")


def _check_s(s, x):
    """Per-sample noise level s: a float or a [B] tensor -> [B] tensor in x's dtype."""
    if not isinstance(s, torch.Tensor):
        s = torch.full((x.shape[0],), checks.number("s", s), dtype=x.dtype, device=x.device)
    if s.shape != (x.shape[0],):
        raise ValueError(f"s: expected a per-sample tensor of shape [{x.shape[0]}], got {tuple(s.shape)}")
    return s.to(x.dtype)


def _col(s):
    """[B] -> [B,1,1,1] (a 0-d s broadcasts over the batch)."""
    if not isinstance(s, torch.Tensor) or s.ndim > 1:
        raise ValueError(f"s: expected a per-sample tensor of shape [B], got {s!r}")
    return s.reshape(-1, 1, 1, 1)


class Corruption:
    """What every observation model shares: sigma, the seeded corruption, Psi_s = s, the ambient loss.
    Subclasses define A, Lambda, forward, inject and adjusted_prediction."""

    def __init__(self, sigma):
        self.sigma = checks.number("sigma", sigma)

    def corrupt(self, x, seed, index):
        """y = A x + sigma eps with eps[i] a pure function of (seed, index[i]) (float32 Philox, then cast)."""
        _check_images("x", x)
        if not isinstance(index, torch.Tensor) or index.shape != (x.shape[0],):
            raise ValueError(f"index: expected an integer tensor of shape [{x.shape[0]}], got {index!r}")
        # The public op: the fused Philox kernel on GPU, the reference elsewhere.
        return functional.corrupt(self.A(x), self.sigma, seed=seed, index=index)

    def Psi(self, s):
        return _col(s)

    def Sigma(self, s, H, W):
        """Sigma_s = Psi_s/Lambda_s, the noise std of Y_s/Lambda_s; must be non-decreasing in s."""
        return self.Psi(s) / self.Lambda(s, H, W)

    def _check_inject(self, s):
        # Data-dependent: where it is free (checks.reads_values), never as a host sync in a training step.
        if checks.reads_values(s) and bool((s <= self.sigma).any()):
            raise ValueError(f"s: expected every s > sigma = {self.sigma} (noise can only be added to an "
                             f"observation), got min {s.min().item()}")

    def ambient_loss(self, x0_hat, x_t, y, s, weight=None):
        """Per-sample weight(s) * sum_CHW (y_hat - y)^2 -> [B]; weight defaults to edm_weight(s)."""
        _check_images("x0_hat", x0_hat, ("x_t", x_t), ("y", y))
        s = _check_s(s, x_t)
        weight = edm_weight(s) if weight is None else weight
        return weight * (self.adjusted_prediction(x0_hat, x_t, s) - y).square().sum(dim=(1, 2, 3))

    def precond_ambient_loss(self, F_x, x_t, y, s):
        """ambient_loss of the EDM-preconditioned x0_hat = c_skip(s) x_t + c_out(s) F_x, F_x the raw network
        output (what the trainer computes: the noise case fuses the preconditioning into the loss op)."""
        _check_images("F_x", F_x, ("x_t", x_t), ("y", y))
        s = _check_s(s, x_t)
        return self.ambient_loss(_col(c_skip(s)) * x_t + _col(c_out(s)) * F_x, x_t, y, s)


class NoiseCorruption(Corruption):
    """y = x + sigma eps (the DSD paper). Process X_s = X_0 + s eps: Lambda = 1, Psi = s. No DCTs needed."""

    def __repr__(self):
        return f"NoiseCorruption(sigma={self.sigma})"

    def A(self, x):
        _check_images("x", x)
        return x

    def Lambda(self, s, H, W):
        return torch.ones_like(_col(s))

    def forward(self, x0, s, eps):
        """X_s = x0 + s eps."""
        _check_images("x0", x0, ("eps", eps))
        return x0 + _col(_check_s(s, x0)) * eps

    def inject(self, y, s, eps):
        """X_s = y + sqrt(s^2 - sigma^2) eps, s > sigma."""
        _check_images("y", y, ("eps", eps))
        s = _check_s(s, y)
        self._check_inject(s)
        return y + _col(added_variance(s, 1.0, self.sigma).sqrt()) * eps

    def inject_seeded(self, y, s, seed, offset=0):
        """inject with eps the Philox stream (seed, offset + flat element index), drawn inside the fused op."""
        _check_images("y", y)
        return functional.add_noise(y, _check_s(s, y), self.sigma, seed=seed, offset=offset)

    def ambient_loss(self, x0_hat, x_t, y, s, weight=None):
        _check_images("x0_hat", x0_hat, ("x_t", x_t), ("y", y))
        return functional.ambient_loss(x0_hat, x_t, y, _check_s(s, x_t), self.sigma, weight)

    def precond_ambient_loss(self, F_x, x_t, y, s):
        _check_images("F_x", F_x, ("x_t", x_t), ("y", y))
        return functional.ambient_loss_precond(F_x, x_t, y, _check_s(s, x_t), self.sigma)

    def adjusted_prediction(self, x0_hat, x_t, s):
        """y_hat = (1 - sigma^2/s^2) x0_hat + (sigma^2/s^2) x_t = E[y | x_t] when x0_hat = E[x0 | x_t]."""
        _check_images("x0_hat", x0_hat, ("x_t", x_t))
        return ambient_prediction(x0_hat, x_t, _check_s(s, x_t), self.sigma)


class BlurNoiseCorruption(Corruption):
    """y = blur_b(x) + sigma eps, blur_b the reflective-border Gaussian blur of std b = blur pixels.

    Process at level s: Lambda_s = exp(-lambda b(s)^2/2), Psi_s = s, with the blur schedule b(s)
      "fixed":  b(s) = blur min(s/sigma, 1)  (constant blur, growing noise once s > sigma),
      "linear": b(s) = blur s/sigma          (blur keeps growing with the noise).
    Both pass through the observation (b(sigma) = blur) and keep Sigma_s = s exp(lambda b(s)^2/2)
    non-decreasing in s for every frequency (Proposition 2.3). With sigma = 0 "fixed" blurs fully at
    every s > 0; "linear" needs sigma > 0.
    """

    def __init__(self, blur, sigma, schedule="fixed"):
        super().__init__(sigma)
        self.blur = checks.number("blur", blur)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
        if schedule == "linear" and self.sigma == 0:
            raise ValueError("sigma: the 'linear' blur schedule b(s) = blur s/sigma needs sigma > 0")
        self.schedule = schedule

    def __repr__(self):
        return f"BlurNoiseCorruption(blur={self.blur}, sigma={self.sigma}, schedule={self.schedule!r})"

    def A(self, x):
        _check_images("x", x)
        return dct_blur(x, self.blur)

    @property
    def kinks(self):
        """Levels where b(s) is not smooth (samplers put them on their grid): s = sigma for "fixed"."""
        return (self.sigma,) if self.schedule == "fixed" and self.sigma > 0 else ()

    def b(self, s):
        """Blur std b(s) in pixels, per sample [B] -> [B,1,1,1]."""
        s = _col(s)
        if self.schedule == "linear":
            return s * (self.blur / self.sigma)
        if self.sigma == 0:
            return torch.full_like(s, self.blur)
        return (s / self.sigma).clamp(max=1) * self.blur

    def Lambda(self, s, H, W):
        return torch.exp(-0.5 * blur_eigenvalues(H, W, s.dtype, s.device) * self.b(s) ** 2)

    def Sigma(self, s, H, W):
        # s exp(+lambda b^2/2) directly: Psi/Lambda would be 0/0 once Lambda underflows.
        return self.Psi(s) * torch.exp(0.5 * blur_eigenvalues(H, W, s.dtype, s.device) * self.b(s) ** 2)

    def _r(self, s, H, W):
        """r = Lambda_s/Lambda_n as exp(-lambda (b(s)^2 - blur^2)/2), never dividing by Lambda_n; r <= 1 by
        construction (reference.edm.blur_excess), so rounding cannot make the injected variance negative."""
        return torch.exp(-0.5 * blur_eigenvalues(H, W, s.dtype, s.device) * blur_excess(self.b(s), self.blur))

    def forward(self, x0, s, eps):
        """X_s = D^T (Lambda_s D x0 + s D eps) = A_s x0 + s eps (Psi_s = s is a scalar, D orthonormal)."""
        _check_images("x0", x0, ("eps", eps))
        s = _check_s(s, x0)
        return dct_blur(x0, self.b(s).reshape(-1)) + _col(s) * eps

    def inject(self, y, s, eps):
        """X_s = D^T (r D y + sqrt(s^2 - r^2 sigma^2) D eps), s > sigma."""
        _check_images("y", y, ("eps", eps))
        s = _check_s(s, y)
        self._check_inject(s)
        return dct_inject(y, eps, s, self.b(s).reshape(-1), self.sigma, self.blur)

    def inject_seeded(self, y, s, seed, offset=0):
        """inject with eps the Philox stream (seed, offset + flat element index), drawn inside the fused op."""
        _check_images("y", y)
        s = _check_s(s, y)
        return functional.dct_inject(y, s, self.b(s).reshape(-1), self.sigma, self.blur, seed=seed, offset=offset)

    def ambient_loss(self, x0_hat, x_t, y, s, weight=None):
        # The public op: adjusted prediction, residual and d/d x0_hat in one pass, in DCT space, where fused.
        _check_images("x0_hat", x0_hat, ("x_t", x_t), ("y", y))
        s = _check_s(s, x_t)
        return functional.dct_ambient_loss(x0_hat, x_t, y, s, self.b(s).reshape(-1), self.sigma, self.blur, weight)

    def adjusted_prediction(self, x0_hat, x_t, s):
        """y_hat = D^T (rho r D x_t + Lambda_n (1 - rho r^2) D x0_hat), rho = sigma^2/s^2."""
        _check_images("x0_hat", x0_hat, ("x_t", x_t))
        s = _check_s(s, x_t)
        return dct_adjusted_prediction(x0_hat, x_t, s, self.b(s).reshape(-1), self.sigma, self.blur)
