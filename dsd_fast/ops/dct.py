"""DCT ops as torch.library custom ops: dct2, idct2, dct_blur, and the two fused pieces of the general DCT
ambient loss (paper 004, Section 3; DESIGN §1): dct_inject and dct_ambient_loss.

Each op runs the Triton kernels of dsd_fast.kernels.dct (one image per program, tl.dot against zero-padded
DCT matrices) on CUDA for float32/bfloat16/float16 images with H, W <= 128, and the plain-torch reference
math otherwise (backend.choose; DSD_FAST_BACKEND=triton forces the kernels and raises where they cannot
run), or where a compiled kernel does not fit the device's shared memory (see _launch).
The blur + noise process is parametrised by per-sample s (= Psi_s) and b_s (its blur std, so
Lambda_s = exp(-lambda b_s^2/2)) plus the observation's sigma and blur: r = Lambda_s/Lambda_n,
q = sqrt(s^2 - r^2 sigma^2), rho = sigma^2/s^2, a = Lambda_n (1 - rho r^2) = Lambda_n q^2/s^2.
Gradients that training never takes (w.r.t. s, b_s, weight, x_t, y) use the explicit formulas in DCT space.
"""

import functools

import torch
from torch import Tensor

from dsd_fast.ops import backend
from dsd_fast.ops.backend import next_pow2, out_buffer
from dsd_fast.reference import dct as _ref
from dsd_fast.reference import philox as _philox

MAX_SIZE = 128  # one whole [H, W] tile per program (and its DCT matrices) must sit in registers
SUPPORTED = ("triton", "reference")


# ----------------------------------------------------------------------------------------------------
# Backend choice (backend.pick, with the tile limit) and launch helpers.

def can_fuse(op, x):
    """True when the Triton kernel of `op` would run on x (chosen backend and eligible input); callers
    with their own unfused math (dsd_fast.corruption) use it instead of the op's strict forced-backend rule."""
    return backend.pick(op, x, SUPPORTED, max_size=MAX_SIZE, strict=False) == "triton"


def _use_triton(op, x):
    return backend.pick(op, x, SUPPORTED, max_size=MAX_SIZE) == "triton"


def _block(n):
    return max(16, next_pow2(n))  # tl.dot needs every dim >= 16


@functools.cache
def _matrices(n, device):
    """(D, D^T) float32, zero-padded to [block, block], contiguous; built from the float64 reference D."""
    N = _block(n)
    D = torch.zeros(N, N, dtype=torch.float64)
    D[:n, :n] = _ref.dct_matrix(n, torch.float64)
    D = D.to(device=device, dtype=torch.float32)
    return D, D.mT.contiguous()


def _launch_args(x):
    H, W = x.shape[-2:]
    BH, BW = _block(H), _block(W)
    # tl.dot precision, measured on H100 at 512x3x64^2: float32 "ieee" spills registers (dct_blur 570 us,
    # dct_inject 5 ms) where "tf32x3" takes 80 us and 123 us at max relative error 8e-7 (tf32 alone misses
    # the 1e-5 tolerance); up to 32^2 "ieee" is fast (dct_blur 32 us). 16-bit images: "tf32", whose error
    # is far below their own rounding (kernel bf16 error <= the reference's at 64^2).
    if x.dtype == torch.float32:
        prec = "ieee" if max(BH, BW) <= 32 else "tf32x3"
    else:
        prec = "tf32"
    # 4 warps measured best at 64^2 (8: dct_blur 80 -> 143 us in float32); 128^2 tiles are untimed.
    num_warps = 8 if BH * BW >= 128 * 128 else 4
    return dict(H=H, W=W, BH=BH, BW=BW, PREC=prec, num_warps=num_warps)


_UNFIT = set()  # (kernel, device, meta) whose compiled form needs more shared memory than the device has


def _launch(name, grid, *args, **meta):
    """Run kernel `name`; False when its compiled form does not fit the device's shared memory (the fused
    ambient loss at 64^2 in tf32x3 did not on H100: 256 KiB asked, 227 KiB there). The caller then takes its
    reference path; the verdict is remembered, so only the first call pays for the compile."""
    from triton.runtime.errors import OutOfResources

    key = (name, str(args[0].device), tuple(sorted(meta.items())))
    if key in _UNFIT:
        return False
    try:
        getattr(_kernels(), name)[grid](*args, **meta)
    except OutOfResources:
        _UNFIT.add(key)
        return False
    return True


