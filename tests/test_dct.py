"""Orthonormal DCT-II and the DCT Gaussian blur against scipy and their closed-form properties."""

import math

import pytest
import scipy.fft
import scipy.ndimage
import torch

from dsd_fast.reference import dct as ref
from dsd_fast.reference.dct import blur_eigenvalues, dct2, dct_blur, dct_matrix, idct2

SHAPES = [(5, 7), (28, 28), (32, 32), (64, 48), (1, 9)]
# Per-dtype tolerance vs scipy's float64 transform (inputs ~N(0,1)): fp64 is round-off over <= 64-term
# dot products (measured <= 4e-15 at 64x48); fp32 measured <= 1e-6 at 64x48 (2e-6 at 256x256).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_dct2_matches_scipy(shape, dtype):
    B = int(torch.randint(1, 4, ()))
    x = torch.randn(B, 3, *shape, dtype=torch.float64)
    ref = torch.from_numpy(scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1)))
    X = dct2(x.to(dtype))
    assert X.dtype == dtype and X.shape == x.shape
    torch.testing.assert_close(X.double(), ref, rtol=0, atol=TOL[dtype])
    inv = torch.from_numpy(scipy.fft.idctn(ref.numpy(), type=2, norm="ortho", axes=(-2, -1)))
    torch.testing.assert_close(idct2(ref.to(dtype)).double(), inv, rtol=0, atol=TOL[dtype])
    torch.testing.assert_close(idct2(X).double(), x, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("n", [1, 2, 5, 28, 256])
def test_dct_matrix_orthonormal(n):
    D = dct_matrix(n)
    torch.testing.assert_close(D @ D.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    j = torch.arange(n, dtype=torch.float64)
    k = int(torch.randint(1, n, ())) if n > 1 else 0
    c = math.sqrt((1 if k == 0 else 2) / n)
    torch.testing.assert_close(D[k], c * torch.cos(math.pi * (2 * j + 1) * k / (2 * n)), rtol=0, atol=1e-13)
    assert dct_matrix(n, torch.float32).dtype == torch.float32


def test_dct_gradcheck():
    x = torch.randn(2, 1, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dct2, (x,))
    assert torch.autograd.gradcheck(idct2, (x,))
    b = (torch.rand(2, dtype=torch.float64) + 0.3).requires_grad_()
    assert torch.autograd.gradcheck(dct_blur, (x, b))


def test_blur_eigenvalues():
    H, W = 5, 7
    lam = blur_eigenvalues(H, W, torch.float32)
    assert lam.shape == (H, W) and lam.dtype == torch.float32 and lam[0, 0] == 0
    k, l = int(torch.randint(H, ())), int(torch.randint(W, ()))
    assert math.isclose(lam[k, l].item(), (math.pi * k / H) ** 2 + (math.pi * l / W) ** 2, rel_tol=1e-6)


def test_blur_symmetric_mean_preserving_semigroup():
    B, C, H, W = 3, 2, 28, 33
    x, z = torch.randn(2, B, C, H, W, dtype=torch.float64)
    a, b = (torch.rand(2) * 3).tolist()
    # <A x, z> = <x, A z>: A = D^T diag D is symmetric.
    assert math.isclose((dct_blur(x, a) * z).sum().item(), (x * dct_blur(z, a)).sum().item(), abs_tol=1e-10)
    # lambda_00 = 0: the DC coefficient, hence every channel's mean, is untouched.
    torch.testing.assert_close(dct_blur(x, a).mean((-2, -1)), x.mean((-2, -1)), rtol=0, atol=1e-13)
    # Heat semigroup: blurring by a then by b is blurring by sqrt(a^2 + b^2).
    torch.testing.assert_close(dct_blur(dct_blur(x, a), b), dct_blur(x, math.hypot(a, b)), rtol=0, atol=1e-12)
    torch.testing.assert_close(dct_blur(x, 0.0), x, rtol=0, atol=1e-13)
    # A real blur: it strictly shrinks every non-constant image (all other eigenvalues are < 1).
    centred = x - x.mean((-2, -1), keepdim=True)
    assert dct_blur(centred, 1.0).norm() < centred.norm()


@pytest.mark.parametrize("b", [1.0, 1.5, 2.0, 3.0])
def test_blur_matches_reflect_gaussian_filter(b):
    """dct_blur(x, b) is scipy's gaussian_filter with mode='reflect' (d c b a | a b c d, the half-sample
    symmetric extension that DCT-II diagonalises), up to aliasing: both are diagonal in the DCT basis,
    scipy with the DTFT of the sampled Gaussian sum_j exp(-(w + 2 pi j)^2 b^2/2), we with exp(-w^2 b^2/2)
    at w = pi k/H. The j = -1 alias peaks at w -> pi at exp(-pi^2 b^2/2), so per axis the multipliers
    differ by <= 1.01 exp(-pi^2 b^2/2) and in 2-D by twice that: an operator-norm bound on
    ||scipy(x) - dct_blur(x)|| / ||x||. truncate=10 makes scipy's kernel tail < 1e-22. Measured on random
    16..33-pixel images: b=1 ~1e-3 (bound 1.5e-2), b=1.5 ~1e-6 (3e-5), b=2 ~6e-11 (5.4e-9), b=3 ~1e-16;
    'mirror' (d c b | a b c d) is off by >= 2e-2 at every b >= 1 and must fail the bound."""
    H, W = int(torch.randint(16, 33, ())), int(torch.randint(16, 33, ()))
    x = torch.randn(H, W, dtype=torch.float64)
    ours = dct_blur(x, b)
    ref = torch.from_numpy(scipy.ndimage.gaussian_filter(x.numpy(), b, mode="reflect", truncate=10.0))
    bound = 2.02 * math.exp(-(math.pi * b) ** 2 / 2) + 1e-13
    assert (ours - ref).norm() / x.norm() <= bound
    # The boundary convention matters: the other symmetric extension must fail.
    mirror = torch.from_numpy(scipy.ndimage.gaussian_filter(x.numpy(), b, mode="mirror", truncate=10.0))
    assert (ours - mirror).norm() / x.norm() > bound


def test_blur_per_sample_b():
    B = 7
    x = torch.randn(B, 3, 5, 7)
    b = torch.rand(B) * 2
    b[0] = 0
    out = dct_blur(x, b)
    for i in range(B):
        torch.testing.assert_close(out[i], dct_blur(x[i], b[i].item()), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=1e-5)
    # Gradient in b: d/db exp(-lambda b^2/2) = -lambda b exp(-lambda b^2/2), checked through a linear probe.
    xd, bd = x.double(), b.double().requires_grad_()
    z = torch.randn_like(xd)
    (g,) = torch.autograd.grad((dct_blur(xd, bd) * z).sum(), bd)
    lam = blur_eigenvalues(5, 7)
    Bb = bd.detach().view(-1, 1, 1, 1)
    expected = (-lam * Bb * torch.exp(-lam * Bb**2 / 2) * dct2(xd) * dct2(z)).sum((1, 2, 3))
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_bad_inputs():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="^b:"):
        dct_blur(x, -1.0)
    with pytest.raises(ValueError, match="^b:"):
        dct_blur(x, torch.ones(3))
    with pytest.raises(ValueError, match="^x:"):
        dct2(torch.ones(2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^x:"):
        dct2(torch.ones(4))
    with pytest.raises(ValueError, match="^n:"):
        dct_matrix(0)
    with pytest.raises(ValueError, match="^W:"):
        blur_eigenvalues(4, 2.5)
    with pytest.raises(ValueError, match="^b:"):
        dct_blur(x, float("inf"))


def test_coefficients_closed_forms():
    """coefficients: r = exp(-lam (b_s^2 - blur^2) / 2), q2 = s^2 - r^2 sigma^2, rho = sigma^2 / s^2,
    a = Lambda_n (1 - rho r^2), in fp64 on random levels; Lambda = 1 (no blur) gives the noise case's
    (1, s^2 - sigma^2, sigma^2 / s^2, 1 - sigma^2 / s^2)."""
    H, W, B = 5, 7, 4
    lam = ref.blur_eigenvalues(H, W)
    sigma, blur = 0.05 + 0.3 * torch.rand(()).item(), 0.5 + torch.rand(()).item()
    s = sigma + torch.rand(B, dtype=torch.float64) * 3 + 1e-3
    b_s = blur + torch.rand(B, dtype=torch.float64)
    r, q2, rho, a = ref.coefficients(lam, s, b_s, sigma, blur)
    col = lambda v: v.view(-1, 1, 1, 1)
    r_want = torch.exp(-0.5 * lam * (col(b_s) ** 2 - blur**2))
    torch.testing.assert_close(r.expand(B, 1, H, W), r_want.expand(B, 1, H, W), rtol=1e-12, atol=0)
    torch.testing.assert_close(q2, col(s) ** 2 - r_want**2 * sigma**2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rho.expand(B, 1, 1, 1), sigma**2 / col(s) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(a, torch.exp(-0.5 * lam * blur**2) * (1 - sigma**2 / col(s) ** 2 * r_want**2),
                               rtol=1e-12, atol=1e-15)
    r, q2, rho, a = ref.coefficients(torch.zeros(H, W, dtype=torch.float64), s, torch.zeros(B, dtype=torch.float64),
                                     sigma, 0.0)
    assert torch.equal(r, torch.ones_like(r))
    torch.testing.assert_close(q2.expand(B, 1, H, W), (col(s) ** 2 - sigma**2).expand(B, 1, H, W), rtol=1e-12, atol=0)
    torch.testing.assert_close(a.expand(B, 1, H, W), (1 - sigma**2 / col(s) ** 2).expand(B, 1, H, W), rtol=1e-12,
                               atol=1e-15)
