"""Fused per-sample losses of DSD and their gradients: ambient Tweedie (Eq. 3, optionally with the EDM
preconditioning folded in), SiD generator (Eq. 10), DMD (Eq. 9) and SDS (Eq. 8) surrogates.

Layout: tensors are contiguous [B, CHW]; program (b, c) handles chunk c of sample b. Forward kernels loop
over a CHUNK (a multiple of BLOCK; constexpr: the interpreter cannot loop to a runtime bound under
numpy 2) and reduce in float32; with one chunk per sample (NC == 1) they write
the finished per-sample values, otherwise partial sums [K, B, NC] that finalize_kernel reduces in a fixed
order (deterministic, no atomics). Backward kernels recompute the residual from the inputs (nothing is
materialised between the passes) and write only the gradients asked for (NEED_* constexprs); with REDUCE
they also write per-block partial sums [K, B, NC] for the rare gradients w.r.t. per-sample scalars.
All arithmetic is float32 whatever the storage dtype.

Ambient residual: r = a u + b x_t - y with per-sample a, b from sigma_t (rho = sigma^2 / sigma_t^2):
  plain   (u = x0_hat): a = 1 - rho,           b = rho
  precond (u = F_x):    a = (1 - rho) c_out,   b = (1 - rho) c_skip + rho   (x0_hat = c_skip x_t + c_out F_x)
loss = w sum r^2, w = weight or EDM's (sigma_t^2 + sigma_d^2) / (sigma_t sigma_d)^2.

Distillation losses (MODE): loss = w S with w = weight or scale / max(mean|x_g - f_phi|, 1e-5) and
  SID: S = sum (1 - alpha) d^2 + d (f_psi - x_g), d = f_phi - f_psi           (scale = 1)
  DMD: S = sum (f_psi - f_phi) x_g                                           (scale = 1)
  SDS: S = sum ((x_t - f_phi) / sigma_t - eps) x_g                           (scale = sigma_t)
"""

import triton
import triton.language as tl

from dsd_fast.reference.edm import SIGMA_DATA as _SIGMA_DATA

SIGMA_DATA = tl.constexpr(_SIGMA_DATA)
SID = tl.constexpr(0)
DMD = tl.constexpr(1)
SDS = tl.constexpr(2)
W_MIN = tl.constexpr(1e-5)  # SiD clamps mean|x_g - f_phi| at 1e-5 before taking its inverse


