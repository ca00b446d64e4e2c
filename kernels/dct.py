"""Orthonormal 2-D DCT-II/III with a per-frequency scale, one image per program, as tl.dot against DCT
matrices (paper 004: every process here is diagonal in DCT space).

An image X [H, W] is loaded as a zero-padded [BH, BW] tile (BH, BW powers of two >= 16, tl.dot's minimum)
and transformed as D_H X D_W^T. The DCT matrices come in zero-padded to [BH, BH] / [BW, BW], so padded
rows and columns stay exactly zero through every product. Loads are converted to float32 and every dot
accumulates in float32; PREC is tl.dot's input_precision, chosen by the launcher (dsd_fast.ops.dct: float32
images "ieee" or "tf32x3", never plain tf32, which misses 1e-5 relative; 16-bit images "tf32"). Images are
contiguous [B*C, H, W] (the launcher makes them so: the interpreter silently misreads strided inputs).
"""

import triton
import triton.language as tl

PI = tl.constexpr(3.141592653589793)  # a jit function may read only constexpr globals


@triton.jit
def _tile_offsets(H, W, BH: tl.constexpr, BW: tl.constexpr):
    rows = tl.arange(0, BH)[:, None]
    cols = tl.arange(0, BW)[None, :]
    return rows * W + cols, (rows < H) & (cols < W)


