"""Data: data set files -> uint8 tensors (datasets), the GPU-resident training loader (loader) and the streaming one
for data sets that do not fit on the device (dali: NVIDIA DALI, optional)."""

from .dali import LOADERS, DALIData, DALIImages, choose_loader, dataset_shape
from .datasets import DATASETS, ENV_DATA, convert_dataset, load_images, resolve_source, to_float, to_uint8
from .loader import GPUData, epoch_permutation, xflip_mask

__all__ = ["DATASETS", "DALIData", "DALIImages", "ENV_DATA", "GPUData", "LOADERS", "choose_loader", "convert_dataset",
           "dataset_shape", "epoch_permutation", "load_images", "resolve_source", "to_float", "to_uint8", "xflip_mask"]
