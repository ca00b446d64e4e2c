"""Network configurations as data (DDPM++ SongUNet under EDM preconditioning).

The 32^2 and 64^2 presets are EDM's DDPM++ settings (model_channels 128, 4 blocks per resolution,
attention at 16^2); dropout per data set as in EDM (cifar10 0.13, afhq 0.25, ffhq 0.05) and DSD
(celebahq 0.15). fashion-mnist is our choice: its 28^2 images are zero-padded to 32^2 inside
EDMPrecond so the 32^2 topology (attention at 16^2) applies; 64 base channels (13.9M parameters)
since one grey channel of 28^2 needs far less capacity than CIFAR-10. cpu-tiny exists for tests and
the CPU demo only.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    img_resolution: int  # resolution of the images D maps (data resolution)
    in_channels: int  # colour channels (the net's output has as many)
    model_channels: int = 128
    channel_mult: tuple = (1, 2, 2, 2)
    num_blocks: int = 4
    attn_resolutions: tuple = (16,)
    dropout: float = 0.10
    net_resolution: int | None = None  # resolution the UNet runs at (zero-padded to); None: img_resolution

    def __post_init__(self):
        # Lists from a JSON round trip become tuples, so configs stay hashable and compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("img_resolution", "in_channels", "model_channels", "num_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not self.channel_mult or not all(isinstance(m, int) and m >= 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult: expected a non-empty tuple of positive ints, "
                             f"got {self.channel_mult}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        if self.net_resolution is not None and self.net_resolution < self.img_resolution:
            raise ValueError(f"net_resolution: expected None or >= img_resolution={self.img_resolution}, "
                             f"got {self.net_resolution}")
        if self.resolution % (1 << (len(self.channel_mult) - 1)):
            raise ValueError(f"net_resolution: the UNet resolution {self.resolution} must be a multiple of "
                             f"2^{len(self.channel_mult) - 1} for channel_mult={self.channel_mult}")

    @property
    def resolution(self):
        """Resolution the UNet runs at."""
        return self.img_resolution if self.net_resolution is None else self.net_resolution


_DDPMPP_32 = dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,))
_DDPMPP_64 = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,))

PRESETS = {
    "cifar10": NetworkConfig(img_resolution=32, in_channels=3, dropout=0.13, **_DDPMPP_32),
    "afhq": NetworkConfig(img_resolution=64, in_channels=3, dropout=0.25, **_DDPMPP_64),
    "ffhq": NetworkConfig(img_resolution=64, in_channels=3, dropout=0.05, **_DDPMPP_64),
    "celebahq": NetworkConfig(img_resolution=64, in_channels=3, dropout=0.15, **_DDPMPP_64),
    "fashion-mnist": NetworkConfig(img_resolution=28, net_resolution=32, in_channels=1, model_channels=64,
                                   channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                                   dropout=0.13),
    # Forward + backward of batch 8 at 32^2: ~0.4 s on one thread of a loaded 2-core CPU box (317,699 params).
    "cpu-tiny": NetworkConfig(img_resolution=32, in_channels=3, model_channels=16, channel_mult=(1, 2, 2),
                              num_blocks=1, attn_resolutions=(8,), dropout=0.0),
    # cpu-tiny's topology for Fashion-MNIST (1 channel, 28^2 padded to 32^2): the README's CPU demo.
    "cpu-fashion": NetworkConfig(img_resolution=28, net_resolution=32, in_channels=1, model_channels=16,
                                 channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0),
}


def resolve_config(preset_or_config, **overrides):
    """A preset name or a NetworkConfig, with fields replaced by overrides."""
    if isinstance(preset_or_config, NetworkConfig):
        config = preset_or_config
    elif isinstance(preset_or_config, str) and preset_or_config in PRESETS:
        config = PRESETS[preset_or_config]
    else:
        raise ValueError(f"preset_or_config: expected a NetworkConfig or one of {sorted(PRESETS)}, "
                         f"got {preset_or_config!r}")
    fields = {f.name for f in dataclasses.fields(NetworkConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: unknown NetworkConfig fields {unknown}; "
                         f"expected some of {sorted(fields)}")
    return dataclasses.replace(config, **overrides)