def _geometry(x):
    """Launch meta-parameters for non-empty contiguous images x [B, ..., H, W], their number N and the
    number C per sample (image n belongs to sample n // C)."""
    meta = _launch_args(x)
    N = x.numel() // (meta["H"] * meta["W"])
    return meta, N, N // x.shape[0]


def _forward_matrices(x):
    return _matrices(x.shape[-2], x.device)[0], _matrices(x.shape[-1], x.device)[0]


def _kernels():
    from dsd_fast.kernels import dct  # imported late: triton is optional, the reference path needs none of it

    return dct


def _col(v):
    return v.reshape(-1, 1, 1, 1)


def _lam(x):
    # int(): backward formulas are traced with symbolic sizes; an image size is static, so specialise on it.
    return _ref.blur_eigenvalues(int(x.shape[-2]), int(x.shape[-1]), x.dtype, x.device)


# ----------------------------------------------------------------------------------------------------
# dct2 / idct2: orthonormal DCT-II / DCT-III over the last two dims; each one's gradient is the other.

def _lr(x, inverse):
    """L x R by the kernel (None if it does not fit the device), (L, R) = (D_H^T, D_W) or (D_H, D_W^T)."""
    x = x.contiguous()
    out = out_buffer(x)
    if x.numel():
        meta, N, _ = _geometry(x)
        Dh, Dht = _matrices(meta["H"], x.device)
        Dw, Dwt = _matrices(meta["W"], x.device)
        L, R = (Dht, Dw) if inverse else (Dh, Dwt)
        if not _launch("dct_lr_kernel", (N,), x, out, L, R, **meta):
            return None
    return out.to(x.dtype)


@torch.library.custom_op("dsd_fast::dct2", mutates_args=())
def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dims: D_H x D_W^T."""
    out = _lr(x, inverse=False) if _use_triton("dct2", x) else None
    return _ref.dct2(x).contiguous() if out is None else out


@torch.library.custom_op("dsd_fast::idct2", mutates_args=())
def idct2(x: Tensor) -> Tensor:
    """Inverse of dct2: D_H^T x D_W."""
    out = _lr(x, inverse=True) if _use_triton("idct2", x) else None
    return _ref.idct2(x).contiguous() if out is None else out


@dct2.register_fake
def _(x):
    return x.new_empty(x.shape)


@idct2.register_fake
def _(x):
    return x.new_empty(x.shape)


dct2.register_autograd(lambda ctx, g: idct2(g))
idct2.register_autograd(lambda ctx, g: dct2(g))


# ----------------------------------------------------------------------------------------------------
# dct_blur: D^T diag(exp(-lambda b^2/2)) D x with b per sample (x is [B, ..., H, W], b is [B]).

@torch.library.custom_op("dsd_fast::dct_blur", mutates_args=())
def dct_blur(x: Tensor, b: Tensor) -> Tensor:
    """Gaussian blur of std b[i] pixels with reflective borders, sample i = x[i]."""
    if _use_triton("dct_blur", x):
        xc = x.contiguous()
        out = out_buffer(xc)
        if not xc.numel():
            return out.to(x.dtype)
        meta, N, C = _geometry(xc)
        if _launch("dct_blur_kernel", (N,), xc, out, b.contiguous(), *_forward_matrices(xc), C, **meta):
            return out.to(x.dtype)
    return _ref.dct_blur(x, b).contiguous()


@dct_blur.register_fake
def _(x, b):
    return x.new_empty(x.shape)


def _dct_blur_setup(ctx, inputs, output):
    x, b = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, b)


def _dct_blur_backward(ctx, g):
    x, b = ctx.saved_tensors
    grad_x = dct_blur(g, b) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.needs_input_grad[1]:
        # d/db exp(-lambda b^2/2) = -lambda b exp(-lambda b^2/2), summed against D g * D x per sample.
        bc = b.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        lam = _lam(x)
        dscale = -lam * bc * torch.exp(-0.5 * lam * bc**2)
        grad_b = (dscale * dct2(g) * dct2(x)).flatten(1).sum(1).to(b.dtype)
    return grad_x, grad_b


dct_blur.register_autograd(_dct_blur_backward, setup_context=_dct_blur_setup)


# ----------------------------------------------------------------------------------------------------
# The blur + noise process coefficients: the reference's (the kernels compute the same in registers).

def _coeffs(x, s, b_s, sigma, blur):
    """reference.dct.coefficients (r, q^2, rho, a) for x's [H, W] and per-sample s, b_s."""
    return _ref.coefficients(_lam(x), s.to(x.dtype), b_s.to(x.dtype), sigma, blur)


