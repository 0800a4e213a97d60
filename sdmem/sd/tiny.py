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

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-'.,{}"


def tiny_tokenizer():
    """A character-level CLIPTokenizer held in memory: every ASCII letter/digit is a token (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *_CHARS, *(c + "</w>" for c in _CHARS)])}
    import tempfile, json  # noqa: E401 - CLIPTokenizer reads vocab/merges from files
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp, "vocab.json")), str(Path(tmp, "merges.txt")), pad_token="<|endoftext|>",
                             model_max_length=77)


def tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of the real architecture at toy width: UNet (32, 64), VAE with four levels
    (downsampling 8x like SD's), CLIP text encoder of width 32; safety checker off."""
    import torch

    from .components import quiet_transformers

    with quiet_transformers():
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


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
