"""Damaged and hostile inputs to the readers: every one is an InputError naming the file, never a traceback."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from helpers import raises
from sdmem.audit.report import write_outputs
from sdmem.cli import main
from sdmem.data import MAX_IMAGE_PIXELS, ArraySource, open_source
from sdmem.errors import InputError

RNG = np.random.default_rng(0)


def noise_png(size: int = 256, *, seed: int = 0) -> bytes:
    """A grey PNG of random black/white pixels, stored uncompressed: > 4 KiB once deflated in a zip, so a zip
    reader sees only its header when the source is opened, and a damaged tail only when the image is read."""
    pixels = (np.random.default_rng(seed).integers(0, 2, (size, size)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _headers(data: bytes, name: str) -> tuple[int, int]:
    """(offset of the central directory entry, offset of the local header) of member ``name`` (APPNOTE 4.3)."""
    eocd = data.rfind(b"PK\x05\x06")
    count, _, cd = struct.unpack("<HII", data[eocd + 10 : eocd + 20])
    pos = cd
    for _ in range(count):
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + n].decode() == name:
            return pos, struct.unpack("<I", data[pos + 42 : pos + 46])[0]
        pos += 46 + n + m + k
    raise KeyError(name)


def patch_member(data: bytes, name: str, *, flags: int = 0, method: int | None = None) -> bytes:
    """Set general-purpose flag bits and/or the compression method of ``name`` in both of its headers."""
    out = bytearray(data)
    central, local = _headers(data, name)
    for flag_at, method_at in ((central + 8, central + 10), (local + 6, local + 8)):
        out[flag_at : flag_at + 2] = struct.pack("<H", struct.unpack("<H", out[flag_at : flag_at + 2])[0] | flags)
        if method is not None:
            out[method_at : method_at + 2] = struct.pack("<H", method)
    return bytes(out)


def break_deflate(data: bytes, name: str, payload: bytes) -> bytes:
    """Replace the deflate data of ``name`` from its middle on with an invalid block (BTYPE = 11): zlib.error,
    but only for a reader that gets that far."""
    out = bytearray(data)
    _, local = _headers(data, name)
    n, m = struct.unpack("<HH", data[local + 26 : local + 30])
    start = local + 30 + n + m
    size = struct.unpack("<I", data[local + 18 : local + 22])[0]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(payload[: len(payload) // 2]) + comp.flush(zlib.Z_FULL_FLUSH)  # ends on a byte boundary
    assert 4096 < len(head) < size - 1
    out[start + len(head)] = 0b111  # BFINAL = 1, BTYPE = 11 (reserved): "invalid block type"
    out[start : start + len(head)] = head
    return bytes(out)


def cli_fails(capsys, *argv: str, where: str) -> str:
    """``sdmem audit ...`` exits 2 with one line on stderr naming ``where``, and no traceback."""
    assert main(["audit", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sdmem audit: error: "), err
    assert where in err and "Traceback" not in err, err
    return err


@pytest.fixture
def generated(tmp_path) -> Path:
    """A folder with one 256x256 image (the size of noise_png), for audits that must get as far as reading."""
    folder = tmp_path / "generated"
    folder.mkdir()
    (folder / "g.png").write_bytes(noise_png(seed=9))
    return folder


# ---------------------------------------------------------------- zip archives (EDM zips, npz)

def test_zip_encrypted_member(tmp_path, generated, capsys):
    path = tmp_path / "enc.zip"
    path.write_bytes(patch_member(zip_bytes({"a.png": noise_png()}), "a.png", flags=0x1))
    raises(lambda: open_source(path), f"{path}/a.png", "encrypted")
    cli_fails(capsys, "--train", str(path), "--generated", str(generated), where=f"{path}/a.png")
    npz = tmp_path / "enc.npz"
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 4, 4, 3), np.uint8))
    npz.write_bytes(patch_member(buf.getvalue(), "images.npy", flags=0x1))
    raises(lambda: open_source(npz), f"{npz}:images", "encrypted")


def test_zip_unsupported_compression(tmp_path, generated, capsys):
    path = tmp_path / "method.zip"
    path.write_bytes(patch_member(zip_bytes({"a.png": noise_png()}), "a.png", method=99))
    raises(lambda: open_source(path), f"{path}/a.png", "compression method")
    cli_fails(capsys, "--train", str(path), "--generated", str(generated), where=f"{path}/a.png")
    npz = tmp_path / "method.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.zeros((2, 4, 4, 3), np.uint8))
    npz.write_bytes(patch_member(buf.getvalue(), "images.npy", method=99))
    raises(lambda: open_source(npz), f"{npz}:images", "compression method")


def test_zip_bad_crc_found_when_read(tmp_path, generated, capsys):
    data = bytearray(zip_bytes({"a.png": noise_png(seed=1), "b.png": noise_png(seed=2)}, zipfile.ZIP_STORED))
    _, local = _headers(bytes(data), "b.png")
    data[local + 30 + len("b.png") + 10000] ^= 0xFF  # a pixel byte: the header stays intact
    path = tmp_path / "crc.zip"
    path.write_bytes(bytes(data))
    src = open_source(path)  # only the headers are read here
    assert src.read([0]).shape == (1, 256, 256, 3)
    raises(lambda: src.read([1]), f"{path}/b.png", "CRC")
    raises(src.load, f"{path}/b.png", "CRC")
    cli_fails(capsys, "--train", str(path), "--generated", str(generated), where=f"{path}/b.png")


def test_zip_corrupt_deflate_found_when_read(tmp_path, generated, capsys):
    payload = noise_png(seed=2)
    path = tmp_path / "zlib.zip"
    path.write_bytes(break_deflate(zip_bytes({"a.png": noise_png(seed=1), "b.png": payload}), "b.png", payload))
    src = open_source(path)
    src.read([0])
    raises(lambda: src.read([1]), f"{path}/b.png", "error", "invalid block type")
    cli_fails(capsys, "--train", str(path), "--generated", str(generated), where=f"{path}/b.png")
    npz = tmp_path / "zlib.npz"  # npz arrays are read at open: the same error, then
    buf = io.BytesIO()
    images = RNG.integers(0, 2, (4, 64, 64, 3), dtype=np.uint8)
    np.savez_compressed(buf, images=images)
    raw = io.BytesIO()
    np.lib.format.write_array(raw, images)
    npz.write_bytes(break_deflate(buf.getvalue(), "images.npy", raw.getvalue()))
    raises(lambda: open_source(npz), f"{npz}:images", "invalid block type")


def test_zip_truncated(tmp_path, generated, capsys):
    data = zip_bytes({"a.png": noise_png(seed=1), "b.png": noise_png(seed=2)})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])  # no central directory: found at open
    raises(lambda: open_source(cut), str(cut), "zip")
    cli_fails(capsys, "--train", str(cut), "--generated", str(generated), where=str(cut))
    later = tmp_path / "later.zip"  # truncated after it was opened (a copy still being written)
    later.write_bytes(data)
    src = open_source(later)
    with open(later, "r+b") as f:
        f.truncate(len(data) // 2)
    raises(lambda: src.read([1]), f"{later}/b.png")
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 4, 4, 3), np.uint8))
    npz = tmp_path / "cut.npz"
    npz.write_bytes(buf.getvalue()[:-30])
    raises(lambda: open_source(npz), str(npz), "not a readable .npz")


# ---------------------------------------------------------------- CIFAR-10 archives

def cifar_folder(root: Path, batch: dict) -> Path:
    """cifar-10-batches-py with every train batch a copy of ``batch`` (protocol-2 pickles, as CIFAR ships)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def good_batch(n: int = 3) -> dict:
    return {b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}


