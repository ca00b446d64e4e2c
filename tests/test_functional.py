"""The public op API: values against the reference / closed forms, and every promised bad-input error."""

import pytest
import torch

import dsd_fast.functional as F
from dsd_fast.reference import edm, losses, philox


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (3, 3, 5, 7), (7, 1, 28, 28)])
def test_corrupt_is_fixed_per_image(shape):
    x = _x(*shape, dtype=torch.float64)
    seed = int(torch.randint(0, 2**62, ()).item())
    index = torch.randperm(1000)[: shape[0]]
    y = F.corrupt(x, 0.2, seed=seed, index=index)
    eps = philox.corrupt_noise(seed, index, tuple(shape[1:]), dtype=torch.float64)
    torch.testing.assert_close(y, x + 0.2 * eps)
    # The same image index gets the same noise in another order and inside another batch.
    perm = torch.randperm(shape[0])
    torch.testing.assert_close(F.corrupt(x[perm], 0.2, seed=seed, index=index[perm]), y[perm])
    torch.testing.assert_close(F.corrupt(x[:1], 0.2, seed=seed, index=index[:1]), y[:1])


def test_add_noise_stream_and_gradient():
    y = _x(4, 3, 6, 5, dtype=torch.float64).requires_grad_()
    sigma = 0.3
    sigma_t = (torch.rand(4, dtype=torch.float64) * 2 + 0.31).requires_grad_()
    x_t = F.add_noise(y, sigma_t, sigma, seed=7, offset=2**33 + 5)
    eps = philox.stream_normal(7, 2**33 + 5, (4, 3, 6, 5), dtype=torch.float64)
    k = (sigma_t**2 - sigma**2).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, y + k * eps)
    g = torch.randn_like(x_t)
    gy, gs = torch.autograd.grad(x_t, (y, sigma_t), g)
    torch.testing.assert_close(gy, g)
    torch.testing.assert_close(gs, (g * eps).sum((1, 2, 3)) * sigma_t / k.flatten())


def test_add_noise_statistics():
    y = torch.zeros(64, 3, 16, 16)
    s = torch.full((64,), 1.0)
    x_t = F.add_noise(y, s, 0.6, seed=123)
    assert abs(x_t.std().item() - 0.8) < 0.01 and abs(x_t.mean().item()) < 0.01


def test_losses_match_reference():
    a, b, c = (_x(3, 2, 7, 5, dtype=torch.float64) for _ in range(3))
    st = torch.rand(3, dtype=torch.float64) + 0.5
    torch.testing.assert_close(F.ambient_loss(a, b, c, st, 0.2), losses.ambient_loss(a, b, c, st, 0.2))
    w = torch.rand(3, dtype=torch.float64)
    torch.testing.assert_close(F.ambient_loss(a, b, c, st, 0.2, w), w * losses.ambient_loss(a, b, c, st, 0.2) /
                               edm.edm_weight(st))
    torch.testing.assert_close(F.sid_generator_loss(a, b, c), losses.sid_generator_loss(a, b, c, 1.2))
    torch.testing.assert_close(F.sid_generator_loss(a, b, c, 1.0, w), losses.sid_generator_loss(a, b, c, 1.0, w))


# ----------------------------------------------------------------------------------------------------
# Bad input: each raises ValueError naming the argument.

