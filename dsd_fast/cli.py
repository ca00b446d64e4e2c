"""`dsd-fast` command line."""

import os

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dsd-fast")
def main():
    """Denoising Score Distillation: learn a clean one-step generator from corrupted images only."""


@main.command()
def info():
    """Versions, devices and which op backends can run here."""
    import torch

    from .ops import backend

    click.echo(f"dsd-fast   {__version__}")
    click.echo(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        click.echo(f"triton     {triton.__version__}")
    except ImportError:
        click.echo("triton     not installed")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    click.echo(f"device     {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
    for name in backend.BACKENDS:
        reason = backend.why_not(name, "ambient_loss", dev)
        click.echo(f"{name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    click.echo(f"selected   DSD_FAST_BACKEND={backend.requested()}")


def _option(*decls, **kw):
    """A click option whose default is None ("not given"): Options' own defaults apply, and a resumed run takes
    every option that is not given from its options.json."""
    return click.option(*decls, default=None, show_default=False, **kw)


_FLOAT = click.FLOAT
_RUN_OPTIONS = [
    _option("--dataset", metavar="NAME|PATH", help="Data set: preset name ($DSD_FAST_DATA/<name>) or a path."),
    _option("--data", metavar="PATH", help="Explicit path for a preset data set name."),
    _option("--noisy-data/--clean-data", help="The data set is already corrupted: use it as-is.  [clean]"),
    _option("--max-images", type=click.IntRange(min=1), help="Use only the first N images."),
    _option("--xflip/--no-xflip", help="Random x-flips.  [xflip]"),
    _option("--corruption", type=click.Choice(["noise", "blur"]), help="Observation model.  [noise]"),
    _option("--sigma", type=_FLOAT, help="Observation noise std (images in [-1, 1]).  [0.2]"),
    _option("--blur", type=_FLOAT, help="Blur std in pixels (--corruption blur)."),
    _option("--blur-schedule", type=click.Choice(["fixed", "linear"]), help="Blur schedule of the process."),
    _option("--preset", metavar="NAME", help="Network preset (cifar10, afhq, ffhq, celebahq, fashion-mnist, "
                                              "cpu-tiny, cpu-fashion).  [cifar10]"),
    _option("--batch", type=click.IntRange(min=1), help="Images per optimiser step.  [per preset]"),
    _option("--batch-gpu", type=click.IntRange(min=1), help="Images per forward/backward round.  [--batch]"),
    _option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp64"]),
            help="Arithmetic (fp64: for verification runs).  [fp32]"),
    _option("--compile/--no-compile", help="torch.compile the networks.  [no-compile]"),
    _option("--sigma-sampling", type=click.Choice(["truncated", "clamp"]), help="Ambient sigma_t.  [truncated]"),
    _option("--seed", type=click.IntRange(min=0), help="Seed of every random draw.  [0]"),
    _option("--snapshot-kimg", type=_FLOAT, help="Network snapshot + last.pt + grids every N kimg.  [500]"),
    _option("--state-kimg", type=_FLOAT, help="Also keep a full training-state copy every N kimg (0: last.pt "
                                               "only).  [0]"),
    _option("--keep", type=click.IntRange(min=1), help="Keep only the K newest state copies.  [all]"),
    _option("--log-every", type=click.IntRange(min=1), help="Steps per metrics.jsonl line.  [10]"),
    _option("--grid-images", type=click.IntRange(min=0), help="Images per PNG grid.  [64]"),
    _option("--sample-steps", type=click.IntRange(min=1), help="Sampler steps of the teacher grid.  [18]"),
    _option("--max-nonfinite", type=click.IntRange(min=1), help="Stop after N non-finite steps in a row.  [10]"),
    _option("--device", help="torch device.  [cuda if available; cuda:LOCAL_RANK under torchrun]"),
    _option("--parallel", type=click.Choice(["auto", "none", "ddp", "fsdp"]),
            help="Under torchrun --nproc-per-node N: DDP or FSDP2 (auto: ddp with N > 1).  [auto]"),
    _option("--fid-every-kimg", type=_FLOAT, help="Proximal FID every N kimg; best.ckpt by it (0: off).  [0]"),
    _option("--fid-images", type=click.IntRange(min=2), help="Generated images per Proximal FID.  [10000]"),
    _option("--fid-ref-images", type=click.IntRange(min=2), help="Corrupted data images in its reference.  [all]"),
    _option("--fid-mode", type=click.Choice(["edm", "clean", "gpu"]),
            help="FID feature mode: edm (EDM's pipeline), clean (clean-fid's PIL bicubic) or gpu.  [edm]"),
    _option("--fid-batch", type=click.IntRange(min=1), help="Images per Proximal FID batch.  [256]"),
    click.option("--outdir", metavar="DIR", help="New run directory."),
    click.option("--resume", metavar="RUN_DIR", help="Continue this run directory exactly."),
]
_PRETRAIN_OPTIONS = [
    _option("--lr", type=_FLOAT, help="Adam learning rate.  [per preset]"),
    _option("--lr-rampup-kimg", type=_FLOAT, help="Linear lr ramp-up.  [10000]"),
    _option("--ema-halflife-kimg", type=_FLOAT, help="EMA half-life.  [500]"),
]
_DISTILL_OPTIONS = [
    _option("--teacher", metavar="CKPT", help="Phase I checkpoint or network snapshot (its EMA is the teacher)."),
    _option("--loss", type=click.Choice(["sid", "dmd", "sds"]), help="Generator loss.  [sid]"),
    _option("--alpha", type=_FLOAT, help="SiD alpha.  [per preset]"),
    _option("--g-lr", type=_FLOAT, help="Generator and fake-score learning rate.  [per preset]"),
    _option("--sigma-init", type=_FLOAT, help="Generator level sigma_init.  [2.5]"),
    _option("--t-max", type=_FLOAT, help="Generator-step t_max (of 1000).  [800]"),
    _option("--g-ema-halflife-kimg", type=_FLOAT, help="Generator EMA half-life.  [500]"),
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


def _run(phases, kimg_fields, kwargs):
    """Build Options from the given flags (plus a resumed run's or the teacher's saved ones) and train."""
    from .training import Options, TrainingError, train
    from .training.loop import RunDir, load_checkpoint

    outdir, resume = kwargs.pop("outdir"), kwargs.pop("resume")
    for flag, field in kimg_fields.items():
        kwargs[field] = kwargs.pop(flag)
    given = {k: v for k, v in kwargs.items() if v is not None}
    try:
        if (outdir is None) == (resume is None):
            raise ValueError("outdir/resume: pass exactly one of --outdir DIR (new run) or --resume RUN_DIR")
        if resume is not None:
            _, saved, _ = RunDir.open(resume)
            options = Options.from_dict({**saved.to_dict(), **given})
        else:
            if phases[0] == "distill" and "teacher" in given:
                saved = load_checkpoint(given["teacher"]).get("options") or {}
                given = {**{k: saved[k] for k in _FROM_TEACHER if k in saved}, **given}
            options = Options(**given)
        status = train(options, phases=phases, outdir=outdir, resume=resume)
    except (ValueError, OSError, TrainingError) as e:
        raise click.ClickException(str(e)) from e
    run_dir = resume or outdir
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 reports
    if status == "interrupted":
        click.echo(f"Interrupted; checkpoint in {run_dir}/last.pt. Continue with --resume {run_dir}")
    else:
        click.echo(f"Done: grids (*.png), metrics.jsonl and checkpoints (*.pt) are in {run_dir}")


@main.command()
@_apply(_RUN_OPTIONS + _PRETRAIN_OPTIONS)
@_option("--kimg", type=_FLOAT, help="Phase I length in thousands of images.  [200000]")
def pretrain(**kwargs):
    """Phase I: ambient-Tweedie pretraining of the teacher on corrupted data only."""
    _run(("pretrain",), {"kimg": "pretrain_kimg"}, kwargs)


@main.command()
@_apply(_RUN_OPTIONS + _DISTILL_OPTIONS)
@_option("--kimg", type=_FLOAT, help="Phase II length in thousands of images.  [100000]")
def distill(**kwargs):
    """Phase II: distil a Phase I teacher (--teacher) into a one-step generator."""
    _run(("distill",), {"kimg": "distill_kimg"}, kwargs)


@main.command()
@_apply(_RUN_OPTIONS + _PRETRAIN_OPTIONS + [o for o in _DISTILL_OPTIONS if o is not _DISTILL_OPTIONS[0]])
@_option("--pretrain-kimg", type=_FLOAT, help="Phase I length in thousands of images.  [200000]")
@_option("--distill-kimg", type=_FLOAT, help="Phase II length in thousands of images.  [100000]")
def train(**kwargs):
    """Phase I then Phase II in one run directory (resumable across the phase boundary)."""
    _run(("pretrain", "distill"), {}, kwargs)


@main.command()
@click.option("--source", required=True, metavar="NAME|PATH", help="Data set name or path.")
@click.option("--data", default=None, metavar="PATH", help="Explicit path for a preset data set name.")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="Output EDM-format zip.")
@click.option("--resolution", type=click.IntRange(min=1), default=None, help="Center-crop + resize to this size.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Convert only the first N images.")
@click.option("--corrupt/--clean", default=False, show_default=True, help="Write the fixed corrupted copy.")
@click.option("--corruption", type=click.Choice(["noise", "blur"]), default="noise", show_default=True)
@click.option("--sigma", type=float, default=0.2, show_default=True, help="Noise std (images in [-1, 1]).")
@click.option("--blur", type=float, default=0.0, show_default=True, help="Blur std in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Corruption seed.")
def dataset(source, data, dest, resolution, max_images, corrupt, corruption, sigma, blur, seed):
    """Convert a data set to an EDM zip (center-crop, resize); --corrupt writes a fixed corrupted copy."""
    from .corruption import BlurNoiseCorruption, NoiseCorruption
    from .data import convert_dataset, resolve_source

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
    import json

    from .data import load_images, resolve_source
    from .noise_level import estimate_noise

    try:
        source = resolve_source(dataset, data)
        estimate = estimate_noise(load_images(source, max_images=max_images), seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(dict(source=os.fspath(source), **estimate.as_dict())))
    else:
        click.echo(f"sigma = {estimate.sigma:.4f} (estimated from {os.fspath(source)}: {estimate.selected} "
                   f"weak-texture {estimate.patch}x{estimate.patch} patches, {estimate.method})")


def _register():
    from .commands import evaluate, fid, generate

    for module in (generate, fid, evaluate):
        main.add_command(module.command)


_register()
