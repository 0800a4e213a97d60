"""The image-source reader layer (sdmem.data): every format, ordering, labels, resolution and bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdmem.data import SUPPORTED_IMAGE_EXTENSIONS, ArraySource, describe, open_source
from sdmem.data.builtin import digits_source, lfw_source
from sdmem.errors import InputError

from helpers import write_cifar_folder

RNG = np.random.default_rng(0)


def rand_img(h, w, c=3):
    return RNG.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def save(path: Path, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.squeeze() if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    if mode:
        img = img.convert(mode)
    img.save(path, **kw)
    return path


def pil_rgb(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def raises_input(where, *snippets):
    """Context: InputError whose message names ``where`` and holds every snippet."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(InputError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            swallowed = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert str(where) in msg, msg
            for s in snippets:
                assert s in msg, msg
            return swallowed
    return _Ctx()


# ---------------------------------------------------------------- image folders

@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "imgs"
    h, w = 5, 7  # not square: catches transposes
    save(root / "b" / "z.PNG", rand_img(h, w))
    save(root / "b" / "grey.png", rand_img(h, w, 0))
    save(root / "b" / "deep" / "rgba.png", rand_img(h, w, 4))
    save(root / "a" / "photo.JPG", rand_img(h, w), quality=95)
    save(root / "a" / "x.jpeg", rand_img(h, w, 0))
    save(root / "a" / "pal.png", rand_img(h, w), mode="P")
    save(root / "c" / "q.webp", rand_img(h, w), lossless=True)
    save(root / "c" / "LA.png", rand_img(h, w), mode="LA")
    save(root / "c" / "m.BMP", rand_img(h, w))
    (root / "c" / "notes.txt").write_text("not an image")
    (root / "c" / ".DS_Store").write_bytes(b"\0junk")
    return root


def test_folder_formats_order_and_colour_rule(mixed_folder):
    src = open_source(mixed_folder)
    expected_files = sorted(p.relative_to(mixed_folder).as_posix() for p in mixed_folder.rglob("*")
                            if p.suffix.lower() in SUPPORTED_IMAGE_EXTENSIONS)
    assert src.files == expected_files and len(src) == 9
    assert src.labels is None and src.shape == (5, 7, 3)
    got = src.load()
    assert got.dtype == np.uint8 and got.shape == (9, 5, 7, 3)
    for k, f in enumerate(src.files):
        np.testing.assert_array_equal(got[k], pil_rgb(mixed_folder / f), err_msg=f)
    np.testing.assert_array_equal(src.read([8, 0, 3]), got[[8, 0, 3]])
    blocks = list(src.iter_blocks(4))
    assert [s for s, _ in blocks] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), got)
    again = pickle.loads(pickle.dumps(src))  # worker processes get a copy
    np.testing.assert_array_equal(again.read([2]), got[[2]])
    assert describe(src).endswith("9 images 7x5")


def test_folder_labels_from_first_subfolder(mixed_folder):
    src = open_source(mixed_folder, labels=True)
    assert src.class_names == ["a", "b", "c"]
    assert src.labels.dtype == np.int64
    assert [src.class_names[y] for y in src.labels] == [f.split("/")[0] for f in src.files]
    assert "3 classes" in describe(src)


def test_folder_images_at_root_with_labels(tmp_path):
    save(tmp_path / "d" / "cls" / "a.png", rand_img(4, 4))
    save(tmp_path / "d" / "stray.png", rand_img(4, 4))
    assert len(open_source(tmp_path / "d")) == 2
    with raises_input(tmp_path / "d", "stray.png"):
        open_source(tmp_path / "d", labels=True)


def test_resolution_centre_crop_lanczos(tmp_path):
    a = save(tmp_path / "r" / "a.png", rand_img(10, 16))
    b = save(tmp_path / "r" / "b.png", rand_img(13, 9))
    with raises_input(tmp_path / "r", "--resolution", "a.png", "b.png"):
        open_source(tmp_path / "r")
    src = open_source(tmp_path / "r", resolution=6)
    assert src.shape == (6, 6, 3)
    got = src.load()
    for k, path in enumerate((a, b)):
        with Image.open(path) as img:
            w, h = img.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            want = np.asarray(img.convert("RGB").crop((left, top, left + s, top + s)).resize((6, 6), Image.LANCZOS))
        np.testing.assert_array_equal(got[k], want)
    arr = ArraySource("arr", np.stack([rand_img(10, 16)] * 2), resolution=6).load()  # arrays: the same rule
    np.testing.assert_array_equal(arr[0], arr[1])


