"""The training set D of an EDM run: |D|/C seeded images from each of the first C classes, a label mode, Lanczos
resizing and intra-class blending (Sec. 3.2); saved in the run folder as subset.npz + subset.json."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError
from ..utils import atomic_write
from . import open_source
from .base import ImageSource, check_resolution
from .builtin import digits_source, lfw_source
from .photos import photos_source, pretrain_source

BUILTINS: dict[str, Callable[..., ImageSource]] = {"builtin:digits": digits_source, "builtin:lfw": lfw_source,
                                                    "builtin:photos": photos_source,
                                                    "builtin:pretrain-mix": pretrain_source}
FORMAT = "sdmem-subset/1"
# Independent seeded streams (numpy SeedSequence entropy [data.seed, stream, ...]).
_DRAW, _RANDOM_LABELS, _BLEND = 0, 1, 2


@dataclass
class Subset:
    """The training set D: images, the labels the network sees, and where every image came from."""

    images: np.ndarray  # uint8 [N, R, R, 3]
    labels: np.ndarray | None  # int64 [N], what the network is conditioned on (None: unconditional)
    true_labels: np.ndarray | None  # int64 [N], source class ids (None: unlabelled source)
    indices: np.ndarray  # int64 [N], into data.source, or into data.blend_source where from_blend
    from_blend: np.ndarray  # bool [N]
    label_dim: int  # 0 (none), C (true), C' (random), N (unique)
    class_names: list[str] | None  # names of the selected classes, in label order (None: unknown)
    class_ids: list[int] | None = None  # the selected classes' label values in the source, in label order
    info: dict = field(default_factory=dict)  # what subset.json records

    def __len__(self) -> int:
        return len(self.images)


def open_data_source(src: str, *, split: str | None = None, resolution: int | None = None,
                     labels: bool = False, key: str = "data.source") -> ImageSource:
    """open_source, plus the embedded sets builtin:digits, builtin:lfw, builtin:photos and builtin:pretrain-mix; errors are prefixed with ``key``."""
    check_resolution(resolution, "data.resolution")  # named by its config key, before anything is read
    if src.startswith("builtin:"):
        if src not in BUILTINS:
            raise InputError(key, f"unknown built-in set {src!r}; expected one of {', '.join(BUILTINS)}")
        if split not in (None, "train"):
            raise InputError("data.split", f"{src} has no splits, got {split!r}")
        return BUILTINS[src](resolution=resolution)
    try:
        return open_source(src, resolution=resolution, labels=labels, split=split)
    except InputError as exc:
        raise InputError(f"{key}: {exc.where}", exc.problem) from None


def _read(source: ImageSource, idx: np.ndarray) -> np.ndarray:
    """source.read(idx) in idx order, read in ascending index order (contiguous, fast on memmaps and files)."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx), *source.shape), np.uint8)
    out[order] = source.read(idx[order]) if len(idx) else out[:0]
    return out


def _name(source: ImageSource, c: int) -> str:
    names = source.class_names
    return f"{c} ({names[c]})" if names and 0 <= c < len(names) else str(c)


def _pick_classes(data, source: ImageSource) -> list[int] | None:
    """The selected classes' label values (None: an unlabelled source drawn as one pool)."""
    if source.labels is None:
        if data.labels == "true":
            raise InputError("data.labels", f"labels: true needs class labels, but {data.source} has none")
        if (data.num_classes or 1) > 1 or data.classes is not None:
            raise InputError("data.source", f"{data.source} has no class labels, so classes cannot be chosen "
                                            f"(data.num_classes = {data.num_classes}, data.classes = {data.classes})")
        if data.blend_ratio > 0:
            raise InputError("data.blend_source", "blending replaces images class by class; data.source "
                                                  f"{data.source} has no class labels")
        return None
    present = [int(c) for c in np.unique(source.labels)]
    if data.classes is not None:
        missing = [c for c in data.classes if c not in present]
        if missing:
            raise InputError("data.classes", f"class ids {missing} have no images in {data.source} "
                                             f"(classes present: {present})")
        return list(data.classes)
    count = data.num_classes or len(present)
    if count > len(present):
        raise InputError("data.num_classes", f"C = {count} classes asked for, but {data.source} has "
                                             f"{len(present)}")
    return present[:count]


