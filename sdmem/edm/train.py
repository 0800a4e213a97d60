"""The EDM training loop of the paper's Appendix B: epochs, LR/EMA warm-up, EMA, snapshots, tracking, resume.

Randomness is a pure function of (seed, rank, step): the minibatch order comes from per-epoch seeded
permutations and the noise/dropout generators are re-seeded every step, so a resumed run needs only the
weights, the EMA, the optimizer state and the step count to continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import config_to_dict, fingerprint
from ..data.subset import Subset, build_subset
from ..errors import InputError, SdmemError
from ..runs import JsonlLog, RunPaths, check_reuse, load_or_build_subset, read_json, write_run_folder
from ..training import (batch_indices, check_world, finish_accelerator, make_accelerator, make_optimizer, rank_share,
                        set_tf32, step_seed, update_ema)
from .config import EDMConfig
from .loss import LOSSES
from .run import CHECKPOINT_FORMAT, atomic_save_file, build_denoiser, read_safetensors, save_snapshot
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


def _load_checkpoint(cfg: EDMConfig, paths: RunPaths, net, ema, optimizer) -> int:
    """Restore weights, EMA and optimizer from the run's checkpoint; returns the step count (0 if none)."""
    if not paths.checkpoint.exists():
        return 0
    tensors, meta = read_safetensors(paths.checkpoint, CHECKPOINT_FORMAT)
    if meta.get("fingerprint", meta.get("config_hash")) != fingerprint(cfg):  # config_hash: before 0.2
        raise InputError(paths.checkpoint, "was written by a run with a different training config; "
                                           "refusing to resume from it (it was left as it is)")
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_meta = json.loads(meta["optimizer"])
        state = {int(i): {name: tensors[f"opt.{i}.{name}"] for name in names} for i, names in opt_meta.items()}
        sd = optimizer.state_dict()
        sd["state"] = state
        optimizer.load_state_dict(sd)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InputError(paths.checkpoint, f"does not fit this run's network/optimizer ({exc}); left as it is") \
            from None
    return int(meta["step"])


def _save_checkpoint(cfg: EDMConfig, paths: RunPaths, net, ema, optimizer, step: int, nimg: int) -> None:
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    names = {}
    for i, st in optimizer.state_dict()["state"].items():
        names[i] = sorted(st)
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint(cfg), "step": str(step), "nimg": str(nimg),
            "optimizer": json.dumps(names), "config": json.dumps(config_to_dict(cfg))}
    atomic_save_file(tensors, paths.checkpoint, meta)


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


def prepare(cfg: EDMConfig) -> tuple[RunPaths, Subset]:
    """Check the run folder and build (or reload) the training subset D, writing nothing yet."""
    paths = RunPaths(cfg.out_dir)
    check_reuse(cfg, paths)
    return paths, load_or_build_subset(paths, lambda: build_subset(cfg.data))