# ----------------------------------------------------------------------------------------------------
# dct_inject: X_s = D^T (r D y + q D eps), the blur + noise process at level s from an observation y.

def _inject_triton(y, eps, s, b_s, sigma, blur, seed, offset):
    """X_s by the kernel (eps None: drawn in-kernel from (seed, offset)); None if it does not fit."""
    y = y.contiguous()
    out = out_buffer(y)
    if y.numel():
        meta, N, C = _geometry(y)
        rng = eps is None
        eps = y if rng else eps.contiguous()  # RNG: eps_ptr is never read
        if not _launch("dct_inject_kernel", (N,), y, eps, out, s.contiguous(), b_s.contiguous(), sigma, blur,
                       seed, offset, *_forward_matrices(y), C, RNG=rng, **meta):
            return None
    return out.to(y.dtype)


def _inject_ref(y, eps, s, b_s, sigma, blur):
    return _ref.dct_inject(y, eps, s, b_s, sigma, blur).contiguous()


@torch.library.custom_op("dsd_fast::dct_inject", mutates_args=())
def dct_inject(y: Tensor, eps: Tensor, s: Tensor, b_s: Tensor, sigma: float, blur: float) -> Tensor:
    """X_s = D^T (r D y + sqrt(s^2 - r^2 sigma^2) D eps) for y [B, C, H, W], eps like y, s and b_s [B]."""
    out = _inject_triton(y, eps, s, b_s, sigma, blur, 0, 0) if _use_triton("dct_inject", y) else None
    return _inject_ref(y, eps, s, b_s, sigma, blur) if out is None else out


@dct_inject.register_fake
def _(y, eps, s, b_s, sigma, blur):
    return y.new_empty(y.shape)


def _inject_grads(needs, g, y, eps, s, b_s, sigma, blur):
    """Gradients of X_s w.r.t. (y, eps, s, b_s), each where `needs` says, from the output gradient g
    (explicitly in DCT space)."""
    r, q2, _, _ = _coeffs(g, s, b_s, sigma, blur)
    q = q2.sqrt()
    G = dct2(g)
    grad_y = idct2(r * G) if needs[0] else None
    grad_eps = idct2(q * G) if needs[1] else None
    grad_s = grad_b_s = None
    if needs[2] or needs[3]:
        E = dct2(eps)
        if needs[2]:  # dq/ds = s/q
            grad_s = (G * E * _col(s.to(g.dtype)) / q).flatten(1).sum(1).to(s.dtype)
        if needs[3]:  # dr/db_s = -lambda b_s r, dq/db_s = -r sigma^2 dr/db_s / q
            dr = -_lam(g) * _col(b_s.to(g.dtype)) * r
            dX = dr * dct2(y) - (r * sigma**2 / q) * dr * E
            grad_b_s = (G * dX).flatten(1).sum(1).to(b_s.dtype)
    return grad_y, grad_eps, grad_s, grad_b_s


def _dct_inject_setup(ctx, inputs, output):
    y, eps, s, b_s, ctx.sigma, ctx.blur = inputs
    ctx.save_for_backward(y, eps, s, b_s)


def _dct_inject_backward(ctx, g):
    grads = _inject_grads(ctx.needs_input_grad[:4], g, *ctx.saved_tensors, ctx.sigma, ctx.blur)
    return *grads, None, None


dct_inject.register_autograd(_dct_inject_backward, setup_context=_dct_inject_setup)


