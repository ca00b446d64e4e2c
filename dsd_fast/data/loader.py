"""GPU-resident training data: uint8 images on the device, seeded epoch permutations, fixed corruption, x-flips.

batch_size is per rank; the global batch of a step is batch_size * world_size samples, and rank r takes
the r-th contiguous share. Sample p of the run (p = step * global_batch + rank * batch_size + j) is image
perm_e[p - e N] of epoch e = p // N (batches run on across epoch ends). perm_e and the flip of sample p
are pure Philox functions of (shuffle_seed, e) and (shuffle_seed, p): a batch depends on (seeds, step, global
batch) only, not on world size, device or torch version. The corruption of image i is
corruption.corrupt(x_i, seed, i): the same noise in every epoch, order and batch. seed is the data set's
(one noisy data set per seed); shuffle_seed (default: seed) may vary per run without changing the data.
"""


import torch

from dsd_fast import checks
from dsd_fast.reference.philox import MASK32, philox4x32

from .datasets import to_float

# Philox counter (c0, c1, c2, c3) under key (seed lo, seed hi). The corruption noise (reference.philox.randn)
# uses c2 = c3 = 0, so a non-zero c2 gives disjoint streams.
PERMUTE_STREAM = 1  # counter (i, epoch, 1, 0): sort key of image i in epoch `epoch`
XFLIP_STREAM = 2  # counter (p lo, p hi, 2, 0): top bit = flip sample p


def _philox(seed, c0, c1, stream):
    zero = torch.zeros_like(c0)
    return philox4x32(c0, c1, torch.full_like(c0, stream), zero, seed & MASK32, seed >> 32)


def epoch_permutation(seed, epoch, n, device=None):
    """The order of epoch `epoch` over n images: int64 [n], a pure function of (seed, epoch, n).
    Images are sorted by a 63-bit Philox key (ties, ~n^2/2^64 likely, keep index order)."""
    seed = checks.integer("seed", seed, 0, 2**64 - 1)
    epoch = checks.integer("epoch", epoch, 0, 2**32 - 1)
    i = torch.arange(checks.integer("n", n, 1), dtype=torch.int64)
    w0, w1, _, _ = _philox(seed, i, torch.full_like(i, epoch), PERMUTE_STREAM)
    return torch.sort((w0 << 31) | (w1 >> 1), stable=True).indices.to(device)


def xflip_mask(seed, p):
    """bool [B]: whether sample p (int64 [B], global sample numbers) is mirrored; probability exactly 1/2."""
    w0 = _philox(checks.integer("seed", seed, 0, 2**64 - 1), p & MASK32, p >> 32, XFLIP_STREAM)[0]
    return (w0 >> 31).bool()


class GPUData:
    """uint8 images [N, C, H, W] resident on device; batch(step) gathers, corrupts and flips on the device.

    corruption: an observation model (dsd_fast.corruption) applied to the clean images, fixed per image by
    (seed, index); noisy=True: the images are already observations and are used as they are (corruption
    must be None). shuffle_seed keys the epoch orders and flips (None: seed)."""

    def __init__(self, images, *, device=None, corruption=None, seed=0, noisy=False, xflip=True, shuffle_seed=None):
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                and images.shape[0] > 0):
            got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else images
            raise ValueError(f"images: expected a non-empty uint8 [N, C, H, W] tensor, got {got}")
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images: expected square images, got {images.shape[2]}x{images.shape[3]}")
        if noisy and corruption is not None:
            raise ValueError("corruption: expected None when noisy=True (the images are already observations)")
        self.seed = checks.integer("seed", seed, 0, 2**64 - 1)
        self.shuffle_seed = (self.seed if shuffle_seed is None else
                             checks.integer("shuffle_seed", shuffle_seed, 0, 2**64 - 1))
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.images = images.to(self.device).contiguous()
        self.corruption = corruption
        self.noisy = bool(noisy)
        self.xflip = bool(xflip)
        self._perms = {}  # epoch -> permutation on device, for the epochs of the last batch

    def __len__(self):
        return self.images.shape[0]

    @property
    def resolution(self):
        return self.images.shape[-1]

    @property
    def channels(self):
        return self.images.shape[1]

    def images_at(self, index):
        """uint8 images [len(index), C, H, W] of these data set indices, on the device."""
        return self.images.index_select(0, index.to(self.device))

    def permutation(self, epoch):
        """The image order of epoch `epoch` (int64 [N] on the device)."""
        perm = self._perms.get(epoch)
        return perm if perm is not None else epoch_permutation(self.shuffle_seed, epoch, len(self), self.device)

    def batch(self, step, batch_size, rank=0, world_size=1):
        """(y, index) of rank's share of step's global batch: y float32 [batch_size, C, H, W] in the [-1, 1]
        scale (corrupted and flipped), index int64 [batch_size] the data set indices, both on the device."""
        step = checks.integer("step", step, 0)
        batch_size = checks.integer("batch_size", batch_size, 1)
        world_size = checks.integer("world_size", world_size, 1)
        rank = checks.integer("rank", rank, 0, world_size - 1)
        N = len(self)
        start = (step * world_size + rank) * batch_size
        e0, e1 = start // N, (start + batch_size - 1) // N
        self._perms = {e: self.permutation(e) for e in range(e0, e1 + 1)}
        order = self._perms[e0] if e0 == e1 else torch.cat([self._perms[e] for e in range(e0, e1 + 1)])
        p = start + torch.arange(batch_size, dtype=torch.int64, device=self.device)
        index = order[p - e0 * N]
        y = to_float(self.images.index_select(0, index))
        if self.corruption is not None:
            y = self.corruption.corrupt(y, self.seed, index)
        if self.xflip:
            # After the corruption: a mirrored white noise is white, and the DCT blur commutes with mirroring.
            y = torch.where(xflip_mask(self.shuffle_seed, p).view(-1, 1, 1, 1), y.flip(-1), y)
        return y, index
