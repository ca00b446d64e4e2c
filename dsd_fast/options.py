"""Training configuration as data: one dataclass, validated once, saved as the run's options.json."""

import dataclasses
import json
import math

from . import checks
from .corruption import BlurNoiseCorruption, NoiseCorruption
from .data.dali import LOADERS
from .distributed import PARALLELS
from .metrics.fid import RESIZE_MODES
from .networks import PRESETS
from .reference.edm import KARRAS_SIGMA_MAX

PHASE_ORDER = ("pretrain", "distill")
CORRUPTIONS = ("noise", "blur")
PRECISIONS = ("fp32", "tf32", "bf16", "fp64")
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")
SIGMA_SAMPLINGS = ("truncated", "clamp")
LR_SCHEDULES = ("constant", "cosine")  # Phase II: SiD's constant lr, or a cosine decay to 0 over distill_kimg
OBSERVATION_SIGMA = "sigma"  # g_sigma_min's name for the observation sigma
DISTILL_LOSSES = ("sid", "dmd", "sds")

# Per-preset defaults: EDM (batch 512, lr 1e-3 at 32^2; 2e-4 at 64^2 with batch 256 as EDM's AFHQ/FFHQ runs),
# SiD (generator/fake lr 1e-5, AFHQ 5e-6 with alpha 1.0). cpu-tiny: lr 2e-3 (a 0.3M-parameter net tolerates
# more; its only jobs are tests and the CPU demo).
PRESET_DEFAULTS = {
    "cifar10": dict(batch=512, lr=1e-3, g_lr=1e-5, alpha=1.2),
    "fashion-mnist": dict(batch=512, lr=1e-3, g_lr=1e-5, alpha=1.2),
    "afhq": dict(batch=256, lr=2e-4, g_lr=5e-6, alpha=1.0),
    "ffhq": dict(batch=256, lr=2e-4, g_lr=1e-5, alpha=1.2),
    "celebahq": dict(batch=256, lr=2e-4, g_lr=1e-5, alpha=1.2),
    "cpu-tiny": dict(batch=64, lr=2e-3, g_lr=1e-4, alpha=1.2),
    "cpu-fashion": dict(batch=64, lr=2e-3, g_lr=1e-4, alpha=1.2),
}

# Fields a resumed run may change: how long it runs and how it reports, never what it computes.
# The parallel mode (and the world size, which is not an option) changes only float rounding: checkpoints hold
# full state dicts and every draw is keyed by global sample position.
# The loader fields too: both loaders give the same batches.
RESUMABLE = frozenset({"loader", "loader_memory_fraction", "loader_choice", "pretrain_kimg", "distill_kimg",
                       "snapshot_kimg", "state_kimg", "keep", "log_every", "device", "compile", "compile_mode",
                       "max_nonfinite", "parallel", "fid_every_kimg", "fid_batch"})
# The in-loop selection metric (selection.py): resumable only until the run has measured it, since its cached
# reference stats and best.json are in its terms.
FID_METRIC = frozenset({"fid_images", "fid_ref_images", "fid_mode"})


