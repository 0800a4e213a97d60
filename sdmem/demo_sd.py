"""The demo's second part: the paper's Table 3 in miniature, on the pretrained tiny SD (sdmem.sd.pretrained).

The tiny SD, pretrained on digits, faces and crops of 16 pictures, is fine-tuned on |D| crops of four photographs it
never saw (an astronaut, a cat, coffee, a rocket: ``builtin:photos``), with LoRA of several ranks and a full
fine-tune, class prompts ("a picture of a cat") and one plain-prompt ("a picture") counterpart; every point sees
the same number of images. It runs as an ``sdmem sweep`` (resumable), each point generated and audited against
its own D, and laid out by ``sdmem compare`` in Table 3's layout. Written under ``DIR/sd/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .demo_folder import open_demo_folder, ratio_cells, text_table, write_rows_csv
from .study.compare import layout, load_sweep, write_compare
from .study.sweep import parse_spec, points, run_sweep
from .utils import atomic_write_text, resolve_device, staged_folder

# The points: (method, rank, prompt). Ranks are LoRA ranks of the attention projections (width 64 at the lowest
# level, where the tiny UNet has its cross-attention), so rank 64 is a full-rank update of those matrices.
POINTS = (("lora", 1, "class"), ("lora", 8, "class"), ("lora", 64, "class"), ("full", 64, "class"),
          ("full", 64, "plain"))
# Measured on 2 CPU cores (README, the demo's second part): |D|, images seen per point, learning rates, images
# generated and audited per point.
SD_SETTINGS = {"full": {"size": 4, "images_seen": 8000, "lr_full": 2e-3, "lr_lora": 2e-3, "num": 64},
               "quick": {"size": 4, "images_seen": 1600, "lr_full": 2e-3, "lr_lora": 2e-3, "num": 32}}
SD_BATCH = 16
SD_WARMUP = 25  # optimizer steps of linear warm-up, then the cosine schedule (Appendix G's) down to 0
# Guidance 1 (the conditional model alone): the fine-tune trains the conditional branch only (no caption dropout,
# as Appendix G), so a larger scale extrapolates towards the pretrained unconditional model (measured: a full
# fine-tune with 88% replicas at scale 1 had 0% at scale 3).
SD_GENERATE = {"steps": 20, "guidance_scale": 1.0, "batch": 64}
SD_ENTRIES = {"demo.json", "points", "results.csv", "compare.md", "compare.csv", "compare.png", "replicas",
              "summary.json"}
SD_COLUMNS = ("model.method", "model.rank", "data.prompt", "size", "memorization_ratio", "memorization_ratio_low",
              "memorization_ratio_high", "knn_distance", "num_params", "images_seen", "point")


def sd_demo_spec(out: Path, pretrained: Path, *, settings: dict, seed: int = 0):
    """The SD study's sweep: the points of POINTS on the pretrained tiny SD, the same images seen each."""
    s = settings
    steps = s.get("steps", SD_GENERATE["steps"])  # DDIM steps (the tests take fewer)
    names = [f"{m}-r{r}-{p}" if m == "lora" else f"full-{p}" for m, r, p in POINTS]
    raw = {"out_dir": str(out / "points"),
           "base": {"kind": "sd", "seed": seed,
                    "data": {"source": "builtin:photos", "size": s["size"], "resolution": 32, "prompt": "class",
                             "seed": seed},
                    "model": {"pretrained": str(pretrained), "method": "lora", "rank": 1},
                    "train": {"images_seen": s["images_seen"], "batch_size": SD_BATCH, "gradient_accumulation": 1,
                              "lr_schedule": "cosine",
                              "lr_warmup_steps": SD_WARMUP, "ema": False, "checkpoint_steps": 100,
                              "checkpoints_total_limit": 1, "log_every_steps": 50},
                    "generate": {"steps": steps, "guidance_scale": SD_GENERATE["guidance_scale"],
                                 "batch": SD_GENERATE["batch"]}},
           "zip": [{"name": names, "model.method": [m for m, _, _ in POINTS], "model.rank": [r for _, r, _ in POINTS],
                    "data.prompt": [p for _, _, p in POINTS],
                    "train.lr": [s["lr_full"] if m == "full" else s["lr_lora"] for m, _, _ in POINTS]}],
           "generate": {"num": s["num"], "batch": SD_GENERATE["batch"], "steps": steps},
           "report": "final"}
    return parse_spec(raw, Path("sdmem demo (SD part)"))


