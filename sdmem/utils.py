"""Small shared helpers: device choice and atomic file writes (torch is imported inside the functions, so the
data layer can use this module cheaply)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError


NAME_RULE = "letters, digits and . _ + - only, not starting with a dot, at most 200 characters"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}$")


def safe_name(name: str) -> bool:
    """True for a single folder name that stays inside its parent: no separators, not ``.``/``..``, no dotfile
    (a sweep point's folder name)."""
    return bool(_SAFE_NAME.match(name))


def one_component(name: str) -> bool:
    """True for a name that is one path component inside its folder (no separator, not ``.`` or ``..``, not
    empty): what a table's ``point`` cell may name (looser than :func:`safe_name`: tables made elsewhere)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0"))


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


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 8 << 20) -> str:
    """The hex digest of a file's bytes (hashlib's ``algorithm``), streamed; an unreadable file is an InputError
    naming it."""
    import hashlib

    h = hashlib.new(algorithm, usedforsecurity=False)  # a checksum, not a security check
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except OSError as exc:
        raise InputError(path, f"unreadable ({exc.strerror or exc})") from None
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """sha256 (hex) of a file's bytes, streamed; an unreadable file is an InputError naming it."""
    return file_digest(path, "sha256", chunk)


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


STAGING_PREFIX = ".staging-"
STAGING_STALE_S = 24 * 3600.0  # a staging folder this old is a dead process's even if its pid was reused


def _staging_name() -> str:
    import socket

    return f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that a killed sdmem process left in ``folder`` (``.staging-HOST-PID``, or the
    older ``.staging-PID``): those of this host whose process is gone, and any older than a day. Another host's
    recent staging, and anything else, is left alone. Returns what was removed."""
    import shutil
    import socket
    import time

    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for entry in folder.iterdir():
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir() or entry.is_symlink():
            continue
        who, _, pid = entry.name[len(STAGING_PREFIX):].rpartition("-")
        if not pid.isdigit():
            continue
        try:
            old = time.time() - entry.stat().st_mtime > STAGING_STALE_S
        except OSError:
            continue
        mine = who in ("", host)
        if old or (mine and int(pid) != os.getpid() and not _pid_alive(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike):
    """Build a folder's content in ``out/.staging-HOST-PID`` and move it into ``out`` only when the block
    succeeds: a failure leaves ``out`` as it was (removed again if this call created it), and a kill leaves only
    the staging folder, which the next staged write into ``out`` removes (:func:`remove_stale_staging`). The
    staging folder lives inside ``out`` itself, so every rename stays on one file system. An entry of the stage
    replaces the entry of that name in ``out`` (a folder included): callers own those names."""
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the folder ({exc.strerror or exc})") from None
    remove_stale_staging(out)
    stage = out / _staging_name()
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as exc:
        raise InputError(out, f"cannot write into the folder ({exc.strerror or exc})") from None
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
