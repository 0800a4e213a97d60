"""Small image sets that ship with scikit-learn / scikit-image (no downloads): digits and an LFW subset."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import ArraySource


def digits_source(n: int | None = None, *, resolution: int | None = None) -> ArraySource:
    """scikit-learn's 1797 digits (8×8, 0..16) as uint8 RGB, labels 0..9; the first ``n`` if given."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    total = len(bunch.images)
    if n is not None and not 0 < n <= total:
        raise InputError("digits", f"expected n in 1..{total}, got {n}")
    n = total if n is None else n
    images = np.round(bunch.images[:n] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    src = ArraySource("digits", images, files=[f"digits[{i}]" for i in range(n)],
                      labels=bunch.target[:n].astype(np.int64), class_names=[str(d) for d in range(10)],
                      resolution=resolution)
    src.kind = "sklearn digits"
    return src


def lfw_source(*, resolution: int | None = None) -> ArraySource:
    """scikit-image's ``lfw_subset``: 200 grey 25×25 crops (100 faces, then 100 non-faces) as uint8 RGB."""
    from skimage.data import lfw_subset

    x = lfw_subset()  # float64 [200, 25, 25] in 0..1
    images = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int64), [100, len(x) - 100])
    src = ArraySource("lfw", images, files=[f"lfw[{i}]" for i in range(len(x))], labels=labels,
                      class_names=["face", "non-face"], resolution=resolution)
    src.kind = "skimage lfw_subset"
    return src