@triton.jit
def _load_image(ptr, n, H, W, BH: tl.constexpr, BW: tl.constexpr):
    offs, mask = _tile_offsets(H, W, BH, BW)
    return tl.load(ptr + n.to(tl.int64) * H * W + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_image(ptr, n, v, H, W, BH: tl.constexpr, BW: tl.constexpr):
    offs, mask = _tile_offsets(H, W, BH, BW)
    tl.store(ptr + n.to(tl.int64) * H * W + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_matrix(ptr, BN: tl.constexpr):
    """A zero-padded, contiguous [BN, BN] float32 matrix."""
    i = tl.arange(0, BN)[:, None]
    j = tl.arange(0, BN)[None, :]
    return tl.load(ptr + i * BN + j)


@triton.jit
def _lambda(H, W, BH: tl.constexpr, BW: tl.constexpr):
    """lambda_kl = (pi k/H)^2 + (pi l/W)^2 as a [BH, BW] tile (padded entries are multiplied by zeros)."""
    k = tl.arange(0, BH).to(tl.float32)[:, None] * (PI / H)
    l = tl.arange(0, BW).to(tl.float32)[None, :] * (PI / W)
    return k * k + l * l


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def dct_lr_kernel(x_ptr, out_ptr, left_ptr, right_ptr, H, W,
                  BH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr):
    """out = L X R per image: dct2 with (L, R) = (D_H, D_W^T), idct2 with (D_H^T, D_W)."""
    n = tl.program_id(0)
    x = _load_image(x_ptr, n, H, W, BH, BW)
    L = _load_matrix(left_ptr, BH)
    R = _load_matrix(right_ptr, BW)
    _store_image(out_ptr, n, _mm(_mm(L, x, PREC), R, PREC), H, W, BH, BW)


@triton.jit
def dct_blur_kernel(x_ptr, out_ptr, b_ptr, dh_ptr, dw_ptr, C, H, W,
                    BH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr):
    """out = D_H^T (exp(-lambda b^2/2) * D_H X D_W^T) D_W, b per sample (image n is sample n // C)."""
    n = tl.program_id(0)
    b = tl.load(b_ptr + n // C).to(tl.float32)
    x = _load_image(x_ptr, n, H, W, BH, BW)
    Dh = _load_matrix(dh_ptr, BH)
    Dw = _load_matrix(dw_ptr, BW)
    X = _mm(_mm(Dh, x, PREC), tl.trans(Dw), PREC)
    X = X * tl.exp(-0.5 * b * b * _lambda(H, W, BH, BW))
    _store_image(out_ptr, n, _mm(_mm(tl.trans(Dh), X, PREC), Dw, PREC), H, W, BH, BW)


@triton.jit
def _inject_coeffs(s_ptr, bs_ptr, i, sigma, blur, H, W, BH: tl.constexpr, BW: tl.constexpr):
    """Per-frequency r = Lambda_s/Lambda_n = exp(-lambda (b(s)^2 - blur^2)/2) and q^2 = s^2 - r^2 sigma^2
    for sample i (Lambda = exp(-lambda b^2/2), Psi_s = s); r without dividing by Lambda_n."""
    s = tl.load(s_ptr + i).to(tl.float32)
    bs = tl.load(bs_ptr + i).to(tl.float32)
    lam = _lambda(H, W, BH, BW)
    # As reference.edm.blur_excess / added_variance: (b_s - blur)(b_s + blur) and (s - r sigma)(s + r sigma)
    # (no cancellation near s = sigma), each floored at 0 so rounding cannot give r > 1 or a negative q^2.
    r = tl.exp(-0.5 * (tl.maximum(bs - blur, 0.0) * (bs + blur)) * lam)
    q2 = tl.maximum((s - r * sigma) * (s + r * sigma), 0.0)
    return s, r, q2, lam


@triton.jit
def dct_inject_kernel(y_ptr, eps_ptr, out_ptr, s_ptr, bs_ptr, sigma, blur, seed, offset, dh_ptr, dw_ptr,
                      C, H, W, RNG: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr):
    """X_s = D^T (r D y + sqrt(s^2 - r^2 sigma^2) D eps) per image. RNG: eps drawn in-kernel as the add_noise
    stream eps[i, j] = randn(seed, offset + i*C*H*W + j) (j the flat index in C, H, W); else read eps_ptr."""
    n = tl.program_id(0)
    s, r, q2, lam = _inject_coeffs(s_ptr, bs_ptr, n // C, sigma, blur, H, W, BH, BW)
    y = _load_image(y_ptr, n, H, W, BH, BW)
    if RNG:
        offs, mask = _tile_offsets(H, W, BH, BW)
        eps = tl.where(mask, tl.randn(seed, offset + n.to(tl.int64) * H * W + offs), 0.0)
    else:
        eps = _load_image(eps_ptr, n, H, W, BH, BW)
    Dh = _load_matrix(dh_ptr, BH)
    Dw = _load_matrix(dw_ptr, BW)
    Dwt = tl.trans(Dw)
    X = r * _mm(_mm(Dh, y, PREC), Dwt, PREC) + tl.sqrt(q2) * _mm(_mm(Dh, eps, PREC), Dwt, PREC)
    _store_image(out_ptr, n, _mm(_mm(tl.trans(Dh), X, PREC), Dw, PREC), H, W, BH, BW)


@triton.jit
def dct_ambient_loss_kernel(x0_ptr, xt_ptr, y_ptr, s_ptr, bs_ptr, w_ptr, sigma, blur, loss_ptr, grad_ptr,
                            dh_ptr, dw_ptr, H, W, C: tl.constexpr, NEED_GRAD: tl.constexpr,
                            BH: tl.constexpr, BW: tl.constexpr, PREC: tl.constexpr):
    """Per sample i: loss[i] = w_i sum_C ||rho r D x_t + a D x0_hat - D y||^2 (= the pixel-space norm, D
    orthonormal), rho = sigma^2/s^2, a = Lambda_n (1 - rho r^2) = Lambda_n q^2/s^2; with NEED_GRAD also
    d loss/d x0_hat = 2 w_i D^T (a * residual). One program per sample: the C channels sum in registers
    (C is a constexpr: the interpreter cannot loop over a runtime scalar)."""
    i = tl.program_id(0)
    w = tl.load(w_ptr + i).to(tl.float32)
    s, r, q2, lam = _inject_coeffs(s_ptr, bs_ptr, i, sigma, blur, H, W, BH, BW)
    rho_r = (sigma * sigma / (s * s)) * r
    a = tl.exp(-0.5 * blur * blur * lam) * (q2 / (s * s))
    Dh = _load_matrix(dh_ptr, BH)
    Dw = _load_matrix(dw_ptr, BW)
    Dwt = tl.trans(Dw)
    total = 0.0
    for c in range(C):
        n = i * C + c
        # The residual gathers one transform at a time to keep few [BH, BW] tiles live (holding all three
        # transforms at once spilled at 64^2 in float32: 6.4 ms at 512x3x64^2, "ieee", H100).
        res = -_mm(_mm(Dh, _load_image(y_ptr, n, H, W, BH, BW), PREC), Dwt, PREC)
        res += a * _mm(_mm(Dh, _load_image(x0_ptr, n, H, W, BH, BW), PREC), Dwt, PREC)
        res += rho_r * _mm(_mm(Dh, _load_image(xt_ptr, n, H, W, BH, BW), PREC), Dwt, PREC)
        total += tl.sum(tl.sum(res * res, axis=1), axis=0)
        if NEED_GRAD:
            g = _mm(_mm(tl.trans(Dh), (2.0 * w * a) * res, PREC), Dw, PREC)
            _store_image(grad_ptr, n, g, H, W, BH, BW)
    tl.store(loss_ptr + i, (w * total).to(loss_ptr.dtype.element_ty))
