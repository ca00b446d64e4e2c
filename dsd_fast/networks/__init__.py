"""EDM-preconditioned DDPM++ SongUNet (SDPA attention) and its presets."""

from .precond import EDMPrecond, build_network
from .presets import PRESETS, NetworkConfig, resolve_config
from .unet import SongUNet, UNetBlock

__all__ = ["EDMPrecond", "NetworkConfig", "PRESETS", "SongUNet", "UNetBlock", "build_network",
           "resolve_config"]
