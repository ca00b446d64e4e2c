"""Data: data set files -> uint8 tensors (datasets), and the GPU-resident training loader (loader)."""

from .datasets import DATASETS, ENV_DATA, convert_dataset, load_images, resolve_source, to_float, to_uint8
from .loader import GPUData, epoch_permutation, xflip_mask

__all__ = ["DATASETS", "ENV_DATA", "GPUData", "convert_dataset", "epoch_permutation", "load_images",
           "resolve_source", "to_float", "to_uint8", "xflip_mask"]