def _draw_blend(data, source: ImageSource, groups: list, k: int, res: int) -> tuple[ImageSource, list]:
    """The blend source and, per class, the k seeded indices of its same-class images that go into D."""
    blend = open_data_source(data.blend_source, resolution=res, labels=True, key="data.blend_source")
    if blend.labels is None:
        raise InputError("data.blend_source", f"{data.blend_source} has no class labels; blending takes images "
                                              "of the same class")
    picks, a, b = [], source.class_names, blend.class_names
    for c in groups:
        if a and b and c < min(len(a), len(b)) and a[c].strip().lower() != b[c].strip().lower():
            raise InputError("data.blend_source", f"class {c} is {a[c]!r} in data.source but {b[c]!r} in "
                                                  "data.blend_source; blending needs the same class indices")
        pool = np.flatnonzero(blend.labels == c)
        if len(pool) < k:
            raise InputError("data.blend_source", f"round(α·|D|/C) = {k} images of class {_name(source, c)} are "
                                                  f"needed, but {data.blend_source} has {len(pool)}")
        picks.append(pool[np.random.default_rng([data.seed, _BLEND, c]).permutation(len(pool))[:k]])
    return blend, picks


def _conditioning(data, n: int, num_classes: int, per: int) -> tuple[np.ndarray | None, int]:
    """(labels the network sees, label_dim) for the label mode: none, true, random or unique."""
    if data.labels == "true":
        return np.repeat(np.arange(num_classes, dtype=np.int64), per), num_classes
    if data.labels == "random":  # uniform, fixed for the run by data.seed
        rng = np.random.default_rng([data.seed, _RANDOM_LABELS])
        return rng.integers(0, data.random_label_classes, n, dtype=np.int64), data.random_label_classes
    if data.labels == "unique":
        return np.arange(n, dtype=np.int64), n
    return None, 0


@dataclass(frozen=True)
class SubsetSpec:
    """What build_subset reads of a config's data section (an EDM DataConfig has every one of these keys)."""

    source: str
    size: int
    split: str | None = None
    num_classes: int | None = None
    classes: tuple[int, ...] | None = None
    labels: str = "none"  # none, true, random, unique
    random_label_classes: int = 10
    resolution: int | None = None
    blend_source: str | None = None
    blend_ratio: float = 0.0
    seed: int = 0


def build_subset(data, *, source: ImageSource | None = None) -> Subset:
    """Draw the training set D that ``data`` (a SubsetSpec or an EDM DataConfig) describes; same config, same D.
    ``source``: the already opened data.source (the SD trainer opens it with labels when it has them)."""
    if source is None:
        source = open_data_source(data.source, split=data.split, resolution=data.resolution)
    h, w, _ = source.shape
    if h != w:
        raise InputError("data.resolution", f"{data.source} images are {w}x{h}, not square; set data.resolution "
                                            "to centre-crop and resize them")
    class_ids, n = _pick_classes(data, source), data.size
    groups = [None] if class_ids is None else class_ids  # None: an unlabelled source, one pool
    if n % len(groups):
        raise InputError("data.size", f"|D| = {n} must be divisible by the {len(groups)} classes (num_classes C) "
                                      f"for the paper's equal class share (|D|/C images per class)")
    per = n // len(groups)
    k = int(np.floor(data.blend_ratio * per + 0.5))  # round(α·|D|/C), halves up: blended images per class
    blend, blend_idx = _draw_blend(data, source, groups, k, h) if k else (None, [])
    main_idx = []
    for c in groups:  # a seeded permutation within each class; its first |D|/C − k images
        pool = np.arange(len(source)) if c is None else np.flatnonzero(source.labels == c)
        if len(pool) < per - k:
            what = f"{data.source} holds {len(pool)} images" if c is None else \
                f"class {_name(source, c)} of {data.source} has {len(pool)} images"
            raise InputError("data.size", f"|D| = {n} needs {per - k} images per class (|D|/C = {per}"
                                          + (f", {k} of them blended" if k else "") + f"), but {what}")
        main_idx.append(pool[np.random.default_rng([data.seed, _DRAW, c or 0]).permutation(len(pool))[:per - k]])
    images = np.empty((n, h, w, 3), np.uint8)
    indices, from_blend = np.empty(n, np.int64), np.zeros(n, bool)
    for g, start in enumerate(range(0, n, per)):  # class-major: each class's own images, then its blended ones
        mid, stop = start + per - k, start + per
        indices[start:mid], images[start:mid] = main_idx[g], _read(source, main_idx[g])
        if k:
            indices[mid:stop], images[mid:stop], from_blend[mid:stop] = blend_idx[g], _read(blend, blend_idx[g]), True
    true_labels = None if class_ids is None else np.repeat(np.asarray(class_ids, np.int64), per)
    labels, label_dim = _conditioning(data, n, len(groups), per)
    names = None if class_ids is None or not source.class_names else \
        [source.class_names[c] if c < len(source.class_names) else str(c) for c in class_ids]
    info = dict(format=FORMAT, source=data.source, split=data.split, blend_source=data.blend_source if k else None,
                blend_ratio=data.blend_ratio, size=n, resolution=h, shape=[n, h, w, 3],
                num_classes=None if class_ids is None else len(class_ids), class_ids=class_ids, class_names=names,
                per_class={str(c): per for c in (class_ids or [])} or None,
                blend_per_class={str(c): k for c in (class_ids or [])} if k else None,
                label_mode=data.labels, label_dim=label_dim, seed=data.seed,
                random_label_classes=data.random_label_classes if data.labels == "random" else None,
                files=[(blend if b else source).files[i] for i, b in zip(indices.tolist(), from_blend.tolist())])
    return Subset(images, labels, true_labels, indices, from_blend, label_dim, names, class_ids, info)