def test_folder_bad_inputs(tmp_path):
    with raises_input(tmp_path / "nope", "no such file or directory"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with raises_input(tmp_path / "empty", "empty"):
        open_source(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    (tmp_path / "txt" / "b.gif").write_bytes(b"GIF89a")
    with raises_input(tmp_path / "txt", "no supported images", ".png", ".webp"):
        open_source(tmp_path / "txt")
    save(tmp_path / "bad" / "ok.png", rand_img(4, 4))
    (tmp_path / "bad" / "garbage.png").write_bytes(os.urandom(200))
    with raises_input(tmp_path / "bad", "garbage.png", "corrupt"):  # the header is read at open
        open_source(tmp_path / "bad")
    with raises_input(tmp_path / "bad", "no splits"):
        open_source(tmp_path / "bad", split="test")
    (tmp_path / "file.txt").write_text("x")
    with raises_input(tmp_path / "file.txt", "unsupported", "npz", "hf:"):
        open_source(tmp_path / "file.txt")
    with raises_input("--resolution", "positive"):
        open_source(tmp_path / "bad", resolution=0)


def test_truncated_image_fails_when_read(tmp_path):
    save(tmp_path / "t" / "a.png", rand_img(32, 32))
    data = (tmp_path / "t" / "a.png").read_bytes()
    (tmp_path / "t" / "b.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    src = open_source(tmp_path / "t")
    src.read([0])
    with raises_input(tmp_path / "t" / "b.png", "corrupt"):
        src.read([1])


# ---------------------------------------------------------------- npz / npy

def test_npz_uncompressed_is_memmapped(tmp_path):
    images, labels = RNG.integers(0, 256, (20, 6, 5, 3), dtype=np.uint8), np.arange(20) % 4
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    src = open_source(tmp_path / "d.npz")
    assert isinstance(src._images, np.memmap)
    np.testing.assert_array_equal(src.load(), images)
    np.testing.assert_array_equal(src.read([7, 3]), images[[7, 3]])
    block = src.read_range(2, 6)  # a fresh writable array, not a view into the read-only map
    assert block.flags.writeable and block.flags.c_contiguous
    block[:] = 0
    np.testing.assert_array_equal(src.read_range(2, 6), images[2:6])
    np.testing.assert_array_equal(src.labels, labels)
    assert src.labels.dtype == np.int64 and src.shape == (6, 5, 3)
    assert describe(src) == "npz: 20 images 5x6, 4 classes"
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src)).read([1]), images[[1]])


def test_npz_compressed_grey_and_npy(tmp_path):
    grey = RNG.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    np.savez_compressed(tmp_path / "g.npz", images=grey)
    src = open_source(tmp_path / "g.npz")
    assert src.labels is None
    np.testing.assert_array_equal(src.load(), np.repeat(grey[..., None], 3, -1))
    np.savez(tmp_path / "c1.npz", images=grey[..., None], labels=np.arange(5.0))  # integral floats are fine
    np.testing.assert_array_equal(open_source(tmp_path / "c1.npz").load(), np.repeat(grey[..., None], 3, -1))
    rgb = RNG.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", rgb)
    src = open_source(tmp_path / "x.npy")
    assert isinstance(src._images, np.memmap)
    np.testing.assert_array_equal(src.load(), rgb)
    with raises_input(tmp_path / "x.npy", "labels"):
        open_source(tmp_path / "x.npy", labels=True)


def test_npz_bad_inputs(tmp_path):
    ok = RNG.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    cases = {
        "nokey.npz": (dict(pixels=ok, y=np.arange(4)), ["images", "pixels", "y"]),
        "float.npz": (dict(images=ok.astype(np.float32)), ["uint8", "float32"]),
        "nan.npz": (dict(images=ok, labels=np.array([0, 1, np.nan, 2])), ["NaN"]),
        "ndim.npz": (dict(images=ok[:, :, 0, 0]), ["shape"]),
        "chan.npz": (dict(images=ok[..., :2]), ["C = 1 or 3"]),
        "len.npz": (dict(images=ok, labels=np.arange(3)), ["labels", "(4,)"]),
        "strlab.npz": (dict(images=ok, labels=np.array(list("abcd"))), ["integer"]),
        "frac.npz": (dict(images=ok, labels=np.array([0, 0.5, 1, 2])), ["integer"]),
        "obj.npz": (dict(images=np.array([ok, None], dtype=object)), ["pickle"]),
    }
    for fname, (arrays, snippets) in cases.items():
        np.savez(tmp_path / fname, **arrays)
        with raises_input(tmp_path / fname, *snippets):
            open_source(tmp_path / fname)
    np.savez(tmp_path / "nolab.npz", images=ok)
    with raises_input(tmp_path / "nolab.npz", "labels"):
        open_source(tmp_path / "nolab.npz", labels=True)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with raises_input(tmp_path / "junk.npz", "npz"):
        open_source(tmp_path / "junk.npz")


# ---------------------------------------------------------------- EDM

