"""``.npz`` (``images`` + optional ``labels``) and ``.npy`` image arrays; uncompressed members are memory-mapped."""

from __future__ import annotations

import os
import struct
import zipfile

import numpy as np

from ..errors import InputError
from .base import ARCHIVE_ERRORS, ArraySource, archive_problem


def _check_images(dtype: np.dtype, shape: tuple, where: str) -> None:
    if dtype.hasobject:
        raise InputError(where, "holds Python objects (pickles), which sdmem never loads; expected uint8 images")
    if dtype != np.uint8:
        hint = " (floats: scale to 0..255 and cast to uint8)" if dtype.kind == "f" else ""
        raise InputError(where, f"expected uint8 images, got dtype {dtype}{hint}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):  # N×H×W is grey
        raise InputError(where, f"expected images of shape N×H×W×C with C = 1 or 3 (or N×H×W grey), "
                                f"got shape {tuple(shape)}")
    if shape[0] == 0 or 0 in shape:
        raise InputError(where, f"holds no images (shape {tuple(shape)})")


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InputError(where, f"expected one integer label per image (shape ({n},)), got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if np.isnan(labels).any():
            raise InputError(where, f"labels contain NaN (first at index {int(np.flatnonzero(np.isnan(labels))[0])})")
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise InputError(where, "expected integer labels, got non-integer floats")
    elif labels.dtype.kind not in "iu":
        raise InputError(where, f"expected integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        raise InputError(where, f"expected class labels >= 0, got {labels.min()}")
    return labels


def _read_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from a .npy header, leaving ``f`` at the array data (NEP 1 .npy format)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0 and 3.0 differ only in the header's text encoding


def _read_member(path: str, zf: zipfile.ZipFile, key: str, where: str, check=None) -> np.ndarray:
    """Array ``key`` of an npz: memory-mapped in place when stored uncompressed (np.savez), else read into RAM.

    Zip local file header (APPNOTE 4.3.7): 30 fixed bytes, then the file name and extra field (lengths at
    offsets 26 and 28), then the member's bytes, here a .npy file (magic, header, raw array data).
    """
    info = zf.getinfo(key + ".npy")
    try:
        with zf.open(info) as member:
            shape, fortran, dtype = _read_header(member)
            header_len = member.tell()
            if check is not None:
                check(dtype, shape, where)  # before reading: a 20 GB float array fails at once
            if dtype.hasobject:
                raise InputError(where, "holds Python objects (pickles), which sdmem never loads")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or 0 in shape:
            with zf.open(info) as member:  # compressed (np.savez_compressed): into RAM
                return np.lib.format.read_array(member, allow_pickle=False)
    except ARCHIVE_ERRORS as exc:  # encrypted, unknown compression method, bad CRC-32, corrupt, truncated
        raise InputError(where, archive_problem(exc)) from None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise InputError(where, "corrupt zip: bad local file header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def open_npz(path: str | os.PathLike, *, resolution: int | None = None, labels: bool = False,
             name: str | None = None) -> ArraySource:
    """An ``.npz`` with ``images`` [N, H, W(, C)] uint8 and optional ``labels`` [N], or a ``.npy`` of images."""
    path = os.fspath(path)
    name = path if name is None else name
    if path.lower().endswith(".npy"):
        return _open_npy(path, name, resolution, labels)
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if "images" not in keys:
                raise InputError(name, f"no 'images' array; keys found: {', '.join(keys) or '(none)'}")
            images = _read_member(path, zf, "images", f"{name}:images", _check_images)
            lab = class_names = None
            if "labels" in keys:
                lab = _check_labels(_read_member(path, zf, "labels", f"{name}:labels"), images.shape[0],
                                    f"{name}:labels")
            if "class_names" in keys:  # optional: a str array, one name per label value
                names = _read_member(path, zf, "class_names", f"{name}:class_names")
                class_names = [str(c) for c in names] if names.dtype.kind in "US" else None
    except (ValueError, *ARCHIVE_ERRORS) as exc:
        raise InputError(name, f"not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    if labels and lab is None:
        raise InputError(name, f"labels were asked for, but there is no 'labels' array (keys: {', '.join(keys)})")
    src = ArraySource(name, images, labels=lab, class_names=class_names, resolution=resolution)
    src.kind = "npz"
    return src


def _open_npy(path: str, name: str, resolution: int | None, labels: bool) -> ArraySource:
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty file
        raise InputError(name, f"not a readable .npy array of images ({exc})") from None
    _check_images(images.dtype, images.shape, name)
    if labels:
        raise InputError(name, "labels were asked for, but a .npy holds images only; use an .npz with "
                               "'images' and 'labels'")
    src = ArraySource(name, images, resolution=resolution)
    src.kind = "npy"
    return src
