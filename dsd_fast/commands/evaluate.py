"""`dsd-fast eval RUN_DIR`: the DSD paper's Table 2 for one run (evaluation.table) as eval.md and eval.json, plus a
PNG grid per row."""

import click

from ..evaluation.table import evaluate
from ..generation import PRECISIONS
from .fid import feature_options, loader_option


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--ckpt", metavar="CKPT", default=None,
              help="The student: a Phase II checkpoint or network snapshot (distill-<kimg>kimg.pt, best.ckpt); the "
                   "teacher rows take the teacher from it, or from RUN_DIR/last.pt when it is a snapshot.  "
                   "[RUN_DIR/last.pt]")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True,
              help="Generated images per row (seeds 0..num-1).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Teacher sampler steps.  [18 up to 32x32, 40 above]")
@click.option("--ref", metavar="CLEAN_STATS.npz", default=None,
              help="Clean-data stats for FID.  [computed from the run's data set]")
@click.option("--proximal-ref", metavar="CORRUPTED_STATS.npz", default=None,
              help="Corrupted-data stats for Proximal FID.  [computed from the run's data set]")
@click.option("--batch", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images per generation batch (per process).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Generator arithmetic.")
@click.option("--data-images", type=click.IntRange(min=2), default=None,
              help="Use the first N data images for the reference stats and the Observation row.  [all]")
@loader_option
@feature_options
@click.option("--grid-images", type=click.IntRange(min=0), default=64, show_default=True,
              help="Images per row's PNG grid (0: none).")
def command(run_dir, ckpt, num, steps, ref, proximal_ref, batch, precision, data_images, mode, inception,
            inception_batch, device, grid_images, loader):
    """Table-2-style comparison of a distilled run: writes RUN_DIR/eval.md, eval.json and eval-<row>.png."""
    try:
        written = evaluate(run_dir, ckpt=ckpt, num=num, steps=steps, ref=ref, proximal_ref=proximal_ref, batch=batch,
                           precision=precision, data_images=data_images, mode=mode, inception=inception,
                           inception_batch=inception_batch, device=device, grid_images=grid_images,
                           loader=loader)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if written is not None:
        click.echo(written)
