"""A tiny Stable Diffusion built from configs (no download) and a small Imagenette-like folder, for the smoke
config, the tests and the benchmark.

    python -m sdmem.sd.tiny runs/tiny-sd                      # a local diffusers folder (about 1 MB of weights)
    python -m sdmem.sd.tiny runs/tiny-sd --pretrained         # the same shape trained here (sdmem.sd.pretrained)
    python -m sdmem.sd.tiny --imagenette data/imagenette-tiny  # train/<wnid>/*.JPEG, 10 classes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ..data.imagenette import IMAGENETTE_CLASSES

from .tiny_model import tiny_pipeline, tiny_tokenizer  # noqa: F401 - re-exported: tests and benchmarks use them


def make_tiny_sd(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save the tiny pipeline as a local diffusers folder (model_index.json, unet/, vae/, ...); returns it."""
    import json

    from .pretrained import FORMAT, MARKER

    out = Path(out_dir)
    if not (out / "model_index.json").exists():
        tiny_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
        (out / MARKER).write_text(json.dumps({"format": FORMAT, "pretrained": False, "seed": seed}) + "\n")
    return out


def _class_image(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    """A distinct, structured picture: a class-coloured background, stripes and a random bright rectangle."""
    base = np.array([(37 * c) % 256, (91 * c + 60) % 256, (53 * c + 120) % 256], np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 40 * np.sin((xx * (c + 1) + yy * (10 - c)) / 7.0)[..., None]
    img = base + stripes + rng.normal(0, 12, (h, w, 3))
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagenette_like(out_dir: str | os.PathLike, per_class: int = 8, *, size: tuple[int, int] = (72, 96),
                         num_classes: int = 10, val_per_class: int = 2, seed: int = 0) -> Path:
    """An Imagenette-shaped folder: ``{train,val}/<wnid>/<wnid>_<k>.JPEG`` (non-square, so the centre crop
    matters); ``num_classes`` of the ten real wnids. Returns the root."""
    from PIL import Image

    out, rng = Path(out_dir), np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(sorted(IMAGENETTE_CLASSES)[:num_classes]):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                path = folder / f"{wnid}_{k:04d}.JPEG"
                if not path.exists():
                    Image.fromarray(_class_image(rng, c, *size)).save(path, format="JPEG", quality=95)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdmem.sd.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", metavar="OUT_DIR", help="write the tiny diffusers folder here")
    p.add_argument("--imagenette", metavar="DIR", help="write a small Imagenette-like folder here")
    p.add_argument("--per-class", type=int, default=8, help="training images per class (default 8)")
    p.add_argument("--pretrained", action="store_true",
                   help="the tiny SD trained here on embedded real pictures (built once, then cached; ~5 min on 2 "
                        "CPU cores), not random weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.out and not args.imagenette:
        p.error("give OUT_DIR and/or --imagenette DIR")
    if args.pretrained and not args.out:
        p.error("--pretrained needs OUT_DIR")
    if args.pretrained:
        from ..errors import InputError
        from .pretrained import copy_pretrained, read_marker

        try:
            out = copy_pretrained(args.out, progress=not args.quiet)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        m = read_marker(out)["measured"]
        print(f"pretrained tiny Stable Diffusion in {out} (VAE held-out RMS {m['vae_heldout_rms']:.2f}, base "
              f"replicas {100 * m['base_replica_ratio']:.1f}% of {m['base_samples']} samples)")
    elif args.out:
        print(f"tiny Stable Diffusion in {make_tiny_sd(args.out)}")
    if args.imagenette:
        print(f"Imagenette-like folder in {make_imagenette_like(args.imagenette, args.per_class)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
