"""Small shared helpers: device choice."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an InputError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda was asked for but torch sees no GPU (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise InputError("--device", f"expected auto, cpu or cuda, got {device!r}")
    return device
