"""The training set D of an SD run and its prompts: |D|/C seeded images of each class (the whole pool when the
source is unlabelled), centre-cropped and resized; saved as subset.npz + subset.json like an EDM run's."""

from __future__ import annotations

import numpy as np

from ..data.subset import FORMAT, Subset, _read, open_data_source
from ..errors import InputError
from .config import CLASS_FIELD, SDDataConfig

_DRAW = 0  # the EDM builder's stream for the per-class draw: the same seed draws the same images


def _open(data: SDDataConfig):
    """The source with class labels when it has them; class prompts require them."""
    kw = dict(split=data.split, resolution=data.resolution)
    try:
        return open_data_source(data.source, labels=True, **kw)
    except InputError as labelled_error:
        source = open_data_source(data.source, labels=False, **kw)  # raises if the problem is not the labels
        if data.prompt == "class":
            raise InputError("data.prompt", f"class prompts need class labels, but {data.source} has none "
                                            f"({labelled_error.problem}); use prompt: plain or a labelled "
                                            "source (an Imagenette folder, class sub-folders, ...)") from None
        return source


def class_prompt(template: str, name: str) -> str:
    return template.replace(CLASS_FIELD, name)


def prompt_table(data: SDDataConfig, class_names: list[str] | None) -> list[str]:
    """The distinct prompts of a run: one (plain) or one per class in label order (class)."""
    if data.prompt == "plain":
        return [data.plain_template]
    if not class_names:
        raise InputError("data.prompt", "class prompts need class names, but the training set has none")
    return [class_prompt(data.class_template, n) for n in class_names]


def prompt_indices(data: SDDataConfig, subset: Subset) -> np.ndarray:
    """For every image of D, its row in prompt_table (0 for plain prompts, the class label for class prompts)."""
    if data.prompt == "plain":
        return np.zeros(len(subset), np.int64)
    return np.array(subset.labels, np.int64)  # a writable copy (a reloaded subset is a read-only memmap)


def build_sd_subset(data: SDDataConfig) -> Subset:
    """Draw D: per class a seeded permutation, its first |D|/C images (the EDM builder's draw)."""
    source = _open(data)
    labels = source.labels
    classes = [None] if labels is None else [int(c) for c in np.unique(labels)]
    n, k = data.size, len(classes)
    if n % k:
        raise InputError("data.size", f"|D| = {n} must be divisible by the {k} classes of {data.source} (|D|/C "
                                      "images per class)")
    per = n // k
    picks = []
    for c in classes:
        pool = np.arange(len(source)) if c is None else np.flatnonzero(labels == c)
        if len(pool) < per:
            what = f"{data.source} holds {len(pool)} images" if c is None else \
                f"class {c} ({_name(source, c)}) of {data.source} has {len(pool)} images"
            raise InputError("data.size", f"|D| = {n} needs {per} images" + (" per class" if c is not None else "")
                             + f", but {what}")
        picks.append(pool[np.random.default_rng([data.seed, _DRAW, c or 0]).permutation(len(pool))[:per]])
    indices = np.concatenate(picks).astype(np.int64)
    images = _read(source, indices)
    names = None if labels is None else [_name(source, c) for c in classes]
    label_arr = None if labels is None else np.repeat(np.arange(k, dtype=np.int64), per)
    true_labels = None if labels is None else np.repeat(np.asarray(classes, np.int64), per)
    r = data.resolution
    info = dict(format=FORMAT, kind="sd", source=data.source, split=data.split, size=n, resolution=r,
                shape=[n, r, r, 3], num_classes=None if labels is None else k,
                class_ids=None if labels is None else classes, class_names=names,
                per_class={str(c): per for c in classes} if labels is not None else None,
                label_mode="none" if labels is None else "true", label_dim=0 if labels is None else k,
                seed=data.seed, prompt=data.prompt, prompts=prompt_table(data, names),
                files=[source.files[i] for i in indices])
    return Subset(images, label_arr, true_labels, indices, np.zeros(n, bool), info["label_dim"], names,
                  None if labels is None else classes, info)


def _name(source, c: int) -> str:
    names = source.class_names
    return names[c] if names and 0 <= c < len(names) else str(c)
