"""`sdmem demo`: the main job on data that ships with scikit-learn (no downloads).

A subset D of the real 8×8 digits is the training set. Two generated sets are audited against it with the
paper's rule: samples of the theoretical optimum (Eq. 2: it can only reproduce D, Fig. 1a) and real
held-out digits (novel images by construction). The contrast is the point of the tool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .audit.api import audit
from .data import ArraySource
from .data.builtin import digits_source
from .edm.optimum import sample_optimum
from .errors import InputError
from .utils import resolve_device, staged_folder


def run_demo(out: str | os.PathLike = "demo_out", *, train_size: int = 500, num: int = 500, seed: int = 0,
             device: str = "auto", progress: bool = True) -> dict:
    """Run the demo into ``out``; returns the comparison written to ``out/summary.json``."""
    digits = digits_source()
    if train_size + num > len(digits):
        raise InputError("--train-size/--num", f"train size + held-out count must be ≤ {len(digits)} digits, "
                                               f"got {train_size} + {num}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))
    train_idx, held_idx = np.sort(order[:train_size]), np.sort(order[train_size:train_size + num])
    images = digits.load()
    train = ArraySource("digits-train", images[train_idx], labels=digits.labels[train_idx],
                        files=[f"digit{i:04d}" for i in train_idx], class_names=digits.class_names)
    held = ArraySource("digits-heldout", images[held_idx], labels=digits.labels[held_idx],
                       files=[f"digit{i:04d}" for i in held_idx])
    dev = resolve_device(device)

    # Everything is built in a staging folder inside `out` and moved into place at the end: a failure leaves
    # `out` as it was. The training subset goes into the folder so any audit can be re-run from the command line.
    with staged_folder(out) as stage:
        for name, src in (("train.npz", train), ("heldout.npz", held)):
            with open(stage / name, "wb") as f:
                np.savez(f, images=src.load(), labels=src.labels)

        # Sample the optimum (Heun, 18 steps, seeds 0..num-1), then audit both sets against D.
        sample_optimum(train, num, stage / "optimum_samples", steps=18, seed=0, device=dev, progress=progress)
        results = {}
        for name, generated in (("optimum", stage / "optimum_samples"), ("heldout", held)):
            report = audit(train, generated, out=stage / f"audit_{name}", device=dev, progress=progress)
            results[name] = report.summary()
        # The reports name the staging folder: point them at where it all ends up.
        for name in results:
            path = stage / f"audit_{name}" / "summary.json"
            path.write_text(path.read_text().replace(str(stage), str(out)))
            results[name] = json.loads(path.read_text())
        comparison = {
            "train": {"source": "scikit-learn digits (8x8, 10 classes)", "size": train_size, "seed": seed},
            "optimum": results["optimum"],
            "heldout": results["heldout"],
        }
        (stage / "summary.json").write_text(json.dumps(comparison, indent=2) + "\n")
    print(format_table(comparison))
    print(f"reports: {out}/audit_optimum, {out}/audit_heldout (summary.json, per_sample.csv, replicas.png, "
          "ratio_hist.png)")
    return comparison


def format_table(comparison: dict) -> str:
    """A small terminal table contrasting the two audits."""
    rows = [("generated set", "memorization ratio", "95% CI", "KNN distance"),
            ("optimum samples (Eq. 2)",) + _cells(comparison["optimum"]),
            ("real held-out digits",) + _cells(comparison["heldout"])]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"training set: {comparison['train']['size']} real digits (scikit-learn), replica iff d1/d2 < 1/3"]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cells(s: dict) -> tuple[str, str, str]:
    lo, hi = s["memorization_ratio_ci95"]
    return (f"{100 * s['memorization_ratio']:.1f}% ({s['num_replicas']}/{s['num_generated']})",
            f"{100 * lo:.1f}-{100 * hi:.1f}%", f"{s['knn_distance']:.2f}")
