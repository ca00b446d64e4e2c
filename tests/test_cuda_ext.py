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
