"""Loop machinery shared by both phases: keyed randomness, run directory (options.json, metrics.jsonl, atomic
checkpoints), the step loop with progress bar, snapshots, non-finite guard and Ctrl-C handling.

Resume is exact because every random draw of step k is a pure function of (seed, purpose, k) and the global
sample position: data order (GPUData.batch(step)), sigma_t uniforms and noise (Philox streams under a derived
key, rank r of world_size reading them from sample r * batch / world_size on), so a draw does not depend on the
world size either; dropout reseeds the global torch RNG from (seed, k, rank) at the start of every step (its
masks do depend on the rank). A checkpoint therefore needs only weights, optimiser and EMA state and the step
counter. With several processes only rank 0 writes files and shows the progress bar.
"""

import contextlib
import hashlib
import json
import math
import os
import resource
import signal
import threading
import time

import torch
from tqdm import tqdm

from ..reference.philox import rand, stream_normal
from .grids import save_grid
from .options import FID_METRIC, RESUMABLE, Options

FID_REFERENCE = "fid-ref-proximal.npz"  # selection.py's reference stats, cached at the run's first measurement


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


def atomic_write_bytes(path, write):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """The run directory: options.json, metrics.jsonl, last.pt, <phase>-<kimg>.pt snapshots, PNG grids (and, with
    in-loop selection, best.ckpt, best.json and FID_REFERENCE: selection.py).
    Only a writer (rank 0) writes; on other ranks the writing methods do nothing."""

    def __init__(self, path, writer=True):
        self.path = os.fspath(path)
        self.writer = writer

    def file(self, name):
        return os.path.join(self.path, name)

    def check_new(self):
        """Refuse a directory that already holds a run (nothing there is touched)."""
        if os.path.exists(self.file("options.json")):
            raise ValueError(f"outdir: {self.path} already holds a run (options.json); "
                             f"continue it with --resume {self.path} or choose another --outdir")

    def create(self, options):
        if self.writer:
            os.makedirs(self.path, exist_ok=True)
            atomic_write_bytes(self.file("options.json"), lambda f: f.write(options.to_json().encode()))

    @classmethod
    def open(cls, path):
        """An existing run: (RunDir, saved Options, last checkpoint). Writes nothing."""
        run = cls(path)
        if not os.path.isfile(run.file("options.json")):
            raise ValueError(f"resume: {run.path} is not a run directory (no options.json)")
        if not os.path.isfile(run.file("last.pt")):
            raise ValueError(f"resume: {run.path} has no checkpoint last.pt to resume from")
        with open(run.file("options.json")) as f:
            saved = Options.from_dict(json.load(f))
        return run, saved, load_checkpoint(run.file("last.pt"))

    def check_resume(self, saved, options):
        """options may differ from the saved ones only in RESUMABLE fields (and in FID_METRIC ones while the run has
        not measured Proximal FID yet); else ValueError, nothing written."""
        measured = os.path.exists(self.file(FID_REFERENCE))
        diff = options.differences(saved, RESUMABLE if measured else RESUMABLE | FID_METRIC)
        if diff:
            detail = ", ".join(f"{k}: saved {getattr(saved, k)!r}, given {getattr(options, k)!r}" for k in diff)
            raise ValueError(f"resume: the options differ from {self.file('options.json')} ({detail}); "
                             f"a resumed run must compute the same thing (start a new --outdir instead)")

    def update_options(self, options):
        if self.writer:
            atomic_write_bytes(self.file("options.json"), lambda f: f.write(options.to_json().encode()))

    def truncate_metrics(self, phase_order, phase, step):
        """Drop metric lines written after the checkpoint (phase, step) that is being resumed."""
        path = self.file("metrics.jsonl")
        if not self.writer or not os.path.exists(path):
            return
        limit = (phase_order.index(phase), step)
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines
                if (phase_order.index(json.loads(line)["phase"]), json.loads(line)["step"]) <= limit]
        atomic_write_bytes(path, lambda f: f.write("".join(keep).encode()))

    def log(self, record):
        if not self.writer:
            return
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, state, *names):
        """torch.save(state) atomically to each name (temporary file + os.replace)."""
        for name in names:
            if self.writer:
                atomic_write_bytes(self.file(name), lambda f: torch.save(state, f))

    def save_grid(self, x, name):
        if self.writer:
            save_grid(x, self.file(name))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e})") from e


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
    completed (steps done), nonfinite (count), step(k) -> (finite, metrics), state_dict(), snapshot(run); every
    rank runs it (checkpoints and snapshots are collectives under FSDP), rank 0 writes. Returns "done" or
    "interrupted" (Ctrl-C: last.pt is written at the last completed step; the caller exits 0).
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


def _steps(phase, run, total_steps, bar, on_step, interrupted, select):
    o, batch = phase.options, phase.options.batch
    snapshot_steps = max(1, steps_for(o.snapshot_kimg, batch))
    fid_steps = max(1, steps_for(o.fid_every_kimg, batch))
    postfix = {}
    bad_in_a_row = 0
    t_log, step_log = time.perf_counter(), phase.completed
    # Ranks see Ctrl-C at different steps: all leave the loop together, at the first step any saw it.
    while phase.completed < total_steps and not phase.par.any(interrupted.is_set()):
        k = phase.completed
        finite, metrics = phase.step(k)
        step = phase.completed
        bad_in_a_row = 0 if finite else bad_in_a_row + 1
        if bad_in_a_row >= o.max_nonfinite:
            raise TrainingError(f"{phase.name}: {bad_in_a_row} non-finite losses in a row (last at step {k}, "
                                f"{metrics}); stopping. The last good state is {run.file('last.pt')}; "
                                f"lower the learning rate or use --precision fp32")
        if step % o.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            record = dict(phase=phase.name, step=step, kimg=step * batch / 1000,
                          img_per_s=(step - step_log) * batch / max(now - t_log, 1e-9),
                          mem_mb=round(memory_mb(phase.device), 1), nonfinite=phase.nonfinite, **metrics)
            run.log(record)
            t_log, step_log = now, step
            postfix.update(kimg=f"{record['kimg']:.2f}", img_s=f"{record['img_per_s']:.0f}",
                           loss=f"{metrics['loss']:.4g}")
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if step % snapshot_steps == 0 or step == total_steps:
            run.save_checkpoint(phase.state_dict(), "last.pt", f"{phase.name}-{step * batch / 1000:010.3f}kimg.pt")
            phase.snapshot(run)
            t_log = time.perf_counter()  # img/s measures training steps, not snapshots
        if select is not None and (step % fid_steps == 0 or step == total_steps):
            fid = select(phase, run)
            postfix["pfid"] = f"{fid['proximal_fid']:.4g}"
            bar.set_postfix(postfix, refresh=False)
            if not bar.disable:
                best = ", best so far: best.ckpt" if fid["best"] else ""
                tqdm.write(f"{phase.name}: Proximal FID {fid['proximal_fid']:.4g} at {fid['kimg']:.3f} kimg "
                           f"({fid['fid_images']} images, {fid['fid_s']:.1f} s){best}")
            t_log = time.perf_counter()
        if on_step is not None:
            on_step(k, metrics)
