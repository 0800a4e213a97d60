"""CIFAR-10, the official python version: ``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/`` folder."""

from __future__ import annotations

import codecs
import io
import os
import pickle
import posixpath
import tarfile

import numpy as np

from ..errors import InputError
from .base import ARCHIVE_ERRORS, ArraySource, archive_problem

# Format (https://www.cs.toronto.edu/~kriz/cifar.html): data_batch_1..5 (train) and test_batch are Python 2
# pickles (protocol 2) of {b"data": uint8 [10000, 3072] (1024 R, 1024 G, 1024 B, rows top to bottom),
# b"labels": [10000 ints 0..9], ...}; batches.meta holds {b"label_names": [10 byte strings], ...}.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
FOLDER = "cifar-10-batches-py"

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


def _latin1(text, encoding="utf-8"):
    # Python 3 writes bytes in protocol 2 as _codecs.encode(str, "latin1"): allow that exact call, nothing else.
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


# Everything a CIFAR batch pickle may ask for: numpy array reconstruction (numpy 1 or 2 module paths).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, str, ints and numpy arrays; refuses any other global (no code runs)."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise InputError(self.where, f"pickle asks for {module}.{name}; refusing to run code")


def safe_unpickle(data: bytes, where: str):
    """Unpickle CIFAR batch data with the restricted unpickler; InputError on anything unexpected."""
    try:
        return _RestrictedUnpickler(data, where).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as exc:
        raise InputError(where, f"not a valid CIFAR-10 pickle ({exc.__class__.__name__}: {exc})") from None


def _get(d, key: str):
    """d[key] for Python 2 (bytes keys, loaded with encoding="bytes") or Python 3 (str keys) pickles."""
    if not isinstance(d, dict):
        return None
    return d[key.encode()] if key.encode() in d else d.get(key)


def _batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch -> (uint8 [n, 32, 32, 3] HWC, int64 [n])."""
    d = safe_unpickle(data, where)
    x, y = _get(d, "data"), _get(d, "labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        got = f"shape {x.shape}, dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise InputError(where, f"expected 'data' uint8 [n, 3072] (CIFAR-10 python format), got {got}")
    if y is None:
        hint = " (this looks like CIFAR-100, which is not supported)" if _get(d, "fine_labels") is not None else ""
        raise InputError(where, f"no 'labels' list{hint}")
    try:
        y = np.asarray(y)
    except (ValueError, TypeError):  # ragged nested lists
        raise InputError(where, f"expected {x.shape[0]} labels in 0..9, got a ragged {type(y).__name__}") from None
    if y.shape != (x.shape[0],) or y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() > 9)):
        raise InputError(where, f"expected {x.shape[0]} labels in 0..9, got {y.shape} {y.dtype}")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)  # CHW rows -> HWC


def _class_names(meta: bytes | None, where: str) -> list[str]:
    if meta is None:
        return list(CIFAR10_CLASSES)
    names = _get(safe_unpickle(meta, where), "label_names")
    if not isinstance(names, list) or len(names) != 10:
        return list(CIFAR10_CLASSES)
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _read_tar(path: str, wanted: list[str], where: str) -> dict[str, bytes]:
    """The members named in ``wanted`` (by base name) of a tar.gz, read into memory; nothing is extracted."""
    found: dict[str, bytes] = {}
    member = None  # the member being read, named in errors
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                base = posixpath.basename(m.name)
                if m.isfile() and base in wanted and base not in found:
                    member = base  # named like the batches in _batch: ARCHIVE/data_batch_1
                    found[base] = tf.extractfile(m).read()
                    member = None
                    if len(found) == len(wanted):
                        break
            if len(found) < len(wanted):
                # tarfile ends its listing quietly at a damaged or zeroed header: read the rest of the stream,
                # which shows a corrupt or truncated gzip file (and checks its CRC) or the data left unlisted.
                rest = 0
                while chunk := tf.fileobj.read(1 << 20):
                    rest += len(chunk)
                if rest > tarfile.RECORDSIZE:  # more than the end-of-archive padding
                    raise InputError(where, f"damaged tar archive: its listing stops at byte {tf.offset:,}, "
                                            f"{rest:,} bytes before the end")
    except (tarfile.TarError, *ARCHIVE_ERRORS) as exc:
        # A corrupt gzip stream may show only deep in the archive (zlib.error, EOFError, BadGzipFile)
        problem = f"not a readable tar.gz archive ({exc.__class__.__name__}: {exc})" \
            if isinstance(exc, tarfile.TarError) else archive_problem(exc)
        raise InputError(where if member is None else f"{where}/{member}", problem) from None
    return found


def find_batches_folder(path: str | os.PathLike) -> str | None:
    """The ``cifar-10-batches-py`` folder at or directly inside ``path``, or None."""
    path = os.fspath(path)
    if os.path.basename(os.path.normpath(path)) == FOLDER or os.path.isfile(os.path.join(path, "data_batch_1")):
        return path
    inner = os.path.join(path, FOLDER)
    return inner if os.path.isdir(inner) else None


def open_cifar10(path: str | os.PathLike, *, split: str | None = None, resolution: int | None = None,
                 labels: bool = False, name: str | None = None) -> ArraySource:
    """CIFAR-10 ``train`` (data_batch_1..5, 50k) or ``test`` (test_batch, 10k) split, labels included."""
    path = os.fspath(path)
    name = path if name is None else name
    split = split or "train"
    if split not in SPLITS:
        raise InputError(name, f"unknown CIFAR-10 split {split!r}; expected one of: {', '.join(SPLITS)}")
    wanted = SPLITS[split] + ["batches.meta"]
    if os.path.isdir(path):
        folder = find_batches_folder(path)
        if folder is None:
            raise InputError(name, f"no {FOLDER} folder here")
        found = {}
        for member in wanted:
            if os.path.isfile(os.path.join(folder, member)):
                try:
                    with open(os.path.join(folder, member), "rb") as f:
                        found[member] = f.read()
                except OSError as exc:
                    raise InputError(os.path.join(folder, member), f"cannot read it ({exc.strerror or exc})") \
                        from None
    else:
        found = _read_tar(path, wanted, name)
    missing = [m for m in SPLITS[split] if m not in found]
    if missing:
        raise InputError(name, f"not a CIFAR-10 python archive/folder: missing {', '.join(missing)} "
                               f"(expected {FOLDER}/data_batch_1..5, test_batch, batches.meta)")
    parts = [_batch(found[m], f"{name}/{m}") for m in SPLITS[split]]
    images = np.concatenate([p[0] for p in parts])  # one contiguous HWC copy
    label_arr = np.concatenate([p[1] for p in parts])
    class_names = _class_names(found.get("batches.meta"), f"{name}/batches.meta")
    src = ArraySource(name, images, labels=label_arr, class_names=class_names, resolution=resolution)
    src.kind = f"cifar10 {split}"
    return src