def run_sd_demo(out: str | os.PathLike, *, quick: bool = False, seed: int = 0, device: str = "auto",
                progress: bool = True, settings: dict | None = None, recipe: dict | None = None) -> dict:
    """Run (or resume) the SD study into ``out`` (the demo's ``DIR/sd``); returns its summary. ``recipe``: the
    tiny SD's (sdmem.sd.pretrained.RECIPE by default; the tests use a small one)."""
    from .sd.pretrained import pretrained_tiny_sd, recipe_fingerprint

    out, t0 = Path(out), time.time()
    dev = resolve_device(device)
    s = settings or SD_SETTINGS["quick" if quick else "full"]
    say = print if progress else (lambda *_: None)
    open_demo_folder(out, {"part": "sd", "quick": quick, "seed": seed, **s, "base": recipe_fingerprint(recipe)},
                     entries=SD_ENTRIES)
    base = pretrained_tiny_sd(progress=progress, log=say, recipe=recipe)
    spec = sd_demo_spec(out, base, settings=s, seed=seed)
    say(f"fine-tuning the pretrained tiny SD on |D| = {s['size']} photo crops: LoRA ranks "
        f"{', '.join(str(r) for m, r, _ in POINTS if m == 'lora')} and full, {s['images_seen']} images seen each; "
        "re-run to resume")
    rows = run_sweep(spec, progress=progress, device=dev, log=say)
    pts = {p.name: p for p in points(spec)}
    table = sorted((_row(r) for r in rows), key=_point_order)  # POINTS' order: LoRA by rank, then full
    results = load_sweep(spec.out_dir)
    row_keys, col_keys = layout(results)
    with staged_folder(out) as stage:
        _write_csv(stage / "results.csv", table)
        md, _ = write_compare(stage, results, row_keys, col_keys)
        (stage / "replicas").mkdir()
        for r in table:
            grid = pts[r["point"]].dir / "audit" / "replicas.png"
            if grid.exists():
                shutil.copyfile(grid, stage / "replicas" / f"{r['point']}.png")
        summary = {"part": "sd", "train": "builtin:photos (crops of 4 scikit-image photos), 32x32", "quick": quick,
                   "seed": seed, "base": str(base), "settings": s, "points": table, "seconds": round(time.time() - t0)}
        atomic_write_text(stage / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(format_sd_table(table))
    print(md)
    print(f"SD results: {out}/results.csv, compare.md/.png (Table 3's layout), replicas/; runs in {out}/points")
    return summary


def _point_order(row: dict) -> int:
    rank = row["model.rank"] if row["model.method"] == "lora" else 64
    return POINTS.index((row["model.method"], rank, row["data.prompt"]))


def _row(r: dict) -> dict:
    method = r["model.method"]
    return {"model.method": method, "model.rank": r["model.rank"] if method == "lora" else "",
            "data.prompt": r["data.prompt"], **{k: r[k] for k in SD_COLUMNS[3:]}}


def _write_csv(path: Path, rows: list[dict]) -> None:
    write_rows_csv(path, rows, SD_COLUMNS)


def format_sd_table(rows: list[dict]) -> str:
    return text_table("replica iff d1/d2 < 1/3, tiny SD fine-tuned on crops of 4 photos (32x32)",
                      ("fine-tune", "prompts", "|D|", "memorization ratio", "95% CI", "KNN distance"),
                      [(f"LoRA r={r['model.rank']}" if r["model.method"] == "lora" else "full", r["data.prompt"],
                        str(r["size"]), *ratio_cells(r)) for r in rows])
