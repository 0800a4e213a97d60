"""Generation images/s of `sdmem generate` (the shared core: seed grid, manifest, verified resume, PNG writing)
for an EDM run and a tiny SD LoRA run, next to a plain sampler loop over the same seeds and batches measured in
the same process (the baseline: no files, no manifest). Prints both figures and their ratio.

    python eval/bench_generate.py [--num 64] [--batch 16] [--edm-steps 18] [--sd-steps 20] [--threads 2]

Training the two tiny runs first takes about a minute on 2 CPU cores; the runs are kept in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EDM = {"kind": "edm", "seed": 0, "data": {"source": "builtin:digits", "size": 64, "num_classes": 2, "labels": "true",
                                          "resolution": 16},
       "model": {"arch": "ddpmpp", "precond": "edm", "channels": 32, "channel_mult": [1, 2], "num_blocks": 1,
                 "attn_resolutions": [8]},
       "train": {"epochs": 4, "batch_size": 32, "warmup_epochs": 1, "snapshot_epochs": 4, "checkpoint_epochs": 4},
       "track": {"num_images": 0}}
SD = {"kind": "sd", "seed": 0, "data": {"size": 20, "resolution": 32, "prompt": "class"},
      "model": {"method": "lora", "rank": 4},
      "train": {"images_seen": 16, "batch_size": 4, "gradient_accumulation": 1, "checkpoint_steps": 4}}


def load_config(path):
    try:
        from sdmem.runs import load_config as load
    except ImportError:  # sdmem before the run layer
        from sdmem.config import load_config as load
    return load(path)


def train_runs(work: Path) -> tuple[Path, Path]:
    from sdmem.edm.train import train as train_edm
    from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd
    from sdmem.sd.train import train as train_sd

    edm_run, sd_run = work / "edm-run", work / "sd-run"
    if not (edm_run / "snapshots").is_dir():
        (work / "edm.yaml").write_text(yaml.safe_dump({**EDM, "out_dir": str(edm_run)}))
        train_edm(load_config(work / "edm.yaml"), progress=False)
    if not (sd_run / "final.json").exists():
        model, data = make_tiny_sd(work / "tiny-sd"), make_imagenette_like(work / "inet", per_class=2)
        cfg = json.loads(json.dumps(SD))
        cfg.update(out_dir=str(sd_run))
        cfg["data"]["source"], cfg["model"]["pretrained"] = str(data), str(model)
        (work / "sd.yaml").write_text(yaml.safe_dump(cfg))
        train_sd(load_config(work / "sd.yaml"), progress=False)
    return edm_run, sd_run


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_edm(run: Path, args) -> tuple[float, float]:
    from sdmem.edm.generate import generate_images, generate_run
    from sdmem.edm.run import load_snapshot

    snap = sorted((run / "snapshots").iterdir())[-1]
    net, _, meta = load_snapshot(snap, "cpu")
    seeds = list(range(args.num))
    res, label_dim = int(meta["img_resolution"]), int(meta["label_dim"])

    def plain():
        for s in range(0, args.num, args.batch):
            generate_images(net, seeds[s : s + args.batch], resolution=res, label_dim=label_dim, device="cpu",
                            batch=args.batch, steps=args.edm_steps)
    out = Path(tempfile.mkdtemp(prefix="gen-edm-"))
    plain()  # warm-up
    base = timed(plain)
    ours = timed(lambda: generate_run(run, out / "g", seeds=seeds, batch=args.batch, steps=args.edm_steps,
                                      device="cpu", progress=False))
    shutil.rmtree(out)
    return args.num / ours, args.num / base


def bench_sd(run: Path, args) -> tuple[float, float]:
    from sdmem.sd.generate import generate_images, generate_run, load_run_pipeline

    pipe, cfg, _ = load_run_pipeline(run, device="cpu")
    names = json.loads((run / "subset.json").read_text())["class_names"]
    seeds = list(range(args.num))
    prompts = [f"a picture of a {names[i * len(names) // args.num]}" for i in seeds]

    def plain():
        for s in range(0, args.num, args.batch):
            generate_images(pipe, prompts[s : s + args.batch], seeds[s : s + args.batch], resolution=32,
                            steps=args.sd_steps, guidance_scale=7.5)
    out = Path(tempfile.mkdtemp(prefix="gen-sd-"))
    plain()  # warm-up
    base = timed(plain)
    ours = timed(lambda: generate_run(run, out / "g", seeds=seeds, batch=args.batch, steps=args.sd_steps,
                                      device="cpu", progress=False))
    shutil.rmtree(out)
    return args.num / ours, args.num / base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--edm-steps", type=int, default=18)
    p.add_argument("--sd-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sdmem-bench-generate"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    edm_run, sd_run = train_runs(work)
    print(f"{args.num} images, batch {args.batch}, {args.threads} threads (CPU)")
    for name, fn in (("EDM (Heun, %d steps, 16x16, 2 classes)" % args.edm_steps, bench_edm),
                     ("tiny SD LoRA (DDIM %d steps, 32x32, class prompts)" % args.sd_steps, bench_sd)):
        ours, base = fn(edm_run if fn is bench_edm else sd_run, args)
        print(f"{name}: sdmem generate {ours:.2f} img/s, plain sampler loop {base:.2f} img/s, ratio "
              f"{ours / base:.2f}x")


if __name__ == "__main__":
    main()
