"""What both trainers share: per-step seeds, the minibatch order, the EMA update, and process set-up.

Randomness in sdmem's trainers is a pure function of (seed, rank, step): the images of each step come from
per-epoch seeded permutations and every generator is re-seeded from ``step_seed`` at each optimizer step, so a
resumed run needs only its weights, EMA, optimizer state and step count to continue exactly. accelerate is the
one place that knows about processes (``make_accelerator``); torch and accelerate are imported lazily.
"""

from __future__ import annotations

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
