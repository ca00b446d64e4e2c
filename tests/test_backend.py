import pytest
import torch

from dsd_fast import functional
from dsd_fast.ops import backend
from dsd_fast.reference import philox


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    assert backend.choose("ambient_loss", torch.device("cpu")) == "reference"


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=cuda_ext cannot run ambient_loss"):
        backend.choose("ambient_loss", torch.device("cpu"))
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no triton implementation"):
        backend.choose("ambient_loss", torch.device("cpu"), supported=("reference",))


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="DSD_FAST_BACKEND: expected one of"):
        backend.choose("ambient_loss", torch.device("cpu"))


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    assert backend.choose("ambient_loss", torch.device("cpu")) == "reference"


# ----------------------------------------------------------------------------------------------------
# Routing to the CUDA extension. Its kernels need a GPU (tests/test_cuda_ext.py); here a stand-in module
# with the extension's signatures, computing the reference math, checks the dispatch and the arguments the
# ops hand over (unsigned seed, int64 index, offset), with the device check lifted for CPU tensors.

class _FakeExt:
    def __init__(self):
        self.calls = []

    def corrupt(self, x, sigma, seed, index):
        self.calls.append(("corrupt", seed, index.dtype))
        return x + sigma * philox.corrupt_noise(seed, index, tuple(x.shape[1:]), dtype=x.dtype)

    def add_noise(self, y, sigma_t, sigma, seed, offset):
        self.calls.append(("add_noise", seed, offset))
        eps = philox.stream_normal(seed, offset, tuple(y.shape), dtype=y.dtype)
        return y + (sigma_t**2 - sigma**2).sqrt().view(-1, 1, 1, 1).to(y.dtype) * eps


@pytest.fixture
def fake_ext(monkeypatch):
    ext = _FakeExt()
    monkeypatch.setattr(backend, "cuda_ext", lambda: ext)
    why_not = backend.why_not

    def on_any_device(name, op, device):
        return why_not(name, op, torch.device("cuda") if name == "cuda_ext" else device)

    monkeypatch.setattr(backend, "why_not", on_any_device)
    return ext


def test_choose_order_cuda_ext_first(monkeypatch, fake_ext):
    monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert backend.choose("corrupt", cuda) == "cuda_ext"
    assert backend.choose("ambient_loss", cuda) == "triton"  # the extension has no kernel for it
    monkeypatch.setattr(backend, "cuda_ext", lambda: None)
    assert backend.choose("corrupt", cuda) == "triton"
    monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    with pytest.raises(RuntimeError, match="cuda_ext cannot run corrupt: the CUDA extension dsd_fast._C was not"):
        backend.choose("corrupt", cuda)


@pytest.mark.parametrize("forced", [False, True])
def test_noise_ops_route_to_cuda_ext(monkeypatch, fake_ext, forced):
    if forced:
        monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    else:
        monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    seed = 2**63 + 977  # past int64: the extension takes the unsigned seed, not the ops' int64 view
    x = torch.randn(3, 2, 5, 7)
    index = torch.tensor([4, 0, 2**30], dtype=torch.int32)
    y = functional.corrupt(x, 0.3, seed=seed, index=index)
    ref = x + 0.3 * philox.corrupt_noise(seed, index.long(), (2, 5, 7), dtype=x.dtype)
    torch.testing.assert_close(y, ref)
    sigma_t = torch.tensor([0.5, 1.0, 2.5])
    x_t = functional.add_noise(y, sigma_t, 0.3, seed=seed, offset=2**40 + 3)
    ref = y + (sigma_t**2 - 0.09).sqrt().view(-1, 1, 1, 1) * philox.stream_normal(seed, 2**40 + 3, tuple(y.shape))
    torch.testing.assert_close(x_t, ref)
    check = 2**64 - 59  # each op's first use runs its self-check (noise.cuda_ext_check) first
    assert fake_ext.calls == [("corrupt", check, torch.int64), ("corrupt", seed, torch.int64),
                              ("add_noise", check, 2**32 + 7), ("add_noise", seed, 2**40 + 3)]


