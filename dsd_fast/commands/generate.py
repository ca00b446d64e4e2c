"""`dsd-fast generate`: the images of integer seeds from a checkpoint, as PNGs in a directory, an EDM dataset zip
or an npz array (generation.generate, writers.py). Seed s gives the same image at any --batch and any number of
torchrun processes.
"""

import time

import click

from .. import checks
from ..distributed import process_group
from ..generation import PRECISIONS, SAMPLERS, generate, load_sampler, parse_seeds
from ..writers import output_kind


@click.command("generate")
@click.option("--ckpt", required=True, metavar="CKPT|RUN_DIR", help="Checkpoint file, or a run directory (last.pt).")
@click.option("--seeds", default="0-63", show_default=True, metavar="LIST", help="Seeds: 0-49999, 1,5,10-19, ...")
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass, per process.")
@click.option("--out", required=True, metavar="DIR|FILE.zip|FILE.npz",
              help="A directory of {seed:06d}.png, an EDM dataset zip, or an npz (images NHWC uint8, seeds).")
@click.option("--sampler", default=None, metavar="NAME",
              help=f"One of {', '.join(SAMPLERS)}.  [one-step for a Phase II checkpoint, else the teacher's]")
@click.option("--steps", type=click.IntRange(min=1), default=18, show_default=True, help="Teacher sampler steps.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="bf16: the network under bf16 autocast.")
@click.option("--device", default=None, help="torch device.  [cuda if available; cuda:LOCAL_RANK under torchrun]")
@click.option("--overwrite", is_flag=True, help="Replace an existing zip/npz, or existing PNGs of these seeds.")
def command(ckpt, seeds, batch, out, sampler, steps, precision, device, overwrite):
    """Images of integer seeds from a checkpoint: PNGs in a directory, an EDM dataset zip, or an npz.

    Seed s gives the same image at any --batch and any number of torchrun processes."""
    try:
        seeds = parse_seeds(seeds)
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        if device is not None:
            checks.device("device", device)
        output_kind(out, seeds, overwrite)  # fail before loading anything
        with process_group(device, precision) as par:
            model = load_sampler(ckpt, sampler, steps=steps, device=par.device, precision=precision)
            t0 = time.perf_counter()
            n = generate(model, seeds, out, batch=batch, overwrite=overwrite)
            seconds = time.perf_counter() - t0
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    if par.main:
        click.echo(f"Wrote {n} images ({model.kind}) to {out} in {seconds:.1f} s ({n / seconds:.1f} img/s)")
