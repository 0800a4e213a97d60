"""Small shared helpers: device choice and atomic file writes (torch is imported inside the functions, so the
data layer can use this module cheaply)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike):
    """Build a folder's content in ``out/.staging-PID`` and move it into ``out`` only when the block succeeds:
    a failure leaves ``out`` as it was (removed again if this call created it). The staging folder lives inside
    ``out`` itself, so every rename stays on one file system."""
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the folder ({exc.strerror or exc})") from None
    stage = out / f".staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    except BaseException:
        shutil.rmtree(out if created else stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
