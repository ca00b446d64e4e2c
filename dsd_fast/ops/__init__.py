"""Fused ops registered as torch.library custom ops "dsd_fast::<name>" (DESIGN §2). backend.choose picks
cuda_ext -> triton -> reference per call; dsd_fast.functional validates arguments and calls these."""

# Noise and per-sample losses: ops/noise.py, ops/losses.py; DCT ops: ops/dct.py.
from .dct import dct2, dct_ambient_loss, dct_blur, dct_inject, dct_inject_seeded, idct2
from .losses import ambient_loss, ambient_loss_precond, dmd_loss, sds_loss, sid_generator_loss
from .noise import add_noise, corrupt

__all__ = ["corrupt", "add_noise", "ambient_loss", "ambient_loss_precond", "sid_generator_loss", "dmd_loss",
           "sds_loss", "dct2", "idct2", "dct_blur", "dct_inject", "dct_inject_seeded", "dct_ambient_loss"]
