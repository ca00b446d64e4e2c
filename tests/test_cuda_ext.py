"""The optional CUDA extension (csrc/) against the reference Philox math. Runs only where the extension
was built (a CUDA machine, `DSD_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`)."""

import pytest
import torch

from dsd_fast.ops import backend
from dsd_fast.reference import philox

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(backend.cuda_ext() is None, reason="dsd_fast._C not built"),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float64, 2e-6)])
@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (7, 3, 28, 28), (512, 3, 64, 64)])
def test_corrupt_matches_reference(shape, dtype, tol):
    x = torch.randn(shape, device="cuda").to(dtype)
    seed = int(torch.randint(0, 2**62, ()).item()) * 3 + 2**63 // 5
    index = torch.randint(0, 2**40 // (shape[1] * shape[2] * shape[3]), (shape[0],), device="cuda")
    y = backend.cuda_ext().corrupt(x, 0.2, seed, index)
    eps = philox.corrupt_noise(seed, index, tuple(shape[1:]), dtype=torch.float32, device="cuda")
    ref = (x.float() + 0.2 * eps).to(dtype)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_add_noise_matches_reference(dtype, tol):
    y = torch.randn(5, 3, 32, 32, device="cuda").to(dtype)
    sigma_t = torch.rand(5, device="cuda") * 3 + 0.25
    offset = 2**33 + 17
    x_t = backend.cuda_ext().add_noise(y, sigma_t, 0.2, 99, offset)
    eps = philox.stream_normal(99, offset, tuple(y.shape), device="cuda")
    ref = (y.float() + (sigma_t**2 - 0.04).sqrt().view(-1, 1, 1, 1) * eps).to(dtype)
    torch.testing.assert_close(x_t, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_dispatch_to_cuda_ext_and_agree_with_triton(monkeypatch, dtype):
    """The public ops pick the extension first (auto) and draw the same noise as the Triton kernels."""
    from dsd_fast import functional

    x = torch.randn(9, 3, 32, 32, device="cuda").to(dtype)
    index = torch.randint(0, 2**20, (9,), device="cuda")
    sigma_t = torch.rand(9, device="cuda") * 3 + 0.25
    seed = 2**64 - 12345
    monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    y = functional.corrupt(x, 0.2, seed=seed, index=index)
    assert torch.equal(y, backend.cuda_ext().corrupt(x, 0.2, seed, index))
    x_t = functional.add_noise(y, sigma_t, 0.2, seed=seed, offset=2**35)
    assert torch.equal(x_t, backend.cuda_ext().add_noise(y, sigma_t, 0.2, seed, 2**35))
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(functional.corrupt(x, 0.2, seed=seed, index=index), y, rtol=tol, atol=tol)
    torch.testing.assert_close(functional.add_noise(y, sigma_t, 0.2, seed=seed, offset=2**35), x_t, rtol=tol,
                               atol=tol)
