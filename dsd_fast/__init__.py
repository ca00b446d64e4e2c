"""dsd_fast: Denoising Score Distillation, fast and correct."""

__version__ = "0.1.0"

from .functional import (  # noqa: E402
    add_noise,
    ambient_loss,
    ambient_loss_precond,
    corrupt,
    dct2,
    dct_blur,
    dmd_loss,
    idct2,
    sds_loss,
    sid_generator_loss,
)

__all__ = ["corrupt", "add_noise", "ambient_loss", "ambient_loss_precond", "sid_generator_loss", "dmd_loss",
           "sds_loss", "dct2", "idct2", "dct_blur"]
