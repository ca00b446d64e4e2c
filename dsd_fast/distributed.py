"""Several processes under torchrun: the process group from torchrun's environment (launch, process_group), DDP or
FSDP2 wrapping of the trained nets, gradient-sync control for accumulation rounds, all-reduced metrics, full
(unsharded) state dicts, so a checkpoint is the same file whatever the world size or parallel mode, and the
gathers that generation and evaluation use to collect every rank's rows.

Every rank computes its contiguous share of the global batch; each round backpropagates sum(loss) / n_rank and
DDP / FSDP average the gradients over ranks, so the update is the global batch mean of the 1-process run.
"""

import contextlib
import copy
import os
import types

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

PARALLELS = ("auto", "none", "ddp", "fsdp")
_FULL = StateDictOptions(full_state_dict=True)
_FULL_RANK0_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, others {}


def local(t):
    """The local shard of a DTensor (FSDP parameter), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class Parallel:
    """This process's place in the run: mode ('none', 'ddp' or 'fsdp'), rank, world_size, device, and the
    collectives the loops need (no-ops for a single process)."""

    def __init__(self, device, mode="none", rank=0, world_size=1, precision="fp32"):
        self.device, self.mode, self.rank, self.world_size = torch.device(device), mode, rank, world_size
        self.precision = precision
        self.main = rank == 0
        self.mesh = init_device_mesh(self.device.type, (world_size,)) if mode == "fsdp" else None

    def batch_split(self, batch, batch_gpu):
        """(images per rank, images per forward/backward round on a rank); ValueError unless they divide."""
        n = batch // self.world_size
        rounds = min(batch_gpu, n)
        if n == 0 or batch % (self.world_size * rounds):
            raise ValueError(f"batch, batch_gpu: batch={batch} must split into world_size={self.world_size} "
                             f"processes x whole rounds of batch_gpu={batch_gpu} images "
                             f"(batch % (world_size * batch_gpu) == 0)")
        return n, rounds

    def shard(self, net, *, frozen=False):
        """fully_shard net in place: each encoder/decoder entry of the SongUNet, then the root. With --precision
        bf16 a trained net gets bf16 parameters in the forward and fp32 gradient reduction; inputs are not cast
        (cast_forward_inputs=False): autocast picks each op's precision as in the unsharded run, and the EDM
        preconditioning outside the UNet stays fp32. frozen (EMA copies): fp32, and the root reshards after
        every forward too (by default it stays gathered for a backward that never comes, and the next EMA update
        would meet full tensors)."""
        policy = MixedPrecisionPolicy()
        if not frozen and self.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)
        for blocks in (net.model.enc, net.model.dec):
            for block in blocks.values():
                fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(net, mesh=self.mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
        return net

    def wrap(self, net):
        """The callable that trains net: net itself (none), DDP(net), or net sharded in place (fsdp). Build the
        optimiser over net.parameters() after this (FSDP replaces them with sharded ones)."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)
        if self.mode == "fsdp":
            return self.shard(net)
        return net

    def average(self, net):
        """A frozen eval copy of net (same sharding) to hold an EMA: sharded modules cannot be deep-copied, so
        call this on the unsharded net before wrap(net); the copy is sharded like it, in fp32."""
        copy_ = copy.deepcopy(net).eval().requires_grad_(False)
        return self.shard(copy_, frozen=True) if self.mode == "fsdp" else copy_

    def no_sync(self, wrapped):
        """Context for a non-final accumulation round: gradients accumulate locally, no communication."""
        if self.mode == "ddp":
            return wrapped.no_sync()
        if self.mode == "fsdp":
            return _fsdp_no_sync(wrapped)
        return contextlib.nullcontext()

    def sum(self, t):
        """Sum of tensor t over ranks."""
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def any(self, flag):
        """Whether flag is true on any rank (every rank leaves the loop at the same step)."""
        if self.world_size == 1:
            return bool(flag)
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item())

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def state_dict(self, net, *, everywhere=False):
        """net's full state dict. Sharded: a collective; the CPU copy lands on rank 0 only (others get {})
        unless everywhere."""
        if self.mode != "fsdp":
            return net.state_dict()
        return get_model_state_dict(net, options=_FULL if everywhere else _FULL_RANK0_CPU)

    def load_state_dict(self, net, state):
        """Load a full state dict (every rank passes the whole of it)."""
        if self.mode == "fsdp":
            set_model_state_dict(net, state, options=_FULL)
        else:
            net.load_state_dict(state)

    def optim_state_dict(self, net, opt):
        """opt's full state keyed by parameter name (the same format for every mode and world size)."""
        return get_optimizer_state_dict(net, opt, options=_FULL_RANK0_CPU)

    def load_optim_state_dict(self, net, opt, state):
        set_optimizer_state_dict(net, opt, state, options=_FULL)


@contextlib.contextmanager
def _fsdp_no_sync(net):
    # FSDP2 keeps the unsharded gradients of non-synced rounds in reduce_dtype (fp32 under bf16).
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


@contextlib.contextmanager
def launch(options):
    """The Parallel of this process: from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)
    when present, with a process group (nccl on CUDA, gloo on CPU) that is destroyed on exit; else one process.
    options.parallel 'auto' is ddp with several processes, none with one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    mode = options.parallel
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    if mode == "none" and world_size > 1:
        raise ValueError(f"parallel: 'none' with WORLD_SIZE={world_size} would train {world_size} separate copies; "
                         f"use ddp or fsdp")
    if mode != "none" and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"parallel: {mode!r} needs a process group: launch with "
                         f"torchrun --nproc-per-node N -m dsd_fast ...")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and mode != "none":
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = mode != "none" and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Parallel(device, mode, rank, world_size, options.precision)
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device=None, precision="fp32"):
    """launch() for the commands that train nothing (generate, fid, eval): under torchrun the process group training
    uses (gloo on CPU, nccl on cuda:LOCAL_RANK), one process otherwise."""
    with launch(types.SimpleNamespace(parallel="auto", device=device, precision=precision)) as par:
        yield par


def world():
    """(rank, world_size) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x):
    """Concatenate every rank's [n_r, ...] rows (n_r may differ) on every rank; x itself with one process."""
    rank, size = world()
    if size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = _pad(x, max(counts))
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def gather_interleaved(x, counts):
    """On rank 0: every rank's rows interleaved row by row (rank r's row j lands at r + size * j), cut to
    sum(counts); None elsewhere. What restores seed order when rank r holds seeds[r::size]."""
    rank, size = world()
    padded = _pad(x, max(counts))  # gather needs equal shapes; the tail is cut off
    parts = [torch.empty_like(padded) for _ in range(size)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    return torch.stack(parts, dim=1).flatten(0, 1)[:sum(counts)] if rank == 0 else None


def _pad(x, n):
    padded = x.new_zeros(n, *x.shape[1:])
    padded[:x.shape[0]] = x
    return padded
