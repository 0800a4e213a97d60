"""`sdmem demo`: the main job as a real study, on data that ships with scikit-learn (no downloads).

EDM models (a ~1M-parameter DDPM++) are trained on subsets D of the real 8×8 digits of three sizes, the same
number of optimizer steps each, memorization tracked during training; each is audited with the paper's rule and
the highest ratio reported, as the paper does. The effective model memorization (EMM, Definition 2.1) of this
configuration comes out of the ratio-against-|D| curve. Two reference rows frame it: samples of the theoretical
optimum of the largest D (Eq. 2: it can only reproduce D, every sample a replica) and real held-out digits
(novel by construction). The training runs through `sdmem sweep`, so re-running the demo resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .audit.api import audit
from .data import ArraySource
from .data.builtin import digits_source
from .data.subset import load_subset
from .edm.optimum import sample_optimum
from .study.emm import estimate_emm, format_table as emm_table, write_emm
from .study.sweep import parse_spec, points, run_sweep
from .errors import InputError
from .utils import atomic_write_text, resolve_device, staged_folder
from .demo_folder import DEMO_ENTRIES, DEMO_FORMAT, open_demo_folder  # noqa: F401 - re-exported
from .demo_folder import ratio_cells, text_table, write_rows_csv

# The same optimizer steps for every |D|: epochs = steps · batch / |D|. Measured on 2 CPU cores (see README).
SETTINGS = {"full": {"sizes": (20, 100, 500), "steps": 1500, "num": 500},
            "quick": {"sizes": (10, 50, 250), "steps": 300, "num": 200}}
BATCH = 32
NETWORK = {"arch": "ddpmpp", "precond": "edm", "channels": 16, "channel_mult": [1, 2], "num_blocks": 2,
           "attn_resolutions": [4], "dropout": 0.0}  # ~0.27M parameters: |D| = 20 memorizes within 1000 steps


def demo_spec(out: Path, *, quick: bool = False, seed: int = 0, settings: dict | None = None):
    """The demo's sweep: one point per |D|, the same network and number of optimizer steps."""
    s = settings or SETTINGS["quick" if quick else "full"]
    snap_kimg = s["steps"] * BATCH / 3 / 1000  # three snapshots (tracked) per run
    raw = {"out_dir": str(out / "points"),
           "base": {"kind": "edm", "seed": seed, "data": {"source": "builtin:digits", "size": s["sizes"][0],
                                                          "labels": "none", "seed": seed},
                    "model": NETWORK,
                    "train": {"epochs": 1, "batch_size": BATCH, "lr": 2e-3, "warmup_epochs": 0, "ema_rate": 0.5,
                              "snapshot_kimg": max(1, round(snap_kimg)), "checkpoint_epochs": 10**6,
                              "log_every_steps": 100},
                    "track": {"batch": 500}},
           "zip": [{"data.size": list(s["sizes"]),
                    "train.epochs": [-(-s["steps"] * BATCH // n) for n in s["sizes"]]}],
           "generate": {"num": s["num"]}, "report": "best"}
    return parse_spec(raw, Path("sdmem demo"))


PARTS = ("edm", "sd")


def run_demo(out: str | os.PathLike = "demo_out", *, quick: bool = False, seed: int = 0, device: str = "auto",
             progress: bool = True, settings: dict | None = None, part: str = "all",
             sd_settings: dict | None = None, sd_recipe: dict | None = None) -> dict:
    """Run (or resume) the demo into ``out``: the EDM |D| study (``out/``) and the SD LoRA-rank study
    (``out/sd/``, sdmem.demo_sd), or one of them (``part``: all | edm | sd). Returns {part: its summary}.
    ``settings`` / ``sd_settings`` replace the parts' full or quick settings, ``sd_recipe`` the tiny SD's recipe
    (tests use tiny ones)."""
    if part not in ("all", *PARTS):
        raise InputError("--part", f"expected one of all, {', '.join(PARTS)}, got {part!r}")
    out = Path(out)
    s = settings or SETTINGS["quick" if quick else "full"]
    open_demo_folder(out, {"quick": quick, "seed": seed, "sizes": list(s["sizes"]), "steps": s["steps"],
                           "num": s["num"]})
    def run_sd():
        from .demo_sd import run_sd_demo

        return run_sd_demo(out / "sd", quick=quick, seed=seed, device=device, progress=progress,
                           settings=sd_settings, recipe=sd_recipe)

    runners = {"edm": lambda: run_edm_demo(out, quick=quick, seed=seed, device=device, progress=progress,
                                           settings=s), "sd": run_sd}
    done = {}
    for name in PARTS if part == "all" else (part,):
        t0 = time.time()
        done[name] = runners[name]()
        print(f"{name.upper()} part: {time.time() - t0:.0f} s")
    return done


def run_edm_demo(out: Path, *, quick: bool, seed: int, device: str, progress: bool, settings: dict) -> dict:
    """The EDM part into ``out`` (opened by run_demo); returns the summary written to ``out/summary.json``."""
    dev = resolve_device(device)
    s = settings
    spec = demo_spec(out, seed=seed, settings=s)
    say = print if progress else (lambda *_: None)

    # Train, track and audit one model per |D| (a sweep: resumable, each point's best snapshot reported).
    say(f"training {len(spec.zips[0]['data.size'])} EDM models on real digits (|D| = "
        f"{', '.join(map(str, spec.zips[0]['data.size']))}); re-run to resume")
    rows = run_sweep(spec, progress=progress, device=dev, log=say)
    pts = {p.name: p for p in points(spec)}
    models = [{"model": "edm", "size": r["size"], "labels": "none", "num_params": r["num_params"],
               "epoch": r["epoch"], "images_seen": r["images_seen"], **_ratio(r), "point": r["point"]}
              for r in sorted(rows, key=lambda r: r["size"])]

    # Everything below is written into a staging folder and moved into `out` at the end.
    with staged_folder(out) as stage:
        largest = pts[models[-1]["point"]]
        d = load_subset(largest.run_dir)
        train = ArraySource(f"D (|D| = {len(d)})", np.asarray(d.images))
        num = spec.generate["num"]
        # Reference rows: the optimum of the largest D, and real digits in none of the training sets.
        sample_optimum(train, num, stage / "optimum_samples", seed=0, device=dev, progress=progress)
        digits = digits_source()
        used = set(np.concatenate([np.asarray(load_subset(p.run_dir).indices) for p in pts.values()]).tolist())
        held = np.array([i for i in range(len(digits)) if i not in used][:num])
        refs = []
        for name, generated in (("optimum (Eq. 2)", stage / "optimum_samples"),
                                ("held-out real digits", digits.load()[held])):
            tag = "optimum" if name.startswith("optimum") else "heldout"
            report = audit(train, generated, out=stage / f"audit_{tag}", device=dev, progress=progress)
            s = report.summary()
            refs.append({"model": name, "size": len(d), "labels": "none", **_ratio(s)})
        # The study's table, EMM, the ratio-against-|D| plot and each model's replica grid.
        table = models + refs
        _write_csv(stage / "results.csv", table)
        emm = estimate_emm([{**m, "memorization_ratio_low": m["memorization_ratio_low"]} for m in models],
                           zeta=0.1, by=[], base=spec.out_dir)
        write_emm(stage, emm, models, zeta=0.1)
        (stage / "replicas").mkdir()
        for m in models:
            grid = pts[m["point"]].dir / "audit" / "replicas.png"
            if grid.exists():
                shutil.copyfile(grid, stage / "replicas" / f"size-{m['size']}.png")
        summary = {"train": "scikit-learn digits (8x8), no labels", "quick": quick, "seed": seed,
                   "models": models, "references": refs, "emm": emm}
        atomic_write_text(stage / "summary.json", json.dumps(summary, indent=2, default=_json) + "\n")
    print(format_table(table))
    print(emm_table(emm))
    print(f"results: {out}/results.csv, emm.png (ratio against |D|), replicas/, summary.json; runs in {out}/points")
    return summary


def _ratio(s: dict) -> dict:
    lo, hi = s.get("memorization_ratio_ci95") or (s["memorization_ratio_low"], s["memorization_ratio_high"])
    return {"memorization_ratio": s["memorization_ratio"], "memorization_ratio_low": lo,
            "memorization_ratio_high": hi, "knn_distance": s["knn_distance"]}


def _json(value):
    return value.item() if hasattr(value, "item") else str(value)


COLUMNS = ("model", "size", "labels", "num_params", "epoch", "images_seen", "memorization_ratio",
           "memorization_ratio_low", "memorization_ratio_high", "knn_distance", "point")


def _write_csv(path: Path, rows: list[dict]) -> None:
    write_rows_csv(path, rows, COLUMNS)


def format_table(rows: list[dict]) -> str:
    """A terminal table: one line per trained model, then the two references."""
    return text_table("replica iff d1/d2 < 1/3 (the paper's rule), real 8x8 digits from scikit-learn",
                      ("model", "|D|", "memorization ratio", "95% CI", "KNN distance"),
                      [(r["model"], str(r["size"]), *ratio_cells(r)) for r in rows])
