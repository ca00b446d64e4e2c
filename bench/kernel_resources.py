"""Compile every Triton kernel at the launch configurations the ops choose, ahead of time for a GPU that
need not be present (default sm_90, the H100), and report each kernel's registers, spills and shared
memory, and whether it fits the target (shared memory per block, registers per thread).

No GPU is used: the public ops run on CPU tensors (batches 512 and 8 by default) with DSD_FAST_BACKEND=triton while
the launchers are told they are on a GPU (block sizes, warps, dot precision, the SM count for reductions all
as on CUDA); each launch compiles for the target with Triton's own argument specialisation instead of running.
Outputs are never computed, so this checks compilation and resources only; numbers come from bench/.

    python bench/kernel_resources.py [--arch 90] [--sizes 32 64 128] [--json out.json] [--md out.md]
"""

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Import triton in JIT mode: the kernels must be JITFunctions, not the interpreter's wrappers.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from dsd_fast.ops import backend  # noqa: E402
from dsd_fast.ops import dct as ops_dct  # noqa: E402
from dsd_fast.ops import losses as ops_losses  # noqa: E402
from dsd_fast.ops import noise as ops_noise  # noqa: E402
from dsd_fast.rundir import atomic_write_bytes, code_commit  # noqa: E402

for _ops in (ops_noise, ops_losses, ops_dct):
    _ops._kernels()  # import the kernels now, in JIT mode

# Per-block limits of the targets (CUDA C Programming Guide, compute capabilities table).
LIMITS = {
    90: dict(name="sm_90 (H100)", smem=227 * 1024, sms=132, regs_per_sm=65536),
    80: dict(name="sm_80 (A100)", smem=163 * 1024, sms=108, regs_per_sm=65536),
}
SIGMA, BLUR, SEED, OFFSET = 0.2, 1.5, 2**63 + 12345, 2**33


