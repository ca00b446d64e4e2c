"""In-loop model selection by Proximal FID (DSD Section 4): the metric a run can compute without clean data.

Every options.fid_every_kimg (and at each phase's end) the phase's EMA network generates the images of seeds
0..fid_images-1 (generation.py's seed -> image map), they are corrupted with the run's observation model
(evaluation.proximal), and their Inception features are compared with those of the run's own
observations: the first fid_ref_images data images corrupted exactly as training corrupts them (or used as they
are with noisy data). The reference stats are computed once and cached in the run directory (fid-ref-proximal.npz,
reused on resume). Phase I measures the teacher EMA sampled as its snapshot grids are (Ambient-Truncated for
noise, the DCT PF-ODE for blur, options.sample_steps); Phase II the student EMA in one step. Both run in fp32,
as `dsd-fast fid --proximal` measures a checkpoint, so best.ckpt reproduces its recorded value offline.

Each measurement appends {phase, step, kimg, proximal_fid, fid_images, fid_s, best} to metrics.jsonl. Whenever
it improves on the phase's best so far, best.ckpt (the phase's network snapshot, as <phase>-<kimg>kimg.pt: what
generate, fid and --teacher read) and best.json (where and what) are rewritten atomically; a later phase's first
measurement replaces an earlier phase's best.

Under torchrun every rank generates its share of the seeds and of the reference images; rank 0 computes the
distance and broadcasts it, so every rank takes the same decisions (saving best.ckpt is a collective under FSDP).
"""

import json
import os
import time

import torch

from ..distributed import gather_rows
from ..evaluation import data_features, fid_from_features, proximal_features
from ..generation import TEACHER_SAMPLERS, Sampler
from ..metrics import InceptionFeatures, feature_stats, load_stats, save_stats
from ..networks import build_network
from ..rundir import FID_REFERENCE, atomic_write_bytes

BEST_CKPT = "best.ckpt"
BEST_JSON = "best.json"


def feature_network(options, device):
    """The FID feature extractor: images uint8 [B, C, H, W] -> float32 [B, D] on the CPU (tests replace it)."""
    return InceptionFeatures(mode=options.fid_mode, device=device, batch_size=options.fid_batch)


def phase_sampler(phase):
    """The network a phase is judged by, as a generation.Sampler: Phase II the student EMA in one step; Phase I
    the teacher EMA with the observation model's first teacher sampler (what its grids use, and what
    generation.load_sampler picks by default for its checkpoints)."""
    o = phase.options
    if phase.name == "distill":
        net, kind = phase.G_ema.net, "one-step"
    else:
        net, kind = phase.ema.net, TEACHER_SAMPLERS[o.corruption][0]
    return Sampler(_plain(phase, net), kind, o.sample_steps, o.to_dict(), phase.config, phase.corruption)


def _plain(phase, net):
    """net itself, or an unsharded fp32 copy on every rank when net is sharded (an FSDP forward is a collective,
    but ranks may generate different numbers of batches) or not fp32 (fp64 runs are measured as their checkpoints
    are offline)."""
    if phase.par.mode != "fsdp" and next(net.parameters()).dtype == torch.float32:
        return net
    copy = build_network(phase.config).to(phase.device).eval().requires_grad_(False)
    copy.load_state_dict(phase.par.state_dict(net, everywhere=True))
    return copy


class ProximalFID:
    """select(phase, run) measures the phase's network, logs it and keeps best.ckpt; returns the metrics record.

    Built before the run writes anything, so its errors come first: no data set, too few images, no Inception
    weights (loaded here, once per run), an unreadable cached reference or best.json. state: the checkpoint
    being resumed (None: a new run); a best.json written after it (the lines truncate_metrics drops) is ignored."""

    def __init__(self, options, data, par, run, state=None, phase_order=("pretrain", "distill")):
        if data is None:
            raise ValueError("fid_every_kimg: Proximal FID compares with the run's corrupted data, which this run "
                             "does not have; give --dataset (or set fid_every_kimg to 0)")
        self.n_ref = len(data) if options.fid_ref_images is None else options.fid_ref_images
        if not 2 <= self.n_ref <= len(data):
            raise ValueError(f"fid_ref_images: expected 2..{len(data)} (the data set's size), got {self.n_ref}")
        self.options, self.data, self.par = options, data, par
        self.features = feature_network(options, par.device)
        self.ref, self.best, self.ref_ready = None, None, False
        if par.main and state is not None:
            if os.path.isfile(run.file(FID_REFERENCE)):
                self.ref = load_stats(run.file(FID_REFERENCE))
            self.best = _read_best(run.file(BEST_JSON), state, phase_order)

    def reference(self, run):
        """(mu, sigma) of the corrupted data on rank 0 (None elsewhere): cached, else computed by all ranks."""
        par = self.par
        if not self.ref_ready:
            if par.any(par.main and self.ref is None):
                d = self.data
                index = torch.arange(par.rank, self.n_ref, par.world_size)
                images = d.images_at(index)
                feats = data_features(images, self.features, corruption=d.corruption, seed=d.seed, index=index,
                                      batch=self.options.fid_batch, progress=False)
                feats = gather_rows(feats.to(par.device)).cpu()
                if par.main:
                    self.ref = feature_stats(feats)
                    save_stats(run.file(FID_REFERENCE), *self.ref)
            self.ref_ready = True
        return self.ref

    def __call__(self, phase, run):
        o, par = self.options, self.par
        t0 = time.perf_counter()
        ref = self.reference(run)
        feats = proximal_features(phase_sampler(phase), range(o.fid_images), self.features, batch=o.fid_batch,
                                  progress=False)
        fid = fid_from_features(feats, ref) if par.main else 0.0
        fid = par.sum(torch.tensor([fid], dtype=torch.float64, device=par.device)).item()  # rank 0's value
        step, kimg = phase.completed, phase.completed * o.batch / 1000
        best = self.best
        improved = par.any(par.main and (best is None or best["phase"] != phase.name or fid < best["proximal_fid"]))
        if improved:
            run.save_checkpoint(phase.network_state(), BEST_CKPT)  # a collective under FSDP: every rank calls it
            if par.main:
                self.best = dict(phase=phase.name, step=step, kimg=kimg, proximal_fid=fid, fid_images=o.fid_images,
                                 fid_ref_images=self.n_ref, fid_mode=o.fid_mode, ckpt=BEST_CKPT)
                text = json.dumps(self.best, indent=2) + "\n"
                atomic_write_bytes(run.file(BEST_JSON), lambda f: f.write(text.encode()))
        record = dict(phase=phase.name, step=step, kimg=kimg, proximal_fid=fid, fid_images=o.fid_images,
                      fid_s=round(time.perf_counter() - t0, 3), best=improved)
        run.log(record)
        return record


def _read_best(path, state, phase_order):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            best = json.load(f)
        measured = (phase_order.index(best["phase"]), int(best["step"]))
        float(best["proximal_fid"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"resume: cannot read {path} ({type(e).__name__}: {e}); delete it to restart the "
                         f"selection") from e
    return best if measured <= (phase_order.index(state["phase"]), state["step"]) else None
