"""The run directory and its files: options.json, metrics.jsonl, checkpoints (full training state and network
snapshots, read with weights_only=True), PNG grids, and the atomic write every one of them goes through.

Files (EDM's split): every options.snapshot_kimg a small network snapshot <phase>-<kimg>kimg.pt (the EMA network
and the options that sample it: what generate / fid / eval / --teacher need) and the full training state in
last.pt, replaced in place; every options.state_kimg a kept copy <phase>-<kimg>kimg-state.pt, of which the
options.keep newest survive. Every file but metrics.jsonl (appended to, line by line) is written to <name>.tmp and
renamed, so a crash (kill -9, a full disk) never leaves a half-written file under a final name; resume deletes
leftover *.tmp files and a torn last metrics line. Checkpoints hold only tensors and plain containers and are read
with torch.load(weights_only=True): a file that needs unpickling is refused, never executed.
"""

import contextlib
import glob
import json
import math
import os
import pickle
import subprocess

import numpy as np
import torch
from PIL import Image

from .options import FID_METRIC, RESUMABLE, Options

FID_REFERENCE = "fid-ref-proximal.npz"  # in-loop Proximal FID's reference stats, cached at its first measurement
NETWORK = "network"  # the `contents` of a network snapshot; a full training state has contents "state"
STATE_SUFFIX = "kimg-state.pt"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


def code_commit():
    """The code a result came from, for its record: $DSD_FAST_COMMIT if set (a copy of the tree without .git, as
    on the GPU machine), else git's HEAD of this checkout, "+dirty" when tracked files differ from it."""
    if os.environ.get("DSD_FAST_COMMIT"):
        return os.environ["DSD_FAST_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                        check=True).stdout.strip()
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: torch.save reports one (ENOSPC) as an
    unrelated RuntimeError ('unexpected pos ...'), and the user must hear the real cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):  # seek, tell, ... for writers such as np.savez's zip file
        return getattr(self.f, name)


def atomic_write_bytes(path, write):
    """write(f) into path.tmp, fsync, then rename it to path: path is either its previous file or the complete
    new one. On failure (a full disk) path.tmp is removed and OSError says which file could not be written."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            try:
                write(f)
            except Exception as e:
                if f.error is None or f.error is e:
                    raise
                raise f.error from None  # torch's RuntimeError only restates it
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "its previous version is unchanged" if os.path.exists(path) else "nothing was written"
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e} ({kept})") from e
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path):
    """Make a rename durable (a power cut, not just a killed process); some file systems cannot, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def kimg_name(phase, step, batch, suffix="kimg.pt"):
    """<phase>-<kimg>kimg.pt (a network snapshot) or, with STATE_SUFFIX, a kept state copy."""
    return f"{phase}-{step * batch / 1000:010.3f}{suffix}"