def _sha256(arr: np.ndarray | None) -> str | None:
    return None if arr is None else hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def _savez(path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(f, **arrays)


def save_subset(subset: Subset, run_dir: str | os.PathLike) -> tuple[str, str]:
    """Write run_dir/subset.npz (uncompressed: it memory-maps) and run_dir/subset.json; returns both paths."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    npz_path, json_path = os.path.join(run_dir, "subset.npz"), os.path.join(run_dir, "subset.json")
    arrays = dict(images=np.ascontiguousarray(subset.images), indices=subset.indices, from_blend=subset.from_blend)
    for key in ("labels", "true_labels"):
        if getattr(subset, key) is not None:
            arrays[key] = np.asarray(getattr(subset, key), np.int64)
    if subset.info.get("label_mode") == "true" and subset.class_names:  # names of the label values 0..C-1
        arrays["class_names"] = np.asarray(subset.class_names, dtype=str)
    info = dict(subset.info, images_sha256=_sha256(arrays["images"]), labels_sha256=_sha256(arrays.get("labels")))
    atomic_write(npz_path, lambda p: _savez(p, arrays), fsync=True)
    atomic_write(json_path, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"), fsync=True)
    subset.info = info
    return npz_path, json_path


def load_subset(run_dir: str | os.PathLike, *, verify: bool = True) -> Subset:
    """The Subset saved in ``run_dir`` (images memory-mapped); a sha256 mismatch with subset.json is an InputError."""
    from .npz import _read_member

    run_dir = os.fspath(run_dir)
    npz_path, json_path = os.path.join(run_dir, "subset.npz"), os.path.join(run_dir, "subset.json")
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} file")
    except FileNotFoundError:
        raise InputError(json_path, "not found: no training subset was saved in this run folder") from None
    except (OSError, ValueError) as exc:
        raise InputError(json_path, f"unreadable ({exc.__class__.__name__}: {exc})") from None
    try:
        with zipfile.ZipFile(npz_path) as zf:
            keys = {name[:-4] for name in zf.namelist() if name.endswith(".npy")}
            arrays = {key: _read_member(npz_path, zf, key, f"{npz_path}:{key}") for key in keys}
    except FileNotFoundError:
        raise InputError(npz_path, "not found, but subset.json is there: the subset was not saved completely") \
            from None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as exc:
        raise InputError(npz_path, f"unreadable ({exc.__class__.__name__}: {exc})") from None
    missing = {"images", "indices", "from_blend"} - set(arrays)
    if missing:
        raise InputError(npz_path, f"missing arrays {sorted(missing)}")
    images, labels = arrays["images"], arrays.get("labels")
    if list(images.shape) != info.get("shape"):
        raise InputError(npz_path, f"images have shape {list(images.shape)}, subset.json says {info.get('shape')}")
    if verify:
        for what, arr in (("images", images), ("labels", labels)):
            digest = _sha256(arr)
            if digest != info.get(f"{what}_sha256"):
                raise InputError(npz_path, f"{what} do not match the sha256 in subset.json ({str(digest)[:12]} vs "
                                           f"{str(info.get(f'{what}_sha256'))[:12]}): the file was changed after "
                                           "the run drew its training set")
    as_int = (lambda key: None if key not in arrays else np.asarray(arrays[key], np.int64))
    return Subset(images, as_int("labels"), as_int("true_labels"), np.asarray(arrays["indices"], np.int64),
                  np.asarray(arrays["from_blend"], bool), int(info["label_dim"]), info.get("class_names"),
                  info.get("class_ids"), info)
