"""What an EDM run folder holds beyond the shared layout (sdmem.runs): the denoiser its config describes and EMA
snapshots (safetensors, the config in their metadata)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import config_to_dict, stored_config
from ..runs import RunPaths
from ..errors import InputError
from ..utils import atomic_write
from .config import EDMConfig, network_kwargs
from .precond import PRECONDS

SNAPSHOT_FORMAT = "sdmem-edm-snapshot/1"
_SNAPSHOT_RE = re.compile(r"^ema-(\d{7})\.safetensors$")


class EDMPaths(RunPaths):
    """An EDM run folder: the shared files, EMA snapshots for inference (``snapshots/ema-EEEEEEE.safetensors``) and
    memorization tracking (``tracking.jsonl``, ``best.json``, ``tracking/epoch-EEEEEEE/``)."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__(run_dir)
        self.snapshots = self.root / "snapshots"
        self.tracking = self.root / "tracking.jsonl"
        self.best = self.root / "best.json"

    def snapshot(self, epoch: int) -> Path:
        return self.snapshots / f"ema-{epoch:07d}.safetensors"

    def list_snapshots(self) -> dict[int, Path]:
        """{epoch: path} of the EMA snapshots present, in epoch order."""
        if not self.snapshots.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.snapshots.iterdir() if (m := _SNAPSHOT_RE.match(p.name))}
        return dict(sorted(found.items()))

    def tracking_audit(self, epoch: int) -> Path:
        """The folder of what was tracked at the snapshot of ``epoch``: ``generated/`` (the images) and ``audit/``
        (their audit against D; in runs tracked before the images were kept, the audit files themselves)."""
        return self.root / "tracking" / f"epoch-{epoch:07d}"


def build_denoiser(cfg: EDMConfig, img_resolution: int, label_dim: int) -> torch.nn.Module:
    """The preconditioned network D(x; σ, labels) the config describes (Karras et al. 2022, Table 1)."""
    precision = cfg.train.precision
    return PRECONDS[cfg.model.precond](img_resolution, 3, label_dim, arch=cfg.model.arch,
                                       use_bf16=precision == "bf16", **network_kwargs(cfg))


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors written atomically and fsynced: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(cpu, str(p), metadata=metadata), fsync=True)


def read_safetensors_meta(path: Path, expected_format: str) -> dict[str, str]:
    """The metadata of an sdmem safetensors file (tensors not read); a foreign or corrupt file is an InputError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"corrupt or unreadable safetensors file ({exc}); it was left as it is") from None
    if meta.get("format") != expected_format:
        raise InputError(path, f"not an sdmem file of format {expected_format} (found {meta.get('format')!r}); "
                               "refusing to use or overwrite it")
    return meta


def read_safetensors(path: Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an sdmem safetensors file; a foreign or corrupt file is an InputError."""
    meta = read_safetensors_meta(path, expected_format)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"corrupt or unreadable safetensors file ({exc}); it was left as it is") from None
    return tensors, meta


def snapshot_info(path: Path) -> tuple[EDMConfig, dict]:
    """(config, metadata with int epoch/step/images_seen/img_resolution/label_dim) of an EMA snapshot, weights
    unread (the file's metadata calls images_seen nimg)."""
    meta = read_safetensors_meta(path, SNAPSHOT_FORMAT)
    try:
        cfg = stored_config(EDMConfig, json.loads(meta["config"]), f"{path}: metadata config")
        ints = {k: int(meta[k]) for k in ("epoch", "step", "nimg", "img_resolution", "label_dim")}
        ints["images_seen"] = ints.pop("nimg")
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"snapshot metadata is incomplete or corrupt ({exc.__class__.__name__}: {exc})") \
            from None
    return cfg, {**meta, **ints}


def save_snapshot(path: Path, ema: torch.nn.Module, cfg: EDMConfig, *, epoch: int, step: int, nimg: int,
                  img_resolution: int, label_dim: int) -> None:
    """EMA weights for inference, with the config in the metadata."""
    meta = {"format": SNAPSHOT_FORMAT, "config": json.dumps(config_to_dict(cfg)), "epoch": str(epoch),
            "step": str(step), "nimg": str(nimg), "img_resolution": str(img_resolution), "label_dim": str(label_dim)}
    atomic_save_file(ema.state_dict(), path, meta)


def load_snapshot(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, EDMConfig, dict]:
    """(denoiser in eval mode, config, metadata) from an EMA snapshot."""
    cfg, meta = snapshot_info(path)
    tensors, _ = read_safetensors(path, SNAPSHOT_FORMAT)
    net = build_denoiser(cfg, meta["img_resolution"], meta["label_dim"])
    try:
        missing, unexpected = net.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the network of its config ({str(exc).splitlines()[0]})") \
            from None
    if missing or unexpected:
        raise InputError(path, f"weights do not fit the network of its config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    return net.eval().requires_grad_(False).to(device), cfg, meta


def resolve_snapshot(run_dir: str | os.PathLike, which: str = "latest") -> Path:
    """The snapshot file for ``latest`` or an epoch number K."""
    paths = EDMPaths(run_dir)
    snaps = paths.list_snapshots()
    if not snaps:
        raise InputError(run_dir, "holds no EMA snapshots yet (snapshots/ema-*.safetensors); train longer or "
                                  "lower train.snapshot_epochs")
    if which == "latest":
        return snaps[max(snaps)]
    try:
        epoch = int(which)
    except ValueError:
        raise InputError("--snapshot", f"expected latest or an epoch number, got {which!r}") from None
    if epoch not in snaps:
        raise InputError("--snapshot", f"no snapshot at epoch {epoch} in {run_dir}; present: {list(snaps)}")
    return snaps[epoch]
