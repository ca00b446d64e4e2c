"""`dsd-fast` command line."""

import dataclasses
import json
import os

import click
import torch

from . import __version__
from .commands import evaluate, fid, generate
from .corruption import SCHEDULES as BLUR_SCHEDULES
from .corruption import BlurNoiseCorruption, NoiseCorruption
from .data import convert_dataset, resolve_source
from .data.dali import LOADERS
from .distributed import PARALLELS
from .metrics.fid import RESIZE_MODES
from .networks import PRESETS
from .noise_level import estimate_dataset_noise
from .ops import backend
from .options import (
    COMPILE_MODES,
    CORRUPTIONS,
    DISTILL_LOSSES,
    LR_SCHEDULES,
    OBSERVATION_SIGMA,
    PRECISIONS,
    PRESET_DEFAULTS,
    SIGMA_SAMPLINGS,
    Options,
)
from .rundir import RunDir, load_checkpoint
from .training import TrainingError
from .training import train as run_training


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dsd-fast")
def main():
    """Denoising Score Distillation: learn a clean one-step generator from corrupted images only."""


@main.command()
def info():
    """Versions, devices and which op backends can run here."""
    click.echo(f"dsd-fast   {__version__}")
    click.echo(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton  # optional: the reference and CUDA backends need none of it

        click.echo(f"triton     {triton.__version__}")
    except ImportError:
        click.echo("triton     not installed")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    click.echo(f"device     {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
    for name in backend.BACKENDS:
        reason = backend.why_not(name, "ambient_loss", dev)
        click.echo(f"{name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    click.echo(f"selected   DSD_FAST_BACKEND={backend.requested()}")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Options)}
_PER_PRESET = frozenset(PRESET_DEFAULTS[Options.preset])


def _shown(field, decls, unset):
    """The default a flag's help shows: Options' own (so help cannot drift from it), 'per preset' for the fields
    PRESET_DEFAULTS fills in, the flag's own name for a boolean, or `unset` where the default is None."""
    value = _DEFAULTS[field]
    if field in _PER_PRESET:
        return "per preset"
    if isinstance(value, bool):
        on, off = decls[0].split("/")
        return (on if value else off).lstrip("-")
    if value is None:
        return unset
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option(field, *decls, help, unset=None, **kw):
    """A click option for Options.<field> whose default is None ("not given"): Options' own defaults apply, and a
    resumed run takes every option that is not given from its options.json. Its help ends with that default."""
    decls = decls or (f"--{field.replace('_', '-')}",)
    shown = _shown(field, decls, unset)
    text = f"{help}  [{shown}]" if shown is not None else help
    return click.option(*decls, field, default=None, show_default=False, help=text, **kw)


def _choice(choices):
    return click.Choice(list(choices))


_FLOAT = click.FLOAT
AUTO = "auto"


class _FloatOr(click.ParamType):
    """A float, or one word (sigma's 'auto': estimated from the data; g_sigma_min's 'sigma': the observation sigma)."""

    def __init__(self, word):
        self.word, self.name = word, f"FLOAT|{word}"

    def convert(self, value, param, ctx):
        if value == self.word:
            return value
        return _FLOAT.convert(value, param, ctx)


_SIGMA = _FloatOr(AUTO)
_RUN_OPTIONS = [
    _option("dataset", metavar="NAME|PATH", help="Data set: preset name ($DSD_FAST_DATA/<name>) or a path."),
    _option("data", metavar="PATH", help="Explicit path for a preset data set name."),
    _option("noisy_data", "--noisy-data/--clean-data", help="The data set is already corrupted: use it as-is."),
    _option("max_images", type=click.IntRange(min=1), help="Use only the first N images.", unset="all"),
    _option("xflip", "--xflip/--no-xflip", help="Random x-flips."),
    _option("loader", type=_choice(LOADERS), help="Data loader: resident (the uint8 set on the device), dali "
                                                 "(NVIDIA DALI streams and decodes it), auto (resident if it fits)."),
    _option("loader_memory_fraction", type=_FLOAT, help="auto: keep the data resident if it fits in this fraction "
                                                        "of the free device memory."),
    _option("corruption", type=_choice(CORRUPTIONS), help="Observation model."),
    _option("sigma", type=_SIGMA, metavar=f"FLOAT|{AUTO}",
            help="Observation noise std (images in [-1, 1]); 'auto' (with --noisy-data): estimate it from the data "
                 "set (see estimate-sigma)."),
    _option("blur", type=_FLOAT, help="Blur std in pixels (--corruption blur)."),
    _option("blur_schedule", type=_choice(BLUR_SCHEDULES), help="Blur schedule of the process."),
    _option("preset", type=_choice(PRESETS), help="Network preset."),
    _option("batch", type=click.IntRange(min=1), help="Images per optimiser step."),
    _option("batch_gpu", type=click.IntRange(min=1), help="Images per forward/backward round.", unset="--batch"),
    _option("precision", type=_choice(PRECISIONS), help="Arithmetic (fp64: for verification runs)."),
    _option("compile", "--compile/--no-compile", help="torch.compile each step's loss computation end to end."),
    _option("compile_mode", type=_choice(COMPILE_MODES), help="torch.compile mode (reduce-overhead: CUDA graphs)."),
    _option("sigma_sampling", type=_choice(SIGMA_SAMPLINGS), help="Ambient sigma_t."),
    _option("seed", type=click.IntRange(min=0), help="Seed of every random draw."),
    _option("snapshot_kimg", type=_FLOAT, help="Network snapshot + last.pt + grids every N kimg."),
    _option("state_kimg", type=_FLOAT, help="Also keep a full training-state copy every N kimg (0: last.pt only)."),
    _option("keep", type=click.IntRange(min=1), help="Keep only the K newest state copies.", unset="all"),
    _option("log_every", type=click.IntRange(min=1), help="Steps per metrics.jsonl line."),
    _option("grid_images", type=click.IntRange(min=0), help="Images per PNG grid."),
    _option("sample_steps", type=click.IntRange(min=1), help="Sampler steps of the teacher grid."),
    _option("max_nonfinite", type=click.IntRange(min=1), help="Stop after N non-finite steps in a row."),
    _option("device", help="torch device.", unset="cuda if available; cuda:LOCAL_RANK under torchrun"),
    _option("parallel", type=_choice(PARALLELS),
            help="Under torchrun --nproc-per-node N: DDP or FSDP2 (auto: ddp with N > 1)."),
    _option("fid_every_kimg", type=_FLOAT, help="Proximal FID every N kimg; best.ckpt by it (0: off)."),
    _option("fid_images", type=click.IntRange(min=2), help="Generated images per Proximal FID."),
    _option("fid_ref_images", type=click.IntRange(min=2), help="Corrupted data images in its reference.", unset="all"),
    _option("fid_mode", type=_choice(RESIZE_MODES),
            help="FID feature mode: edm (EDM's pipeline), clean (clean-fid's PIL bicubic) or gpu."),
    _option("fid_batch", type=click.IntRange(min=1), help="Images per Proximal FID batch."),
    click.option("--outdir", metavar="DIR", help="New run directory."),
    click.option("--resume", metavar="RUN_DIR", help="Continue this run directory exactly."),
]
_PRETRAIN_OPTIONS = [
    _option("lr", type=_FLOAT, help="Adam learning rate."),
    _option("lr_rampup_kimg", type=_FLOAT, help="Linear lr ramp-up."),
    _option("ema_halflife_kimg", type=_FLOAT, help="EMA half-life."),
]
_DISTILL_OPTIONS = [
    _option("teacher", metavar="CKPT", help="Phase I checkpoint or network snapshot (its EMA is the teacher)."),
    _option("loss", type=_choice(DISTILL_LOSSES), help="Generator loss."),
    _option("alpha", type=_FLOAT, help="SiD alpha."),
    _option("g_lr", type=_FLOAT, help="Generator learning rate."),
    _option("fake_lr", type=_FLOAT, help="Fake-score learning rate (default: --g-lr, as SiD)."),
    _option("fake_steps", type=int, help="Fake-score updates per generator update (SiD: 1; DMD2: 5)."),
    _option("g_lr_schedule", type=_choice(LR_SCHEDULES),
            help="Both nets' lr over the run: constant (SiD) or a cosine decay to 0 at --kimg."),
    _option("sigma_init", type=_FLOAT, help="Generator level sigma_init."),
    _option("t_max", type=_FLOAT, help="Generator-step t_max (of 1000)."),
    _option("g_sigma_min", type=_FloatOr(OBSERVATION_SIGMA), metavar=f"FLOAT|{OBSERVATION_SIGMA}",
            help="Generator-step Karras sigma_min; 'sigma': the observation sigma, the lowest level the ambient "
                 "teacher learnt."),
    _option("g_ema_halflife_kimg", type=_FLOAT, help="Generator EMA half-life."),
    _option("g_ema_rampup_ratio", type=_FLOAT,
            help="Cap the generator EMA half-life at this fraction of the images seen (0: no cap)."),
]
# Fields a distill run takes from its teacher's options.json unless given.
_FROM_TEACHER = ("dataset", "data", "noisy_data", "max_images", "corruption", "sigma", "blur", "blur_schedule",
                 "preset", "seed")


def _apply(options):
    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return decorate


def _run(phases, kwargs):
    """Build Options from the given flags (plus a resumed run's or the teacher's saved ones) and train."""
    outdir, resume = kwargs.pop("outdir"), kwargs.pop("resume")
    given = {k: v for k, v in kwargs.items() if v is not None}
    try:
        if (outdir is None) == (resume is None):
            raise ValueError("outdir/resume: pass exactly one of --outdir DIR (new run) or --resume RUN_DIR")
        if given.get("sigma") == AUTO:
            given.update(_auto_sigma(phases, given, resume))
        if resume is not None:
            _, saved, _ = RunDir.open(resume)
            options = Options.from_dict({**saved.to_dict(), **given})
        else:
            if phases[0] == "distill" and "teacher" in given:
                saved = load_checkpoint(given["teacher"]).get("options") or {}
                given = {**{k: saved[k] for k in _FROM_TEACHER if k in saved}, **given}
            options = Options(**given)
        status = run_training(options, phases=phases, outdir=outdir, resume=resume)
    except (ValueError, OSError, TrainingError) as e:
        raise click.ClickException(str(e)) from e
    run_dir = resume or outdir
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 reports
    if status == "interrupted":
        click.echo(f"Interrupted; checkpoint in {run_dir}/last.pt. Continue with --resume {run_dir}")
    else:
        click.echo(f"Done: grids (*.png), metrics.jsonl and checkpoints (*.pt) are in {run_dir}")


def _auto_sigma(phases, given, resume):
    """--sigma auto: sigma and sigma_estimate for a new run on already-noisy data, from noise_level's estimator."""
    if resume is not None or phases[0] != "pretrain":
        raise ValueError("sigma: 'auto' estimates sigma for a new pretrain/train run from its data set; a resumed "
                         "run keeps its sigma and distill takes its teacher's (give a number)")
    if not given.get("noisy_data"):
        raise ValueError("sigma: 'auto' estimates the noise already in the data set, so it needs --noisy-data; "
                         "with clean data sigma is the noise the run adds (give a number)")
    if given.get("dataset") is None:
        raise ValueError("sigma: 'auto' needs the data set to estimate it from (--dataset)")
    estimate, source = estimate_dataset_noise(given["dataset"], given.get("data"), max_images=given.get("max_images"),
                                              seed=given.get("seed", 0))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"sigma = {estimate.sigma:.4f} (--sigma auto: estimated from {source}, {estimate.selected} "
                   f"weak-texture {estimate.patch}x{estimate.patch} patches, {estimate.method})")
    return dict(sigma=estimate.sigma, sigma_estimate=dict(source=source, **estimate.as_dict()))


@main.command()
@_apply(_RUN_OPTIONS + _PRETRAIN_OPTIONS)
@_option("pretrain_kimg", "--kimg", type=_FLOAT, help="Phase I length in thousands of images.")
def pretrain(**kwargs):
    """Phase I: ambient-Tweedie pretraining of the teacher on corrupted data only."""
    _run(("pretrain",), kwargs)


@main.command()
@_apply(_RUN_OPTIONS + _DISTILL_OPTIONS)
@_option("distill_kimg", "--kimg", type=_FLOAT, help="Phase II length in thousands of images.")
def distill(**kwargs):
    """Phase II: distil a Phase I teacher (--teacher) into a one-step generator."""
    _run(("distill",), kwargs)


@main.command()
@_apply(_RUN_OPTIONS + _PRETRAIN_OPTIONS + [o for o in _DISTILL_OPTIONS if o is not _DISTILL_OPTIONS[0]])
@_option("pretrain_kimg", type=_FLOAT, help="Phase I length in thousands of images.")
@_option("distill_kimg", type=_FLOAT, help="Phase II length in thousands of images.")
def train(**kwargs):
    """Phase I then Phase II in one run directory (resumable across the phase boundary)."""
    _run(("pretrain", "distill"), kwargs)


@main.command()
@click.option("--source", required=True, metavar="NAME|PATH", help="Data set name or path.")
@click.option("--data", default=None, metavar="PATH", help="Explicit path for a preset data set name.")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="Output EDM-format zip.")
@click.option("--resolution", type=click.IntRange(min=1), default=None, help="Center-crop + resize to this size.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Convert only the first N images.")
@click.option("--corrupt/--clean", default=False, show_default=True, help="Write the fixed corrupted copy.")
@click.option("--corruption", type=_choice(CORRUPTIONS), default=_DEFAULTS["corruption"], show_default=True)
@click.option("--sigma", type=float, default=_DEFAULTS["sigma"], show_default=True,
              help="Noise std (images in [-1, 1]).")
@click.option("--blur", type=float, default=_DEFAULTS["blur"], show_default=True, help="Blur std in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Corruption seed.")
def dataset(source, data, dest, resolution, max_images, corrupt, corruption, sigma, blur, seed):
    """Convert a data set to an EDM zip (center-crop, resize); --corrupt writes a fixed corrupted copy."""
    try:
        cor = None
        if corrupt:
            cor = NoiseCorruption(sigma) if corruption == "noise" else BlurNoiseCorruption(blur, sigma)
        path = convert_dataset(resolve_source(source, data), dest, resolution=resolution, corruption=cor,
                               seed=seed, max_images=max_images)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Wrote {path}")


@main.command("estimate-sigma")
@click.option("--dataset", required=True, metavar="NAME|PATH", help="The (noisy) data set: a name or a path.")
@click.option("--data", default=None, metavar="PATH", help="Explicit path for a preset data set name.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Use the first N images.  [all]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Patch subsampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate and what it rests on as JSON.")
def estimate_sigma(dataset, data, max_images, seed, as_json):
    """Estimate the observation noise std sigma (in the [-1, 1] scale of --sigma) from the data set alone: PCA of
    weak-texture patches (Chen, Zhu & Heng, ICCV 2015; Liu, Tanaka & Okutomi, TIP 2013)."""
    try:
        estimate, source = estimate_dataset_noise(dataset, data, max_images=max_images, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(dict(source=source, **estimate.as_dict())))
    else:
        click.echo(f"sigma = {estimate.sigma:.4f} (estimated from {source}: {estimate.selected} "
                   f"weak-texture {estimate.patch}x{estimate.patch} patches, {estimate.method})")


for _module in (generate, fid, evaluate):
    main.add_command(_module.command)
