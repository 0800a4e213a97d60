"""Small shared helpers: device choice, atomic file writes, and the one place that sets up processes.

torch and accelerate are imported inside the functions, so the data layer can use this module cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an InputError."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise InputError("--device", f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda was asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    return device


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place: a kill leaves the old
    file or the new one, never half of one. ``fsync`` also flushes it to disk first (for checkpoints)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """uint8 [H, W, 3] as a PNG, written atomically."""
    from PIL import Image

    atomic_write(path, lambda p: Image.fromarray(image).save(p, format="PNG"))


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


def finish_accelerator(acc) -> None:
    """End cleanly: a barrier and destroy_process_group (end_training sometimes aborted a gloo rank)."""
    import torch

    acc.wait_for_everyone()
    if acc.is_main_process:
        for tracker in acc.trackers:
            tracker.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
