"""Loop machinery shared by both phases: keyed randomness, precision, the step loop with progress bar, snapshots
(through rundir.RunDir), non-finite guard, Ctrl-C handling and the disk-use estimate printed at the start.

Resume is exact because every random draw of step k is a pure function of (seed, purpose, k) and the global
sample position: data order (GPUData.batch(step)), sigma_t uniforms and noise (Philox streams under a derived
key, rank r of world_size reading them from sample r * batch / world_size on), so a draw does not depend on the
world size either; dropout reseeds the global torch RNG from (seed, k, rank) at the start of every step (its
masks do depend on the rank). A checkpoint therefore needs only weights, optimiser and EMA state and the step
counter. With several processes only rank 0 writes files and shows the progress bar.
"""

import contextlib
import hashlib
import math
import os
import resource
import shutil
import signal
import threading
import time

import torch
from tqdm import tqdm

from ..networks import build_network
from ..options import PHASE_ORDER
from ..reference.philox import rand, stream_normal
from ..rundir import STATE_SUFFIX, kimg_name


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite losses, bad checkpoint); the CLI turns it into exit code 1."""


def derive_seed(seed, *parts):
    """A 63-bit key from (seed, parts): distinct purposes and steps get independent Philox streams."""
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def uniform(key, n, device, start=0):
    """n float32 U[0, 1) from the Philox stream `key`, elements start..start+n-1 (one per sample)."""
    return rand(key, start + torch.arange(n, dtype=torch.int64, device=device))


def normal(key, shape, device, start=0, dtype=torch.float32):
    """N(0, I) of shape [B, ...] from the Philox stream `key`, samples start..start+B-1 of it (drawn in float32,
    then cast: an fp64 run sees the same draws)."""
    return stream_normal(key, start * math.prod(shape[1:]), shape, dtype, device)


def compute_dtype(precision):
    """The dtype of weights, data and losses: float64 for --precision fp64 (verification runs), else float32
    (bf16 is autocast over float32 weights)."""
    return torch.float64 if precision == "fp64" else torch.float32


def compiled(options, fn):
    """fn under torch.compile with options.compile_mode when options.compile, else fn itself."""
    return torch.compile(fn, mode=options.compile_mode) if options.compile else fn


def seed_dropout(seed, step, rank):
    """Reseed the global torch RNG (dropout) from (seed, step, rank)."""
    torch.manual_seed(derive_seed(seed, "dropout", step, rank))


def autocast(precision, device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_precision(precision):
    """tf32 matmuls/convolutions only when asked for (torch's default for matmul is fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def steps_for(kimg, batch):
    return math.ceil(round(kimg * 1000, 6) / batch)


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# torch.save's zip archive costs about this much per tensor beyond its data (zip headers, 64-byte alignment, the
# pickled key and storage record); measured 340-370 bytes on the cpu-tiny network's 179 tensors (names ~40
# characters), so the estimate below is within 1 % of the files there.
_BYTES_PER_TENSOR = 360


def disk_use(options, config, phases):
    """Expected bytes in the run directory at the end of a run of `phases`: dict(snapshots, snapshot_bytes,
    states, state_bytes (of each kept copy, oldest first), last_bytes, best_bytes, total)."""
    with torch.device("meta"):  # shapes and dtypes only: no memory, even for the paper-scale presets
        net = build_network(config).to(compute_dtype(options.precision))
    params = list(net.parameters())
    n_tensors = len(net.state_dict())
    net_bytes = _tensor_bytes(net.state_dict().values()) + n_tensors * _BYTES_PER_TENSOR
    # Adam: exp_avg and exp_avg_sq like each parameter, plus a float32 step count per parameter.
    adam_bytes = 2 * _tensor_bytes(params) + len(params) * (4 + 3 * _BYTES_PER_TENSOR)
    state_bytes = {"pretrain": 2 * net_bytes + adam_bytes, "distill": 4 * net_bytes + 2 * adam_bytes}
    snapshots, states = 0, []
    for name in PHASE_ORDER:
        if name not in phases:
            continue
        total = steps_for(options.pretrain_kimg if name == "pretrain" else options.distill_kimg, options.batch)
        every = max(1, steps_for(options.snapshot_kimg, options.batch))
        snapshots += total // every + (total % every != 0)
        if options.state_kimg:
            states += [state_bytes[name]] * (total // max(1, steps_for(options.state_kimg, options.batch)))
    if options.keep is not None:
        states = states[len(states) - min(len(states), options.keep):]
    last = state_bytes[phases[-1]]
    best = net_bytes if options.fid_every_kimg else 0
    return dict(snapshots=snapshots, snapshot_bytes=net_bytes, states=len(states), state_bytes=states,
                last_bytes=last, best_bytes=best, total=snapshots * net_bytes + sum(states) + last + best)


def _size(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def describe_disk_use(use, path):
    """One line for the start of a run: what its directory will hold, and the free space there."""
    states = f" + {use['states']} state copies x {_size(use['state_bytes'][-1])}" if use["states"] else ""
    best = f" + best.ckpt {_size(use['best_bytes'])}" if use["best_bytes"] else ""
    text = (f"disk: {use['snapshots']} network snapshots x {_size(use['snapshot_bytes'])}{states} + last.pt "
            f"{_size(use['last_bytes'])}{best} = {_size(use['total'])} expected in {path} (+ {_size(use['last_bytes'])}"
            f" while last.pt is rewritten)")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):  # a new run's directory: the free space of the folder it will be made in
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    text += f"; {_size(free)} free"
    if free < use["total"] + use["last_bytes"]:
        text += " -- NOT ENOUGH: raise --snapshot-kimg, lower --keep or free space"
    return text


@contextlib.contextmanager
def deferred_sigint():
    """While active, the first Ctrl-C only sets a flag (checked between steps, so a checkpoint is never taken
    in the middle of an optimiser update); a second one interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run_phase(phase, run, total_steps, *, on_step=None, progress=True, select=None):
    """Steps phase.completed..total_steps-1 of `phase`, an object with name, options, device, par (Parallel),
    completed (steps done), bad (update.NonFinite), step(k) -> (finite, metrics) (0-d device tensors or floats,
    read only when the loop logs, measures, checkpoints or calls on_step), state_dict() (the full state),
    network_state() (the small snapshot: network_snapshot), snapshot(run) (grids); every rank runs it (checkpoints
    and snapshots are collectives under FSDP), rank 0 writes. Returns "done" or "interrupted" (Ctrl-C: last.pt is
    written at the last completed step; the caller exits 0).
    on_step(k, metrics) is called after each step (tests raise KeyboardInterrupt from it).
    select: a selection.ProximalFID, called as select(phase, run) every options.fid_every_kimg and at the end."""
    bar = tqdm(total=total_steps, initial=phase.completed, desc=phase.name, unit="step",
               disable=not (progress and run.writer), dynamic_ncols=True)
    try:
        with deferred_sigint() as interrupted:
            _steps(phase, run, total_steps, bar, on_step, interrupted, select)
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
    if phase.completed == total_steps:
        return "done"
    run.save_checkpoint(phase.state_dict(), "last.pt")
    if run.writer:
        tqdm.write(f"{phase.name}: interrupted after step {phase.completed}; checkpoint {run.file('last.pt')}")
    return "interrupted"


def save_checkpoints(phase, run, snapshot, keep_state):
    """With snapshot the network snapshot and the grids, with keep_state a kept state copy (pruning old ones), then
    the full state to last.pt. last.pt comes last: a run killed before it resumes from the previous last.pt and
    rewrites this step's files, identical; killed after it, every file of this step is already there. Every rank
    calls it (collectives under FSDP)."""
    o, step = phase.options, phase.completed
    if snapshot:
        run.save_checkpoint(phase.network_state(), kimg_name(phase.name, step, o.batch))
        phase.snapshot(run)
    state = phase.state_dict()
    if keep_state:
        run.save_checkpoint(state, kimg_name(phase.name, step, o.batch, STATE_SUFFIX))
        run.prune_states(o.keep, PHASE_ORDER)
    run.save_checkpoint(state, "last.pt")


STALL = 0.1  # a streaming loader that keeps the step waiting this fraction of the time is reported as a stall


def _loader_record(phase, bar):
    """A streaming loader's (DALI) own rate and the step's wait for it since the last log line; a stall is also
    written to the console. Nothing for the resident loader (its batches are device-side gathers)."""
    data = getattr(phase, "data", None)
    if data is None or not hasattr(data, "stats"):
        return {}
    s = data.stats(reset=True)
    if s.wait_fraction > STALL and not bar.disable:
        tqdm.write(f"{phase.name}: the data loader stalls the step ({s.wait_fraction:.0%} of the time waiting, "
                   f"{s.img_per_s:.0f} img/s): raise its threads or use the resident loader if the set fits")
    return dict(loader_img_per_s=s.img_per_s, loader_wait_s=s.wait_s, loader_wait_fraction=s.wait_fraction)


def _steps(phase, run, total_steps, bar, on_step, interrupted, select):
    o, batch = phase.options, phase.options.batch
    snapshot_steps = max(1, steps_for(o.snapshot_kimg, batch))
    state_steps = max(1, steps_for(o.state_kimg, batch)) if o.state_kimg else 0
    fid_steps = max(1, steps_for(o.fid_every_kimg, batch))
    postfix = {}
    t_log, step_log = time.perf_counter(), phase.completed
    par = phase.par
    while phase.completed < total_steps:
        k = phase.completed
        # Ranks see Ctrl-C at different steps: all leave the loop together, at the first step any saw it that
        # they compare at (every log_every steps with several ranks: the comparison is a collective and a sync).
        if (par.world_size == 1 or k % o.log_every == 0) and par.any(interrupted.is_set()):
            break
        finite, metrics = phase.step(k)  # device tensors: read (one sync) only below, when something needs them
        step = phase.completed
        log = step % o.log_every == 0 or step == total_steps
        measure = select is not None and (step % fid_steps == 0 or step == total_steps)
        snapshot = step % snapshot_steps == 0 or step == total_steps
        keep_state = bool(state_steps) and step % state_steps == 0
        if not (log or measure or snapshot or keep_state or on_step is not None):
            bar.update(1)
            continue
        nonfinite, in_a_row, last_bad = phase.bad.read()
        metrics = {key: float(v) for key, v in metrics.items()}
        if in_a_row >= o.max_nonfinite:
            raise TrainingError(f"{phase.name}: {in_a_row} non-finite losses in a row (last at step {last_bad}, "
                                f"{metrics}); stopping. The last good state is {run.file('last.pt')}; "
                                f"lower the learning rate or use --precision fp32")
        if log:
            now = time.perf_counter()
            record = dict(phase=phase.name, step=step, kimg=step * batch / 1000,
                          img_per_s=(step - step_log) * batch / max(now - t_log, 1e-9),
                          mem_mb=round(memory_mb(phase.device), 1), nonfinite=nonfinite, **metrics)
            record.update(_loader_record(phase, bar))
            run.log(record)
            t_log, step_log = now, step
            postfix.update(kimg=f"{record['kimg']:.2f}", img_s=f"{record['img_per_s']:.0f}",
                           loss=f"{metrics['loss']:.4g}")
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        # The measurement comes before last.pt, like every other output of this step (see save_checkpoints).
        if measure:
            fid = select(phase, run)
            postfix["pfid"] = f"{fid['proximal_fid']:.4g}"
            bar.set_postfix(postfix, refresh=False)
            if not bar.disable:
                best = ", best so far: best.ckpt" if fid["best"] else ""
                tqdm.write(f"{phase.name}: Proximal FID {fid['proximal_fid']:.4g} at {fid['kimg']:.3f} kimg "
                           f"({fid['fid_images']} images, {fid['fid_s']:.1f} s){best}")
            t_log = time.perf_counter()
        if snapshot or keep_state:
            save_checkpoints(phase, run, snapshot, keep_state)
            t_log = time.perf_counter()  # img/s measures training steps, not snapshots
        if on_step is not None:
            on_step(k, metrics)
