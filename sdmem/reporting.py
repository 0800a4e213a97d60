"""What every kind's report shares: generate a study point's images, audit them against its run's training set,
and turn the audit into the row's numbers (sdmem.kinds.Kind.report). A point has ``config``, ``dir`` (its folder)
and ``run_dir`` (its trainer's run folder); its images go to ``dir/generated``, its audit to ``dir/audit``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import InputError


def audit_row(report) -> dict:
    """The row's numbers from an AuditReport."""
    s = report.summary()
    lo, hi = s["memorization_ratio_ci95"]
    return {"memorization_ratio": s["memorization_ratio"], "memorization_ratio_low": lo, "memorization_ratio_high": hi,
            "knn_distance": s["knn_distance"], "fid": s.get("fid"), "num_generated": s["num_generated"]}


def generate_and_audit(point, generate: dict, generate_run, *, progress: bool, device: str, **options) -> dict:
    """``generate.num`` images (seeds from ``generate.seed``) into the point's generated/, audited into its audit/;
    the fid column is filled when the Inception weights are in their default place (sdmem.fid), empty otherwise."""
    from .audit.api import audit
    from .fid import weights_available

    first = generate.get("seed", 0)
    seeds = list(range(first, first + generate["num"]))
    generate_run(point.run_dir, point.dir / "generated", seeds=seeds, device=device, progress=progress,
                 **{k: generate[k] for k in ("batch", "steps") if k in generate}, **options)
    report = audit(point.run_dir, point.dir / "generated", out=point.dir / "audit", progress=progress,
                   fid=weights_available())
    return audit_row(report)


def replace_audit(target: Path, source: Path) -> None:
    """Copy an audit folder to the point's audit/ (a copy beside it, then swapped in). An audit/ that is not an
    sdmem audit folder (no summary.json) is the user's: refused, never removed."""
    if target.exists() and not (target.is_dir() and not target.is_symlink() and (target / "summary.json").is_file()):
        raise InputError(target, "exists and is not an sdmem audit folder (no summary.json); refusing to replace it")
    tmp = target.with_name(f".audit.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