@dataclasses.dataclass
class Options:
    # Data and corruption (y = A x + sigma eps, one fixed draw per image).
    dataset: str | None = None  # preset name or path; None only for distill (no real data needed)
    data: str | None = None  # explicit path for a preset name
    noisy_data: bool = False  # the dataset is already corrupted: use it as-is
    max_images: int | None = None
    xflip: bool = True
    loader: str = "auto"  # resident (GPUData: the uint8 set on the device), dali (streamed), auto (by size)
    loader_memory_fraction: float = 0.5  # auto keeps the data resident when it fits in this much free device memory
    loader_choice: str | None = None  # set at the start of the run: the loader auto chose, and why
    corruption: str = "noise"
    sigma: float = 0.2
    sigma_estimate: dict | None = None  # --sigma auto: where sigma came from (noise_level.NoiseEstimate, source)
    blur: float = 0.0
    blur_schedule: str = "fixed"
    # Network and run.
    preset: str = "cifar10"
    seed: int = 0
    batch: int | None = None  # images per optimiser step (all ranks); None: preset default
    batch_gpu: int | None = None  # images per forward/backward round on one process; None: the whole batch
    parallel: str = "auto"  # under torchrun: ddp or fsdp (auto: ddp with several processes, none with one)
    precision: str = "fp32"
    compile: bool = False  # torch.compile each step's loss computation end to end (loop.compiled)
    compile_mode: str = "default"  # torch.compile mode: default, max-autotune, reduce-overhead (CUDA graphs)
    device: str | None = None
    snapshot_kimg: float = 500.0  # network snapshot <phase>-<kimg>kimg.pt, last.pt and grids every N kimg
    state_kimg: float = 0.0  # also a kept full-state copy <phase>-<kimg>kimg-state.pt every N kimg; 0: last.pt only
    keep: int | None = None  # the newest kept state copies that survive; None: all
    log_every: int = 10  # steps between metrics.jsonl lines
    grid_images: int = 64
    sample_steps: int = 18
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    # In-loop model selection by Proximal FID (selection.py): best.ckpt, best.json, metrics.jsonl lines.
    fid_every_kimg: float = 0.0  # 0: off
    fid_images: int = 10000  # generated images (seeds 0..fid_images-1) per measurement
    fid_ref_images: int | None = None  # corrupted data images in the reference stats; None: all
    fid_mode: str = "edm"  # FID feature mode (metrics.fid): edm (EDM's pipeline), clean (clean-fid's), gpu
    fid_batch: int = 256  # images per generation / feature batch
    # Phase I (ambient-Tweedie pretraining).
    pretrain_kimg: float = 200000.0
    lr: float | None = None
    lr_rampup_kimg: float = 10000.0
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float = 0.05
    sigma_sampling: str = "truncated"
    # Phase II (score distillation).
    teacher: str | None = None
    distill_kimg: float = 100000.0
    loss: str = "sid"
    alpha: float | None = None
    g_lr: float | None = None  # generator lr
    # The fake score f_psi: its lr (None: g_lr, as SiD) and its updates per generator update (SiD: 1). DMD2's
    # two-time-scale rule (5 fake updates per generator update) keeps f_psi tracking a fast-moving generator.
    fake_lr: float | None = None
    fake_steps: int = 1
    # Both Phase II nets' lr over the run: constant (SiD) or cosine, g_lr/fake_lr * (1 + cos(pi k / K)) / 2 at step
    # k of K = the distill_kimg steps (resuming with another distill_kimg stretches what is left of it).
    g_lr_schedule: str = "constant"
    sigma_init: float = 2.5
    t_max: float = 800.0
    # Generator-step levels: SiD's Karras schedule with this sigma_min (SiD: 0.002). OBSERVATION_SIGMA ("sigma") uses
    # the observation sigma: the ambient teacher only learnt sigma_t > sigma in Phase I, and with 0.002 about a third
    # of the generator steps query it at levels it never saw.
    g_sigma_min: float | str = 0.002
    g_ema_halflife_kimg: float = 500.0
    # The generator EMA's half-life cap, as a fraction of the images seen (EDM's ramp-up; 0: no cap). Phase I's
    # 0.05 averages only the last 5 %; a one-step student that has levelled off gains from a longer window.
    g_ema_rampup_ratio: float = 0.05

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        for name, value in PRESET_DEFAULTS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.batch_gpu is None:
            self.batch_gpu = self.batch
        if self.fake_lr is None:
            self.fake_lr = self.g_lr
        self._validate()

    def _validate(self):
        def choice(name, choices):
            checks.choice(name, getattr(self, name), choices)

        def number(name, low=0.0, strict=False):
            checks.number(name, getattr(self, name), low, strict=strict)

        def integer(name, low=1):
            checks.integer(name, getattr(self, name), low)

        choice("corruption", CORRUPTIONS)
        choice("precision", PRECISIONS)
        choice("sigma_sampling", SIGMA_SAMPLINGS)
        choice("g_lr_schedule", LR_SCHEDULES)
        choice("loss", DISTILL_LOSSES)
        choice("parallel", PARALLELS)
        choice("fid_mode", RESIZE_MODES)
        choice("loader", LOADERS)
        choice("compile_mode", COMPILE_MODES)
        number("loader_memory_fraction", strict=True)
        if self.loader_memory_fraction > 1:
            raise ValueError(f"loader_memory_fraction: expected a number in (0, 1], got {self.loader_memory_fraction}")
        for name in ("sigma", "blur", "pretrain_kimg", "distill_kimg", "lr_rampup_kimg", "ema_halflife_kimg",
                     "ema_rampup_ratio", "g_ema_halflife_kimg", "g_ema_rampup_ratio"):
            number(name)
        for name in ("lr", "g_lr", "fake_lr", "sigma_init", "snapshot_kimg", "t_max"):
            number(name, strict=True)
        number("alpha", low=-math.inf)
        if isinstance(self.g_sigma_min, str) and self.g_sigma_min != OBSERVATION_SIGMA:
            raise ValueError(f"g_sigma_min: expected a number or {OBSERVATION_SIGMA!r}, got {self.g_sigma_min!r}")
        if self.g_sigma_min != OBSERVATION_SIGMA:
            number("g_sigma_min", strict=True)
        if not 0 < self.generator_sigma_min() < KARRAS_SIGMA_MAX:
            raise ValueError(f"g_sigma_min: expected a level in (0, {KARRAS_SIGMA_MAX}) or {OBSERVATION_SIGMA!r} with "
                             f"sigma > 0, got {self.g_sigma_min!r} (sigma={self.sigma})")
        number("fid_every_kimg")
        number("state_kimg")
        for name in ("batch", "batch_gpu", "log_every", "sample_steps", "max_nonfinite", "fid_batch",
                     "fake_steps"):
            integer(name)
        integer("grid_images", 0)
        integer("fid_images", 2)  # a covariance needs two samples
        if self.fid_ref_images is not None:
            integer("fid_ref_images", 2)
        integer("seed", 0)
        if self.max_images is not None:
            integer("max_images")
        if self.keep is not None:
            integer("keep")
        if self.batch % self.batch_gpu:
            raise ValueError(f"batch_gpu: expected a divisor of batch={self.batch}, got {self.batch_gpu}")
        if self.corruption == "blur" and self.blur <= 0:
            raise ValueError(f"blur: expected a blur std > 0 pixels with corruption='blur', got {self.blur}")
        if self.corruption == "noise" and self.blur != 0:
            raise ValueError(f"blur: only meaningful with corruption='blur' (got blur={self.blur} with 'noise')")
        if self.sigma_estimate is not None and not isinstance(self.sigma_estimate, dict):
            raise ValueError(f"sigma_estimate: expected None or a dict (a NoiseEstimate record), got "
                             f"{type(self.sigma_estimate).__name__}")
        self.make_corruption()  # validates the schedule against sigma

    def generator_sigma_min(self):
        """The generator step's Karras sigma_min as a number (OBSERVATION_SIGMA resolved to sigma)."""
        return self.sigma if self.g_sigma_min == OBSERVATION_SIGMA else self.g_sigma_min

    def make_corruption(self):
        if self.corruption == "blur":
            return BlurNoiseCorruption(self.blur, self.sigma, self.blur_schedule)
        return NoiseCorruption(self.sigma)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"options: unknown fields {unknown}")
        return cls(**d)

    def differences(self, other, ignore=RESUMABLE):
        """Names of fields (outside ignore) whose values differ from other's."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a if k not in ignore and a[k] != b[k])