def _edm_items(n=5):
    return {f"{i // 3:05d}/img{i:08d}.png": (rand_img(6, 6), i % 3) for i in range(n)}


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_edm_zip_and_folder(tmp_path):
    items = _edm_items()
    meta = {"labels": [[f, y] for f, (_, y) in reversed(list(items.items()))]}  # mapped by name, not order
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as zf:
        for f in reversed(list(items)):
            zf.writestr(f, _png_bytes(items[f][0]))
        zf.writestr("dataset.json", json.dumps(meta))
    src = open_source(tmp_path / "ds.zip")
    assert src.files == sorted(items)
    np.testing.assert_array_equal(src.load(), np.stack([items[f][0] for f in sorted(items)]))
    np.testing.assert_array_equal(src.labels, [items[f][1] for f in sorted(items)])
    copy = pickle.loads(pickle.dumps(src))  # the open zip is not pickled; reopened on first read
    np.testing.assert_array_equal(copy.read([4, 0]), src.read([4, 0]))
    assert describe(src).startswith("EDM zip: 5 images 6x6")

    folder = tmp_path / "edmdir"
    for f, (arr, _) in items.items():
        save(folder / f, arr)
    (folder / "dataset.json").write_text(json.dumps(meta))
    src2 = open_source(folder, labels=True)
    assert src2.files == src.files
    np.testing.assert_array_equal(src2.load(), src.load())
    np.testing.assert_array_equal(src2.labels, src.labels)
    (folder / "dataset.json").write_text(json.dumps({"labels": None}))
    assert open_source(folder).labels is None
    with raises_input(folder, "null"):
        open_source(folder, labels=True)


def test_edm_bad_inputs(tmp_path):
    with zipfile.ZipFile(tmp_path / "nolabels.zip", "w") as zf:
        zf.writestr("00000/img00000000.png", _png_bytes(rand_img(4, 4)))
    assert open_source(tmp_path / "nolabels.zip").labels is None
    with raises_input(tmp_path / "nolabels.zip", "dataset.json"):
        open_source(tmp_path / "nolabels.zip", labels=True)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with raises_input(tmp_path / "other.zip", "not an EDM dataset", "PNG"):
        open_source(tmp_path / "other.zip")
    with zipfile.ZipFile(tmp_path / "missing.zip", "w") as zf:
        zf.writestr("a.png", _png_bytes(rand_img(4, 4)))
        zf.writestr("b.png", _png_bytes(rand_img(4, 4)))
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 1]]}))
    with raises_input(tmp_path / "missing.zip", "no label for b.png"):
        open_source(tmp_path / "missing.zip")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with raises_input(tmp_path / "broken.zip", "zip"):
        open_source(tmp_path / "broken.zip")


# ---------------------------------------------------------------- CIFAR-10

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture
def cifar(tmp_path):
    """A miniature cifar-10-batches-py (3 images per train batch, 2 test) and its tar.gz."""
    images = write_cifar_folder(tmp_path, RNG, CLASSES)
    return tmp_path, images


