"""The training set D of an SD run and its prompts: |D|/C seeded images of each class (the whole pool when the
source is unlabelled), centre-cropped and resized; saved as subset.npz + subset.json like an EDM run's."""

from __future__ import annotations

import numpy as np

from ..data.subset import Subset, SubsetSpec, build_subset, open_data_source
from ..errors import InputError
from .config import CLASS_FIELD, SDDataConfig



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
    """Draw D with the shared builder: |D|/C seeded images of every class (the whole pool when the source is
    unlabelled), labels = class positions; then record the prompts."""
    source = _open(data)
    labelled = source.labels is not None
    spec = SubsetSpec(source=data.source, split=data.split, size=data.size, resolution=data.resolution,
                      labels="true" if labelled else "none", seed=data.seed)
    subset = build_subset(spec, source=source)
    if labelled and subset.class_names is None:  # a class prompt needs a name: the label value itself
        subset.class_names = [_name(source, c) for c in subset.class_ids]
    subset.info.update(kind="sd", class_names=subset.class_names, prompt=data.prompt,
                       prompts=prompt_table(data, subset.class_names))
    return subset


def _name(source, c: int) -> str:
    names = source.class_names
    return names[c] if names and 0 <= c < len(names) else str(c)