def test_cifar_ragged_labels(tmp_path, generated, capsys):
    folder = cifar_folder(tmp_path / "short", {**good_batch(), b"labels": [0, 1]})
    raises(lambda: open_source(folder), f"{folder}/data_batch_1", "3 labels")
    cli_fails(capsys, "--train", str(folder), "--generated", str(generated), where=f"{folder}/data_batch_1")
    folder = cifar_folder(tmp_path / "nested", {**good_batch(), b"labels": [[0, 1], [2], 3]})
    raises(lambda: open_source(folder), f"{folder}/data_batch_1", "3 labels", "ragged")


def test_cifar_data_of_the_wrong_shape(tmp_path):
    for k, data in enumerate([np.zeros((3, 3000), np.uint8), np.zeros(9216, np.uint8),
                              np.zeros((3, 3072), np.float32)]):
        folder = cifar_folder(tmp_path / str(k), {b"data": data, b"labels": [0, 1, 2]})
        raises(lambda: open_source(folder), f"{folder}/data_batch_1", "uint8 [n, 3072]")


def test_cifar_corrupt_gzip_stream(tmp_path, generated, capsys):
    folder = cifar_folder(tmp_path / "src", good_batch(400))  # 6 MB of noise: gzip stays about that size
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    data = bytearray(archive.read_bytes())
    late = tmp_path / "late" / "cifar-10-python.tar.gz"  # damage deep inside: seen only while reading members
    late.parent.mkdir()
    late.write_bytes(bytes(data[: len(data) // 2]) + bytes(len(data) - len(data) // 2))
    raises(lambda: open_source(late), str(late), "truncated")  # tarfile alone would just list 3 batches
    cli_fails(capsys, "--train", str(late), "--generated", str(generated), where=str(late))
    flipped = tmp_path / "flip" / "cifar-10-python.tar.gz"
    flipped.parent.mkdir()
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    flipped.write_bytes(bytes(data))
    raises(lambda: open_source(flipped), str(flipped), "corrupt", "CRC")
    cut = tmp_path / "cut" / "cifar-10-python.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[: len(data) // 3])  # ends inside data_batch_2
    raises(lambda: open_source(cut), f"{cut}/data_batch_2", "truncated")
    garbage = tmp_path / "garbage" / "cifar-10-python.tar.gz"
    garbage.parent.mkdir()
    garbage.write_bytes(os.urandom(5000))
    raises(lambda: open_source(garbage), str(garbage), "not a readable tar.gz")


def test_cifar_damaged_tar_header(tmp_path):
    """A gzip stream that is fine around a tar header that is not: tarfile stops listing there, quietly."""
    folder = cifar_folder(tmp_path / "src", good_batch())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    raw = bytearray(buf.getvalue())
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        offset = next(m.offset for m in tf if m.name.endswith("data_batch_3"))
    raw[offset + 148 : offset + 156] = b"0000000\0"  # a wrong header checksum
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(gzip.compress(bytes(raw)))
    raises(lambda: open_source(archive), str(archive), "damaged tar archive", "listing stops")


# ---------------------------------------------------------------- images: size cap, names, empty/truncated

def test_decompression_bomb_png_is_refused_before_decoding(tmp_path, generated, capsys, monkeypatch):
    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.new("1", (9000, 9000)).save(folder / "a.png")  # 81 M pixels: over our cap, under PIL's
    Image.new("1", (10000, 10000)).save(folder / "b.png")  # 100 M pixels: PIL itself would only warn
    assert os.path.getsize(folder / "b.png") < 100_000

    def no_decoding(self):
        raise AssertionError("an image over the cap was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning gets out
        raises(lambda: open_source(folder), f"{folder}/a.png", "9000x9000", f"{MAX_IMAGE_PIXELS:,}")
        (folder / "a.png").unlink()
        raises(lambda: open_source(folder), f"{folder}/b.png", "10000x10000", "limit")
        cli_fails(capsys, "--train", str(folder), "--generated", str(generated), where=f"{folder}/b.png")


def test_absurd_resolution_is_refused_before_allocating(tmp_path, capsys):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    raises(lambda: open_source(tmp_path / "f", resolution=10**6), "--resolution", "limit", f"{MAX_IMAGE_PIXELS:,}")
    raises(lambda: ArraySource("x", np.zeros((1, 4, 4, 3), np.uint8), resolution=10**6), "--resolution", "limit")
    from sdmem.data.subset import open_data_source
    raises(lambda: open_data_source("builtin:digits", resolution=10**5), "data.resolution", "limit")
    assert open_source(tmp_path / "f", resolution=8192).shape == (8192, 8192, 3)  # the cap itself is allowed
    try:  # refused by the CLI's argument parser (usage + one error line), or by open_source (one line)
        rc = main(["audit", "--quiet", "--train", str(tmp_path / "f"), "--generated", str(tmp_path / "f"),
                   "--resolution", str(10**6)])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "--resolution" in err and "Traceback" not in err, err


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes on POSIX only")
def test_non_utf8_file_names_work_and_print(tmp_path, capsys):
    folder = os.path.join(os.fsencode(str(tmp_path)), b"gen")
    os.makedirs(os.path.join(folder, b"cls\xfe"))
    img = RNG.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    with open(os.path.join(folder, b"cls\xfe", b"img\xff.png"), "wb") as f:
        f.write(png(img[0]))
    with open(os.path.join(folder, b"cls\xfe", b"ok.png"), "wb") as f:
        f.write(png(img[1]))
    src = open_source(folder, labels=True)
    assert src.files == ["cls\\xfe/img\\xff.png", "cls\\xfe/ok.png"] and src.class_names == ["cls\\xfe"]
    for name in src.files + src.class_names:
        name.encode("utf-8")  # printable, and writable into JSON and CSV
    np.testing.assert_array_equal(src.load(), img)
    out = tmp_path / "out"
    assert main(["audit", "--quiet", "--train", os.fsdecode(folder), "--generated", os.fsdecode(folder),
                 "--out", str(out)]) == 0
    assert "cls\\xfe/img\\xff.png" in (out / "per_sample.csv").read_text(encoding="utf-8")
    json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_empty_and_truncated_images(tmp_path, generated, capsys):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = noise_png(64)
    for k, (bad, when) in enumerate([(b"", "open"), (data[:20], "open"), (data[: len(data) // 2], "read")]):
        folder = tmp_path / f"t{k}"
        folder.mkdir()
        (folder / "a.png").write_bytes(data)
        (folder / "b.png").write_bytes(bad)
        if when == "open":
            raises(lambda: open_source(folder), f"{folder}/b.png", "corrupt")
        else:
            src = open_source(folder)
            raises(lambda: src.read([1]), f"{folder}/b.png", "corrupt")
    cli_fails(capsys, "--train", str(tmp_path / "t0"), "--generated", str(generated), where=f"{tmp_path}/t0/b.png")


# ---------------------------------------------------------------- JSON inside datasets

@pytest.mark.parametrize("text, problem", [
    (b"{not json", "not valid JSON"),
    (b'{"labels": [["a.png", 1]], "x": "\xff\xfe"}', "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b'[["a.png", 1]]', '{"labels"'),
    (b'{"labels": 5}', "pairs"),
    (b'{"labels": [["a.png", 1, 2]]}', "pairs"),
    (b'{"labels": [["a.png", 1.5]]}', "class index"),
    (b'{"labels": [["a.png", "cat"]]}', "class index"),
    (b'{"labels": [["a.png", 100000000000000000000000]]}', "class index"),
    (b'{"labels": [["other.png", 1]]}', "no label for a.png"),
])
def test_bad_dataset_json(tmp_path, text, problem):
    folder = tmp_path / "edm"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(np.zeros((4, 4, 3), np.uint8)))
    (folder / "dataset.json").write_bytes(text)
    raises(lambda: open_source(folder, labels=True), str(folder / "dataset.json"), problem)
    path = tmp_path / "edm.zip"
    path.write_bytes(zip_bytes({"a.png": png(np.zeros((4, 4, 3), np.uint8)), "dataset.json": text}))
    raises(lambda: open_source(path, labels=True), f"{path}/dataset.json", problem)


def test_bad_dataset_json_through_the_cli(tmp_path, generated, capsys):
    path = tmp_path / "edm.zip"
    path.write_bytes(zip_bytes({"a.png": noise_png(), "dataset.json": b'{"labels": [["a.png", -1]]}'}))
    cli_fails(capsys, "--train", str(path), "--generated", str(generated), where=f"{path}/dataset.json")


# ---------------------------------------------------------------- writing the report

def _writers(seen: list | None = None):
    def write(p: Path):
        if seen is not None:
            seen.append(p)
        p.write_text("x")
    return {"a.txt": write, "b.txt": write}


def test_report_temporary_folder_is_inside_the_target(tmp_path):
    seen: list[Path] = []
    out = tmp_path / "out"
    placed = write_outputs(out, _writers(seen))
    assert placed == [out / "a.txt", out / "b.txt"]
    assert all(p.parent.parent == out and p.parent.name.startswith(".tmp-") for p in seen)
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt"]


def test_report_out_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "report"
    out.write_text("keep me")
    raises(lambda: write_outputs(out, _writers()), str(out), "not a folder")
    assert out.read_text() == "keep me"
    raises(lambda: write_outputs(out / "sub", _writers()), str(out / "sub"), "Not a directory")
    assert out.read_text() == "keep me"
    np.savez(tmp_path / "x.npz", images=RNG.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8))
    assert main(["audit", "--quiet", "--train", str(tmp_path / "x.npz"), "--generated", str(tmp_path / "x.npz"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "Traceback" not in err, err
    assert out.read_text() == "keep me"


def test_report_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        raises(lambda: write_outputs(ro / "out", _writers()), str(ro / "out"), "Permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_report_write_error_leaves_nothing(tmp_path, code):
    def full(p: Path):
        p.write_text("half")
        raise OSError(code, os.strerror(code), str(p))

    out = tmp_path / "new" / "out"  # neither folder existed: both are removed again
    raises(lambda: write_outputs(out, {"a.txt": lambda p: p.write_text("x"), "b.txt": full}), str(out),
           os.strerror(code))
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old"  # an existing report stays as it was, with no temporary folder left
    old.mkdir()
    (old / "a.txt").write_text("old")
    with pytest.raises(InputError):
        write_outputs(old, {"a.txt": lambda p: p.write_text("new"), "b.txt": full})
    assert os.listdir(old) == ["a.txt"] and (old / "a.txt").read_text() == "old"