class Recorder:
    """Stands in for JITFunction.run: records each distinct launch (compiled later by compile_all), never
    launches."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.op = None
        self.records = {}  # key -> record
        self.jobs = {}  # key -> (kernel, signature, constexprs, attrs, options)

    def run(self, kernel, args, kwargs):
        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, specialization,
                                                                   options)
        key = (kernel.fn.__name__, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), options.num_warps, options.num_stages)
        if key in self.records:
            self.records[key]["ops"].add(self.op)
            return
        meta = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
        self.records[key] = dict(
            kernel=kernel.fn.__name__, ops={self.op}, num_warps=options.num_warps, num_stages=options.num_stages,
            dtypes=sorted({v for v in signature.values() if v[0] == "*"}),
            meta={k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))})
        self.jobs[key] = (kernel, signature, constexprs, attrs, options.__dict__)

    def compile_all(self, processes):
        """Compile the recorded launches (forked workers: the kernels need not be picklable)."""
        global _JOBS
        keys = list(self.jobs)
        _JOBS = [(self.target, *self.jobs[k]) for k in keys]
        if processes > 1 and len(keys) > 1:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                results = pool.map(_compile_job, range(len(keys)), chunksize=1)
        else:
            results = [_compile_job(i) for i in range(len(keys))]
        for key, result in zip(keys, results, strict=True):
            self.records[key].update(result)


_JOBS = []


def _compile_job(i):
    target, kernel, signature, constexprs, attrs, options = _JOBS[i]
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding
        return dict(compiled=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return dict(compiled=True, shared=compiled.metadata.shared, **_resources(compiled.asm["ptx"]))


def _ptxas():
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _resources(ptx):
    """Registers, stack frame and spill bytes of a kernel, from ptxas -v on its PTX (for the PTX's target)."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, flags=re.M)[1]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(_ptxas()), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    used = re.search(r"Used (\d+) registers", out)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(registers=int(used[1]), stack=int(frame[1]), spill_stores=int(frame[2]), spill_loads=int(frame[3]))


def _install(recorder):
    """Route launches to the recorder and make the launchers choose their GPU configurations."""
    triton_jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: recorder.run(self, args, kwargs)
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend.choose pick triton for CPU tensors ...
    os.environ["DSD_FAST_BACKEND"] = "triton"
    backend.interpreting = lambda device: False  # ... while the launchers size blocks as on a GPU
    ops_losses._sm_count = lambda device: LIMITS[recorder.target.arch]["sms"]


def _cases(shape, dtype):
    """(op name, thunk) for every op's forward and backward on images of `shape` and `dtype`."""
    B = shape[0]

    def img(grad=False):
        return torch.randn(shape, dtype=dtype).requires_grad_(grad)

    def per_sample():
        return (SIGMA + 0.05 + 3 * torch.rand(B)).to(dtype)

    def backward(loss):
        loss.sum().backward()

    index = torch.randint(0, 2**40, (B,))
    s = per_sample()
    b_s = torch.rand(B).to(dtype)
    yield "corrupt", lambda: ops_noise.corrupt(img(), SIGMA, SEED, index)
    yield "add_noise", lambda: backward(ops_noise.add_noise(img(), per_sample().requires_grad_(), SIGMA, SEED,
                                                            OFFSET))
    yield "ambient_loss", lambda: backward(ops_losses.ambient_loss(img(True), img(), img(), per_sample(), SIGMA))
    yield "ambient_loss_precond", lambda: backward(ops_losses.ambient_loss_precond(img(True), img(), img(),
                                                                                   per_sample(), SIGMA))
    yield "sid_generator_loss", lambda: backward(ops_losses.sid_generator_loss(img(True), img(True), img(True)))
    yield "dmd_loss", lambda: backward(ops_losses.dmd_loss(img(), img(), img(True)))
    yield "sds_loss", lambda: backward(ops_losses.sds_loss(img(), img(), img(), img(True), per_sample()))
    yield "dct2", lambda: backward(ops_dct.dct2(img(True)))
    yield "idct2", lambda: backward(ops_dct.idct2(img(True)))
    yield "dct_blur", lambda: backward(ops_dct.dct_blur(img(True), torch.rand(B).to(dtype)))
    yield "dct_inject", lambda: ops_dct.dct_inject(img(), img(), s, b_s, SIGMA, BLUR)
    yield "dct_inject_seeded", lambda: ops_dct.dct_inject_seeded(img(), s, b_s, SIGMA, BLUR,
                                                                       ops_noise.signed_seed(SEED), OFFSET)
    yield "dct_ambient_loss", lambda: backward(ops_dct.dct_ambient_loss(img(True), img(), img(), s, b_s,
                                                                         torch.rand(B).to(dtype), SIGMA, BLUR))


def collect(arch=90, sizes=(32, 64, 128), channels=(1, 3), dtypes=(torch.float32, torch.bfloat16), ops=None,
            processes=1, batches=(512, 8)):
    """Compile every launch of the ops on B x C x H x H images for B in batches; a list of records (one per
    distinct compile). The batch matters: the reductions split small batches into chunks (a constexpr) that
    a finalize kernel sums, while at 512 one program per sample finishes the sum itself."""
    recorder = Recorder(arch)
    _install(recorder)
    for B, size, C, dtype in itertools.product(batches, sizes, channels, dtypes):
        for op, thunk in _cases((B, C, size, size), dtype):
            if ops is None or op in ops:
                recorder.op = f"{op} {B}x{C}x{size}^2"
                thunk()
    recorder.compile_all(processes)
    limits = LIMITS[arch]
    rows = []
    for r in recorder.records.values():
        r["ops"] = sorted(r["ops"])
        if r["compiled"]:
            threads = 32 * r["num_warps"]
            r["fits"] = r["shared"] <= limits["smem"] and r["registers"] * threads <= limits["regs_per_sm"]
        else:
            r["fits"] = False
        rows.append(r)
    return rows


def markdown(rows, arch):
    limits = LIMITS[arch]
    lines = [f"Kernels compiled for {limits['name']} (shared memory limit {limits['smem'] // 1024} KiB per block) by "
             "bench/kernel_resources.py: compile facts, not timings. A kernel that does not fit is skipped at run "
             "time (its op takes the unfused path).", "",
             "| kernel | used by | dtypes | meta | warps | registers | spill stores B | shared KiB | fits |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["ops"])):
        meta = ", ".join(f"{k}={v}" for k, v in r["meta"].items())
        used = "; ".join(r["ops"][:4]) + (f" (+{len(r['ops']) - 4})" if len(r["ops"]) > 4 else "")
        if r["compiled"]:
            res = f"{r['registers']} | {r['spill_stores']} | {r['shared'] / 1024:.1f} | {'yes' if r['fits'] else 'NO'}"
        else:
            res = f"- | - | - | compile error: {r['error']}"
        lines.append(f"| {r['kernel']} | {used} | {' '.join(r['dtypes'])} | {meta} | {r['num_warps']} | {res} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS), help="compute capability")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="image sizes H = W")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 3], help="channels C")
    parser.add_argument("--ops", nargs="+", help="only these ops (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 8],
                        help="images per launch (the reductions' layout follows it)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--md", help="write the markdown table here (default: stdout)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = collect(args.arch, tuple(args.sizes), tuple(args.channels), ops=args.ops, processes=args.jobs,
                   batches=tuple(args.batches))
    info = dict(arch=args.arch, target=LIMITS[args.arch]["name"], triton=triton.__version__,
                torch=torch.__version__, commit=code_commit(), sizes=args.sizes, channels=args.channels,
                batches=args.batches)
    if args.json:
        text = json.dumps(dict(info=info, kernels=rows), indent=1) + "\n"
        atomic_write_bytes(args.json, lambda f: f.write(text.encode()))
    table = markdown(rows, args.arch)
    if args.md:
        atomic_write_bytes(args.md, lambda f: f.write(table.encode()))
    else:
        print(table, end="")
    bad = [r for r in rows if not r["fits"]]
    print(f"{len(rows)} compiles, {len(bad)} not fitting {LIMITS[args.arch]['name']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