def _ok():
    x = _x(2, 3, 8, 8)
    return x, x.clone(), x.clone(), torch.tensor([1.0, 2.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.corrupt(_x(3, 8, 8), 0.2, seed=0, index=torch.arange(3)), "x: expected a 4-D"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), -0.1, seed=0, index=torch.arange(2)), "sigma: expected >= 0"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), float("nan"), seed=0, index=torch.arange(2)), "sigma: expected a finite"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), 0.2, seed=0, index=torch.tensor([0.0, 1.0])), "index: expected an integer"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), 0.2, seed=0, index=torch.arange(3)), r"index: expected shape \[2\]"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), 0.2, seed=0, index=torch.tensor([0, -1])), "index: expected non-negative"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), 0.2, seed=-1, index=torch.arange(2)), "seed: expected an integer"),
        (lambda: F.corrupt(_x(2, 3, 8, 8), 0.2, seed=1.5, index=torch.arange(2)), "seed: expected an integer"),
        (lambda: F.corrupt(torch.zeros(2, 3, 8, 8, dtype=torch.int64), 0.2, seed=0, index=torch.arange(2)),
         "x: expected a floating-point"),
        (lambda: F.add_noise(_x(2, 3, 8, 8), torch.tensor([0.5, 0.1]), 0.2, seed=0), "sigma_t: expected every value > sigma"),
        (lambda: F.add_noise(_x(2, 3, 8, 8), torch.tensor([0.5, 0.2]), 0.2, seed=0), "sigma_t: expected every value > sigma"),
        (lambda: F.add_noise(_x(2, 3, 8, 8), torch.tensor([0.5]), 0.2, seed=0), r"sigma_t: expected shape \[2\]"),
        (lambda: F.add_noise(_x(2, 3, 8, 8), torch.tensor([0.5, float("inf")]), 0.2, seed=0), "sigma_t: expected finite"),
        (lambda: F.add_noise(_x(2, 3, 8, 8), 0.5, 0.2, seed=0, offset=-3), "offset: expected a non-negative"),
        (lambda: F.ambient_loss(*_ok()[:3], torch.tensor([1.0, 0.1]), 0.2), "sigma_t: expected every value > sigma"),
        (lambda: F.ambient_loss(*_ok()[:3], torch.tensor([1.0, 2.0]), -0.2), "sigma: expected >= 0"),
        (lambda: F.ambient_loss(_x(2, 3, 8, 8), _x(2, 3, 8, 7), _x(2, 3, 8, 8), 1.0, 0.2), "x_t: expected shape"),
        (lambda: F.ambient_loss(_x(2, 3, 8, 8), _x(2, 3, 8, 8).double(), _x(2, 3, 8, 8), 1.0, 0.2), "x_t: expected dtype"),
        (lambda: F.ambient_loss(_x(2, 3, 8, 8), _x(2, 3, 8, 8), _x(2, 3, 8, 8, dtype=torch.float64), 1.0, 0.2),
         "y: expected dtype"),
        (lambda: F.ambient_loss(*_ok()[:3], torch.tensor([1.0, 2.0]), 0.2, weight=torch.ones(3)), r"weight: expected shape"),
        (lambda: F.sid_generator_loss(_x(2, 3, 8, 8), _x(2, 3, 8, 8), _x(1, 3, 8, 8)), "x_g: expected shape"),
        (lambda: F.sid_generator_loss(_x(2, 3, 8, 8), _x(2, 3, 4, 8), _x(2, 3, 8, 8)), "f_psi: expected shape"),
        (lambda: F.sid_generator_loss(_x(2, 3, 8, 8), _x(2, 3, 8, 8), _x(2, 3, 8, 8), alpha=float("nan")),
         "alpha: expected a finite"),
        (lambda: F.sid_generator_loss(_x(8, 8), _x(8, 8), _x(8, 8)), "f_phi: expected a 4-D"),
        (lambda: F.dct2(torch.zeros(5)), "x: expected a floating-point tensor with >= 2 dims"),
        (lambda: F.dct2(torch.zeros(2, 300, 8)), "x: expected H, W <= 256"),
        (lambda: F.dct_blur(_x(2, 3, 8, 8), torch.tensor([1.0, -1.0])), "b: expected values >= 0"),
        (lambda: F.dct_blur(_x(2, 3, 8, 8), torch.tensor([1.0, 1.0, 1.0])), r"b: expected shape \[2\]"),
    ],
)
def test_bad_input_raises_named_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_device_mismatch_named():
    x = _x(2, 3, 4, 4)
    meta = torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match="x_t: expected device cpu"):
        F.ambient_loss(x, meta, x, 1.0, 0.2)
    with pytest.raises(ValueError, match="sigma_t: expected device cpu"):
        F.add_noise(x, torch.ones(2, device="meta"), 0.2, seed=0)


def test_dct_ops_match_reference_and_invert():
    from dsd_fast.reference import dct

    x = _x(3, 2, 5, 7, dtype=torch.float64).requires_grad_()
    X = F.dct2(x)
    torch.testing.assert_close(X, dct.dct2(x))
    torch.testing.assert_close(F.idct2(X), x)
    b = torch.rand(3, dtype=torch.float64) * 2
    torch.testing.assert_close(F.dct_blur(x, b), dct.dct_blur(x, b))
    # Orthonormal: the gradient of ||dct2(x)||^2 / 2 is x itself.
    (g,) = torch.autograd.grad(0.5 * (F.dct2(x) ** 2).sum(), x)
    torch.testing.assert_close(g, x.detach())
