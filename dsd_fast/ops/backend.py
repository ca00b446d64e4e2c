"""Backend choice for the fused ops (cuda_ext -> triton -> reference) and the launch helpers they share.

pick(op, x, supported) is the one dispatch rule every op calls once: choose() (DSD_FAST_BACKEND, the device,
what is installed), then the input (dtype, image size) and the CUDA extension's self-check. DSD_FAST_BACKEND=auto
(default) picks the first eligible backend for the inputs; naming one (cuda_ext, triton, reference) forces it,
and a forced backend that cannot run raises instead of falling back. Triton is eligible for CUDA tensors, and for
CPU tensors only under TRITON_INTERPRET=1 (the interpreter is a correctness tool, far too slow for real work).
"""

import importlib
import os

import torch

BACKENDS = ("cuda_ext", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton and CUDA kernels take
# Elements per program of the one-block-per-program kernels (ops.noise, ops.losses): on an H100
# (512x3x64x64 float32, do_bench) 1024 / 4 warps gave the fastest backward kernels (1.6-2.2 TB/s);
# corrupt / add_noise timings were host-bound (50-200 us, no stable winner among 1024-4096, 4-8 warps).
GPU_BLOCK = 1024
NUM_WARPS = 4


def requested():
    name = os.environ.get("DSD_FAST_BACKEND", "auto").strip().lower()
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"DSD_FAST_BACKEND: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


# Module-level caches, not functools.cache: torch.compile traces through a cache wrapper into importlib, which it
# cannot trace (a graph break in every op). Filled on first use, and at import where a GPU is present, so a step
# compiled from its first call never imports.
_IMPORTED = {}


def _optional(name):
    if name not in _IMPORTED:
        try:
            _IMPORTED[name] = importlib.import_module(name)
        except ImportError:
            _IMPORTED[name] = None
    return _IMPORTED[name]


def _has_triton():
    return _optional("triton") is not None


def cuda_ext():
    """The compiled extension module dsd_fast._C, or None when it was not built."""
    return _optional("dsd_fast._C")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend, op, device):
    """None if `backend` can run `op` on `device`, else the reason (for errors and fallbacks)."""
    if backend == "reference":
        return None
    if backend == "triton":
        if device.type != "cuda" and not _interpreting():
            return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        if not _has_triton():
            return "triton is not installed"
        return None
    if backend == "cuda_ext":
        if device.type != "cuda":  # first: a CPU tensor never imports the extension (see _IMPORTED)
            return f"the CUDA extension needs CUDA tensors, got device {device}"
        ext = cuda_ext()
        if ext is None:
            return "the CUDA extension dsd_fast._C was not built"
        if not hasattr(ext, op):
            return f"the CUDA extension has no kernel for {op}"
        return None
    raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


def choose(op, device, supported=BACKENDS):
    """The backend to run `op` on `device`. `supported` lists the backends that implement `op`."""
    name = requested()
    if name != "auto":
        reason = why_not(name, op, device) if name in supported else f"no {name} implementation of {op}"
        if reason is not None:
            raise RuntimeError(f"DSD_FAST_BACKEND={name} cannot run {op}: {reason}")
        return name
    for backend in supported:
        if backend == "triton" and device.type != "cuda":
            continue  # auto never picks the interpreter
        if why_not(backend, op, device) is None:
            return backend
    return "reference"


def _why_not_input(x, max_size):
    if x.dtype not in KERNEL_DTYPES:
        return f"the kernels take float32/bfloat16/float16 tensors, got {x.dtype}"
    if max_size is not None and x.ndim >= 2 and max(x.shape[-2], x.shape[-1]) > max_size:
        return f"the kernels take H, W <= {max_size}, got {tuple(x.shape[-2:])}"
    return None


def pick(op, x, supported=BACKENDS, *, max_size=None, self_check=None, strict=True):
    """The backend (cuda_ext, triton or reference) that runs `op` on x: choose(), then x's dtype (KERNEL_DTYPES)
    and image size (H, W <= max_size, None: any), and for cuda_ext self_check(ext, op, device) (a reason, or
    None when the extension's kernel is right). Where the chosen kernel cannot take x, auto falls back (cuda_ext
    to triton, triton to reference); a forced backend raises, unless strict=False (callers with their own
    unfused path ask whether the kernel would run, and get "reference")."""
    name = choose(op, x.device, supported)
    if name == "reference":
        return name
    reason = _why_not_input(x, max_size)
    if reason is None and name == "cuda_ext" and self_check is not None:
        reason = self_check(cuda_ext(), op, x.device)
    if reason is None:
        return name
    if requested() == name:
        if strict:
            raise RuntimeError(f"DSD_FAST_BACKEND={name} cannot run {op}: {reason}")
        return "reference"
    if name == "cuda_ext":
        return pick(op, x, tuple(b for b in supported if b != "cuda_ext"), max_size=max_size, strict=strict)
    return "reference"


# ----------------------------------------------------------------------------------------------------
# Launch helpers.

def interpreting(device):
    return device.type != "cuda"  # Triton on a CPU tensor only runs under TRITON_INTERPRET=1


def next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a, b):
    return -(-a // b)


def out_buffer(like, shape=None):
    """A kernel's output buffer of like's dtype, except 16-bit under the interpreter: written in float32 and
    rounded by the launcher with torch (`.to(like.dtype)`), because the interpreter's float32 -> bfloat16 /
    float16 casts truncate where compiled Triton rounds to nearest even."""
    interp16 = interpreting(like.device) and like.dtype in (torch.bfloat16, torch.float16)
    return like.new_empty(like.shape if shape is None else shape, dtype=torch.float32 if interp16 else like.dtype)


def elementwise_block(chw, device):
    """BLOCK of the one-block-per-program kernels."""
    if interpreting(device):
        return min(next_pow2(chw), 16384)  # the interpreter pays per program: few, big ones
    return min(next_pow2(chw), GPU_BLOCK)


if torch.cuda.is_available():  # see _IMPORTED
    _has_triton(), cuda_ext()
