"""The anchor rung of the training-step ladder: EDM's own training step (NVlabs/edm's training_loop.py body, its
EDMPrecond + SongUNet DDPM++ and its EDMLoss), run from a checkout that is never committed here.

    git clone https://github.com/NVlabs/edm bench/.edm      # or DSD_FAST_EDM=/path/to/edm (git-ignored)

The step is the loop body of training_loop.py: zero_grad, one EDMLoss forward + backward per round (loss.sum() *
1/batch), the learning-rate ramp, nan_to_num of every gradient, Adam (lr 10e-4, as train.py sets), the EMA lerp.
Left out, as in our rungs: the data loader (both sides read a uint8 batch resident on the device) and the DDP
wrapper (a one-process step without it is at least as fast, so the ratio to it is not flattered). Its network is
built from our NetworkConfig with EDM's ddpmpp settings (train.py: positional embedding, standard encoder /
decoder, channel_mult_noise 1, resample_filter [1, 1]); `same_network` checks that it has our parameter count.
EDM runs with TF32 off and cudnn.benchmark on (training_loop.py); its --fp16 runs the UNet in float16 on CUDA
only (on a CPU the fp16 rung is the fp32 step).
"""

import contextlib
import copy
import os
import sys
from pathlib import Path

import torch

EDM_DIR = Path(os.environ.get("DSD_FAST_EDM", Path(__file__).resolve().parent / ".edm"))
EDM_LR = 10e-4  # train.py's --lr default
EDM_LR_RAMPUP_KIMG = 10000  # training_loop.py's default
EDM_EMA_HALFLIFE_KIMG, EDM_EMA_RAMPUP = 500, 0.05


def why_not():
    """None if EDM's code can be imported from EDM_DIR, else the reason."""
    if not (EDM_DIR / "training" / "networks.py").is_file():
        return (f"no NVlabs/edm checkout at {EDM_DIR} (git clone https://github.com/NVlabs/edm {EDM_DIR}, "
                f"or set DSD_FAST_EDM)")
    return None


def _edm_modules():
    reason = why_not()
    if reason is not None:
        raise FileNotFoundError(reason)
    if str(EDM_DIR) not in sys.path:
        sys.path.insert(0, str(EDM_DIR))
    from training import loss, networks  # EDM's top-level packages (dnnlib, torch_utils, training)

    return networks, loss


def edm_network(config, fp16):
    """EDM's EDMPrecond(SongUNet) in train.py's ddpmpp configuration, sized by our NetworkConfig."""
    if config.net_resolution not in (None, config.img_resolution):
        raise ValueError(f"config: EDM's network runs at its image resolution; got net_resolution "
                         f"{config.net_resolution} for {config.img_resolution}^2 images")
    networks, _ = _edm_modules()
    return networks.EDMPrecond(
        img_resolution=config.img_resolution, img_channels=config.in_channels, label_dim=0, use_fp16=fp16,
        model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=config.model_channels,
        channel_mult=list(config.channel_mult), num_blocks=config.num_blocks,
        attn_resolutions=list(config.attn_resolutions), dropout=config.dropout)


def parameter_count(net):
    return sum(p.numel() for p in net.parameters())


@contextlib.contextmanager
def edm_backend_flags():
    """training_loop.py's backend settings for the duration of a case; the previous ones afterwards."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction) = saved


class EDMStep:
    """One optimiser step of EDM's training loop on `images` (uint8 [N, C, H, W], resident on the device)."""

    def __init__(self, config, batch, batch_gpu, fp16, images, device):
        if batch % batch_gpu:
            raise ValueError(f"batch_gpu: expected a divisor of batch={batch}, got {batch_gpu}")
        _, loss = _edm_modules()
        self.batch, self.batch_gpu, self.images, self.device = batch, batch_gpu, images, device
        self.net = edm_network(config, fp16).train().requires_grad_(True).to(device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.loss_fn = loss.EDMLoss()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=EDM_LR, betas=(0.9, 0.999), eps=1e-8)

    def step(self, k):
        """Step k (its images: a window of the resident set); returns the summed loss (a device tensor)."""
        n = self.images.shape[0]
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for r in range(self.batch // self.batch_gpu):
            first = (k * self.batch + r * self.batch_gpu) % n
            idx = torch.arange(first, first + self.batch_gpu, device=self.device) % n
            images = self.images[idx].to(torch.float32) / 127.5 - 1
            loss = self.loss_fn(net=self.net, images=images, labels=None, augment_pipe=None)
            loss.sum().mul(1 / self.batch).backward()
            total += loss.detach().sum()
        nimg = k * self.batch
        for g in self.opt.param_groups:
            g["lr"] = EDM_LR * min(nimg / max(EDM_LR_RAMPUP_KIMG * 1000, 1e-8), 1)
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        self.opt.step()
        halflife = min(EDM_EMA_HALFLIFE_KIMG * 1000, nimg * EDM_EMA_RAMPUP)
        beta = 0.5 ** (self.batch / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        return total