class RunDir:
    """The run directory: options.json, metrics.jsonl, last.pt (the full state), <phase>-<kimg>kimg.pt network
    snapshots, <phase>-<kimg>kimg-state.pt state copies, PNG grids (and, with in-loop selection, best.ckpt,
    best.json and FID_REFERENCE: selection.py).
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
        state = load_checkpoint(run.file("last.pt"))
        if is_network_snapshot(state):
            raise ValueError(f"resume: {run.file('last.pt')} is a network snapshot, not a training state "
                             f"(it holds no optimiser state to continue from)")
        return run, saved, state

    def remove_partial(self):
        """Delete the *.tmp files a killed writer left behind (none is ever under a final name)."""
        if self.writer:
            for path in glob.glob(self.file("*.tmp")) + glob.glob(self.file(".*.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

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
        """Drop metric lines written after the checkpoint (phase, step) that is being resumed, and a torn last
        line (a process killed in the middle of appending it)."""
        path = self.file("metrics.jsonl")
        if not self.writer or not os.path.exists(path):
            return
        limit = (phase_order.index(phase), step)
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    break  # torn by a kill in the middle of the append
                raise ValueError(f"resume: {path} line {i + 1} is not JSON ({e}); only the last line may be "
                                 f"incomplete") from e
            if (phase_order.index(record["phase"]), record["step"]) <= limit:
                keep.append(line + "\n")
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

    def state_copies(self, phase_order):
        """Names of the kept state copies, oldest first (by phase, then kimg)."""
        copies = []
        for path in glob.glob(self.file(f"*-*{STATE_SUFFIX}")):
            name = os.path.basename(path)
            phase, _, kimg = name[:-len(STATE_SUFFIX)].partition("-")
            with contextlib.suppress(ValueError):
                copies.append((phase_order.index(phase), float(kimg), name))
        return [name for *_, name in sorted(copies)]

    def prune_states(self, keep, phase_order):
        """Delete all but the `keep` newest state copies (keep None: all stay)."""
        if self.writer and keep is not None:
            for name in self.state_copies(phase_order)[:-keep]:
                os.remove(self.file(name))

    def save_grid(self, x, name):
        if self.writer:
            save_grid(x, self.file(name))


def read_options(run_dir, name="run"):
    """The Options of a run directory (its options.json); FileNotFoundError naming `name` if it has none."""
    path = os.path.join(run_dir, "options.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: {run_dir!r} is not a run directory (no options.json)")
    with open(path) as f:
        return Options.from_dict(json.load(f))


def load_checkpoint(path):
    """A dsd_fast checkpoint (full state or network snapshot) as a dict, read with weights_only=True: tensors and
    plain containers only. ValueError for anything else; a file that needs unpickling is refused, not executed."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e})") from e
    if head != ZIP_MAGIC:
        if head[:1] == b"\x80":  # pickle protocol >= 2: a bare pickle, or torch's legacy format
            raise ValueError(_needs_pickle(path, "it is a pickle, not torch's zip format"))
        raise ValueError(f"checkpoint: cannot read {path} (not a torch checkpoint: no zip header)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(_needs_pickle(path, str(e.__cause__ or e).strip().splitlines()[0])) from e
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: {path} is not a dsd_fast checkpoint (it holds a {type(state).__name__}, "
                         f"expected a dict)")
    return state


def _needs_pickle(path, detail):
    return (f"checkpoint: {path} is not a dsd_fast checkpoint: reading it needs unpickling Python objects, which can "
            f"run arbitrary code, so it is refused ({detail}). dsd_fast checkpoints hold only tensors and plain "
            f"containers and load with torch.load(weights_only=True)")


def is_network_snapshot(state):
    return state.get("contents") == NETWORK


def network_snapshot(phase, key, weights):
    """The small snapshot of a phase: its EMA network's weights under `key` ('ema' for Phase I, 'G_ema' for
    Phase II, as in the full state) plus what rebuilds and samples it (options with the corruption, net_config)."""
    o = phase.options
    return dict(contents=NETWORK, phase=phase.name, step=phase.completed, kimg=phase.completed * o.batch / 1000,
                options=o.to_dict(), net_config=vars(phase.config).copy(), **{key: weights})




def to_uint8_grid(x, cols=None):
    """[N, C, H, W] in [-1, 1] -> uint8 array [rows*H, cols*W, C] (C = 1 or 3); missing tiles stay black."""
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[0] >= 1):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected [N, 1 or 3, H, W] images with N >= 1, got {got}")
    N, C, H, W = x.shape
    cols = cols or math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    img = (x.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    grid = torch.zeros(rows * cols, C, H, W, dtype=torch.uint8)
    grid[:N] = img
    grid = grid.view(rows, cols, C, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, cols * W, C)
    return grid.numpy()


def save_grid(x, path, cols=None):
    """Write the grid as a PNG, atomically."""
    grid = to_uint8_grid(x, cols)
    image = Image.fromarray(np.ascontiguousarray(grid[:, :, 0] if grid.shape[2] == 1 else grid))
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))
