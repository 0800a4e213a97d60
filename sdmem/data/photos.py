"""Real photographs that ship with scikit-image, cut into small crops (no downloads): the training data of the
pretrained tiny Stable Diffusion (sdmem.sd.pretrained) and the fine-tuning set of the demo's SD study.

Three disjoint groups of pictures:
- PRETRAIN: 16 scikit-image pictures (galaxies, tissue, a retina, bricks, coins, the moon, text, ...), plus
  scikit-learn's digits and the 100 faces of ``lfw_subset`` (and their mirror images): what the tiny SD's VAE
  and UNet learn from.
- FINETUNE: four colour photographs (an astronaut, a cat, coffee, a rocket) that neither saw: the demo fine-tunes
  on a grid of crops of them (``builtin:photos``, four classes).
- HELDOUT: the stereo motorcycle, seen by nothing; with the FINETUNE crops it measures the VAE on new pictures.
"""

from __future__ import annotations

import numpy as np

from .base import ArraySource

# class name -> scikit-image picture
PRETRAIN = {"galaxy": "hubble_deep_field", "tissue": "immunohistochemistry", "retina": "retina",
            "colour wheel": "colorwheel", "logo": "logo", "brick wall": "brick", "man": "camera", "cell": "cell",
            "clock": "clock", "coin": "coins", "grass": "grass", "gravel": "gravel", "moon": "moon", "page": "page",
            "text": "text", "vessel": "microaneurysms"}
FINETUNE = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
HELDOUT = {"motorcycle": "stereo_motorcycle"}


def picture(name: str) -> np.ndarray:
    """One scikit-image picture as uint8 RGB (grey and boolean pictures repeated over 3 channels, alpha dropped)."""
    import skimage.data

    a = skimage.data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(skimage.data, name)()
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _resize(a: np.ndarray, res: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((res, res), Image.LANCZOS))


def random_crops(img: np.ndarray, n: int, res: int, rng: np.random.Generator, scale=(0.15, 0.6)) -> np.ndarray:
    """``n`` square crops of side ``scale`` x the picture's short side (uniform), at random places, half of them
    mirrored, each resized to ``res`` x ``res``."""
    h, w = img.shape[:2]
    out = np.empty((n, res, res, 3), np.uint8)
    for k in range(n):
        s = max(res, int(min(h, w) * rng.uniform(*scale)))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = _resize(img[y : y + s, x : x + s], res)
        out[k] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def grid_crops(img: np.ndarray, k: int, res: int) -> np.ndarray:
    """The picture's central square cut into a k x k grid of disjoint tiles, each resized to ``res``."""
    h, w = img.shape[:2]
    s = min(h, w) // k * k
    y0, x0, t = (h - s) // 2, (w - s) // 2, s // k
    return np.stack([_resize(img[y0 + i * t : y0 + (i + 1) * t, x0 + j * t : x0 + (j + 1) * t], res)
                     for i in range(k) for j in range(k)])


def pretrain_images(res: int = 32, per_picture: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """The tiny SD's training set: the 1797 digits (builtin:digits), the 100 lfw faces (builtin:lfw) and their mirror
    images, and ``per_picture`` random crops of each PRETRAIN picture, at ``res``; returns (uint8 N x res x res x 3,
    labels, class names)."""
    from .builtin import digits_source, lfw_source

    rng = np.random.default_rng(seed)
    digits, lfw = digits_source(), lfw_source()
    digits = np.stack([_resize(a, res) for a in digits.read_range(0, len(digits))])
    faces = np.stack([_resize(a, res) for a in lfw.read_range(0, 100)])  # lfw_subset's first 100 are the faces
    faces = np.concatenate([faces, faces[:, :, ::-1]])  # and mirrored: 200, as many as each picture's crops
    parts = [digits, faces] + [random_crops(picture(p), per_picture, res, rng) for p in PRETRAIN.values()]
    labels = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
    return np.concatenate(parts), labels, ["digit", "face", *PRETRAIN]


def finetune_images(res: int = 32, per_class: int = 6, grid: int = 4) -> tuple[np.ndarray, np.ndarray, list]:
    """The demo's fine-tuning pool: ``per_class`` of the grid x grid disjoint tiles of each FINETUNE photo (4
    classes), chosen to be far apart (each next tile, class by class, the one whose RMS distance to the nearest tile
    already chosen is largest; the first the most varied), so no two pool images are near copies (a flat sky beside
    a flat sky would make every copy of either ambiguous under the d1/d2 rule)."""
    tiles = [grid_crops(picture(p), grid, res) for p in FINETUNE.values()]
    flat = [t.reshape(len(t), -1).astype(np.float64) for t in tiles]
    picked: list[list[int]] = [[] for _ in tiles]
    chosen = np.empty((0, flat[0].shape[1]))
    for _ in range(per_class):
        for c, f in enumerate(flat):
            if len(chosen):
                near = np.sqrt(((f[:, None] - chosen[None]) ** 2).mean(-1)).min(1)
            else:
                near = f.std(1)
            near[picked[c]] = -1.0
            k = int(np.argmax(near))
            picked[c].append(k)
            chosen = np.concatenate([chosen, f[k : k + 1]])
    images = np.concatenate([t[p] for t, p in zip(tiles, picked)])
    labels = np.repeat(np.arange(len(tiles), dtype=np.int64), per_class)
    return images, labels, list(FINETUNE)


def heldout_images(res: int = 32, per_picture: int = 16, seed: int = 1) -> np.ndarray:
    """Pictures no tiny-SD part trained on: the FINETUNE tiles and random crops of the FINETUNE and HELDOUT
    photos (scale 0.3-0.6 of the short side)."""
    rng = np.random.default_rng(seed)
    names = [*FINETUNE.values(), *HELDOUT.values()]
    return np.concatenate([finetune_images(res)[0]] + [random_crops(picture(p), per_picture, res, rng, (0.3, 0.6))
                                                        for p in names])


def photos_source(*, resolution: int | None = None) -> ArraySource:
    """``builtin:photos``: the demo's fine-tuning pool, 24 crops (32 x 32) of four photos, labelled by photo."""
    images, labels, names = finetune_images()
    src = ArraySource("photos", images, files=[f"photos[{i}]" for i in range(len(images))], labels=labels,
                      class_names=names, resolution=resolution)
    src.kind = "skimage photo crops"
    return src


def pretrain_source(*, resolution: int | None = None) -> ArraySource:
    """``builtin:pretrain-mix``: the tiny SD's pretraining set (digits, faces, crops of 16 pictures), 18 classes."""
    images, labels, names = pretrain_images()
    src = ArraySource("pretrain-mix", images, files=[f"pretrain-mix[{i}]" for i in range(len(images))],
                      labels=labels, class_names=names, resolution=resolution)
    src.kind = "digits, lfw faces and skimage picture crops"
    return src
