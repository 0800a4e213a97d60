"""Memorization tracking during EDM training: at each EMA snapshot, generate ``track.num_images`` images with fixed
seeds, audit them against the training set D, append the row to ``tracking.jsonl`` and keep the highest ratio in
``best.json`` (the paper reports the highest ratio seen during training)."""

from __future__ import annotations

import json
import time

import numpy as np

from ..data import ArraySource
from ..data.subset import Subset
from ..runs import JsonlLog, RunPaths
from ..utils import atomic_write_text
from .config import EDMConfig
from .generate import generate_images


def track_memorization(cfg: EDMConfig, paths: RunPaths, ema, subset: Subset, device, *, epoch: int, step: int,
                       nimg: int) -> dict:
    """Generate track.num_images with fixed seeds, audit them against D, log; keep the highest ratio."""
    from ..audit.api import audit

    seeds = list(range(cfg.track.seed, cfg.track.seed + cfg.track.num_images))
    images = generate_images(ema, seeds, resolution=subset.images.shape[1], label_dim=subset.label_dim,
                             device=device, batch=cfg.track.batch, steps=cfg.track.steps,
                             sigma_min=cfg.track.sigma_min)
    # The audit's report (per-sample flags and neighbours, replica grid) is kept per snapshot: a study
    # bootstraps the flags of the snapshot it reports.
    report = audit(ArraySource("D", np.asarray(subset.images)), images, backend=cfg.track.backend,
                   out=paths.tracking_audit(epoch), progress=False)
    row = {"epoch": epoch, "step": step, "nimg": nimg, "memorization_ratio": report.memorization_ratio,
           "memorization_ratio_ci95": list(report.ci95), "knn_distance": report.knn_distance,
           "num_generated": len(seeds), "time": time.time()}
    JsonlLog(paths.tracking).append(row)
    update_best(paths, JsonlLog(paths.tracking).rows())
    return row


def update_best(paths: RunPaths, rows: list[dict]) -> dict | None:
    """best.json: the tracked row with the highest memorization ratio (the first of equals), as the paper reports."""
    from ..records import TRACKED, check

    rows = [check(TRACKED, r, f"{paths.tracking} row {i + 1}") for i, r in enumerate(rows)]
    if not rows:
        paths.best.unlink(missing_ok=True)
        return None
    best = max(rows, key=lambda r: (r["memorization_ratio"], -r["step"]))
    atomic_write_text(paths.best, json.dumps(best, indent=2) + "\n")
    return best
