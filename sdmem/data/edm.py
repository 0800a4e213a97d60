"""EDM datasets (NVlabs/edm ``dataset_tool.py``): a zip or folder of PNGs plus an optional ``dataset.json``."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from ..errors import InputError
from .base import ARCHIVE_ERRORS, FileSource, archive_problem, display_name, image_size
from .folder import file_source, select_images, walk_files

# dataset.json (edm/dataset_tool.py): {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null};
# EDM's ImageFolderDataset lists every image file (any depth), sorted by relative path, and maps labels by name.


class ZipLoader:
    """``loader(i)`` for FileSource: the bytes of member i. The zip is opened lazily, once per process."""

    def __init__(self, path: str, files: list[str], name: str | None = None):
        self.path = path
        self.files = files
        self.name = path if name is None else name  # in messages
        self._zip: zipfile.ZipFile | None = None
        self._pid = None

    def zip(self) -> zipfile.ZipFile:
        """The open zip, (re)opened after pickling or in a forked worker (a shared file offset would race)."""
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def __call__(self, i: int) -> bytes:
        # A bad CRC-32, corrupt deflate data or a file truncated since it was opened shows only now, when the
        # member is read to its end (open_edm_zip reads just the headers).
        try:
            return self.zip().read(self.files[i])
        except ARCHIVE_ERRORS as exc:
            raise InputError(f"{self.name}/{self.files[i]}", archive_problem(exc)) from None

    def close(self) -> None:
        """Close the zip if open (it reopens on the next read)."""
        if self._zip is not None:
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return {"path": self.path, "files": self.files, "name": self.name, "_zip": None, "_pid": None}


def _parse_labels(text: bytes | str, where: str) -> dict[str, int] | None:
    """{relative path: class} from dataset.json, or None for ``"labels": null``."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(where, f"not valid JSON ({exc})") from None
    except RecursionError:  # e.g. "[[[[...": nesting deeper than the parser's recursion limit
        raise InputError(where, "not valid JSON (nested too deeply)") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputError(where, 'expected {"labels": [["file.png", class], ...]} or {"labels": null}')
    if meta["labels"] is None:
        return None
    try:
        pairs = dict(meta["labels"])
    except (TypeError, ValueError):
        raise InputError(where, 'expected "labels" to be a list of [file name, class] pairs') from None
    bad = next((k for k, v in pairs.items()
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63), None)  # int64 labels
    if bad is not None:
        raise InputError(where, f"expected a class index >= 0 for {bad}, got {pairs[bad]!r} "
                                "(sdmem reads class labels only, not label vectors)")
    return {str(k).replace("\\", "/"): v for k, v in pairs.items()}


def _labels_for(files: list[str], table: dict[str, int] | None, name: str, json_where: str | None,
                required: bool) -> np.ndarray | None:
    if table is None:
        if required:
            why = "has no dataset.json" if json_where is None else "has a dataset.json whose labels are null"
            raise InputError(name, f"labels were asked for, but this EDM dataset {why} "
                                   '(expected {"labels": [["00000/img00000000.png", 6], ...]})')
        return None
    missing = next((f for f in files if f not in table), None)
    if missing is not None:
        raise InputError(json_where, f"no label for {display_name(missing)}")
    return np.array([table[f] for f in files], np.int64)


def open_edm_zip(path: str | os.PathLike, *, resolution: int | None = None, labels: bool = False,
                 name: str | None = None) -> FileSource:
    """An EDM dataset zip: images read lazily from the zip, labels from its ``dataset.json``."""
    path = os.fspath(path)
    name = path if name is None else name
    loader = ZipLoader(path, [], name)
    member = None  # the member being read, named in errors
    try:
        zf = loader.zip()
        members = sorted(n for n in zf.namelist() if not n.endswith("/"))
        json_name = "dataset.json" if "dataset.json" in members else None
        member = json_name
        table = _parse_labels(zf.read(json_name), f"{name}/dataset.json") if json_name else None
        member = None
        files = [f for f in members if not any(p.startswith(".") or p == "__MACOSX" for p in f.split("/"))]
        try:
            files = select_images(files, name, what="zip")
        except InputError as exc:
            raise InputError(name, f"not an EDM dataset zip (PNG images plus an optional dataset.json): "
                                   f"{exc.problem}") from None
        label_arr = _labels_for(files, table, name, json_name and f"{name}/dataset.json", labels)
        loader.files = files
        sizes = []
        for member in files:
            with zf.open(member) as f:  # the header only: PIL reads the first bytes
                sizes.append(image_size(f, f"{name}/{member}"))
    except ARCHIVE_ERRORS as exc:
        loader.close()
        if member is None:
            raise InputError(name, f"not a readable zip ({exc.__class__.__name__}: {exc})") from None
        raise InputError(f"{name}/{member}", archive_problem(exc)) from None
    except BaseException:
        loader.close()
        raise
    src = FileSource(name, files, loader, sizes, labels=label_arr, resolution=resolution)
    src.kind = "EDM zip"
    return src


def open_edm_folder(path: str | os.PathLike, *, resolution: int | None = None, labels: bool = False,
                    name: str | None = None) -> FileSource:
    """An EDM dataset folder (images at any depth, ``dataset.json`` at the root)."""
    path = os.fspath(path)
    name = path if name is None else name
    json_path = os.path.join(path, "dataset.json")
    table = None
    if os.path.isfile(json_path):
        try:
            with open(json_path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise InputError(json_path, f"cannot read it ({exc.strerror or exc})") from None
        table = _parse_labels(text, json_path)
    files = select_images(walk_files(path), name)
    label_arr = _labels_for(files, table, name, json_path if os.path.isfile(json_path) else None, labels)
    return file_source(name, path, files, labels=label_arr, resolution=resolution, kind="EDM folder")
