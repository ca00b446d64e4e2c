"""Optimiser updates without a host sync: a non-finite loss skips the update by a device-side flag, never a
Python `if` on a device tensor.

Fused Adam takes `found_inf` (the flag GradScaler uses): when it is 1 the kernel leaves the parameters, both
moments and the step count as they were. The EMA skips by a zero lerp weight. The flag and the losses stay on
the device; the loop reads them (one sync) only when it logs, checkpoints or checks the non-finite limit.
"""

import torch


def adam(params, lr, betas):
    """Fused Adam (eps 1e-8): what guarded_step needs."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, fused=True)


def make_fused(opt):
    """After load_state_dict: a loaded param group carries the file's 'fused' flag (a checkpoint written before
    fused Adam says None), and fused Adam wants its step counts on the parameters' device."""
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)


def guarded_step(opt, loss, lr):
    """Adam step at lr unless loss (a 0-d tensor, or a float) is non-finite, decided on the device; the gradients
    are dropped either way. Returns the 0-d bool tensor `finite`."""
    finite = torch.isfinite(torch.as_tensor(loss))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.found_inf = (~finite).to(torch.float32)
    try:
        opt.step()
    finally:
        del opt.found_inf
    opt.zero_grad(set_to_none=True)
    return finite


class NonFinite:
    """The non-finite step count and the current run of them in a row, on the device (no sync per step)."""

    def __init__(self, device, total=0):
        self.total = torch.tensor(int(total), dtype=torch.int64, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # the current run of non-finite steps
        self.longest = torch.zeros((), dtype=torch.int64, device=device)  # since the last read()
        self.last = torch.full((), -1, dtype=torch.int64, device=device)  # the last non-finite step

    def add(self, finite, step):
        bad = (~finite).to(torch.int64)
        self.total += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)
        self.last = torch.where(finite, self.last, step)

    def read(self):
        """(total, longest run since the last read, last non-finite step) as ints: one sync."""
        total, longest, last = torch.stack([self.total, self.longest, self.last]).tolist()
        self.longest.zero_()
        return total, longest, last
