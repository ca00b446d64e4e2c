"""EDM preconditioning around the DDPM++ SongUNet: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""

import torch
from torch import nn

from ..reference.edm import c_in, c_noise, precond
from .presets import NetworkConfig, resolve_config
from .unet import SongUNet


class EDMPrecond(nn.Module):
    """Denoiser D(x; sigma): [B, C, R, R] x sigma ([B], or a scalar for the whole batch) -> [B, C, R, R].

    The c_* coefficients and the combination run in fp32 (fp64 stays fp64) whatever the autocast state;
    only F, the UNet, runs at autocast precision, and its output is cast back before the combination.
    When config.net_resolution > img_resolution (Fashion-MNIST: 28 -> 32) F's input c_in x is zero-padded
    (centred) and F's output cropped back: a constant border that carries no noise, so the net can tell
    border from image at every sigma, and D still maps R x R to R x R. sigma > 0 is not checked (that
    would sync the device); sigma = 0 gives c_noise = -inf.
    """

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        self.img_resolution = config.img_resolution
        self.img_channels = config.in_channels
        self.model = SongUNet(img_resolution=config.resolution, in_channels=config.in_channels,
                              out_channels=config.in_channels, model_channels=config.model_channels,
                              channel_mult=config.channel_mult, num_blocks=config.num_blocks,
                              attn_resolutions=config.attn_resolutions, dropout=config.dropout)
        lo = (config.resolution - config.img_resolution) // 2
        hi = config.resolution - config.img_resolution - lo
        self.pad = (lo, hi, lo, hi)

    def F(self, x_in, c_noise):
        """The raw net at the data resolution (pads and crops around the UNet when needed)."""
        lo, hi = self.pad[0], self.pad[1]
        if lo or hi:
            x_in = torch.nn.functional.pad(x_in, self.pad)
        F_x = self.model(x_in, c_noise)
        if lo or hi:
            F_x = F_x[:, :, lo:F_x.shape[2] - hi, lo:F_x.shape[3] - hi]
        return F_x.to(c_noise.dtype)

    def forward(self, x, sigma, raw=False):
        """D(x; sigma); raw: the UNet's output F(c_in x; c_noise) alone (fp32), for a loss that applies the
        preconditioning itself (functional.ambient_loss_precond). A flag, not a method, so DDP and
        torch.compile wrappers pass it through."""
        R, C = self.img_resolution, self.img_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != R or x.shape[3] != R:
            raise ValueError(f"x: expected shape [B, {C}, {R}, {R}], got {list(x.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma: expected a scalar or shape [{x.shape[0]}], got {list(sigma.shape)}")
        if raw:
            return self.F(c_in(sigma.reshape(-1, 1, 1, 1)) * x, c_noise(sigma))
        return precond(self.F, x, sigma)


def build_network(preset_or_config, **overrides):
    """EDMPrecond(SongUNet) from a preset name (see presets.PRESETS) or a NetworkConfig, with overrides."""
    return EDMPrecond(resolve_config(preset_or_config, **overrides))
