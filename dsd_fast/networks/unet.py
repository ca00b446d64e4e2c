"""SongUNet in its DDPM++ configuration (Song et al. 2021, as re-implemented in NVlabs/edm).

Fixed DDPM++ choices: positional timestep embedding, standard encoder and decoder, resample filter
[1,1] (2x2 box down, nearest up), 1x1 resampling projections on the skip path, additive (not adaptive)
embedding, skip scale sqrt(1/2), GroupNorm eps 1e-6, one attention head. No class labels and no
augmentation labels (DSD uses x-flips only). Module names and parameter shapes follow EDM's SongUNet,
so an EDM state dict maps onto this one key for key (EDM's only extra keys are the constant
`resample_filter` buffers).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def xavier_uniform(shape, fan_in, fan_out, init_weight=1.0):
    """U(-a, a) with a = init_weight * sqrt(6 / (fan_in + fan_out)); fans count the kernel taps (as EDM)."""
    return math.sqrt(6 / (fan_in + fan_out)) * init_weight * (torch.rand(*shape) * 2 - 1)


class Linear(nn.Module):
    """Fully connected layer, xavier-uniform weight, zero bias."""

    def __init__(self, in_features, out_features, init_weight=1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(xavier_uniform([out_features, in_features], in_features, out_features,
                                                  init_weight))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """kxk convolution ('same' padding), optionally preceded by 2x down- or upsampling.

    EDM resamples with the separable filter [1,1]: a depthwise stride-2 conv with the 2x2 box 1/4 (down)
    and a stride-2 transposed conv with 4 * box = ones (up). Those are exactly 2x2 average pooling and
    nearest-neighbour upsampling, which is how we run them (no filter buffer, no depthwise conv).
    """

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False, init_weight=1.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(xavier_uniform(shape, fan_in, fan_out, init_weight))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


def group_norm(num_channels, eps=1e-6):
    """EDM's GroupNorm: 32 groups, but at least 4 channels per group."""
    num_groups = min(32, num_channels // 4)
    if num_groups < 1 or num_channels % num_groups:
        raise ValueError(f"model_channels, channel_mult: a GroupNorm over {num_channels} channels needs a "
                         f"multiple of min(32, channels // 4) >= 1 channels")
    return nn.GroupNorm(num_groups=num_groups, num_channels=num_channels, eps=eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block with optional 2x resampling and self-attention.

    x <- sqrt(1/2) (conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb))))) + skip(x))
    then, with attention, x <- sqrt(1/2) (proj(attn(norm2(x))) + x).
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=1, dropout=0.0):
        super().__init__()
        if attention and out_channels % num_heads:
            raise ValueError(f"num_heads: expected a divisor of out_channels={out_channels}, got {num_heads}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = math.sqrt(0.5)

        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        # Residual branches start near zero (EDM's init_zero is xavier * 1e-5, not exactly 0).
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, up=up, down=down)
        if self.num_heads:
            self.norm2 = group_norm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init_weight=1e-5)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def attention(self, x):
        """softmax(q^T k / sqrt(c)) over spatial positions, per head of c = C / num_heads channels.

        EDM's qkv channel layout is (head, c, {q,k,v}); we keep it (checkpoint-compatible) and hand
        [B, heads, HW, c] tensors to scaled_dot_product_attention, whose default scale is 1/sqrt(c).
        The copy to a unit-stride c axis is needed: the fused SDPA kernels (flash, efficient, cuDNN)
        reject strided views and fall back to the slow math kernel.
        """
        B, C, H, W = x.shape
        qkv = self.qkv(x).reshape(B, self.num_heads, C // self.num_heads, 3, H * W)
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(-1, -2).reshape(B, C, H, W)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoids of c_noise: [sin(c_noise f_i), cos(c_noise f_i)], f_i = 10000^(-i/(n/2-1)).

    EDM computes [cos, sin] and then swaps the halves; we emit the swapped order directly. Computed in
    at least fp32 (fp64 stays fp64), whatever the autocast state: the argument spans several octaves.
    """

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, c_noise):
        half = self.num_channels // 2
        dtype = torch.promote_types(c_noise.dtype, torch.float32)
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=dtype, device=c_noise.device) / (half - 1))
        arg = c_noise.to(dtype)[:, None] * freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ U-Net F(x_in, c_noise): [B, in_channels, R, R] x [B] -> [B, out_channels, R, R]."""

    def __init__(self, img_resolution, in_channels, out_channels, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
                 dropout=0.10):
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution: expected a multiple of 2^{len(channel_mult) - 1} for "
                             f"channel_mult={tuple(channel_mult)}, got {img_resolution}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        emb_channels = model_channels * channel_mult_emb
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout)

        # Mapping: c_noise -> embedding shared by every block.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder: every module's output is a skip connection.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: each `_block{idx}` consumes one skip (num_blocks + 1 per level = all encoder outputs).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = group_norm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, kernel=3,
                                                                          init_weight=1e-5)

    def forward(self, x, c_noise):
        emb = self.map_noise(c_noise)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        for name, block in self.dec.items():
            if isinstance(block, UNetBlock):
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
            elif isinstance(block, nn.GroupNorm):
                x = F.silu(block(x))
            else:
                x = block(x)
        return x
