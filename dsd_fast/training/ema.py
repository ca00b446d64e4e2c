"""Exponential moving average of a network's weights, parameterised by a half-life in images (EDM)."""

import copy

import torch


def ema_beta(nimg, batch, halflife_kimg, rampup_ratio=0.05):
    """EDM's per-step decay 0.5 ** (batch / halflife_nimg); with rampup_ratio the half-life is capped at
    rampup_ratio * nimg so the average forgets the random initialisation early in training."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


class EMA:
    """A frozen eval-mode copy of net whose parameters track beta * ema + (1 - beta) * net; buffers are copied."""

    def __init__(self, net):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net, beta):
        ema_params = list(self.net.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, state):
        self.net.load_state_dict(state)
