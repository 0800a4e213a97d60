"""The EDM training loop of the paper's Appendix B: epochs, LR/EMA warm-up, EMA, snapshots, tracking, resume.

Randomness is a pure function of (seed, rank, step): the minibatch order comes from per-epoch seeded
permutations and the noise/dropout generators are re-seeded every step, so a resumed run needs only the
weights, the EMA, the optimizer state and the step count to continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import config_to_dict
from ..data.subset import Subset, build_subset
from ..errors import InputError
from ..runs import JsonlLog, read_json
from ..training import (Trainer, batch_indices, finish_accelerator, fit, make_optimizer, prepare, rank_share, set_tf32,
                        step_seed, update_ema)
from .config import EDMConfig
from .loss import LOSSES
from .run import EDMPaths, build_denoiser, save_snapshot
from .tracking import track_memorization, update_best

EMA_REF_BATCH = 512  # train.ema_rate is per optimizer step of this many images


@dataclass
class Schedule:
    """Step counts and the epoch-based cadences of one run (|D| = num_train, batch = images per step)."""

    num_train: int
    batch: int
    epochs: int
    warmup_epochs: int
    snapshot_epochs: int
    checkpoint_epochs: int
    snapshot_kimg: int | None = None

    def snapshot_due(self, step: int) -> bool:
        """True after the step that passes a snapshot: every snapshot_kimg thousand images, else snapshot_epochs."""
        if self.snapshot_kimg is None:
            return self.crosses(step, self.snapshot_epochs)
        per = self.snapshot_kimg * 1000
        return (step * self.batch) // per > ((step - 1) * self.batch) // per or step == self.total_steps

    @property
    def total_steps(self) -> int:
        return math.ceil(self.epochs * self.num_train / self.batch)

    def epoch(self, step: int) -> float:
        return step * self.batch / self.num_train

    def crosses(self, step: int, every: int) -> bool:
        """True when the optimizer step ``step`` (1-based count after it) passes a multiple of ``every`` epochs."""
        per = every * self.num_train
        return (step * self.batch) // per > ((step - 1) * self.batch) // per or step == self.total_steps

    def ramp(self, step: int) -> float:
        """Linear warm-up factor in [0, 1] over the first warmup_epochs, by images seen after this step."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((step + 1) * self.batch / (self.warmup_epochs * self.num_train), 1.0)


def ema_beta(ema_rate: float, batch: int, ramp: float, rule: str = "batch_scaled") -> float:
    """EMA decay for one step of ``batch`` images, its half-life ramped in warm-up: ema_rate per 512 images
    (batch_scaled), or per optimizer step whatever the batch (per_step: the rule at the reference batch)."""
    if rule == "per_step":
        batch = EMA_REF_BATCH
    if ema_rate == 0:
        return 0.0
    halflife_nimg = EMA_REF_BATCH * math.log(0.5) / math.log(ema_rate)
    return 0.5 ** (batch / max(halflife_nimg * ramp, 1e-8))


def accumulate_gradients(net, loss_fn, images: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor,
                         gen: torch.Generator, *, batch_gpu: int, scale: float, no_sync=None) -> torch.Tensor:
    """Forward and backward over the images ``idx`` in passes of ``batch_gpu``; returns the summed loss.

    EDM's reduction: the per-pixel loss is summed over pixels and images and scaled by 1/(images per
    process), so the gradient is that of the mean per-image loss. Passes before the last skip the DDP
    all-reduce (``no_sync``).
    """
    total = torch.zeros((), device=images.device)
    rounds = math.ceil(len(idx) / batch_gpu)
    for r in range(rounds):
        part = idx[r * batch_gpu : (r + 1) * batch_gpu]
        ctx = no_sync() if (no_sync is not None and r < rounds - 1) else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(net, images[part], None if labels is None else labels[part], generator=gen).sum()
            loss.mul(scale).backward()
        total += loss.detach()
    return total


