"""`sdmem generate`: sample a run's EMA snapshot with the Heun sampler, one PNG per seed, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..utils import atomic_write_text, resolve_device, save_png
from .run import is_run_dir, load_snapshot, resolve_snapshot
from .sampler import heun_sampler, seeded_class_labels, seeded_latents, to_uint8


def class_labels_for(seeds: list[int], label_dim: int, class_label: int | None) -> torch.Tensor | None:
    """Labels of a conditional model: a fixed class, or one drawn from each seed's own stream."""
    if not label_dim:
        return None
    if class_label is not None:
        return torch.full((len(seeds),), class_label, dtype=torch.int64)
    return seeded_class_labels(seeds, label_dim)


@torch.no_grad()
def generate_images(denoiser, seeds: list[int], *, resolution: int, label_dim: int, device, batch: int,
                    steps: int = 18, class_label: int | None = None, progress: bool = False) -> np.ndarray:
    """uint8 [len(seeds), R, R, 3] with the Heun sampler, one seed per image (batch-size independent)."""
    out = np.empty((len(seeds), resolution, resolution, 3), np.uint8)
    for start in tqdm(range(0, len(seeds), batch), disable=not progress, desc="generate", unit="batch"):
        chunk = seeds[start : start + batch]
        latents = seeded_latents(chunk, (3, resolution, resolution), device)
        labels = class_labels_for(chunk, label_dim, class_label)
        labels = None if labels is None else labels.to(device)
        out[start : start + len(chunk)] = to_uint8(heun_sampler(denoiser, latents, labels, num_steps=steps))
    return out


def generate_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seeds: list[int],
                 snapshot: str = "latest", class_label: str | int | None = "random", batch: int = 256,
                 steps: int = 18, device: str = "auto", progress: bool = True) -> int:
    """Write ``{seed:06d}.png`` for every seed not already in ``out_dir``; returns how many were new."""
    if not is_run_dir(run_dir):
        raise InputError(run_dir, "is not an sdmem run folder (expected config.json and subset.npz from sdmem train)")
    dev = resolve_device(device)
    net, cfg, meta = load_snapshot(resolve_snapshot(run_dir, snapshot), dev)
    label_dim, res = int(meta["label_dim"]), int(meta["img_resolution"])
    fixed = None
    if class_label not in (None, "random"):
        try:
            fixed = int(class_label)
        except ValueError:
            raise InputError("--class", f"expected a class index or random, got {class_label!r}") from None
        if not label_dim:
            raise InputError("--class", "this run is unconditional (labels: none); it takes no class")
        if not 0 <= fixed < label_dim:
            raise InputError("--class", f"expected a class in [0, {label_dim}), got {fixed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (out / f"{s:06d}.png").exists()]
    if label_dim:
        labels_path = out / "labels.json"
        known = json.loads(labels_path.read_text()) if labels_path.exists() else {}
        labels = class_labels_for(seeds, label_dim, fixed).tolist()
        known.update({f"{s:06d}.png": int(c) for s, c in zip(seeds, labels)})
        atomic_write_text(labels_path, json.dumps(dict(sorted(known.items())), indent=1) + "\n")
    bar = tqdm(total=len(todo), disable=not progress, desc="generate", unit="img")
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        images = generate_images(net, chunk, resolution=res, label_dim=label_dim, device=dev, batch=batch,
                                 steps=steps, class_label=fixed)
        for s, img in zip(chunk, images):
            save_png(out / f"{s:06d}.png", img)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