def train(cfg: EDMConfig, *, progress: bool = True) -> dict:
    """Train (or resume) the run of ``cfg``; returns a summary (steps, epochs, best tracked ratio)."""
    paths, subset = prepare(cfg)
    acc = make_accelerator(paths.root, paths.tensorboard)
    device = acc.device
    res, label_dim = subset.images.shape[1], subset.label_dim
    sched = Schedule(len(subset), cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_epochs,
                     cfg.train.snapshot_epochs, cfg.train.checkpoint_epochs, cfg.train.snapshot_kimg)
    world, rank = acc.num_processes, acc.process_index
    per_rank = check_world(cfg.train.batch_size, world)
    batch_gpu = min(cfg.train.batch_gpu or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise InputError("train.batch_gpu", f"must divide the per-process batch {per_rank}")
    set_tf32(cfg.train.precision == "tf32")

    # Build the network (seeded init), its EMA and Adam with the paper's L2 weight decay.
    torch.manual_seed(cfg.seed)
    net = build_denoiser(cfg, res, label_dim).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = make_optimizer(list(net.parameters()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                               decoupled=False, fused=cfg.train.fused_adam)
    step = _load_checkpoint(cfg, paths, net, ema, optimizer)

    # Now that everything checked out, write the run folder (config and the exact subset D), and drop log rows
    # past the checkpoint: the steps after it are replayed (identically) and logged again.
    if acc.is_main_process:
        write_run_folder(cfg, paths, subset)
        JsonlLog(paths.log).trim(step)
        update_best(paths, JsonlLog(paths.tracking).trim(step))
        acc.init_trackers("edm", config={k: str(v) for k, v in config_to_dict(cfg).items()})
    acc.wait_for_everyone()

    ddp_net = acc.prepare_model(net)
    loss_fn = LOSSES[cfg.model.precond]()
    images = torch.from_numpy(np.array(subset.images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = None if subset.labels is None else torch.from_numpy(np.asarray(subset.labels)).to(device)
    gen = torch.Generator(device=device)
    params = [p for p in net.parameters()]
    ema_params = [p for p in ema.parameters()]

    bar = tqdm(total=sched.total_steps, initial=step, disable=not (progress and acc.is_main_process),
               desc="train", unit="step")
    t_last = time.perf_counter()
    while step < sched.total_steps:
        # Learning rate and EMA decay for this step (linear warm-up over warmup_epochs).
        ramp = sched.ramp(step)
        for g in optimizer.param_groups:
            g["lr"] = cfg.train.lr * ramp
        beta = ema_beta(cfg.train.ema_rate, cfg.train.batch_size, ramp, cfg.train.ema_rule)

        # Accumulate gradients over this rank's share of the global batch (EDM: sum over pixels / images).
        idx = rank_share(batch_indices(step, cfg.train.batch_size, len(subset), cfg.seed), rank, world)
        idx = torch.from_numpy(idx).to(device)
        s = step_seed(cfg.seed, rank, step)
        torch.manual_seed(s)
        gen.manual_seed(s)
        no_sync = (lambda: acc.no_sync(ddp_net)) if world > 1 else None
        loss_total = accumulate_gradients(ddp_net, loss_fn, images, labels, idx, gen, batch_gpu=batch_gpu,
                                          scale=1.0 / per_rank, no_sync=no_sync)
        loss_value = float(acc.reduce(loss_total, reduction="sum")) / cfg.train.batch_size
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            last = f"the last good state is {paths.checkpoint}" if paths.checkpoint.exists() else \
                "no checkpoint was written yet"
            raise SdmemError(f"{paths.root}: the loss became {loss_value} at step {step} (epoch "
                             f"{sched.epoch(step):.2f}); training stopped and {last} (left as it is)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Update the EMA: ema <- beta·ema + (1 − beta)·net.
        update_ema(ema_params, params, beta)
        step += 1
        nimg = step * cfg.train.batch_size
        bar.update(1)

        if step % cfg.train.log_every_steps == 0 or step == sched.total_steps:
            now = time.perf_counter()
            row = {"step": step, "nimg": nimg, "epoch": round(sched.epoch(step), 4), "loss": loss_value,
                   "lr": cfg.train.lr * ramp, "ema_beta": beta, "sec": round(now - t_last, 3)}
            t_last = now
            if acc.is_main_process:
                JsonlLog(paths.log).append(row)
                acc.log({"loss": loss_value, "lr": row["lr"]}, step=step)
                bar.set_postfix(loss=f"{loss_value:.4g}", epoch=f"{row['epoch']:.1f}")

        # Snapshot the EMA (and audit its samples), then the full resumable state.
        epoch = int(sched.epoch(step))
        if sched.snapshot_due(step) and acc.is_main_process:
            save_snapshot(paths.snapshot(epoch), ema, cfg, epoch=epoch, step=step, nimg=nimg,
                          img_resolution=res, label_dim=label_dim)
            if cfg.track.num_images:
                row = track_memorization(cfg, paths, ema, subset, device, epoch=epoch, step=step, nimg=nimg)
                acc.log({"memorization_ratio": row["memorization_ratio"], "knn_distance": row["knn_distance"]},
                        step=step)
                if progress:
                    tqdm.write(f"epoch {epoch}: memorization ratio {100 * row['memorization_ratio']:.2f}%, "
                               f"KNN distance {row['knn_distance']:.3f}")
        if sched.crosses(step, cfg.train.checkpoint_epochs) and acc.is_main_process:
            _save_checkpoint(cfg, paths, net, ema, optimizer, step, nimg)
        if world > 1 and (sched.snapshot_due(step)
                          or sched.crosses(step, cfg.train.checkpoint_epochs)):
            acc.wait_for_everyone()
    bar.close()

    summary = {"out_dir": str(paths.root), "steps": step, "epochs": sched.epoch(step), "num_train": len(subset),
               "label_dim": label_dim, "resolution": res, "main_process": acc.is_main_process}
    if paths.best.exists():
        summary["best"] = read_json(paths.best, "best snapshot record")
    finish_accelerator(acc)
    return summary


def dry_run(cfg: EDMConfig) -> dict:
    """The resolved config with a top-level num_params (the subset is built to learn resolution and labels)."""
    from .config import num_params

    _, subset = prepare(cfg)
    res, label_dim = subset.images.shape[1], subset.label_dim
    return {"num_params": num_params(cfg, res, label_dim), "resolution": res, "label_dim": label_dim,
            "num_train": len(subset), **config_to_dict(cfg)}