class EDMTrainer(Trainer):
    """The EDM run of Appendix B on the training skeleton: Adam with L2 weight decay and a linear LR/EMA warm-up
    over ``warmup_epochs``, the EMA snapshot (and tracking) every ``snapshot_epochs`` (or ``snapshot_kimg``), one
    checkpoint kept, written every ``checkpoint_epochs``."""

    name = "edm"
    files = EDMPaths
    keep_checkpoints = 1

    def build_subset(self) -> Subset:
        return build_subset(self.cfg.data)

    def build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.res, self.label_dim = self.subset.images.shape[1], self.subset.label_dim
        self.sched = Schedule(len(self.subset), t.batch_size, t.epochs, t.warmup_epochs, t.snapshot_epochs,
                              t.checkpoint_epochs, t.snapshot_kimg)
        self.total = self.sched.total_steps
        self.batch_gpu = min(t.batch_gpu or self.per_rank, self.per_rank)
        if self.per_rank % self.batch_gpu:
            raise InputError("train.batch_gpu", f"must divide the per-process batch {self.per_rank}")
        set_tf32(t.precision == "tf32")
        # The network (seeded init), its EMA and Adam with the paper's L2 weight decay.
        torch.manual_seed(cfg.seed)
        self.net = build_denoiser(cfg, self.res, self.label_dim).to(self.device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = make_optimizer(list(self.net.parameters()), lr=t.lr, weight_decay=t.weight_decay,
                                        decoupled=False, fused=t.fused_adam)

    def weights(self) -> tuple[dict, dict]:
        return self.net.state_dict(), self.ema.state_dict()

    def load_weights(self, model: dict, ema: dict | None) -> None:
        self.net.load_state_dict(model)
        self.ema.load_state_dict(ema if ema is not None else {})

    def trim_records(self, step: int) -> None:
        update_best(self.paths, JsonlLog(self.paths.tracking).trim(step))

    def begin(self) -> None:
        self.ddp_net = self.acc.prepare_model(self.net)
        self.loss_fn = LOSSES[self.cfg.model.precond]()
        self.images = torch.from_numpy(np.array(self.subset.images)).to(self.device).permute(0, 3, 1, 2).float() \
            / 127.5 - 1
        labels = self.subset.labels
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).to(self.device)
        self.gen = torch.Generator(device=self.device)
        self.params, self.ema_params = list(self.net.parameters()), list(self.ema.parameters())

    def backward(self) -> float:
        """This rank's share of the global batch, its gradients accumulated (EDM: sum over pixels / images), at
        this step's learning rate (linear warm-up); returns the loss per image over all ranks."""
        cfg, step = self.cfg, self.step
        self.ramp = self.sched.ramp(step)
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.train.lr * self.ramp
        idx = rank_share(batch_indices(step, cfg.train.batch_size, len(self.subset), cfg.seed), self.rank, self.world)
        idx = torch.from_numpy(idx).to(self.device)
        s = step_seed(cfg.seed, self.rank, step)
        torch.manual_seed(s)
        self.gen.manual_seed(s)
        no_sync = (lambda: self.acc.no_sync(self.ddp_net)) if self.world > 1 else None
        total = accumulate_gradients(self.ddp_net, self.loss_fn, self.images, self.labels, idx, self.gen,
                                     batch_gpu=self.batch_gpu, scale=1.0 / self.per_rank, no_sync=no_sync)
        return float(self.acc.reduce(total, reduction="sum")) / cfg.train.batch_size

    def update(self) -> dict:
        """Adam's step, then ema <- beta·ema + (1 − beta)·net with this step's (warmed-up) decay."""
        t = self.cfg.train
        beta = ema_beta(t.ema_rate, t.batch_size, self.ramp, t.ema_rule)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema_params, self.params, beta)
        return {"epoch": round(self.sched.epoch(self.step + 1), 4), "lr": t.lr * self.ramp, "ema_beta": beta}

    def images_seen(self, step: int) -> int:
        return step * self.cfg.train.batch_size

    def where(self, step: int) -> str:
        return f" (epoch {self.sched.epoch(step):.2f})"

    def postfix(self, row: dict | None) -> dict:
        return {"loss": f"{row['loss']:.4g}", "epoch": f"{row['epoch']:.1f}"} if row else {}

    def snapshot_due(self, step: int) -> bool:
        return self.sched.snapshot_due(step)

    def checkpoint_due(self, step: int) -> bool:
        return self.sched.crosses(step, self.cfg.train.checkpoint_epochs)

    def snapshot(self) -> None:
        """The EMA snapshot for inference, and the memorization tracked on its images."""
        cfg, step = self.cfg, self.step
        epoch, nimg = int(self.sched.epoch(step)), self.images_seen(step)
        save_snapshot(self.paths.snapshot(epoch), self.ema, cfg, epoch=epoch, step=step, nimg=nimg,
                      img_resolution=self.res, label_dim=self.label_dim)
        if not cfg.track.num_images:
            return
        row = track_memorization(cfg, self.paths, self.ema, self.subset, self.device, epoch=epoch, step=step,
                                 nimg=nimg)
        self.acc.log({"memorization_ratio": row["memorization_ratio"], "knn_distance": row["knn_distance"]},
                     step=step)
        if self.progress:
            tqdm.write(f"epoch {epoch}: memorization ratio {100 * row['memorization_ratio']:.2f}%, "
                       f"KNN distance {row['knn_distance']:.3f}")

    def finish(self) -> dict:
        summary = {"out_dir": str(self.paths.root), "steps": self.step, "epochs": self.sched.epoch(self.step),
                   "num_train": len(self.subset), "label_dim": self.label_dim, "resolution": self.res,
                   "main_process": self.acc.is_main_process}
        if self.paths.best.exists():
            summary["best"] = read_json(self.paths.best, "best snapshot record")
        finish_accelerator(self.acc)
        return summary


def train(cfg: EDMConfig, *, progress: bool = True) -> dict:
    """Train (or resume) the run of ``cfg``; returns a summary (steps, epochs, best tracked ratio)."""
    return fit(EDMTrainer(cfg, progress=progress))


def dry_run(cfg: EDMConfig) -> dict:
    """The resolved config with a top-level num_params (the subset is built to learn resolution and labels)."""
    from .config import num_params

    _, subset = prepare(cfg, lambda: build_subset(cfg.data), EDMPaths)
    res, label_dim = subset.images.shape[1], subset.label_dim
    return {"num_params": num_params(cfg, res, label_dim), "resolution": res, "label_dim": label_dim,
            "num_train": len(subset), **config_to_dict(cfg)}