def test_cifar_archive_and_folders(cifar):
    tmp, images = cifar
    train_x = np.concatenate([images[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((images[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    for src_path in (tmp / "cifar-10-python.tar.gz", tmp / "cifar-10-batches-py", tmp):
        src = open_source(src_path)
        assert len(src) == 15 and src.shape == (32, 32, 3) and src.class_names == CLASSES
        np.testing.assert_array_equal(src.load(), train_x)
        np.testing.assert_array_equal(src.labels, train_y)
        assert describe(src) == "cifar10 train: 15 images 32x32, 10 classes"
    # CHW -> HWC against raw bytes: R plane, then G, then B; rows top to bottom
    raw = pickle.loads((tmp / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")[b"data"]
    img = open_source(tmp / "cifar-10-python.tar.gz").read([0])[0]
    assert img[0, 0, 0] == raw[0, 0] and img[0, 0, 1] == raw[0, 1024] and img[0, 0, 2] == raw[0, 2048]
    assert img[1, 0, 0] == raw[0, 32] and img[0, 1, 0] == raw[0, 1] and img[31, 31, 2] == raw[0, 3071]
    test = open_source(tmp / "cifar-10-python.tar.gz", split="test")
    np.testing.assert_array_equal(test.load(), images["test_batch"][0])
    np.testing.assert_array_equal(test.labels, images["test_batch"][1])
    with raises_input(tmp / "cifar-10-batches-py", "split", "'valid'"):
        open_source(tmp / "cifar-10-batches-py", split="valid")


def test_cifar_malicious_pickle_is_refused(cifar, tmp_path):
    tmp, _ = cifar
    sentinel = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    evil = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    (tmp / "cifar-10-batches-py" / "data_batch_1").write_bytes(evil)
    with raises_input(tmp / "cifar-10-batches-py", "data_batch_1", "system", "refusing to run code"):
        open_source(tmp / "cifar-10-batches-py")
    bad_tar = tmp_path / "evil.tgz"
    with tarfile.open(bad_tar, "w:gz") as tf:
        tf.add(tmp / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with raises_input(bad_tar, "refusing to run code"):
        open_source(bad_tar)
    assert not sentinel.exists()
    (tmp / "cifar-10-batches-py" / "data_batch_2").unlink()
    with raises_input(tmp / "cifar-10-batches-py", "data_batch_2"):
        open_source(tmp / "cifar-10-batches-py")


# ---------------------------------------------------------------- Imagenette

def test_imagenette(tmp_path):
    root = tmp_path / "imagenette2-320"
    wnids = ["n03888605", "n01440764", "n99999999"]
    for split, n in (("train", 2), ("val", 1)):
        for w in wnids:
            for i in range(n):
                save(root / split / w / f"{w}_{i}.JPEG", rand_img(8, 8))
    src = open_source(root)
    assert src.class_names == ["tench", "parachute", "n99999999"] and len(src) == 6
    assert src.files[0] == "train/n01440764/n01440764_0.JPEG"
    assert [src.class_names[y] for y in src.labels] == ["tench"] * 2 + ["parachute"] * 2 + ["n99999999"] * 2
    np.testing.assert_array_equal(src.read([5])[0], pil_rgb(root / src.files[5]))
    assert describe(src) == "imagenette train: 6 images 8x8, 3 classes"
    val = open_source(root, split="val")
    assert len(val) == 3 and describe(val).startswith("imagenette val")
    direct = open_source(root / "val")
    assert direct.files == [f.split("/", 1)[1] for f in val.files]
    np.testing.assert_array_equal(direct.labels, val.labels)
    with raises_input(root, "split"):
        open_source(root, split="test")


# ---------------------------------------------------------------- Hugging Face (offline, local imagefolder)

def test_hf_local_imagefolder(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    for var, val in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("HF_DATASETS_CACHE", str(tmp_path / "cache")), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(var, val)
    if "datasets" in sys.modules:  # imported earlier in this process: its config was read then
        config = sys.modules["datasets"].config
        monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "cache")
        for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setattr(config, attr, True, raising=False)
    if "huggingface_hub.constants" in sys.modules:
        monkeypatch.setattr(sys.modules["huggingface_hub.constants"], "HF_HUB_OFFLINE", True, raising=False)
    folder = tmp_path / "hfimgs"
    save(folder / "cat" / "0.png", rand_img(6, 6))
    save(folder / "cat" / "1.png", rand_img(6, 6, 4))
    save(folder / "dog" / "2.png", rand_img(6, 6, 0))
    src = open_source(f"hf:{folder}", labels=True)
    assert len(src) == 3 and src.shape == (6, 6, 3) and src.class_names == ["cat", "dog"]
    want = {p.name: (pil_rgb(p), p.parent.name) for p in folder.rglob("*.png")}
    got = src.load()
    rows = sorted(zip((got[i].tobytes() for i in range(3)), src.labels))
    expect = sorted((a.tobytes(), ["cat", "dog"].index(c)) for a, c in want.values())
    assert rows == expect
    assert open_source(f"hf:{folder}", resolution=4).load().shape == (3, 4, 4, 3)
    with raises_input("hf:no-such-user/no-such-dataset", "could not be loaded", "local"):
        open_source("hf:no-such-user/no-such-dataset")
    with raises_input(f"hf:{folder}:test", "could not be loaded"):
        open_source(f"hf:{folder}:test")


# ---------------------------------------------------------------- built-in sets

def test_digits_and_lfw():
    from sklearn.datasets import load_digits

    d = digits_source()
    raw = load_digits()
    assert len(d) == 1797 and d.shape == (8, 8, 3) and d.class_names == [str(i) for i in range(10)]
    x = d.load()
    np.testing.assert_array_equal(x[..., 0], np.round(raw.images * 255 / 16).astype(np.uint8))
    assert x.max() == 255 and (x[..., 0] == x[..., 2]).all()
    np.testing.assert_array_equal(d.labels, raw.target)
    assert len(digits_source(100)) == 100
    with pytest.raises(InputError):
        digits_source(0)
    f = lfw_source()
    assert len(f) == 200 and f.shape == (25, 25, 3) and f.load().dtype == np.uint8
    assert f.labels.tolist() == [0] * 100 + [1] * 100


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc needed")
def test_streaming_a_memmapped_npz_keeps_its_pages_out_of_resident_memory(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8))  # 12 MB
    src = open_source(path)
    total = sum(int(block.sum(dtype=np.int64) > 0) for _, block in src.iter_blocks(500))
    assert total == 8

    def mapped_rss_kb():
        rss, inside = 0, False
        for line in open("/proc/self/smaps"):
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
        return rss

    assert mapped_rss_kb() < 1024  # without releasing pages, all 12 MB read so far stay resident
