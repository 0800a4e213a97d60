"""Imagenette (fast.ai): ``imagenette2*/{train,val}/<wnid>/*.JPEG``, ten ImageNet classes labelled by wnid."""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import InputError
from .base import FileSource, display_name
from .folder import file_source, list_images

# https://github.com/fastai/imagenette: the ten classes, by ImageNet WordNet id (sorted = label order).
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}
SPLITS = ("train", "val")
_WNID = re.compile(r"n\d{8}")


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def is_wnid_folder(path: str | os.PathLike) -> bool:
    """Whether every (non-hidden) sub-folder of ``path`` is named like an ImageNet wnid (n + 8 digits)."""
    subs = _subdirs(os.fspath(path))
    return bool(subs) and all(_WNID.fullmatch(s) for s in subs)


def looks_like_imagenette(path: str | os.PathLike) -> bool:
    """An Imagenette root (``train/`` or ``val/`` of wnid folders) or a split folder itself."""
    path = os.fspath(path)
    return is_wnid_folder(path) or any(is_wnid_folder(os.path.join(path, s)) for s in SPLITS)


def open_imagenette(path: str | os.PathLike, *, split: str | None = None, resolution: int | None = None,
                    labels: bool = False, name: str | None = None) -> FileSource:
    """An Imagenette split (default ``train``); labels = index of the wnid in sorted order, always filled."""
    path = os.fspath(path)
    name = path if name is None else name
    if is_wnid_folder(path):  # a split folder given directly: ``split`` is its name, or not given
        here = os.path.basename(os.path.normpath(path))
        if split is not None and here in SPLITS and split != here:
            raise InputError(name, f"this is the {here!r} folder, but split {split!r} was asked for")
        root, kind_split = path, here if here in SPLITS else (split or "train")
    else:
        split = split or "train"
        if split not in SPLITS:
            raise InputError(name, f"unknown Imagenette split {split!r}; expected one of: {', '.join(SPLITS)}")
        root, kind_split = os.path.join(path, split), split
        if not is_wnid_folder(root):
            raise InputError(name, f"no {split}/ folder of wnid sub-folders (n01440764/, ...) here")
    prefix = "" if root == path else kind_split + "/"  # files are relative to the folder the user gave
    wnids = _subdirs(root)
    files = list_images(root, os.path.join(name, prefix) if prefix else name)
    at_root = next((f for f in files if "/" not in f), None)
    if at_root is not None:
        raise InputError(display_name(os.path.join(name, prefix + at_root)), "is not inside a wnid class folder")
    index = {w: k for k, w in enumerate(wnids)}
    label_arr = np.array([index[f.split("/", 1)[0]] for f in files], np.int64)
    class_names = [IMAGENETTE_CLASSES.get(w, w) for w in wnids]
    return file_source(name, path, [prefix + f for f in files], labels=label_arr, class_names=class_names,
                       resolution=resolution, kind=f"imagenette {kind_split}")