@torch.library.custom_op("dsd_fast::dct_inject_seeded", mutates_args=())
def dct_inject_seeded(y: Tensor, s: Tensor, b_s: Tensor, sigma: float, blur: float, seed: int,
                      offset: int) -> Tensor:
    """dct_inject with eps the add_noise stream drawn in-kernel:
    eps[i, j] = randn(seed, offset + i*C*H*W + j) (j the flat index in C, H, W). seed is the int64
    two's-complement view of a uint64 seed (dsd_fast.ops.noise.signed_seed). The kernel uses the float32
    draws as they are; the reference rounds them to y's dtype first."""
    out = None
    if _use_triton("dct_inject_seeded", y):
        out = _inject_triton(y, None, s, b_s, sigma, blur, seed, offset)
    return _inject_ref(y, _seeded_eps(y, seed, offset), s, b_s, sigma, blur) if out is None else out


def _seeded_eps(y, seed, offset):
    return _philox.stream_normal(seed % 2**64, offset, tuple(y.shape), y.dtype, y.device)  # uint64 again


@dct_inject_seeded.register_fake
def _(y, s, b_s, sigma, blur, seed, offset):
    return y.new_empty(y.shape)


def _dct_inject_seeded_setup(ctx, inputs, output):
    y, s, b_s, ctx.sigma, ctx.blur, ctx.seed, ctx.offset = inputs
    ctx.save_for_backward(y, s, b_s)


def _dct_inject_seeded_backward(ctx, g):
    y, s, b_s = ctx.saved_tensors
    n = ctx.needs_input_grad
    eps = _seeded_eps(y, ctx.seed, ctx.offset) if n[1] or n[2] else None
    needs = (n[0], False, n[1], n[2])  # _inject_grads' order (y, eps, s, b_s); eps here is no input
    grad_y, _, grad_s, grad_b_s = _inject_grads(needs, g, y, eps, s, b_s, ctx.sigma, ctx.blur)
    return grad_y, grad_s, grad_b_s, None, None, None, None


dct_inject_seeded.register_autograd(_dct_inject_seeded_backward, setup_context=_dct_inject_seeded_setup)


# ----------------------------------------------------------------------------------------------------
# dct_ambient_loss: per-sample w ||rho r D x_t + a D x0_hat - D y||^2 (= w ||y_hat - y||^2 in pixels).

def _residual(x0_hat, x_t, y, s, b_s, sigma, blur):
    """The residual in DCT space and the coefficients (reference math through the dct2 op)."""
    r, q2, rho, a = _coeffs(x0_hat, s, b_s, sigma, blur)
    Xt, X0 = dct2(x_t), dct2(x0_hat)
    return _col(rho) * r * Xt + a * X0 - dct2(y), (r, q2, rho, a, Xt, X0)


