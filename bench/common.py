"""Shared pieces of the pytest-benchmark suites: environment record, timed runs that synchronise the device,
input rotation past the L2 cache, and achieved bandwidth from the minimal byte count.

Run: pytest bench --benchmark-enable --benchmark-json bench/results/<name>.json, then
python bench/render_table.py bench/results/*.json. Without CUDA every case runs once on a tiny tensor
(Triton interpreted): a check that the suite works, not a measurement.
"""

import functools
import itertools

import pytest
import torch

from dsd_fast.ops import backend
from dsd_fast.rundir import code_commit

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# On CPU, inductor spends ~8 s compiling each op (measured, 2 cores): the CPU smoke run compiles with
# aot_eager (same tracing and AOT autograd, no codegen). Recorded per case as compile_backend.
COMPILE_BACKEND = "inductor" if CUDA else "aot_eager"
ROUNDS, WARMUP_ROUNDS = (30, 3) if CUDA else (1, 1)
L2_MULTIPLE = 3  # rotate among input sets totalling 3x the L2 size, so every round reads from DRAM
MAX_SETS = 32


@functools.cache
def environment():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(DEVICE) if CUDA else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": code_commit(),
        "compile_backend": COMPILE_BACKEND,
    }


def sync():
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def n_sets(set_bytes):
    """How many input sets to rotate among so that their total exceeds L2_MULTIPLE x the L2 cache."""
    if not CUDA:
        return 1
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    return max(1, min(MAX_SETS, -(-L2_MULTIPLE * l2 // max(set_bytes, 1))))


def run(benchmark, make_set, fn, mode, grad_names=()):
    """Time `fn(**inputs)` in `mode` (forward, backward, full = forward + backward), every timed call
    ending in a device synchronisation. make_set() returns (inputs dict, grad_out or None); the inputs
    named in grad_names require grad and backward is taken w.r.t. them (autograd.grad: no accumulation
    into .grad, which would add traffic)."""
    first = make_set()
    set_bytes = sum(t.numel() * t.element_size() for t in first[0].values() if isinstance(t, torch.Tensor))
    sets = itertools.cycle([first] + [make_set() for _ in range(n_sets(set_bytes) - 1)])

    def leaves(inputs):
        return [inputs[k] for k in grad_names]

    def forward(inputs, grad):
        with torch.set_grad_enabled(bool(grad_names)):
            out = fn(**inputs)
        sync()
        return out

    def full(inputs, grad):
        with torch.set_grad_enabled(bool(grad_names)):
            out = fn(**inputs)
            torch.autograd.grad(out, leaves(inputs), grad)
        sync()

    def backward(out, inputs, grad):
        torch.autograd.grad(out, leaves(inputs), grad)
        sync()

    if mode == "backward":
        def setup():
            inputs, grad = next(sets)
            with torch.enable_grad():
                out = fn(**inputs)
            sync()
            return (out, inputs, grad), {}
        target = backward
    else:
        def setup():
            return next(sets), {}
        target = forward if mode == "forward" else full
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


def record(benchmark, nbytes, **info):
    """extra_info: the case, the environment, the minimal bytes and the achieved GB/s (median time)."""
    benchmark.extra_info.update(info, **environment(), bytes=nbytes)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["GBps"] = nbytes / median / 1e9


_compiled = {}


def provider_function(op, provider, reference, fused, monkeypatch):
    """The callable a case times: the eager reference, torch.compile of it (one static graph per op and
    shape), or the fused op with its backend (triton, cuda_ext) forced (skipped where that cannot run)."""
    if provider == "reference":
        return reference
    if provider == "compiled":
        if op not in _compiled:
            _compiled[op] = torch.compile(reference, dynamic=False, backend=COMPILE_BACKEND)
        return _compiled[op]
    reason = backend.why_not(provider, op, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("DSD_FAST_BACKEND", provider)
    return fused