def test_cuda_ext_dtype_and_missing_kernels(monkeypatch, fake_ext):
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    index = torch.arange(2)
    monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    torch.testing.assert_close(functional.corrupt(x, 0.1, seed=5, index=index),
                               x + 0.1 * philox.corrupt_noise(5, index, (1, 4, 4), dtype=x.dtype))
    assert fake_ext.calls == []  # float64: auto falls back to the reference
    monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=cuda_ext cannot run corrupt: the kernels take "
                                           "float32/bfloat16/float16 tensors, got torch.float64"):
        functional.corrupt(x, 0.1, seed=5, index=index)
    # d x_t / d sigma_t has no extension kernel: a forced cuda_ext says so instead of silently falling back.
    sigma_t = torch.tensor([0.5, 0.7], requires_grad=True)
    x_t = functional.add_noise(x.float(), sigma_t, 0.1, seed=5)
    with pytest.raises(RuntimeError, match="no cuda_ext implementation of add_noise_backward"):
        x_t.sum().backward()


class _StaleExt(_FakeExt):
    """An extension whose kernels draw another stream (as a stale or miscompiled build would)."""

    def corrupt(self, x, sigma, seed, index):
        return super().corrupt(x, sigma, seed ^ 1, index)

    def add_noise(self, y, sigma_t, sigma, seed, offset):
        return super().add_noise(y, sigma_t, sigma, seed, offset + 1)


@pytest.mark.parametrize("op", ["corrupt", "add_noise"])
def test_cuda_ext_failing_its_self_check_is_never_used(monkeypatch, fake_ext, op):
    stale = _StaleExt()
    monkeypatch.setattr(backend, "cuda_ext", lambda: stale)
    monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    x = torch.randn(2, 3, 4, 4)
    index, sigma_t = torch.tensor([1, 9]), torch.tensor([0.5, 1.5])

    def call():
        if op == "corrupt":
            return functional.corrupt(x, 0.2, seed=7, index=index)
        return functional.add_noise(x, sigma_t, 0.2, seed=7, offset=11)

    want = (x + 0.2 * philox.corrupt_noise(7, index, (3, 4, 4)) if op == "corrupt" else
            x + (sigma_t**2 - 0.04).sqrt().view(-1, 1, 1, 1) * philox.stream_normal(7, 11, tuple(x.shape)))
    with pytest.warns(RuntimeWarning, match=f"CUDA extension's {op} kernel does not reproduce the reference"):
        got = call()
    torch.testing.assert_close(got, want)  # auto fell back to the reference
    assert [c[0] for c in stale.calls] == [op]  # the self-check's one call, then never again
    call()
    assert len(stale.calls) == 1
    monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    with pytest.raises(RuntimeError, match=f"DSD_FAST_BACKEND=cuda_ext cannot run {op}: the CUDA extension's"):
        call()


def test_pick_is_the_one_dispatch_rule(monkeypatch):
    """backend.pick: the device rule (choose), then dtype, the image-size limit and the CUDA extension's
    self-check; auto falls back (cuda_ext -> triton -> reference), a forced backend raises naming the reason,
    strict=False answers "reference" instead."""
    x32, x64 = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    big = torch.zeros(1, 1, 8, 200)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DSD_FAST_BACKEND", "auto")
    assert backend.pick("op", x32) == "reference"  # a CPU tensor: no kernel backend without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.pick("op", x32, ("triton", "reference")) == "reference"  # auto never picks the interpreter
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    if backend._has_triton():
        assert backend.pick("op", x32, ("triton", "reference"), max_size=128) == "triton"
        with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=triton cannot run op: .*float64"):
            backend.pick("op", x64, ("triton", "reference"))
        with pytest.raises(RuntimeError, match=r"H, W <= 128, got \(8, 200\)"):
            backend.pick("op", big, ("triton", "reference"), max_size=128)
        assert backend.pick("op", big, ("triton", "reference"), max_size=128, strict=False) == "reference"
        assert backend.pick("op", big, ("triton", "reference")) == "triton"  # no limit given
    # The CUDA extension's self-check (a stale build): auto moves on to triton, forced raises its reason.
    monkeypatch.setattr(backend, "choose", lambda op, device, supported: supported[0])
    monkeypatch.setattr(backend, "cuda_ext", lambda: object())
    stale = lambda ext, op, device: "stale build"
    monkeypatch.setenv("DSD_FAST_BACKEND", "auto")
    assert backend.pick("op", x32, self_check=stale) == "triton"
    assert backend.pick("op", x32, self_check=lambda ext, op, device: None) == "cuda_ext"
    assert backend.pick("op", x64, self_check=stale) == "reference"
    monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=cuda_ext cannot run op: stale build"):
        backend.pick("op", x32, self_check=stale)
