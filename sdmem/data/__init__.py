"""Image sources: one reader layer used by every sdmem command."""

from __future__ import annotations

import os

from ..errors import InputError
from .base import (MAX_IMAGE_PIXELS, ArraySource, FileSource, ImageSource, center_crop_resize, check_resolution,
                   decode_image, to_rgb_array)
from .folder import SUPPORTED_IMAGE_EXTENSIONS

__all__ = ["MAX_IMAGE_PIXELS", "ArraySource", "FileSource", "ImageSource", "SUPPORTED_IMAGE_EXTENSIONS",
           "center_crop_resize", "check_resolution", "decode_image", "describe", "open_source", "to_rgb_array"]

FORMATS = ("a folder of images (" + ", ".join(SUPPORTED_IMAGE_EXTENSIONS) + "), an .npz/.npy of uint8 images, "
           "an EDM dataset (.zip or folder with dataset.json), CIFAR-10 (cifar-10-python.tar.gz or "
           "cifar-10-batches-py/), an Imagenette folder, an sdmem run folder, hf:NAME[:SPLIT], or a dataset name "
           "(sdmem data list)")


def open_source(src: str | os.PathLike, *, resolution: int | None = None, labels: bool = False,
                split: str | None = None) -> ImageSource:
    """Open an image SRC, recognising its format; ``labels=True`` requires class labels."""
    resolution = check_resolution(resolution)  # before anything is read or allocated
    name = os.fspath(src)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.startswith("hf:"):
        from .hf import open_hf
        return open_hf(name, split=split, resolution=resolution, labels=labels)
    if not os.path.exists(name):
        from .named import is_bare_name, resolve
        if is_bare_name(name):  # a dataset name (cifar10, imagenette-320, ...): cached, or fetched now
            return open_source(resolve(name), resolution=resolution, labels=labels, split=split)
        raise InputError(name, "no such file or directory")
    kw = dict(resolution=resolution, labels=labels, name=name)
    lower = name.lower().rstrip("/\\")
    if os.path.isfile(name):
        if lower.endswith((".npz", ".npy")):
            from .npz import open_npz
            source = open_npz(name, **_no_split(name, split, kw))
        elif lower.endswith(".zip"):
            from .edm import open_edm_zip
            source = open_edm_zip(name, **_no_split(name, split, kw))
        elif lower.endswith((".tar.gz", ".tgz")):
            from .cifar import open_cifar10
            source = open_cifar10(name, split=split, **kw)
        else:
            raise InputError(name, f"unsupported file type; expected {FORMATS}")
    elif os.path.isdir(name):
        from .cifar import find_batches_folder
        from .imagenette import looks_like_imagenette
        from ..runs import is_run_dir
        if is_run_dir(name):
            # A training run folder (sdmem train): its exact training subset D, at the training resolution.
            from .npz import open_npz
            source = open_npz(os.path.join(name, "subset.npz"), **_no_split(name, split, kw))
            source.kind = "run subset"
        elif find_batches_folder(name):
            from .cifar import open_cifar10
            source = open_cifar10(name, split=split, **kw)
        elif os.path.isfile(os.path.join(name, "dataset.json")):
            from .edm import open_edm_folder
            source = open_edm_folder(name, **_no_split(name, split, kw))
        elif looks_like_imagenette(name):
            from .imagenette import open_imagenette
            source = open_imagenette(name, split=split, **kw)
        else:
            from .folder import open_folder
            source = open_folder(name, **_no_split(name, split, kw))
    else:
        raise InputError(name, f"not a regular file or folder; expected {FORMATS}")
    if labels and source.labels is None:  # every reader checks this itself; a last guard
        raise InputError(name, "labels were asked for, but this source has none")
    return source


def _no_split(name: str, split: str | None, kw: dict) -> dict:
    # Formats without splits are one training set: split None or "train" means all of it.
    if split not in (None, "train"):
        raise InputError(name, f"this format has no splits (asked for split {split!r}); splits exist for "
                               "CIFAR-10 (train/test), Imagenette (train/val) and hf: datasets")
    return kw


def describe(source: ImageSource) -> str:
    """One line, e.g. ``cifar10 train: 50000 images 32x32, 10 classes``."""
    h, w, _ = source.shape
    line = f"{source.kind}: {len(source)} images {w}x{h}"
    if source.labels is not None:
        k = len(source.class_names) if source.class_names else len(set(source.labels.tolist()))
        line += f", {k} classes"
    return line
