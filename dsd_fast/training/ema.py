"""Exponential moving average of a network's weights, parameterised by a half-life in images (EDM)."""

import copy

import torch

from ..distributed import local


def ema_beta(nimg, batch, halflife_kimg, rampup_ratio=0.05):
    """EDM's per-step decay 0.5 ** (batch / halflife_nimg); with rampup_ratio the half-life is capped at
    rampup_ratio * nimg so the average forgets the random initialisation early in training."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


class EMA:
    """A frozen eval-mode copy of net whose parameters track beta * ema + (1 - beta) * net; buffers are copied.
    frozen_copy(net) makes the copy (Parallel.average: sharded like net under FSDP). The update is elementwise,
    so with sharded parameters each rank averages its own shards, with no communication."""

    def __init__(self, net, frozen_copy=None):
        self.net = copy.deepcopy(net).eval().requires_grad_(False) if frozen_copy is None else frozen_copy(net)

    @torch.no_grad()
    def update(self, net, beta, finite=None):
        """ema <- beta ema + (1 - beta) net; finite (a 0-d bool tensor): False leaves the average as it is, decided
        on the device (a skipped step's weights are unchanged, but its buffers are copied either way)."""
        ema_params = [local(p) for p in self.net.parameters()]
        weight = 1.0 - beta
        if finite is not None:
            # A tensor weight per parameter (a 0-d one would be read on the host as a Scalar), in the parameters'
            # dtype: a float weight is applied in their precision too.
            w = torch.where(finite, weight, 0.0).to(ema_params[0].dtype)
            weight = [w.expand_as(p) for p in ema_params]
        torch._foreach_lerp_(ema_params, [local(p.detach()) for p in net.parameters()], weight)
        for b_ema, b in zip(self.net.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, state):
        self.net.load_state_dict(state)
