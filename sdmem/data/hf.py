"""Hugging Face datasets: ``hf:NAME[:SPLIT]`` through ``datasets.load_dataset``, decoded lazily per image."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import ImageSource, center_crop_resize, check_resolution, decode_image, pil_to_rgb, to_rgb_array

_IMAGE_NAMES = ("image", "img")
_LABEL_NAMES = ("label", "labels")


def parse_hf(src: str) -> tuple[str, str | None]:
    """``hf:NAME[:SPLIT]`` -> (NAME, SPLIT or None); the split may hold slices (``train[:1000]``)."""
    name, _, split = src[len("hf:"):].partition(":")
    if not name:
        raise InputError(src, "expected hf:NAME[:SPLIT], e.g. hf:cifar10:train")
    return name, split or None


def _find_columns(features) -> tuple[str | None, str | None]:
    import datasets

    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((c for c in _IMAGE_NAMES if c in features), None)
    label = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((c for c in _LABEL_NAMES if c in features), None)
    return image, label


class HFSource(ImageSource):
    """A ``datasets.Dataset``; image i is decoded when read (by the sdmem colour rule, not datasets')."""

    def __init__(self, name: str, ds, image_col: str, *, labels: np.ndarray | None = None,
                 class_names: list[str] | None = None, resolution: int | None = None):
        import datasets

        self.name = name
        self._encoded = isinstance(ds.features[image_col], datasets.Image)
        self._ds = ds.cast_column(image_col, datasets.Image(decode=False)) if self._encoded else \
            ds.with_format("numpy")
        self._col = image_col
        self.files = [f"{name}[{i}]" for i in range(len(ds))]
        self.labels = labels
        self.class_names = class_names
        self.resolution = resolution = check_resolution(resolution)
        if not len(ds):
            raise InputError(name, "the dataset split is empty")
        first = self._decode(0)  # the size of every image, unless --resolution makes them all R×R
        self.shape = (resolution, resolution, 3) if resolution else first.shape

    def _decode(self, i: int) -> np.ndarray:
        item = self._ds[int(i)][self._col]
        where = self.files[i]
        if not self._encoded:
            return pil_to_rgb(item, where) if hasattr(item, "mode") else to_rgb_array(np.asarray(item), where)
        if item.get("bytes") is not None:
            return decode_image(item["bytes"], where)
        if item.get("path"):
            return decode_image(item["path"], f"{where} ({item['path']})")
        raise InputError(where, "image has neither bytes nor a path")

    def read(self, indices) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), np.uint8)
        for k, i in enumerate(indices):
            img = self._decode(i)
            if self.resolution:
                img = center_crop_resize(img, self.resolution)
            elif img.shape != self.shape:
                raise InputError(self.files[i], f"is {img.shape[1]}x{img.shape[0]}, but the first image is "
                                                f"{self.shape[1]}x{self.shape[0]}; pass --resolution R to "
                                                "centre-crop and resize them")
            out[k] = img
        return out


def open_hf(src: str, *, split: str | None = None, resolution: int | None = None,
            labels: bool = False) -> HFSource:
    """``hf:NAME[:SPLIT]`` (default split ``train``; a split in SRC wins over ``split``)."""
    name, src_split = parse_hf(src)
    split = src_split or split or "train"
    resolution = check_resolution(resolution)  # before the dataset is downloaded or read
    try:
        import datasets
    except ImportError:
        raise InputError(src, "reading hf: sources needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, unknown split, ... all surface here
        raise InputError(src, f"the dataset could not be loaded (offline? {exc.__class__.__name__}: {exc}); "
                              "download it first or pass a local image folder instead") from None
    if not isinstance(ds, datasets.Dataset):
        raise InputError(src, f"expected one split of a map-style dataset, got {type(ds).__name__}")
    image_col, label_col = _find_columns(ds.features)
    if image_col is None:
        raise InputError(src, f"no image column (an Image feature, or named image/img); columns: "
                              f"{', '.join(ds.column_names)}")
    label_arr = class_names = None
    if label_col is not None:
        feat = ds.features[label_col]
        label_arr = np.asarray(ds.with_format("numpy")[label_col])
        if label_arr.ndim != 1 or label_arr.dtype.kind not in "iu" or (label_arr.size and label_arr.min() < 0):
            label_arr = None  # not class labels (or -1 = unlabelled split)
        elif isinstance(feat, datasets.ClassLabel):
            class_names = list(feat.names)
        label_arr = label_arr.astype(np.int64) if label_arr is not None else None
    if labels and label_arr is None:
        raise InputError(src, f"labels were asked for, but split {split!r} has no class-label column "
                              f"(a ClassLabel feature, or named label/labels with integers >= 0)")
    source = HFSource(src, ds, image_col, labels=label_arr, class_names=class_names, resolution=resolution)
    source.kind = f"hf {name} {split}"
    return source