@torch.library.custom_op("dsd_fast::dct_ambient_loss", mutates_args=())
def dct_ambient_loss_op(x0_hat: Tensor, x_t: Tensor, y: Tensor, s: Tensor, b_s: Tensor, weight: Tensor,
                        sigma: float, blur: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss [B], d loss/d x0_hat) with loss = weight * sum_CHW (y_hat - y)^2; the gradient is computed in the
    same pass when need_grad (else an empty tensor) and backward only scales it."""
    if _use_triton("dct_ambient_loss", x0_hat):
        xs = x0_hat.contiguous(), x_t.contiguous(), y.contiguous()
        B = x0_hat.shape[0]
        loss = out_buffer(x0_hat, (B,)).zero_()
        grad = out_buffer(x0_hat) if need_grad else x0_hat.new_empty(0)
        if not x0_hat.numel():
            return loss.to(x0_hat.dtype), grad.to(x0_hat.dtype)
        meta, _, C = _geometry(xs[0])
        scalars = s.contiguous(), b_s.contiguous(), weight.contiguous()
        # num_stages=1: Triton's software pipelining of the channel loop multi-buffers its loads in shared
        # memory, 256 KiB at 3x64^2 float32 (tf32x3) against the H100's 227 KiB, so the kernel never ran
        # there; unpipelined it needs 160 KiB (sm_90 compile, bench/kernel_resources.py).
        if _launch("dct_ambient_loss_kernel", (B,), *xs, *scalars, sigma, blur, loss, grad,
                   *_forward_matrices(x0_hat), C=C, NEED_GRAD=need_grad, num_stages=1, **meta):
            return loss.to(x0_hat.dtype), grad.to(x0_hat.dtype)
    # Unfused: the transforms through the dct2/idct2 ops (their kernels where those run), the rest in torch.
    with torch.no_grad():  # plain math on plain tensors: this is the op's forward, not its autograd
        res, (r, q2, rho, a, Xt, X0) = _residual(x0_hat, x_t, y, s, b_s, sigma, blur)
        w = weight.to(x0_hat.dtype)
        loss = w * res.square().flatten(1).sum(1)
        grad = idct2(_col(2 * w) * a * res) if need_grad else x0_hat.new_empty(0)
    return loss, grad


@dct_ambient_loss_op.register_fake
def _(x0_hat, x_t, y, s, b_s, weight, sigma, blur, need_grad):
    grad = x0_hat.new_empty(x0_hat.shape) if need_grad else x0_hat.new_empty(0)
    return x0_hat.new_empty(x0_hat.shape[:1]), grad


def _dct_ambient_loss_setup(ctx, inputs, output):
    x0_hat, x_t, y, s, b_s, weight, ctx.sigma, ctx.blur, ctx.need_grad = inputs
    loss, grad = output
    ctx.mark_non_differentiable(grad)  # an internal residual for backward, not a result to differentiate
    others = any(ctx.needs_input_grad[1:6])
    ctx.save_for_backward(grad, *((x0_hat, x_t, y, s, b_s, weight) if others else ()))


def _dct_ambient_loss_backward(ctx, g_loss, _g_grad):
    needs = ctx.needs_input_grad[:6]
    saved = ctx.saved_tensors
    grad_x0 = None
    if needs[0]:
        if not ctx.need_grad:
            raise RuntimeError("dsd_fast::dct_ambient_loss: x0_hat needs a gradient but the op ran with "
                               "need_grad=False")
        grad_x0 = _col(g_loss.to(saved[0].dtype)) * saved[0]
    if not any(needs[1:]):
        return grad_x0, None, None, None, None, None, None, None, None
    x0_hat, x_t, y, s, b_s, weight = saved[1:]
    sigma = ctx.sigma
    res, (r, q2, rho, a, Xt, X0) = _residual(x0_hat, x_t, y, s, b_s, sigma, ctx.blur)
    w = weight.to(res.dtype)
    gw = _col(g_loss.to(res.dtype) * w * 2)  # d loss/d res = 2 w res, times the incoming gradient
    grad_xt = idct2(gw * _col(rho) * r * res) if needs[1] else None
    grad_y = idct2(-gw * res) if needs[2] else None
    grad_s = grad_b_s = grad_w = None
    if needs[3]:
        # rho = sigma^2/s^2 and a = Lambda_n (1 - rho r^2): d/ds through rho only, d rho/ds = -2 rho/s.
        sc = _col(s.to(res.dtype))
        drho = -2 * _col(rho) / sc
        Lambda_n = torch.exp(-0.5 * _lam(res) * ctx.blur**2)
        dres = drho * (r * Xt - Lambda_n * r**2 * X0)
        grad_s = (gw * res * dres).flatten(1).sum(1).to(s.dtype)
    if needs[4]:
        # d r/d b_s = -lambda b_s r; d a/d b_s = -2 Lambda_n rho r dr.
        dr = -_lam(res) * _col(b_s.to(res.dtype)) * r
        Lambda_n = torch.exp(-0.5 * _lam(res) * ctx.blur**2)
        dres = _col(rho) * dr * (Xt - 2 * Lambda_n * r * X0)
        grad_b_s = (gw * res * dres).flatten(1).sum(1).to(b_s.dtype)
    if needs[5]:
        grad_w = (g_loss.to(res.dtype) * res.square().flatten(1).sum(1)).to(weight.dtype)
    return grad_x0, grad_xt, grad_y, grad_s, grad_b_s, grad_w, None, None, None


dct_ambient_loss_op.register_autograd(_dct_ambient_loss_backward, setup_context=_dct_ambient_loss_setup)


def dct_ambient_loss(x0_hat, x_t, y, s, b_s, weight, sigma, blur):
    """Per-sample loss [B] of dsd_fast::dct_ambient_loss; d/d x0_hat is fused into the forward pass only
    when autograd will ask for it."""
    need_grad = torch.is_grad_enabled() and x0_hat.requires_grad
    return dct_ambient_loss_op(x0_hat, x_t, y, s, b_s, weight, float(sigma), float(blur), need_grad)[0]