@triton.jit
def _load(ptr, row, j, mask):
    return tl.load(ptr + row + j, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, row, j, v, mask):
    tl.store(ptr + row + j, v.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Ambient Tweedie loss.

@triton.jit
def _ambient_coeffs(sigma_t_ptr, weight_ptr, b, sigma, PRECOND: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(a, b, w) of sample b, float32."""
    s = tl.load(sigma_t_ptr + b).to(tl.float32)
    s2 = s * s
    d2 = SIGMA_DATA * SIGMA_DATA
    rho = sigma * sigma / s2
    if PRECOND:
        c_skip = d2 / (s2 + d2)
        c_out = s * SIGMA_DATA / tl.sqrt_rn(s2 + d2)
        ca = (1 - rho) * c_out
        cb = (1 - rho) * c_skip + rho
    else:
        ca = 1 - rho
        cb = rho
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + b).to(tl.float32)
    else:
        w = (s2 + d2) / (s2 * d2)
    return ca, cb, w


@triton.jit
def ambient_loss_fwd_kernel(u_ptr, x_t_ptr, y_ptr, sigma_t_ptr, weight_ptr, out_ptr, sigma, CHW, NC,
                            CHUNK: tl.constexpr, PRECOND: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            BLOCK: tl.constexpr):
    """out[b * NC + c] = w * sum over chunk c of r^2 (the loss itself when NC == 1)."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    ca, cb, w = _ambient_coeffs(sigma_t_ptr, weight_ptr, b, sigma, PRECOND, HAS_WEIGHT)
    row = b.to(tl.int64) * CHW
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, CHUNK, BLOCK):
        j = c * CHUNK + start + tl.arange(0, BLOCK)
        mask = j < CHW
        r = ca * _load(u_ptr, row, j, mask) + cb * _load(x_t_ptr, row, j, mask) - _load(y_ptr, row, j, mask)
        acc += r * r
    tl.store(out_ptr + b * NC + c, (w * tl.sum(acc)).to(out_ptr.dtype.element_ty))


@triton.jit
def ambient_loss_bwd_kernel(grad_ptr, u_ptr, x_t_ptr, y_ptr, sigma_t_ptr, weight_ptr,
                            g_u_ptr, g_x_t_ptr, g_y_ptr, partial_ptr, sigma, B, CHW, NC,
                            PRECOND: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_U: tl.constexpr,
                            NEED_X_T: tl.constexpr, NEED_Y: tl.constexpr, REDUCE: tl.constexpr,
                            BLOCK: tl.constexpr):
    """dL/du = 2 w a r grad, dL/dx_t = 2 w b r grad, dL/dy = -2 w r grad; with REDUCE also the partial sums
    (r^2, r u, r x_t) of the block, for the gradients w.r.t. sigma_t and weight."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    ca, cb, w = _ambient_coeffs(sigma_t_ptr, weight_ptr, b, sigma, PRECOND, HAS_WEIGHT)
    g = 2 * w * tl.load(grad_ptr + b).to(tl.float32)
    row = b.to(tl.int64) * CHW
    j = c * BLOCK + tl.arange(0, BLOCK)
    mask = j < CHW
    u = _load(u_ptr, row, j, mask)
    x_t = _load(x_t_ptr, row, j, mask)
    r = ca * u + cb * x_t - _load(y_ptr, row, j, mask)
    if NEED_U:
        _store(g_u_ptr, row, j, (g * ca) * r, mask)
    if NEED_X_T:
        _store(g_x_t_ptr, row, j, (g * cb) * r, mask)
    if NEED_Y:
        _store(g_y_ptr, row, j, -g * r, mask)
    if REDUCE:
        p = partial_ptr + b * NC + c
        tl.store(p, tl.sum(r * r))
        tl.store(p + B * NC, tl.sum(r * u))
        tl.store(p + 2 * B * NC, tl.sum(r * x_t))


# ----------------------------------------------------------------------------------------------------
# Distillation losses: SiD generator loss, DMD and SDS surrogates.

@triton.jit
def _distill_weight(A, b, CHW, weight_ptr, sigma_t_ptr, MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """w of sample(s) b from A = sum|x_g - f_phi| (b a scalar or a block of samples)."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + b).to(tl.float32)
    else:
        w = 1 / tl.maximum(A / CHW, W_MIN)
        if MODE == SDS:
            w = w * tl.load(sigma_t_ptr + b).to(tl.float32)
    return w


@triton.jit
def distill_loss_fwd_kernel(f_phi_ptr, p1_ptr, x_g_ptr, eps_ptr, sigma_t_ptr, weight_ptr, loss_ptr, w_ptr,
                            partial_ptr, alpha, B, CHW, NC, CHUNK: tl.constexpr, MODE: tl.constexpr,
                            HAS_WEIGHT: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk S and A = sum|x_g - f_phi|; p1 is f_psi (SID, DMD) or x_t (SDS); eps is read by SDS only.
    FINAL (NC == 1): writes loss[b] = w S and w[b]; else partial[0, b, c] = S, partial[1, b, c] = A."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    if MODE == SDS:
        inv_s = 1 / tl.load(sigma_t_ptr + b).to(tl.float32)
    row = b.to(tl.int64) * CHW
    S = tl.zeros([BLOCK], tl.float32)
    A = tl.zeros([BLOCK], tl.float32)
    for start in range(0, CHUNK, BLOCK):
        j = c * CHUNK + start + tl.arange(0, BLOCK)
        mask = j < CHW
        f_phi = _load(f_phi_ptr, row, j, mask)
        p1 = _load(p1_ptr, row, j, mask)
        x_g = _load(x_g_ptr, row, j, mask)
        if MODE == SID:
            d = f_phi - p1
            S += (1 - alpha) * d * d + d * (p1 - x_g)
        elif MODE == DMD:
            S += (p1 - f_phi) * x_g
        else:
            S += ((p1 - f_phi) * inv_s - _load(eps_ptr, row, j, mask)) * x_g
        if not HAS_WEIGHT:
            A += tl.abs(x_g - f_phi)
    S_sum = tl.sum(S)
    A_sum = tl.sum(A)
    if FINAL:
        w = _distill_weight(A_sum, b, CHW, weight_ptr, sigma_t_ptr, MODE, HAS_WEIGHT)
        tl.store(loss_ptr + b, (w * S_sum).to(loss_ptr.dtype.element_ty))
        tl.store(w_ptr + b, w)
    else:
        tl.store(partial_ptr + b * NC + c, S_sum)
        tl.store(partial_ptr + (B + b) * NC + c, A_sum)


@triton.jit
def finalize_kernel(partial_ptr, weight_ptr, sigma_t_ptr, loss_ptr, w_ptr, B, NC, CHW, DISTILL: tl.constexpr,
                    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Sums the partials [K, B, NC] (NC <= BLOCK_C) over chunks in a fixed order. Ambient: loss = the sum
    of partial[0] (each already weighted). Distillation: S, A = partial[0], partial[1]; loss = w S, w
    from A."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b < B
    cc = tl.arange(0, BLOCK_C)
    offs = b[:, None] * NC + cc[None, :]
    mask = b_mask[:, None] & (cc[None, :] < NC)
    S = tl.sum(tl.load(partial_ptr + offs, mask=mask, other=0.0), axis=1)
    if DISTILL:
        A = tl.sum(tl.load(partial_ptr + B * NC + offs, mask=mask, other=0.0), axis=1)
        w = _distill_weight(A, b, CHW, weight_ptr, sigma_t_ptr, MODE, HAS_WEIGHT)
        tl.store(w_ptr + b, w, mask=b_mask)
        S = w * S
    tl.store(loss_ptr + b, S.to(loss_ptr.dtype.element_ty), mask=b_mask)


@triton.jit
def sid_loss_bwd_kernel(grad_ptr, w_ptr, f_phi_ptr, f_psi_ptr, x_g_ptr, g_phi_ptr, g_psi_ptr, g_x_g_ptr,
                        partial_ptr, alpha, CHW, NC, NEED_PHI: tl.constexpr, NEED_PSI: tl.constexpr,
                        NEED_X_G: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    """With k = grad w, d = f_phi - f_psi, e = f_psi - x_g: dL/df_phi = k (2 (1 - alpha) d + e),
    dL/df_psi = k ((2 alpha - 1) d - e), dL/dx_g = -k d; REDUCE: partial[b, c] = block sum of the
    unweighted integrand (the gradient w.r.t. a given weight)."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    k = tl.load(grad_ptr + b).to(tl.float32) * tl.load(w_ptr + b).to(tl.float32)
    row = b.to(tl.int64) * CHW
    j = c * BLOCK + tl.arange(0, BLOCK)
    mask = j < CHW
    f_psi = _load(f_psi_ptr, row, j, mask)
    d = _load(f_phi_ptr, row, j, mask) - f_psi
    e = f_psi - _load(x_g_ptr, row, j, mask)
    if NEED_PHI:
        _store(g_phi_ptr, row, j, k * (2 * (1 - alpha) * d + e), mask)
    if NEED_PSI:
        _store(g_psi_ptr, row, j, k * ((2 * alpha - 1) * d - e), mask)
    if NEED_X_G:
        _store(g_x_g_ptr, row, j, -k * d, mask)
    if REDUCE:
        tl.store(partial_ptr + b * NC + c, tl.sum((1 - alpha) * d * d + d * e))


@triton.jit
def distill_grad_kernel(grad_ptr, w_ptr, f_phi_ptr, p1_ptr, eps_ptr, sigma_t_ptr, g_x_g_ptr, CHW,
                        MODE: tl.constexpr, BLOCK: tl.constexpr):
    """dL/dx_g of the DMD / SDS surrogates: grad w (f_psi - f_phi), or grad w ((x_t - f_phi) / sigma_t - eps)."""
    b = tl.program_id(0)
    k = tl.load(grad_ptr + b).to(tl.float32) * tl.load(w_ptr + b).to(tl.float32)
    row = b.to(tl.int64) * CHW
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < CHW
    diff = _load(p1_ptr, row, j, mask) - _load(f_phi_ptr, row, j, mask)
    if MODE == SDS:
        inv_s = 1 / tl.load(sigma_t_ptr + b).to(tl.float32)
        diff = diff * inv_s - _load(eps_ptr, row, j, mask)
    _store(g_x_g_ptr, row, j, k * diff, mask)
