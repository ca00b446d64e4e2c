"""Image grids as PNG (PIL): [-1, 1] NCHW tensors tiled into a near-square grid."""

import math
import os

import numpy as np
import torch
from PIL import Image


def to_uint8_grid(x, cols=None):
    """[N, C, H, W] in [-1, 1] -> uint8 array [rows*H, cols*W, C] (C = 1 or 3); missing tiles stay black."""
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[0] >= 1):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected [N, 1 or 3, H, W] images with N >= 1, got {got}")
    N, C, H, W = x.shape
    cols = cols or math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    img = (x.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    grid = torch.zeros(rows * cols, C, H, W, dtype=torch.uint8)
    grid[:N] = img
    grid = grid.view(rows, cols, C, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, cols * W, C)
    return grid.numpy()


def save_grid(x, path, cols=None):
    """Write the grid atomically (temporary file, then os.replace)."""
    grid = to_uint8_grid(x, cols)
    tmp = f"{path}.tmp"
    Image.fromarray(np.ascontiguousarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)).save(tmp, format="PNG")
    os.replace(tmp, path)
