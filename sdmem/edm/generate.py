"""`sdmem generate` for an EDM run: its EMA snapshot with the Heun sampler, one PNG per seed, through the shared
generation core (fixed seed grid, manifest, verified resume)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import fingerprint
from ..errors import InputError
from ..generation import Plan, generate_folder
from ..runs import read_run_config
from ..utils import file_sha256, resolve_device
from .run import load_snapshot, resolve_snapshot, snapshot_info
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
                    steps: int = 18, class_label: int | None = None, labels: torch.Tensor | None = None,
                    sigma_min: float = 0.002, progress: bool = False) -> np.ndarray:
    """uint8 [len(seeds), R, R, 3] with the Heun sampler in batches of ``batch``, one seed per image.

    ``labels`` (int64 [len(seeds)]) overrides the class rule of ``class_label``.
    """
    out = np.empty((len(seeds), resolution, resolution, 3), np.uint8)
    if labels is None:
        labels = class_labels_for(seeds, label_dim, class_label)
    for start in tqdm(range(0, len(seeds), batch), disable=not progress, desc="generate", unit="batch"):
        chunk = seeds[start : start + batch]
        latents = seeded_latents(chunk, (3, resolution, resolution), device)
        lab = None if labels is None else labels[start : start + len(chunk)].to(device)
        out[start : start + len(chunk)] = to_uint8(heun_sampler(denoiser, latents, lab, num_steps=steps,
                                                                sigma_min=sigma_min))
    return out


def _fixed_class(class_label: str | int | None, label_dim: int) -> int | None:
    if class_label in (None, "random"):
        return None
    try:
        fixed = int(class_label)
    except ValueError:
        raise InputError("--class", f"expected a class index or random, got {class_label!r}") from None
    if not label_dim:
        raise InputError("--class", "this run is unconditional (labels: none); it takes no class")
    if not 0 <= fixed < label_dim:
        raise InputError("--class", f"expected a class in [0, {label_dim}), got {fixed}")
    return fixed


def run_plan(run_dir: str | os.PathLike, *, snapshot: str = "latest", class_label: str | int | None = "random",
             batch: int = 256, steps: int = 18, device: str = "auto") -> Plan:
    """The generation plan of an EDM run's snapshot (the weights load only when images are missing)."""
    cfg = read_run_config(run_dir, "edm")
    path = resolve_snapshot(run_dir, snapshot)
    _, meta = snapshot_info(path)
    label_dim, res = meta["label_dim"], meta["img_resolution"]
    fixed = _fixed_class(class_label, label_dim)
    dev = resolve_device(device)
    info = {"run": str(Path(run_dir).resolve()), "snapshot_file": path.name, "device": dev}
    return snapshot_plan(cfg, lambda: load_snapshot(path, dev)[0], epoch=meta["epoch"], res=res, label_dim=label_dim,
                         fixed=fixed, batch=batch, steps=steps, dev=dev, info=info)


def snapshot_plan(cfg, get_net, *, epoch: int, res: int, label_dim: int, fixed: int | None, batch: int, steps: int,
                  dev, info: dict) -> Plan:
    """The plan of the images of an EDM run's EMA snapshot at ``epoch`` (``cfg``: the run's config, ``get_net()``
    its denoiser): one settings record for `sdmem generate` (:func:`run_plan`) and memorization tracking
    (sdmem.edm.tracking), so a folder either made is extended by the other."""
    sigma_min = cfg.track.sigma_min  # never below the network's trained σ range (the run's own setting)
    settings = {"made_by": {"kind": "edm", "fingerprint": fingerprint(cfg)}, "snapshot": f"epoch {epoch}",
                "sampler": "edm-heun", "steps": steps, "sigma_min": sigma_min, "batch": batch, "size": [res, res]}
    return _denoiser_plan(settings, info, get_net, label_dim=label_dim, fixed=fixed, res=res, dev=dev, steps=steps,
                          sigma_min=sigma_min)


def pickle_plan(path: str | os.PathLike, *, class_label: str | int | None = "random", batch: int = 256,
                steps: int = 18, device: str = "auto") -> Plan:
    """The generation plan of a published EDM network pickle (edm-*.pkl), read by the restricted loader
    (sdmem.edm.pickles: nothing in the file is ever executed). The sampler never goes below the network's
    trained σ range, as EDM's own generate.py clamps it."""
    from .pickles import load_edm_pickle

    path = Path(path)
    dev = resolve_device(device)
    net, info = load_edm_pickle(path, "cpu")  # checked (and cheap) before the folder is touched
    label_dim, res = int(info["label_dim"]), int(info["img_resolution"])
    fixed = _fixed_class(class_label, label_dim)
    sigma_min = max(0.002, float(info.get("sigma_min") or 0.0))
    settings = {"made_by": {"kind": "edm-pickle", "sha256": file_sha256(path)}, "snapshot": path.name,
                "sampler": "edm-heun", "steps": steps, "sigma_min": sigma_min, "batch": batch, "size": [res, res]}
    keep = ("class_name", "precond", "arch", "source_version", "source_match")
    return _denoiser_plan(settings, {"pickle": str(path.resolve()), "device": dev, **{k: info.get(k) for k in keep}},
                          lambda: net.to(dev), label_dim=label_dim, fixed=fixed, res=res, dev=dev, steps=steps,
                          sigma_min=sigma_min)


def _denoiser_plan(settings: dict, info: dict, get_net, *, label_dim: int, fixed: int | None, res: int, dev,
                   steps: int, sigma_min: float) -> Plan:
    """The plan of an EDM denoiser (``get_net()`` loads it when images are missing): seeded classes (or the fixed
    one) per seed, EDM's Heun sampler per block."""
    def condition(seed: int) -> dict:
        if not label_dim:
            return {}
        return {"class": fixed if fixed is not None else int(seeded_class_labels([seed], label_dim)[0])}

    def load():
        net = get_net()

        def render(seeds: list[int], conds: list[dict]) -> np.ndarray:
            labels = torch.tensor([c["class"] for c in conds], dtype=torch.int64) if label_dim else None
            return generate_images(net, seeds, resolution=res, label_dim=label_dim, device=dev, batch=len(seeds),
                                   steps=steps, labels=labels, sigma_min=sigma_min)
        return render

    return Plan(settings, condition, load, info)


def generate_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seeds: list[int],
                 snapshot: str = "latest", class_label: str | int | None = "random", batch: int = 256,
                 steps: int = 18, device: str = "auto", progress: bool = True) -> int:
    """Write ``{seed:06d}.png`` for every seed not already done in ``out_dir``; returns how many were new."""
    plan = run_plan(run_dir, snapshot=snapshot, class_label=class_label, batch=batch, steps=steps, device=device)
    return generate_folder(out_dir, seeds, plan, progress=progress)
