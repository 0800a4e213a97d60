"""What both trainers share: per-step seeds, the minibatch order, the EMA update, and process set-up.

Randomness in sdmem's trainers is a pure function of (seed, rank, step): the images of each step come from
per-epoch seeded permutations and every generator is re-seeded from ``step_seed`` at each optimizer step, so a
resumed run needs only its weights, EMA, optimizer state and step count to continue exactly. accelerate is the
one place that knows about processes (``make_accelerator``); torch and accelerate are imported lazily.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of all randomness (noise, dropout, timesteps) of one process at one optimizer step."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def batch_indices(step: int, batch: int, num_train: int, seed: int) -> np.ndarray:
    """The images of batch ``step``: positions [step·B, (step+1)·B) of a stream of per-epoch seeded
    permutations, so every image is drawn equally often (the paper's Appendix B)."""
    start = step * batch
    out = np.empty(batch, np.int64)
    filled = 0
    while filled < batch:
        epoch, offset = divmod(start + filled, num_train)
        perm = np.random.default_rng([seed, epoch]).permutation(num_train)
        take = min(batch - filled, num_train - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def rank_share(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's contiguous share of a global batch (the batch size is a multiple of ``world``)."""
    per = len(idx) // world
    return idx[rank * per : (rank + 1) * per]


def update_ema(ema: list, params: list, decay: float) -> None:
    """ema <- decay·ema + (1 − decay)·params, in place with one foreach op (float32 EMA of any-dtype params)."""
    import torch

    with torch.no_grad():
        src = [p.detach() if p.dtype == e.dtype else p.detach().to(e.dtype) for e, p in zip(ema, params)]
        torch._foreach_lerp_(ema, src, 1.0 - decay)


def make_optimizer(params: list, *, lr: float, weight_decay: float, decoupled: bool, betas=(0.9, 0.999),
                   eps: float = 1e-8, fused: bool = False):
    """Adam over the trainable parameters only: with L2 weight decay added to the gradient (the paper's EDM
    trainer, Sec. 5) or decoupled AdamW (the SD fine-tune, Appendix G). ``fused``: torch's fused kernel (the
    same update up to rounding, deterministic, so resume stays bitwise); otherwise torch's default choice."""
    import torch

    params = [p for p in params if p.requires_grad]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
               **({"fused": True} if fused else {}))


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (no effect on a CPU)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def make_accelerator(project_dir: Path, logging_dir: Path, *, mixed_precision: str = "no"):
    """accelerate's Accelerator for one run: CPU when no GPU is visible, TensorBoard when installed."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    try:
        import tensorboard  # noqa: F401
        log_with = "tensorboard"
    except ImportError:
        log_with = None
    project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(logging_dir))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, log_with=log_with,
                       project_config=project)


def check_world(batch_size: int, world: int) -> int:
    """Images per process of a global batch; the batch must split evenly over the processes."""
    from .errors import InputError

    if batch_size % world:
        raise InputError("train.batch_size", f"expected a multiple of the {world} processes, got {batch_size}")
    return batch_size // world


def start_processes(timeout_hours: float = 24.0, *, cpu: bool | None = None) -> None:
    """Set up the process group of this launch once (accelerate's ``PartialState``: gloo on CPU, NCCL with GPUs),
    unless it already is; it then lives until the process exits, where it is destroyed.

    Jobs that run several trainings in one launch (a sweep), or a training after an audit, find it set up.
    Re-creating it within a launch is racy (torch restarts its group names, and a rank that arrives early at the
    second set-up can read the first one's rendezvous keys from the launcher's store and hang). The long timeout
    lets the other ranks wait at the next collective while rank 0 generates and audits alone."""
    import datetime

    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() if cpu is None else cpu
    if torch.distributed.is_available() and not torch.distributed.is_initialized():
        PartialState(cpu=cpu, timeout=datetime.timedelta(hours=timeout_hours), **({"backend": "gloo"} if cpu else {}))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _destroy_at_exit()


_EXIT_HOOKED = False


def _destroy_at_exit() -> None:
    """Destroy the process group when the process exits (registered once)."""
    import atexit

    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        atexit.register(_destroy_group)
        _EXIT_HOOKED = True


def _destroy_group() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_accelerator(acc) -> None:
    """End one run cleanly: a barrier, the trackers closed, and accelerate's singletons reset so that a next run
    in this process (a sweep's next point) builds its own state. The process group itself is kept and destroyed
    when the process exits (see ``start_processes``)."""
    import torch

    acc.wait_for_everyone()
    if acc.is_main_process:
        for tracker in acc.trackers:
            tracker.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        _destroy_at_exit()


# The one training skeleton: every kind's trainer is a Trainer; fit() runs it.

class Trainer:
    """One training run of some kind, driven by :func:`fit`. The skeleton owns the run folder (the reuse check,
    the subset D, writing config.json once everything checked out), resume from the newest checkpoint (one
    format, :mod:`sdmem.checkpoint`), the log (trimmed on resume, one row every ``log_every`` steps), the
    non-finite-loss stop, checkpoint cadence and rotation, the progress bar and the end.

    A kind supplies, as methods: ``build_subset`` (D), ``build`` (model, EMA, optimizer, with ``self.acc``
    ready), ``weights``/``load_weights`` (what a checkpoint holds besides the optimizer), ``begin`` (after the
    folder is written: DDP, data on the device), ``backward`` (one step's gradients; the reduced loss),
    ``update`` (the optimizer and EMA step; extra log columns), ``snapshot`` (its inference weights, tracking or
    validation, on the main process) and ``finish`` (the summary). Attributes: ``name`` (the tracker's),
    ``total`` (steps), ``keep_checkpoints`` (None: all), ``nonfinite_allowance`` (non-finite steps skipped in a
    row before stopping: an fp16 loss scale finding its level).
    """

    name = "run"
    files: type | None = None  # the kind's run-folder paths (a sdmem.runs.RunPaths subclass); None: RunPaths
    keep_checkpoints: int | None = 1
    nonfinite_allowance = 0

    def __init__(self, cfg, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.total = 0
        self.step = 0
        self.loss: float | None = None
        self.done = False

    # -- what a kind supplies ------------------------------------------------------------------------------------
    def build_subset(self):
        raise NotImplementedError

    def mixed_precision(self) -> str:
        return "no"

    def build(self) -> None:
        raise NotImplementedError

    def weights(self) -> tuple[dict, dict | None]:
        """(trained weights, their EMA or None) as name -> tensor: what a checkpoint saves."""
        raise NotImplementedError

    def load_weights(self, model: dict, ema: dict | None) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """JSON state a checkpoint keeps besides the tensors (an LR schedule, a loss scale)."""
        return {}

    def load_extra(self, extra: dict) -> None:
        pass

    def trim_records(self, step: int) -> None:
        """Drop the kind's own per-step records past the resumed step (main process)."""

    def finished(self) -> bool:
        """True when a resumed run has nothing left to do (not even its outputs)."""
        return False

    def begin(self) -> None:
        pass

    def backward(self) -> float:
        raise NotImplementedError

    def update(self) -> dict:
        raise NotImplementedError

    def images_seen(self, step: int) -> int:
        raise NotImplementedError

    def log_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every_steps == 0 or step == self.total

    def snapshot_due(self, step: int) -> bool:
        return False

    def snapshot(self) -> None:
        pass

    def checkpoint_due(self, step: int) -> bool:
        raise NotImplementedError

    def postfix(self, row: dict | None) -> dict:
        return {"loss": f"{self.loss:.4g}"} if self.loss is not None else {}

    def finish(self) -> dict:
        raise NotImplementedError

    # -- the skeleton --------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Check the folder, build the model and resume it; write the run folder once everything checked out."""
        from .config import flatten_config

        self.paths, self.subset = prepare(self.cfg, self.build_subset, self.files)
        self.acc = make_accelerator(self.paths.root, self.paths.tensorboard, mixed_precision=self.mixed_precision())
        self.device, self.world, self.rank = self.acc.device, self.acc.num_processes, self.acc.process_index
        self.per_rank = check_world(self.cfg.train.batch_size, self.world)
        self.build()
        self.step = self.resume()
        # Now that everything checked out, write the run folder (config and the exact subset D), and drop log rows
        # past the checkpoint: the steps after it are replayed (identically) and logged again.
        if self.acc.is_main_process:
            from .runs import JsonlLog, write_run_folder

            write_run_folder(self.cfg, self.paths, self.subset)
            JsonlLog(self.paths.log).trim(self.step)
            self.trim_records(self.step)
            for stale in self.paths.checkpoints.glob(".step-*") if self.paths.checkpoints.is_dir() else ():
                # a checkpoint write that a kill interrupted (sdmem's temporary names)
                stale.unlink() if stale.is_file() else shutil.rmtree(stale, ignore_errors=True)
            self.acc.init_trackers(self.name, config={k: str(v) for k, v in flatten_config(self.cfg).items()})
        self.acc.wait_for_everyone()
        self.done = self.finished()
        if not self.done:
            self.begin()

    def resume(self) -> int:
        """Restore the newest checkpoint (any sdmem format); the step it holds, 0 when there is none."""
        from . import checkpoint
        from .config import fingerprint
        from .errors import InputError

        path = checkpoint.newest(self.paths.root)
        if path is None:
            return 0
        ck = checkpoint.read(path)
        if ck.fingerprint != fingerprint(self.cfg):
            raise InputError(path, "was written by a run with a different training config; refusing to resume from "
                                   "it (it was left as it is)")
        try:
            self.load_weights(ck.model, ck.ema)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(path, f"does not fit this run's model ({str(exc).splitlines()[0]}); left as it is") \
                from None
        checkpoint.restore_optimizer(self.optimizer, ck.optimizer, path)
        try:
            self.load_extra(ck.extra)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(path, f"does not fit this run's schedule ({exc}); left as it is") from None
        return ck.step

    def save_checkpoint(self) -> None:
        from . import checkpoint
        from .config import config_to_dict, fingerprint

        model, ema = self.weights()
        ck = checkpoint.Checkpoint(self.step, fingerprint(self.cfg), model, ema,
                                   self.optimizer.state_dict()["state"], self.extra_state())
        checkpoint.save(self.paths.checkpoint(self.step), ck, kind=self.cfg.kind,
                        images_seen=self.images_seen(self.step), config=config_to_dict(self.cfg))
        checkpoint.rotate(self.paths.root, self.keep_checkpoints)

    def stop_if_nonfinite(self, loss: float) -> None:
        """A non-finite loss skips its step (up to ``nonfinite_allowance`` in a row), then stops training,
        naming the last good state."""
        from . import checkpoint
        from .errors import SdmemError

        if math.isfinite(loss):
            self._bad = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        self._bad = getattr(self, "_bad", 0) + 1
        if self._bad > self.nonfinite_allowance:
            newest = checkpoint.newest(self.paths.root)
            last = f"the last good state is {newest}" if newest else "no checkpoint was written yet"
            raise SdmemError(f"{self.paths.root}: the loss became {loss} at step {self.step}{self.where(self.step)}; "
                             f"training stopped and {last} (left as it is)")

    def where(self, step: int) -> str:
        """Words after "at step N" in messages (EDM: the epoch)."""
        return ""

    def log_step(self, columns: dict) -> dict | None:
        if not self.log_due(self.step):
            return None
        from .runs import JsonlLog

        now = time.perf_counter()
        row = {"step": self.step, "images_seen": self.images_seen(self.step), "loss": self.loss, **columns,
               "sec": round(now - self._t_last, 3)}
        self._t_last = now
        if self.acc.is_main_process:
            JsonlLog(self.paths.log).append(row)
            self.acc.log({"loss": self.loss, "lr": row.get("lr")}, step=self.step)
        return row


def prepare(cfg, build_subset, files: type | None = None):
    """(paths, subset D) of a run: the folder checked for reuse, D reloaded from it or built; nothing written.
    ``files``: the kind's RunPaths subclass."""
    from .runs import RunPaths, check_reuse, load_or_build_subset

    paths = (files or RunPaths)(cfg.out_dir)
    check_reuse(cfg, paths)
    return paths, load_or_build_subset(paths, build_subset)


def fit(trainer: Trainer) -> dict:
    """Run ``trainer`` to its last step (resuming what is there); returns its summary."""
    from tqdm.auto import tqdm

    t = trainer
    t.open()
    if not t.done:
        bar = tqdm(total=t.total, initial=t.step, disable=not (t.progress and t.acc.is_main_process),
                   desc="train", unit="step")
        t._t_last = time.perf_counter()
        while t.step < t.total:
            loss = t.backward()
            t.stop_if_nonfinite(loss)
            columns = t.update()
            t.step += 1
            t.loss = loss
            row = t.log_step(columns)
            bar.update(1)
            if t.acc.is_main_process and (postfix := t.postfix(row)):
                bar.set_postfix(**postfix)
            snap, ckpt = t.snapshot_due(t.step), t.checkpoint_due(t.step)
            if snap and t.acc.is_main_process:
                t.snapshot()
            if ckpt and t.acc.is_main_process:
                t.save_checkpoint()
            if t.world > 1 and (snap or ckpt):
                t.acc.wait_for_everyone()
        bar.close()
    return t.finish()
