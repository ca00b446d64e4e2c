"""Fused per-sample losses as torch.library custom ops: ambient Tweedie (plain and with the EDM
preconditioning folded in), SiD generator loss, DMD and SDS surrogates. Each returns [B] = SUM over C, H, W.

Each op runs the Triton kernels of dsd_fast.kernels.losses for float32/bfloat16/float16 inputs on CUDA
(or under TRITON_INTERPRET=1 when DSD_FAST_BACKEND=triton), the reference math otherwise: the forward of
dsd_fast.reference.losses and closed-form gradients (no nested autograd). Forward is one pass over the
inputs; backward is its own custom op, one more pass that recomputes the residual and writes only the
gradients asked for. Gradients w.r.t. per-sample scalars (sigma_t, weight) come from per-sample sums of
that same pass. The distillation ops also return the weight they used (w_g = 1 / mean|x_g - f_phi|, not
differentiated, as SiD), which backward needs.
"""

import functools

import torch
from torch import Tensor

from dsd_fast.ops import backend
from dsd_fast.ops.backend import cdiv, elementwise_block, next_pow2, out_buffer
from dsd_fast.ops.noise import SUPPORTED
from dsd_fast.reference import edm as _edm
from dsd_fast.reference import losses as _losses

__all__ = ["SUPPORTED", "ambient_loss", "ambient_loss_precond", "sid_generator_loss", "dmd_loss", "sds_loss"]

SID, DMD, SDS = 0, 1, 2  # MODE of the distillation kernels
# GPU launch constants. Sweep on an H100 (triton do_bench, 512x3x64x64 float32; host-bound and noisy:
# the same layout timed 66-155 us, so only coarse choices are supported): forward reductions with
# BLOCK 1024 / 4 warps were among the fastest and most stable (66-69 us = 1.1 TB/s incl. launch); the
# backward kernels reached 1.6 (ambient) and 2.2 TB/s (SiD, 6 tensors) with 1024 / 4 warps. Re-tune with
# bench/ (CUDA-synchronised, L2-rotated) before trusting finer differences.
PROGRAMS_PER_SM = 2  # small batches are split into chunks until the grid has this many programs per SM;
                     # B >= 2 x SMs (e.g. 512 on an H100) keeps one chunk per sample: a single launch
GPU_REDUCE_BLOCK = 1024  # elements per loop step of the forward reductions
FWD_WARPS = 4  # forward reductions
BWD_WARPS = 4  # one-block-per-program backward kernels (BLOCK from backend.elementwise_block)


# ----------------------------------------------------------------------------------------------------
# Launch helpers.

@functools.cache
def _kernels():
    from dsd_fast.kernels import losses  # imported late: triton is optional, the reference path needs none

    return losses


@functools.cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def reduce_layout(B, chw, device):
    """(BLOCK, CHUNK, NC) of the forward reductions: NC chunks per sample of CHUNK elements (a multiple of
    BLOCK)."""
    if backend.interpreting(device):
        block = min(next_pow2(chw), 16384)
        return block, cdiv(chw, block) * block, 1  # the interpreter pays per program: one per sample
    block = min(next_pow2(chw), GPU_REDUCE_BLOCK)
    nblocks = cdiv(chw, block)
    # Small batches are split into chunks so that every SM has work.
    chunks = min(nblocks, cdiv(PROGRAMS_PER_SM * _sm_count(device), B))
    per = cdiv(nblocks, chunks)
    return block, per * block, cdiv(nblocks, per)


