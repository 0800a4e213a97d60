"""A folder of image files, read recursively; optional labels from the first sub-folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import FileSource, check_resolution, display_name, image_size

SUPPORTED_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _hidden(name: str) -> bool:
    # dot-files (.DS_Store, macOS "._x.png" resource forks, .ipynb_checkpoints) and zip junk are never images
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    """Whether a file name has a supported image extension (case-insensitive) and is not hidden."""
    base = name.rsplit("/", 1)[-1]
    return not _hidden(base) and base.lower().endswith(SUPPORTED_IMAGE_EXTENSIONS)


def _walk_error(exc: OSError):
    # os.walk skips a folder it cannot list unless told: its images would silently be missing
    raise InputError(display_name(exc.filename or "?"), f"cannot list this folder ({exc.strerror or exc})")


def walk_files(root: str | os.PathLike) -> list[str]:
    """Every non-hidden file under root, as relative POSIX paths, sorted."""
    root = os.fspath(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else Path(rel).as_posix() + "/"
        out.extend(prefix + f for f in filenames if not _hidden(f))
    return sorted(out)


def select_images(all_files: list[str], where: str, *, what: str = "folder") -> list[str]:
    """The supported images among ``all_files`` (sorted); InputError if none."""
    files = sorted(f for f in all_files if is_image_name(f))
    if not files:
        if not all_files:
            raise InputError(where, f"{what} is empty")
        sample = ", ".join(map(display_name, all_files[:3])) + (", ..." if len(all_files) > 3 else "")
        raise InputError(where, f"no supported images among {len(all_files)} file(s) ({sample}); supported extensions: "
                                f"{', '.join(SUPPORTED_IMAGE_EXTENSIONS)} (any case)")
    return files


def list_images(root: str | os.PathLike, where: str) -> list[str]:
    """Relative POSIX paths of the supported images under ``root`` (recursive), sorted."""
    return select_images(walk_files(root), where)


def folder_labels(files: list[str], where: str) -> tuple[np.ndarray, list[str]]:
    """Label = index of the first sub-folder in the sorted first-level folder names."""
    at_root = [f for f in files if "/" not in f]
    if at_root:
        more = f" and {len(at_root) - 1} more images are" if len(at_root) > 1 else " is"
        raise InputError(where, f"labels need every image inside a class sub-folder, but "
                                f"{display_name(at_root[0])}{more} directly in the folder")
    firsts = [display_name(f.split("/", 1)[0]) for f in files]  # class names go into reports: UTF-8 text
    class_names = sorted(set(firsts))
    index = {c: k for k, c in enumerate(class_names)}
    return np.array([index[c] for c in firsts], np.int64), class_names


class PathLoader:
    """``loader(i)`` for FileSource: the path of image i (picklable, for worker processes)."""

    def __init__(self, root: str | os.PathLike, files: list[str]):
        self.root = os.fspath(root)
        self.files = files

    def __call__(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])


def file_source(name: str, root: str | os.PathLike, files: list[str], *, labels: np.ndarray | None = None,
                class_names: list[str] | None = None, resolution: int | None = None,
                kind: str = "image folder") -> FileSource:
    """A FileSource over files under ``root``; sizes are read from the headers now (corrupt headers fail here).

    The loader opens the real names; ``source.files`` holds their printable UTF-8 forms (:func:`display_name`),
    so a non-UTF-8 name (bytes that are not UTF-8, on POSIX) can go into summary.json and per_sample.csv.
    """
    check_resolution(resolution)
    loader = PathLoader(root, files)
    shown = [display_name(f) for f in files]
    sizes = [image_size(loader(i), f"{name.rstrip('/')}/{f}") for i, f in enumerate(shown)]
    src = FileSource(name, shown, loader, sizes, labels=labels, class_names=class_names, resolution=resolution)
    src.kind = kind
    return src


def open_folder(path: str | os.PathLike, *, resolution: int | None = None, labels: bool = False,
                name: str | None = None) -> FileSource:
    """A folder of images (recursive); with ``labels`` the first sub-folder is the class."""
    name = os.fspath(path) if name is None else name
    if not os.path.isdir(path):
        raise InputError(name, "expected a folder of images")
    files = list_images(path, name)
    label_arr, class_names = folder_labels(files, name) if labels else (None, None)
    return file_source(name, path, files, labels=label_arr, class_names=class_names, resolution=resolution)
