"""The detection study on the pretrained tiny SD (README, "sdmem detect"): does each score separate the prompts a
fine-tune memorized from those it did not, judged by the pixel audit?

    python eval/detect_study.py OUT [--steps 2000] [--classes 6] [--varied 3] [--per-class 16] [--guidance 1]

1. A labelled image folder ``OUT/data``: C "copied" classes, each one 32x32 crop of a scikit-image photo copied
   ``per-class`` times (the duplication that makes a model memorize), and C "varied" classes ("mix k"), each
   ``per-class`` distinct crops of pictures drawn at random from 15 of the tiny SD's pretraining pictures.
2. A full fine-tune of the pretrained tiny SD on all of it with class prompts and 10% caption dropout (so the
   unconditional branch is trained too, as SD's was), through sdmem's trainer: ``OUT/run``.
3. The ground truth: every class prompt's pixel audit against the run's training images (``detect --confirm RUN
   --top all``: 16 images each, the paper's rule); replica rate >= 80% is memorized, <= 10% novel, others left out.
4. ``sdmem detect`` with every method on the same prompts and these labels: each method's AUC and TPR at 1% FPR,
   printed and written to ``OUT/study.md``; beside it each method's AUC on all prompts against the design's labels
   (copied or varied).
Resumable: every stage keeps its folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np


# One crop each, duplicated: colour photos, so that a copy's second-nearest training image (in the grey and textured
# pool below) is far and the paper's rule can call it a replica.
MEMORIZED = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "immunohistochemistry")
# The varied classes' crops come from all of these at random, so that each such prompt's images vary as a large
# dataset's do (and its mean is the data's mean), as a prompt that is not memorized sees them.
MIXED = ("hubble_deep_field", "clock", "retina", "brick", "cell", "coins", "grass", "gravel", "moon", "page", "text",
         "camera", "colorwheel", "logo", "microaneurysms")


def make_folder(out: Path, classes: int, per_class: int, varied: int | None = None, seed: int = 0) -> list[str]:
    """``classes`` copied classes (one crop of a photo, ``per_class`` copies) and ``varied`` (default: as many)
    varied ones (``per_class`` distinct crops of random pictures); returns the class names (copied first)."""
    from PIL import Image

    from sdmem.data.photos import picture, random_crops

    if (out / "classes.json").exists():
        return json.loads((out / "classes.json").read_text())
    if not 1 <= classes <= len(MEMORIZED):
        raise SystemExit(f"--classes: expected 1 to {len(MEMORIZED)}")
    rng = np.random.default_rng(seed)
    made = []
    tmp = out.with_name(out.name + ".tmp")
    for pic in MEMORIZED[:classes]:
        name = pic.split("_")[-1]
        crop = random_crops(picture(pic), 1, 32, rng, (0.3, 0.6))[0]
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):  # the same picture, duplicated
            Image.fromarray(crop).save(tmp / name / f"{j:03d}.png")
        made.append(name)
    pics = {p: picture(p) for p in MIXED}
    for k in range(classes if varied is None else varied):
        name = f"mix {k}"
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            c = random_crops(pics[MIXED[rng.integers(len(MIXED))]], 1, 32, rng, (0.15, 0.6))[0]
            Image.fromarray(c).save(tmp / name / f"{j:03d}.png")
        made.append(name)
    (tmp / "classes.json").write_text(json.dumps(made))
    tmp.rename(out)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--classes", type=int, default=6, help="memorized classes, and as many novel ones (at most 6)")
    p.add_argument("--varied", type=int, default=3, help="varied classes (default 3)")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="of the images audited and of collapse (wen: its steps after the first)")
    args = p.parse_args(argv)
    from sdmem import cli
    from sdmem.config import config_from_dict
    from sdmem.sd.config import SDConfig
    from sdmem.sd.pretrained import pretrained_tiny_sd
    from sdmem.sd.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = pretrained_tiny_sd()
    names = make_folder(out / "data", args.classes, args.per_class, args.varied)
    copied = args.classes
    raw = {"kind": "sd", "seed": 0, "out_dir": str(out / "run"),
           "data": {"source": str(out / "data"), "size": len(names) * args.per_class, "resolution": 32,
                    "prompt": "class", "seed": 0},
           "model": {"pretrained": str(base), "method": "full"},
           "train": {"images_seen": args.steps * 16, "batch_size": 16, "gradient_accumulation": 1, "lr": 2e-3,
                     "lr_schedule": "cosine", "lr_warmup_steps": 25, "ema": False, "empty_prompt_prob": 0.1,
                     "checkpoint_steps": 100, "checkpoints_total_limit": 1, "log_every_steps": 50}}
    train(config_from_dict(SDConfig, raw, "the detection study"), progress=True)
    t_train = time.time() - t0
    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"a picture of a {n}\n" for n in names))
    common = ["--model", str(out / "run"), "--prompts", str(prompts), "--guidance", str(args.guidance), "--quiet"]
    # The ground truth: the pixel audit of every prompt (16 images each) against the run's training images.
    truth_dir = out / "truth"
    if cli.main(["detect", *common, "--method", "collapse", "--confirm", str(out / "run"), "--top", str(len(names)),
                 "--confirm-num", "16", "--out", str(truth_dir)]) != 0:
        return 1
    rows = list(csv.DictReader((truth_dir / "scores.csv").open()))
    rate = np.array([float(r["replica_rate"]) for r in rows])
    keep = (rate >= 0.8) | (rate <= 0.1)
    labels = (rate >= 0.8).astype(int)
    kept = out / "prompts-kept.txt"
    kept.write_text("".join(f"a picture of a {n}\n" for n, k in zip(names, keep) if k))
    (out / "labels-kept.txt").write_text("".join(f"{v}\n" for v, k in zip(labels, keep) if k))
    t1 = time.time()
    if cli.main(["detect", *common[:2], "--prompts", str(kept), *common[4:], "--labels", str(out / "labels-kept.txt"),
                 "--out", str(out / "detect")]) != 0:
        return 1
    t_detect = time.time() - t1
    summary = json.loads((out / "detect" / "summary.json").read_text())
    # Beside it: every prompt, labelled by the design (copied = 1), whatever the audit found.
    (out / "labels-design.txt").write_text("".join(f"{int(i < copied)}\n" for i in range(len(names))))
    if cli.main(["detect", *common, "--labels", str(out / "labels-design.txt"), "--out", str(out / "detect-design")]):
        return 1
    design = json.loads((out / "detect-design" / "summary.json").read_text())
    lines = [f"# Detection study: tiny SD fully fine-tuned {args.steps} steps on {copied} copied and "
             f"{len(names) - copied} varied classes ({args.per_class} images each)", "",
             f"Ground truth by the pixel audit (16 images per prompt, guidance {args.guidance}): "
             f"{int(labels[keep].sum())} memorized (replica rate >= 80%), {int((1 - labels[keep]).sum())} novel "
             f"(<= 10%), {int((~keep).sum())} in between (left out).", "",
             "| prompt | kind | replica rate |", "|---|---|---|"]
    lines += [f"| {r['prompt']} | {'copied' if i < copied else 'varied'} | {100 * rate[i]:.0f}% |"
              for i, r in enumerate(rows)]
    lines += ["", "| method | AUC (audit labels) | TPR at 1% FPR | AUC (copied vs varied, all prompts) |",
              "|---|---|---|---|"]
    for m, r in summary.get("roc", {}).items():
        auc = "—" if r["auc"] is None else f"{r['auc']:.3f}"
        tpr = "—" if r["tpr_at_1pct_fpr"] is None else f"{100 * r['tpr_at_1pct_fpr']:.0f}%"
        lines.append(f"| {m} | {auc} | {tpr} | {design['roc'][m]['auc']:.3f} |")
    lines += ["", f"Fine-tune {t_train:.0f} s (with the tiny SD's build when not cached), detection {t_detect:.0f} s "
                  "(2 CPU cores)."]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