def _rows(x):
    """x as contiguous [B, CHW] (the interpreter silently misreads strided tensors)."""
    B = x.shape[0]
    return x.contiguous().view(B, x.numel() // B)


def _col(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _acc(x):
    """Dtype of the reference-path arithmetic: float32 for 16-bit inputs, else the input's."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fill(grads, refs):
    """Gradient outputs of a backward op: an empty tensor (of the ref's dtype) for each one not asked for."""
    return tuple(ref.new_empty(0) if g is None else g for g, ref in zip(grads, refs, strict=True))


def _fill_fake(needs, refs):
    return tuple(ref.new_empty(ref.shape if n else (0,)) for n, ref in zip(needs, refs, strict=True))


def _finalize(partial, loss, w, weight, sigma_t, B, NC, chw, distill, mode=SID):
    BLOCK_C = next_pow2(NC)
    BLOCK_B = min(next_pow2(B), max(1, 4096 // BLOCK_C))
    _kernels().finalize_kernel[(cdiv(B, BLOCK_B),)](
        partial, weight, sigma_t, loss, w, B, NC, chw, DISTILL=distill, MODE=mode,
        HAS_WEIGHT=weight is not None, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C)


# ----------------------------------------------------------------------------------------------------
# Ambient Tweedie loss: w ||a u + b x_t - y||^2 with u = x0_hat (plain) or F_x (precond, DESIGN §1).

def ambient_coeffs(sigma_t, sigma, precond, weight=None):
    """((a, b, w), (da, db, dw)): per-sample coefficients of r = a u + b x_t - y and loss = w sum r^2, with
    their derivatives w.r.t. sigma_t, in sigma_t's dtype. rho = sigma^2 / sigma_t^2."""
    s, d = sigma_t, _edm.SIGMA_DATA
    s2, d2 = s * s, d * d
    rho = sigma**2 / s2
    drho = -2 * rho / s
    if precond:
        c_skip, c_out = _edm.c_skip(s), _edm.c_out(s)
        dc_skip = -2 * s * d2 / (s2 + d2) ** 2
        dc_out = d**3 / (s2 + d2) ** 1.5
        a, b = (1 - rho) * c_out, (1 - rho) * c_skip + rho
        da = (1 - rho) * dc_out - drho * c_out
        db = (1 - rho) * dc_skip + drho * (1 - c_skip)
    else:
        a, b, da, db = 1 - rho, rho, -drho, drho
    if weight is None:
        w, dw = _edm.edm_weight(s), -2 / (s * s2)
    else:
        w, dw = weight.to(s.dtype), torch.zeros_like(s)
    return (a, b, w), (da, db, dw)


def _ambient_fwd_ref(u, x_t, y, sigma_t, sigma, weight, precond):
    if precond:
        s = _col(sigma_t.to(u.dtype), u)
        u = _edm.c_skip(s) * x_t + _edm.c_out(s) * u
    return _losses.ambient_loss(u, x_t, y, sigma_t, sigma, weight)


def ambient_fwd_triton(u, x_t, y, sigma_t, sigma, weight, precond):
    B = u.shape[0]
    u2, x2, y2 = _rows(u), _rows(x_t), _rows(y)
    chw = u2.shape[1]
    BLOCK, CHUNK, NC = reduce_layout(B, chw, u.device)
    loss = out_buffer(u, (B,))
    partial = loss if NC == 1 else u.new_empty(B, NC, dtype=torch.float32)
    weight = None if weight is None else weight.contiguous()
    sigma_t = sigma_t.contiguous()
    _kernels().ambient_loss_fwd_kernel[(B, NC)](
        u2, x2, y2, sigma_t, weight, partial, sigma, chw, NC, CHUNK=CHUNK,
        PRECOND=precond, HAS_WEIGHT=weight is not None, BLOCK=BLOCK, num_warps=FWD_WARPS)
    if NC > 1:
        _finalize(partial, loss, None, None, None, B, NC, chw, distill=False)
    return loss.to(u.dtype)


def _ambient_forward(u, x_t, y, sigma_t, sigma, weight, precond):
    if backend.pick("ambient_loss", u, SUPPORTED) != "triton" or u.numel() == 0:
        return _ambient_fwd_ref(u, x_t, y, sigma_t, sigma, weight, precond)
    return ambient_fwd_triton(u, x_t, y, sigma_t, sigma, weight, precond)


@torch.library.custom_op("dsd_fast::ambient_loss", mutates_args=())
def _ambient_loss(x0_hat: Tensor, x_t: Tensor, y: Tensor, sigma_t: Tensor, sigma: float,
                  weight: Tensor | None) -> Tensor:
    return _ambient_forward(x0_hat, x_t, y, sigma_t, sigma, weight, precond=False)


@torch.library.custom_op("dsd_fast::ambient_loss_precond", mutates_args=())
def _ambient_loss_precond(F_x: Tensor, x_t: Tensor, y: Tensor, sigma_t: Tensor, sigma: float,
                          weight: Tensor | None) -> Tensor:
    return _ambient_forward(F_x, x_t, y, sigma_t, sigma, weight, precond=True)


def _ambient_fake(u, x_t, y, sigma_t, sigma, weight):
    return u.new_empty(u.shape[:1])


_ambient_loss.register_fake(_ambient_fake)
_ambient_loss_precond.register_fake(_ambient_fake)


def _ambient_scalar_grads(grad, sums, sigma_t, sigma, weight, precond, needs):
    """Gradients w.r.t. sigma_t and weight from the per-sample sums (r^2, r u, r x_t):
    dL/dsigma_t = w' S + 2 w (a' P + b' Q), dL/dweight = S, each times grad."""
    S, P, Q = sums
    (_, _, w), (da, db, dw) = ambient_coeffs(sigma_t.to(S.dtype), sigma, precond, weight)
    g = grad.to(S.dtype)
    g_s = (g * (dw * S + 2 * w * (da * P + db * Q))).to(sigma_t.dtype) if needs[3] else None
    g_w = (g * S).to(weight.dtype) if needs[4] else None
    return g_s, g_w


def _ambient_bwd_ref(grad, u, x_t, y, sigma_t, sigma, weight, precond, needs):
    acc = _acc(u)
    (a, b, w), _ = ambient_coeffs(sigma_t.to(acc), sigma, precond, weight)
    uu, vv = u.to(acc), x_t.to(acc)
    r = _col(a, u) * uu + _col(b, u) * vv - y.to(acc)
    g = _col(2 * w * grad.to(acc), u)
    g_u = (g * _col(a, u) * r).to(u.dtype) if needs[0] else None
    g_x_t = (g * _col(b, u) * r).to(x_t.dtype) if needs[1] else None
    g_y = (-g * r).to(y.dtype) if needs[2] else None
    sums = tuple((r * v).flatten(1).sum(1) for v in (r, uu, vv)) if needs[3] or needs[4] else None
    return g_u, g_x_t, g_y, sums


def ambient_bwd_triton(grad, u, x_t, y, sigma_t, sigma, weight, precond, needs):
    B = u.shape[0]
    u2, x2, y2 = _rows(u), _rows(x_t), _rows(y)
    chw = u2.shape[1]
    BLOCK = elementwise_block(chw, u.device)
    NC = cdiv(chw, BLOCK)
    reduce = needs[3] or needs[4]
    g_u, g_x_t, g_y = (out_buffer(t) if n else None for t, n in zip((u2, x2, y2), needs[:3], strict=True))
    partial = u.new_empty(3, B, NC, dtype=torch.float32) if reduce else None
    _kernels().ambient_loss_bwd_kernel[(B, NC)](
        grad.contiguous(), u2, x2, y2, sigma_t.contiguous(), None if weight is None else weight.contiguous(),
        g_u, g_x_t, g_y, partial, sigma, B, chw, NC,
        PRECOND=precond, HAS_WEIGHT=weight is not None, NEED_U=needs[0], NEED_X_T=needs[1], NEED_Y=needs[2],
        REDUCE=reduce, BLOCK=BLOCK, num_warps=BWD_WARPS)
    grads = tuple(None if g is None else g.view(u.shape).to(t.dtype) for g, t in zip((g_u, g_x_t, g_y), (u, x_t, y),
                                                                                   strict=True))
    return (*grads, tuple(partial.sum(2)) if reduce else None)


def _ambient_grad_refs(u, x_t, y, sigma_t, weight):
    """The tensor each gradient output of ambient_loss_backward is shaped and typed like."""
    return u, x_t, y, sigma_t, sigma_t if weight is None else weight


@torch.library.custom_op("dsd_fast::ambient_loss_backward", mutates_args=())
def _ambient_loss_backward(grad: Tensor, u: Tensor, x_t: Tensor, y: Tensor, sigma_t: Tensor, sigma: float,
                           weight: Tensor | None, precond: bool, needs: list[bool]
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (u, x_t, y, sigma_t, weight) where `needs` says, else empty tensors."""
    if backend.pick("ambient_loss", u, SUPPORTED) != "triton" or u.numel() == 0:
        *grads, sums = _ambient_bwd_ref(grad, u, x_t, y, sigma_t, sigma, weight, precond, needs)
    else:
        *grads, sums = ambient_bwd_triton(grad, u, x_t, y, sigma_t, sigma, weight, precond, needs)
    scalar = (None, None) if sums is None else _ambient_scalar_grads(grad, sums, sigma_t, sigma, weight,
                                                                     precond, needs)
    return _fill((*grads, *scalar), _ambient_grad_refs(u, x_t, y, sigma_t, weight))


@_ambient_loss_backward.register_fake
def _(grad, u, x_t, y, sigma_t, sigma, weight, precond, needs):
    return _fill_fake(needs, _ambient_grad_refs(u, x_t, y, sigma_t, weight))


def _ambient_setup(precond):
    def setup_context(ctx, inputs, output):
        u, x_t, y, sigma_t, ctx.sigma, weight = inputs
        ctx.precond = precond
        ctx.save_for_backward(u, x_t, y, sigma_t, weight)
    return setup_context


def _ambient_grads(ctx, grad):
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[5]]
    outs = _ambient_loss_backward(grad, *ctx.saved_tensors[:4], ctx.sigma, ctx.saved_tensors[4], ctx.precond,
                                  needs)
    g_u, g_x_t, g_y, g_s, g_w = (g if k else None for g, k in zip(outs, needs, strict=True))
    return g_u, g_x_t, g_y, g_s, None, g_w


_ambient_loss.register_autograd(_ambient_grads, setup_context=_ambient_setup(False))
_ambient_loss_precond.register_autograd(_ambient_grads, setup_context=_ambient_setup(True))


def ambient_loss(x0_hat, x_t, y, sigma_t, sigma, weight=None):
    """Per-sample w(sigma_t) ||y_hat - y||^2 (DSD Eq. 3), y_hat = (1 - rho) x0_hat + rho x_t -> [B]."""
    return _ambient_loss(x0_hat, x_t, y, sigma_t, float(sigma), weight)


def ambient_loss_precond(F_x, x_t, y, sigma_t, sigma, weight=None):
    """ambient_loss of x0_hat = c_skip(sigma_t) x_t + c_out(sigma_t) F_x (EDM preconditioning, F_x the raw
    network output), with the coefficients computed in-kernel: x0_hat is never materialised."""
    return _ambient_loss_precond(F_x, x_t, y, sigma_t, float(sigma), weight)


# ----------------------------------------------------------------------------------------------------
# Distillation losses: loss = w S per sample, w = weight or scale / max(mean|x_g - f_phi|, 1e-5).

def _distill_weight_ref(f_phi, x_g, sigma_t, weight, mode):
    if weight is not None:
        return weight.to(_acc(f_phi), copy=True)
    w = _losses.sid_weight(x_g, f_phi)
    if mode == SDS:
        w = sigma_t.to(w.dtype) * w
    return w.to(_acc(f_phi))


def distill_fwd_triton(f_phi, p1, x_g, eps, sigma_t, weight, alpha, mode):
    """(loss, w) of the SID / DMD / SDS mode; p1 is f_psi (SID, DMD) or x_t (SDS)."""
    B = f_phi.shape[0]
    rows = [_rows(t) if t is not None else None for t in (f_phi, p1, x_g, eps)]
    chw = rows[0].shape[1]
    BLOCK, CHUNK, NC = reduce_layout(B, chw, f_phi.device)
    loss = out_buffer(f_phi, (B,))
    w = f_phi.new_empty(B, dtype=torch.float32)
    partial = None if NC == 1 else f_phi.new_empty(2, B, NC, dtype=torch.float32)
    weight = None if weight is None else weight.contiguous()
    sigma_t = None if sigma_t is None else sigma_t.contiguous()
    _kernels().distill_loss_fwd_kernel[(B, NC)](
        *rows, sigma_t, weight, loss, w, partial, alpha, B, chw, NC, CHUNK=CHUNK,
        MODE=mode, HAS_WEIGHT=weight is not None, FINAL=NC == 1, BLOCK=BLOCK, num_warps=FWD_WARPS)
    if NC > 1:
        _finalize(partial, loss, w, weight, sigma_t, B, NC, chw, distill=True, mode=mode)
    return loss.to(f_phi.dtype), w


def _distill_fake(f_phi, *args):
    B = f_phi.shape[:1]
    return f_phi.new_empty(B), f_phi.new_empty(B, dtype=_acc(f_phi))


def _distill_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # w_g is a constant of the loss (SiD: no grad through it)


# SiD generator loss (Eq. 10): S = sum (1 - alpha) d^2 + d (f_psi - x_g), d = f_phi - f_psi.

@torch.library.custom_op("dsd_fast::sid_generator_loss", mutates_args=())
def _sid_generator_loss(f_phi: Tensor, f_psi: Tensor, x_g: Tensor, alpha: float,
                        weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(loss [B], w [B]): the per-sample loss and the weight it used."""
    if backend.pick("sid_generator_loss", f_phi, SUPPORTED) != "triton" or f_phi.numel() == 0:
        w = _distill_weight_ref(f_phi, x_g, None, weight, SID)
        return _losses.sid_generator_loss(f_phi, f_psi, x_g, alpha, w.to(f_phi.dtype)), w
    return distill_fwd_triton(f_phi, f_psi, x_g, None, None, weight, alpha, SID)


_sid_generator_loss.register_fake(_distill_fake)


def _sid_bwd_ref(grad, f_phi, f_psi, x_g, w, alpha, needs):
    acc = _acc(f_phi)
    k = _col(grad.to(acc) * w.to(acc), f_phi)
    f_psi_ = f_psi.to(acc)
    d = f_phi.to(acc) - f_psi_
    e = f_psi_ - x_g.to(acc)
    g_phi = (k * (2 * (1 - alpha) * d + e)).to(f_phi.dtype) if needs[0] else None
    g_psi = (k * ((2 * alpha - 1) * d - e)).to(f_psi.dtype) if needs[1] else None
    g_x_g = (-k * d).to(x_g.dtype) if needs[2] else None
    S = ((1 - alpha) * d * d + d * e).flatten(1).sum(1) if needs[3] else None
    return g_phi, g_psi, g_x_g, S


def sid_bwd_triton(grad, f_phi, f_psi, x_g, w, alpha, needs):
    B = f_phi.shape[0]
    rows = [_rows(t) for t in (f_phi, f_psi, x_g)]
    chw = rows[0].shape[1]
    BLOCK = elementwise_block(chw, f_phi.device)
    NC = cdiv(chw, BLOCK)
    g = [out_buffer(t) if n else None for t, n in zip(rows, needs[:3], strict=True)]
    partial = f_phi.new_empty(B, NC, dtype=torch.float32) if needs[3] else None
    _kernels().sid_loss_bwd_kernel[(B, NC)](
        grad.contiguous(), w.contiguous(), *rows, *g, partial, alpha, chw, NC,
        NEED_PHI=needs[0], NEED_PSI=needs[1], NEED_X_G=needs[2], REDUCE=needs[3], BLOCK=BLOCK,
        num_warps=BWD_WARPS)
    grads = tuple(None if t is None else t.view(f_phi.shape).to(f_phi.dtype) for t in g)
    return (*grads, partial.sum(1) if needs[3] else None)


@torch.library.custom_op("dsd_fast::sid_generator_loss_backward", mutates_args=())
def _sid_generator_loss_backward(grad: Tensor, f_phi: Tensor, f_psi: Tensor, x_g: Tensor, w: Tensor,
                                 alpha: float, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (f_phi, f_psi, x_g, weight) where `needs` says, else empty tensors; w is the weight
    the forward used (so the weight's gradient is grad * S)."""
    if backend.pick("sid_generator_loss", f_phi, SUPPORTED) != "triton" or f_phi.numel() == 0:
        *grads, S = _sid_bwd_ref(grad, f_phi, f_psi, x_g, w, alpha, needs)
    else:
        *grads, S = sid_bwd_triton(grad, f_phi, f_psi, x_g, w, alpha, needs)
    return _fill((*grads, None if S is None else grad.to(S.dtype) * S), (f_phi, f_psi, x_g, w))


@_sid_generator_loss_backward.register_fake
def _(grad, f_phi, f_psi, x_g, w, alpha, needs):
    return _fill_fake(needs, (f_phi, f_psi, x_g, w))


def _sid_setup(ctx, inputs, output):
    f_phi, f_psi, x_g, ctx.alpha, weight = inputs
    _distill_setup(ctx, inputs, output)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.save_for_backward(f_phi, f_psi, x_g, output[1])


def _sid_grads(ctx, grad, _grad_w):
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[4]]
    outs = _sid_generator_loss_backward(grad, *ctx.saved_tensors, ctx.alpha, needs)
    g_phi, g_psi, g_x_g, g_w = (g if k else None for g, k in zip(outs, needs, strict=True))
    return g_phi, g_psi, g_x_g, None, None if g_w is None else g_w.to(ctx.weight_dtype)


_sid_generator_loss.register_autograd(_sid_grads, setup_context=_sid_setup)


def sid_generator_loss(f_phi, f_psi, x_g, alpha=1.2, weight=None):
    """Per-sample SiD generator loss (Eq. 10) [B]; weight None means w_g = 1 / max(mean|x_g - f_phi|, 1e-5)."""
    return _sid_generator_loss(f_phi, f_psi, x_g, float(alpha), weight)[0]


# DMD (Eq. 9) and SDS (Eq. 8) surrogates: loss = sum g x_g with g held fixed, so only x_g gets a gradient.

def distill_grad_triton(grad, f_phi, p1, eps, sigma_t, w, mode):
    B = f_phi.shape[0]
    rows = [_rows(t) if t is not None else None for t in (f_phi, p1, eps)]
    chw = rows[0].shape[1]
    BLOCK = elementwise_block(chw, f_phi.device)
    g_x_g = out_buffer(rows[0])
    _kernels().distill_grad_kernel[(B, cdiv(chw, BLOCK))](
        grad.contiguous(), w.contiguous(), *rows, None if sigma_t is None else sigma_t.contiguous(), g_x_g, chw,
        MODE=mode, BLOCK=BLOCK, num_warps=BWD_WARPS)
    return g_x_g.view(f_phi.shape).to(f_phi.dtype)


@torch.library.custom_op("dsd_fast::dmd_loss", mutates_args=())
def _dmd_loss(f_phi: Tensor, f_psi: Tensor, x_g: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(loss [B], w [B])."""
    if backend.pick("dmd_loss", f_phi, SUPPORTED) != "triton" or f_phi.numel() == 0:
        w = _distill_weight_ref(f_phi, x_g, None, weight, DMD)
        return _losses.dmd_loss(f_phi, f_psi, x_g, w.to(f_phi.dtype)), w
    return distill_fwd_triton(f_phi, f_psi, x_g, None, None, weight, 0.0, DMD)


_dmd_loss.register_fake(_distill_fake)


@torch.library.custom_op("dsd_fast::dmd_loss_backward", mutates_args=())
def _dmd_loss_backward(grad: Tensor, f_phi: Tensor, f_psi: Tensor, w: Tensor) -> Tensor:
    """dL/dx_g = grad w (f_psi - f_phi)."""
    if backend.pick("dmd_loss", f_phi, SUPPORTED) != "triton" or f_phi.numel() == 0:
        acc = _acc(f_phi)
        return (_col(grad.to(acc) * w.to(acc), f_phi) * (f_psi.to(acc) - f_phi.to(acc))).to(f_phi.dtype)
    return distill_grad_triton(grad, f_phi, f_psi, None, None, w, DMD)


@_dmd_loss_backward.register_fake
def _(grad, f_phi, f_psi, w):
    return f_phi.new_empty(f_phi.shape)


def _dmd_setup(ctx, inputs, output):
    f_phi, f_psi, _, _ = inputs
    _distill_setup(ctx, inputs, output)
    ctx.save_for_backward(f_phi, f_psi, output[1])


def _dmd_grads(ctx, grad, _grad_w):
    g_x_g = _dmd_loss_backward(grad, *ctx.saved_tensors) if ctx.needs_input_grad[2] else None
    return None, None, g_x_g, None


_dmd_loss.register_autograd(_dmd_grads, setup_context=_dmd_setup)


def dmd_loss(f_phi, f_psi, x_g, weight=None):
    """DMD surrogate [B]: sum g x_g with g = w (f_psi - f_phi) held fixed; w = 1 / max(mean|x_g - f_phi|, 1e-5)
    by default. Only x_g receives a gradient."""
    return _dmd_loss(f_phi, f_psi, x_g, weight)[0]


@torch.library.custom_op("dsd_fast::sds_loss", mutates_args=())
def _sds_loss(f_phi: Tensor, x_t: Tensor, eps: Tensor, x_g: Tensor, sigma_t: Tensor,
              weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """(loss [B], w [B])."""
    if backend.pick("sds_loss", f_phi, SUPPORTED) != "triton" or f_phi.numel() == 0:
        w = _distill_weight_ref(f_phi, x_g, sigma_t, weight, SDS)
        return _losses.sds_loss(f_phi, x_t, eps, x_g, sigma_t, w.to(f_phi.dtype)), w
    return distill_fwd_triton(f_phi, x_t, x_g, eps, sigma_t, weight, 0.0, SDS)


_sds_loss.register_fake(_distill_fake)


@torch.library.custom_op("dsd_fast::sds_loss_backward", mutates_args=())
def _sds_loss_backward(grad: Tensor, f_phi: Tensor, x_t: Tensor, eps: Tensor, sigma_t: Tensor,
                       w: Tensor) -> Tensor:
    """dL/dx_g = grad w ((x_t - f_phi) / sigma_t - eps)."""
    if backend.pick("sds_loss", f_phi, SUPPORTED) != "triton" or f_phi.numel() == 0:
        acc = _acc(f_phi)
        eps_phi = (x_t.to(acc) - f_phi.to(acc)) / _col(sigma_t.to(acc), f_phi)
        return (_col(grad.to(acc) * w.to(acc), f_phi) * (eps_phi - eps.to(acc))).to(f_phi.dtype)
    return distill_grad_triton(grad, f_phi, x_t, eps, sigma_t, w, SDS)


@_sds_loss_backward.register_fake
def _(grad, f_phi, x_t, eps, sigma_t, w):
    return f_phi.new_empty(f_phi.shape)


def _sds_setup(ctx, inputs, output):
    f_phi, x_t, eps, _, sigma_t, _ = inputs
    _distill_setup(ctx, inputs, output)
    ctx.save_for_backward(f_phi, x_t, eps, sigma_t, output[1])


def _sds_grads(ctx, grad, _grad_w):
    g_x_g = _sds_loss_backward(grad, *ctx.saved_tensors) if ctx.needs_input_grad[3] else None
    return None, None, None, g_x_g, None, None


_sds_loss.register_autograd(_sds_grads, setup_context=_sds_setup)


def sds_loss(f_phi, x_t, eps, x_g, sigma_t, weight=None):
    """SDS surrogate [B]: sum g x_g with g = w ((x_t - f_phi) / sigma_t - eps) held fixed; w = sigma_t /
    max(mean|x_g - f_phi|, 1e-5) by default. Only x_g receives a gradient."""
    return _sds_loss(f_phi, x_t, eps, x_g, sigma_t, weight)[0]
