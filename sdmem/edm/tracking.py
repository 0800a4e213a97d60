"""Memorization tracking during EDM training: at each EMA snapshot, generate ``track.num_images`` images with fixed
seeds, audit them against the training set D, append the row to ``tracking.jsonl`` and keep the highest ratio in
``best.json`` (the paper reports the highest ratio seen during training).

The images go through the one generation core (sdmem.generation), like every generated folder; each tracked
snapshot keeps ``tracking/epoch-NNNNNNN/generated/`` (the PNGs and their manifest) and
``tracking/epoch-NNNNNNN/audit/`` (their audit against D: summary.json, per_sample.csv, replicas.png). Runs tracked
before the images were kept hold the audit in ``tracking/epoch-NNNNNNN/`` itself (:func:`tracked_audit` reads both).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..data import ArraySource
from ..data.subset import Subset
from ..generation import Plan, generate_folder, image_name, read_manifest
from ..runs import JsonlLog
from ..utils import atomic_write_text
from .config import EDMConfig
from .generate import snapshot_plan
from .run import EDMPaths

# What an audit report writes (sdmem.audit.api.AuditReport.save): in tracking/epoch-N/ itself before the images
# were kept, in tracking/epoch-N/audit/ since.
REPORT_FILES = ("summary.json", "per_sample.csv", "replicas.png", "ratio_hist.png")


def tracked_generated(paths: EDMPaths, epoch: int) -> Path:
    """The folder of the images tracked at the snapshot of ``epoch`` (absent in runs made before they were kept)."""
    return paths.tracking_audit(epoch) / "generated"


def tracked_audit(paths: EDMPaths, epoch: int) -> Path | None:
    """The audit folder of the snapshot of ``epoch``: ``tracking/epoch-N/audit/``, or ``tracking/epoch-N/`` itself
    in a run tracked before the images were kept; None when neither holds a summary.json."""
    folder = paths.tracking_audit(epoch)
    for audit_dir in (folder / "audit", folder):
        if (audit_dir / "summary.json").is_file():
            return audit_dir
    return None


def tracking_seeds(cfg: EDMConfig) -> list[int]:
    return list(range(cfg.track.seed, cfg.track.seed + cfg.track.num_images))


def tracking_batch(cfg: EDMConfig) -> int:
    """The seed grid's block size of tracked images: track.batch, or track.num_images when fewer are tracked (a
    block is always rendered whole, so a batch above the images asked for would only render images to drop)."""
    return max(1, min(cfg.track.batch, cfg.track.num_images))


def tracking_plan(cfg: EDMConfig, ema, *, epoch: int, resolution: int, label_dim: int, device,
                  snapshot_file: str = "") -> Plan:
    """The generation plan of the images tracked at the snapshot of ``epoch``, rendered by the in-memory EMA
    denoiser ``ema``: the settings `sdmem generate RUN --snapshot EPOCH --steps track.steps --batch B` records for
    that snapshot (B = :func:`tracking_batch`), classes drawn per seed as it draws them (``--class random``).

    The images lie on the fixed seed grid of every generated folder (sdmem.generation): blocks [kB, (k+1)B) are
    rendered whole. When track.seed is not a multiple of B (or track.seed + track.num_images is not), the first
    (last) block also renders the grid's seeds before (after) the tracked ones, and drops them: the tracked
    images are those the grid gives, not batches counted from track.seed, so a tracked image equals the one
    `sdmem generate` writes for its seed with the same batch and steps, byte for byte.
    """
    info = {"tracked": True, "snapshot_file": snapshot_file, "device": str(device)}
    return snapshot_plan(cfg, lambda: ema, epoch=epoch, res=resolution, label_dim=label_dim, fixed=None,
                         batch=tracking_batch(cfg), steps=cfg.track.steps, dev=device, info=info)


def _drop_stale(paths: EDMPaths, epoch: int, plan: Plan, seeds: list[int]) -> None:
    """Before an epoch is tracked (again, after a resume): drop what an earlier attempt left that these images
    would not match. The report of the layout before images were kept goes (tracking would overwrite it); a
    generated/ made with other settings or holding other seeds goes (a resume with other track.* settings); one
    with the same settings and a part of these seeds is completed (a resume after a kill: the same weights)."""
    folder = paths.tracking_audit(epoch)
    for name in REPORT_FILES:
        (folder / name).unlink(missing_ok=True)
    generated = tracked_generated(paths, epoch)
    manifest = read_manifest(generated)  # a generated/ that is no sdmem folder is refused, never removed
    if manifest is not None and (manifest["settings"] != plan.settings
                                 or not set(manifest["images"]) <= {image_name(s) for s in seeds}):
        shutil.rmtree(generated)


def track_memorization(cfg: EDMConfig, paths: EDMPaths, ema, subset: Subset, device, *, epoch: int, step: int,
                       nimg: int) -> dict:
    """Generate track.num_images with fixed seeds into tracking/epoch-N/generated/, audit them against D into
    tracking/epoch-N/audit/, log the row; keep the highest ratio."""
    from ..audit.api import audit

    seeds = tracking_seeds(cfg)
    plan = tracking_plan(cfg, ema, epoch=epoch, resolution=subset.images.shape[1], label_dim=subset.label_dim,
                         device=device, snapshot_file=paths.snapshot(epoch).name)
    _drop_stale(paths, epoch, plan, seeds)
    generated = tracked_generated(paths, epoch)
    generate_folder(generated, seeds, plan, progress=False)
    # The audit's report (per-sample flags and neighbours, replica grid) is kept per snapshot: a study
    # bootstraps the flags of the snapshot it reports.
    report = audit(ArraySource("D", np.asarray(subset.images)), generated, backend=cfg.track.backend,
                   out=paths.tracking_audit(epoch) / "audit", progress=False)
    row = {"epoch": epoch, "step": step, "images_seen": nimg, "memorization_ratio": report.memorization_ratio,
           "memorization_ratio_ci95": list(report.ci95), "knn_distance": report.knn_distance,
           "num_generated": len(seeds), "time": time.time()}
    JsonlLog(paths.tracking).append(row)
    update_best(paths, JsonlLog(paths.tracking).rows())
    return row


def update_best(paths: EDMPaths, rows: list[dict]) -> dict | None:
    """best.json: the tracked row with the highest memorization ratio (the first of equals), as the paper reports."""
    from ..records import TRACKED, check

    rows = [check(TRACKED, r, f"{paths.tracking} row {i + 1}") for i, r in enumerate(rows)]
    if not rows:
        paths.best.unlink(missing_ok=True)
        return None
    best = max(rows, key=lambda r: (r["memorization_ratio"], -r["step"]))
    atomic_write_text(paths.best, json.dumps(best, indent=2) + "\n")
    return best
