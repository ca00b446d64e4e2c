"""`dsd-fast` command line."""

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
