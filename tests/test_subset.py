"""The training set D (sdmem.data.subset): equal class shares, seeds, label modes, resizing, blending, save/load."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from sdmem.edm.config import DataConfig
from sdmem.data import open_source
from sdmem.data.subset import build_subset, load_subset, save_subset
from helpers import raises

CLASSES, PER_CLASS = 4, 12
NAMES = ["airplane", "automobile", "bird", "cat"]


def make_npz(path, *, res=32, seed=0, labels=True, names=NAMES, per_class=PER_CLASS, classes=CLASSES):
    """uint8 images [classes·per_class, res, res, 3], labels interleaved (0, 1, 2, 3, 0, ...)."""
    rng = np.random.default_rng(seed)
    n = classes * per_class
    arrays = {"images": rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)}
    if labels:
        arrays["labels"] = np.arange(n) % classes
    if labels and names:
        arrays["class_names"] = np.asarray(names[:classes])
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def src(tmp_path):
    return make_npz(tmp_path / "train.npz")


def data(source, size, **kw) -> DataConfig:
    return DataConfig(source=source, size=size, **kw)


def test_equal_share_of_first_classes(src):
    s = build_subset(data(src, 9, num_classes=3, labels="true"))
    full = open_source(src)
    assert s.images.shape == (9, 32, 32, 3) and s.images.dtype == np.uint8
    assert np.bincount(s.true_labels).tolist() == [3, 3, 3]  # |D|/C each, from classes 0, 1, 2
    assert np.array_equal(full.labels[s.indices], s.true_labels)
    assert np.array_equal(full.read(s.indices), s.images)
    assert len(set(s.indices.tolist())) == 9 and not s.from_blend.any()
    assert s.class_names == NAMES[:3] and s.class_ids == [0, 1, 2] and s.label_dim == 3
    every = build_subset(data(src, 8))  # labelled source, num_classes null: every class, equal share, no labels
    assert np.bincount(every.true_labels).tolist() == [2, 2, 2, 2] and every.labels is None and every.label_dim == 0
    dog = build_subset(data(src, 5, classes=[3], labels="true"))  # explicit class ids
    assert set(dog.true_labels.tolist()) == {3} and dog.labels.tolist() == [0] * 5 and dog.class_names == ["cat"]


def test_deterministic_and_seeded(src):
    a, b = build_subset(data(src, 8, num_classes=2)), build_subset(data(src, 8, num_classes=2))
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.images, b.images)
    c = build_subset(data(src, 8, num_classes=2, seed=1))
    assert not np.array_equal(a.indices, c.indices)
    small = build_subset(data(src, 4, num_classes=2))  # a smaller D keeps a prefix of each class's draw
    assert np.array_equal(small.indices.reshape(2, 2), a.indices.reshape(2, 4)[:, :2])


def test_label_modes(src):
    none = build_subset(data(src, 8, num_classes=2))
    assert none.labels is None and none.label_dim == 0 and none.true_labels is not None
    true = build_subset(data(src, 8, classes=[2, 0], labels="true"))  # label = position in the class list
    assert true.labels.tolist() == [0] * 4 + [1] * 4 and true.true_labels.tolist() == [2] * 4 + [0] * 4
    rand = build_subset(data(src, 40, labels="random", random_label_classes=7))
    assert rand.labels.dtype == np.int64 and rand.label_dim == 7
    assert rand.labels.min() >= 0 and rand.labels.max() < 7 and len(set(rand.labels.tolist())) > 1
    assert np.array_equal(rand.labels, build_subset(data(src, 40, labels="random", random_label_classes=7)).labels)
    other = build_subset(data(src, 40, labels="random", random_label_classes=7, seed=5))
    assert not np.array_equal(rand.labels, other.labels)
    unique = build_subset(data(src, 12, num_classes=3, labels="unique"))
    assert np.array_equal(unique.labels, np.arange(12)) and unique.label_dim == 12


def test_resolution_is_lanczos(src):
    s = build_subset(data(src, 4, num_classes=2, resolution=16))
    raw = open_source(src)
    assert s.images.shape == (4, 16, 16, 3)
    for img, i in zip(s.images, s.indices):
        want = np.asarray(Image.fromarray(raw.read([i])[0]).resize((16, 16), Image.LANCZOS))
        assert np.array_equal(img, want)


def test_blend_replaces_same_class_images(tmp_path, src):
    other = make_npz(tmp_path / "imagenet.npz", res=64, seed=1)  # larger: resized to the main resolution
    s = build_subset(data(src, 20, num_classes=2, labels="true", blend_source=other, blend_ratio=0.5))
    per = 10
    assert s.from_blend.reshape(2, per).sum(1).tolist() == [5, 5]  # round(α·|D|/C) per class
    blend = open_source(other, resolution=32)
    assert np.array_equal(blend.labels[s.indices[s.from_blend]], s.true_labels[s.from_blend])  # same class
    assert np.array_equal(blend.read(s.indices[s.from_blend]), s.images[s.from_blend])
    main = open_source(src)
    assert np.array_equal(main.read(s.indices[~s.from_blend]), s.images[~s.from_blend])
    assert build_subset(data(src, 8, num_classes=2, blend_source=other, blend_ratio=0.3)).from_blend.sum() == 2
    assert build_subset(data(src, 8, num_classes=2, blend_source=other, blend_ratio=1.0)).from_blend.all()
    assert not build_subset(data(src, 8, num_classes=2, blend_source=other, blend_ratio=0.0)).from_blend.any()


def test_errors(tmp_path, src):
    raises(lambda: build_subset(data(src, 10, num_classes=3)), "data.size", "divisible by the 3 classes")
    raises(lambda: build_subset(data(src, 26, num_classes=2)), "data.size", "13 images per class", "has 12")
    raises(lambda: build_subset(data(src, 10, num_classes=5)), "data.num_classes", "C = 5", "has 4")
    raises(lambda: build_subset(data(src, 4, classes=[9])), "data.classes", "[9]")
    plain = make_npz(tmp_path / "plain.npz", labels=False)
    raises(lambda: build_subset(data(plain, 10, labels="true")), "data.labels", "no")
    raises(lambda: build_subset(data(plain, 10, num_classes=2)), "data.source", "no class labels")
    raises(lambda: build_subset(data(plain, 100)), "data.size", "holds 48")
    raises(lambda: build_subset(data(src, 8, num_classes=2, blend_source=plain, blend_ratio=0.5)),
           "data.blend_source", "labels")
    renamed = make_npz(tmp_path / "renamed.npz", names=["cat", "dog", "bird", "frog"])
    raises(lambda: build_subset(data(src, 8, num_classes=2, blend_source=renamed, blend_ratio=0.5)),
           "data.blend_source", "same class indices")
    few = make_npz(tmp_path / "few.npz", per_class=2)
    raises(lambda: build_subset(data(src, 16, num_classes=2, blend_source=few, blend_ratio=0.5)),
           "data.blend_source", "4 images of class 0")
    raises(lambda: build_subset(data(str(tmp_path / "missing.npz"), 4)), "data.source", "no such file")
    raises(lambda: build_subset(data("builtin:mnist", 4)), "data.source", "builtin:digits")


def test_unlabelled_source_random_subset(tmp_path):
    plain = make_npz(tmp_path / "plain.npz", labels=False)
    s = build_subset(data(plain, 10, labels="unique"))
    assert len(set(s.indices.tolist())) == 10 and s.true_labels is None and s.class_names is None
    assert np.array_equal(s.indices, build_subset(data(plain, 10)).indices)
    assert np.array_equal(open_source(plain).read(s.indices), s.images) and s.label_dim == 10


def test_builtin_digits():
    s = build_subset(DataConfig(source="builtin:digits", size=50, labels="true"))
    assert s.images.shape == (50, 8, 8, 3) and np.bincount(s.true_labels).tolist() == [5] * 10
    assert s.label_dim == 10 and s.class_names == [str(d) for d in range(10)]


def test_save_load_roundtrip_and_tamper(tmp_path, src):
    s = build_subset(data(src, 8, num_classes=2, labels="random", random_label_classes=3))
    npz_path, json_path = save_subset(s, tmp_path / "run")
    meta = json.loads(open(json_path).read())
    assert meta["size"] == 8 and meta["label_mode"] == "random" and meta["per_class"] == {"0": 4, "1": 4}
    assert meta["source"] == src and meta["class_names"] == NAMES[:2] and len(meta["images_sha256"]) == 64
    with zipfile.ZipFile(npz_path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())  # memory-maps
    back = load_subset(tmp_path / "run")
    assert isinstance(back.images, np.memmap) and np.array_equal(back.images, s.images)
    for key in ("labels", "true_labels", "indices", "from_blend"):
        assert np.array_equal(getattr(back, key), getattr(s, key)), key
    assert back.label_dim == 3 and back.class_ids == [0, 1]
    assert np.array_equal(open_source(npz_path).labels, s.labels)  # also an ordinary npz SRC for the auditor
    with np.load(npz_path) as z:
        arrays = dict(z)
    arrays["images"][0, 0, 0, 0] ^= 1
    np.savez(npz_path, **arrays)
    raises(lambda: load_subset(tmp_path / "run"), "subset.npz", "sha256")
    assert load_subset(tmp_path / "run", verify=False).images[0, 0, 0, 0] != s.images[0, 0, 0, 0]
    raises(lambda: load_subset(tmp_path), "subset.json", "not found")
