"""DSD training: Phase I (ambient pretraining), Phase II (score distillation), or both in one run directory."""

import math

import torch

from ..data import DALIData, GPUData, choose_loader, dataset_shape, load_images, resolve_source
from ..distributed import Parallel, launch
from ..networks import resolve_config
from ..options import PHASE_ORDER, Options
from ..rundir import RunDir, load_checkpoint
from .loop import TrainingError, describe_disk_use, disk_use, run_phase, steps_for
from .phase1 import Pretrain
from .phase2 import Distill, check_teacher
from .selection import ProximalFID

PHASES = PHASE_ORDER

__all__ = ["Distill", "Options", "PHASES", "Pretrain", "RunDir", "TrainingError", "load_data", "train"]


def load_data(options, config, device, par=None, start_step=0):
    """The run's observations on device, corrupted once per image with the run's corruption and seed unless
    options.noisy_data: GPUData (the whole uint8 set on the device) or, by options.loader, DALIData (streamed, the
    same batches); which one and why goes to options.loader_choice. The images must match the network's
    resolution and channels. par: this process's Parallel (DALI reads this rank's share of every step from
    start_step on)."""
    source = resolve_source(options.dataset, options.data)
    shape = dict(resolution=config.img_resolution, channels=config.in_channels, max_images=options.max_images)
    free = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else None
    size = math.prod(dataset_shape(source, **shape)) if options.loader == "auto" else 0  # only auto weighs it
    try:
        kind, reason = choose_loader(options.loader, size, free, options.loader_memory_fraction)
    except ImportError as e:  # --loader dali without DALI: a usage error, said as such
        raise ValueError(str(e)) from e
    options.loader_choice = f"{kind}: {reason}"
    corruption = None if options.noisy_data else options.make_corruption()
    common = dict(device=device, corruption=corruption, seed=options.seed, noisy=options.noisy_data,
                  xflip=options.xflip)
    if kind == "dali":
        par = Parallel(device) if par is None else par
        n, _ = par.batch_split(options.batch, options.batch_gpu)  # the share Pretrain.step asks for
        return DALIData(source, batch_size=n, rank=par.rank, world_size=par.world_size, start_step=start_step,
                        **shape, **common)
    return GPUData(load_images(source, **shape), **common)


def _check_data(data, config):
    if data is not None and (data.resolution, data.channels) != (config.img_resolution, config.in_channels):
        raise ValueError(f"dataset: images are {data.channels}x{data.resolution}x{data.resolution} (CxHxW) but "
                         f"the network expects {config.in_channels}x{config.img_resolution}x{config.img_resolution}")


def train(options=None, *, phases=("pretrain",), outdir=None, resume=None, data=None, on_step=None,
          progress=True):
    """Run `phases` (a tuple in PHASES order) in a new run directory `outdir`, or continue the run in `resume`
    (options None: the saved ones; else they may differ only in options.RESUMABLE fields). data: a GPUData
    to use instead of loading options.dataset. Every check runs before anything is written.
    Under torchrun every process calls this (options.parallel: ddp or fsdp); rank 0 writes the run directory.
    Returns "done" or "interrupted" (Ctrl-C; last.pt written)."""
    if not phases or tuple(p for p in PHASES if p in phases) != tuple(phases):
        raise ValueError(f"phases: expected a non-empty tuple in the order {PHASES}, got {phases!r}")
    if (outdir is None) == (resume is None):
        raise ValueError("outdir/resume: expected exactly one of them (a new run, or a run to continue)")
    state = None
    if resume is not None:
        run, saved, state = RunDir.open(resume)
        options = saved if options is None else options
        run.check_resume(saved, options)
        if state["phase"] not in phases:
            raise ValueError(f"resume: {run.path} stopped in phase {state['phase']!r}, which this command "
                             f"({'/'.join(phases)}) does not run")
    elif options is None:
        raise ValueError("options: expected an Options for a new run")
    with launch(options) as par:
        return _train(options, phases, outdir, resume, data, on_step, progress, par,
                      run if resume is not None else None, state)


def _train(options, phases, outdir, resume, data, on_step, progress, par, run, state):
    config = resolve_config(options.preset)
    device = par.device
    par.batch_split(options.batch, options.batch_gpu)
    teacher_state = None
    if phases[0] == "distill" and (state is None or state["phase"] != "distill"):
        if options.teacher is None:
            raise ValueError("teacher: Phase II alone needs a Phase I checkpoint (--teacher)")
        teacher = load_checkpoint(options.teacher)
        check_teacher(teacher, config, options.teacher)
        teacher_state = teacher["ema"]
    if data is None and options.dataset is not None:
        start = state["step"] if state is not None and state["phase"] == "pretrain" else 0
        data = load_data(options, config, device, par, start)
        if progress and par.main:
            print(f"data: {options.loader_choice}", flush=True)
    if data is None and "pretrain" in phases:
        raise ValueError("dataset: Phase I needs a data set (--dataset)")
    _check_data(data, config)
    if resume is None:
        run = RunDir(outdir, writer=par.main)
        run.check_new()
    run.writer = par.main
    select = ProximalFID(options, data, par, run, state, PHASES) if options.fid_every_kimg else None
    par.barrier()  # every rank has checked (and read last.pt) before rank 0 writes

    if resume is None:
        run.create(options)
    else:
        run.remove_partial()
        run.update_options(options)
        run.truncate_metrics(PHASES, state["phase"], state["step"])
    if progress and run.writer:
        print(describe_disk_use(disk_use(options, config, phases), run.path), flush=True)
    start = phases.index(state["phase"]) if state is not None else 0
    for name in phases[start:]:
        resuming = state is not None and state["phase"] == name
        if name == "pretrain":
            phase = Pretrain(options, config, data, device, par=par)
            total = steps_for(options.pretrain_kimg, options.batch)
        else:
            if resuming:
                teacher_state = state["teacher"]
            phase = Distill(options, config, data, device, teacher_state, par=par)
            total = steps_for(options.distill_kimg, options.batch)
        if resuming:
            phase.load_state_dict(state)
        if run_phase(phase, run, total, on_step=on_step, progress=progress, select=select) == "interrupted":
            return "interrupted"
        if name == "pretrain":
            teacher_state = phase.teacher_state()
    return "done"
