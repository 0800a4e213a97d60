"""The image-source interface shared by every reader: lazy uint8 RGB blocks, labels, file names.

Limits: ``MAX_IMAGE_PIXELS`` = 8192 x 8192 = 67,108,864 pixels is the largest image sdmem decodes and the
largest ``--resolution`` it accepts (R x R). It is checked from the file header, before any pixel is decoded
or any array allocated, so a decompression bomb (a small PNG claiming a huge size) or an absurd resolution is
an InputError, not a MemoryError. No dataset image comes close (CIFAR-10: 32 x 32, ImageNet: about 500 x 375,
Stable Diffusion training crops: 512-1024 px). PIL's own limit (``Image.MAX_IMAGE_PIXELS``, about 89 M pixels)
only warns below twice its value; that warning is silenced, the cap here decides.
"""

from __future__ import annotations

import io
import mmap
import os
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

MAX_IMAGE_PIXELS = 8192 * 8192  # the one cap on image size and --resolution (see the module docstring)
_CAP = f"{MAX_IMAGE_PIXELS:,} pixels (8192x8192)"


def check_resolution(resolution, key: str = "--resolution") -> int | None:
    """None, or a positive integer R with R x R <= MAX_IMAGE_PIXELS (before anything is allocated)."""
    if resolution is None:
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise InputError(key, f"expected a positive integer, got {resolution!r}")
    if int(resolution) ** 2 > MAX_IMAGE_PIXELS:
        raise InputError(key, f"{resolution}x{resolution} is over the limit of {_CAP} per image")
    return int(resolution)


def display_name(name: str) -> str:
    """A file name as printable UTF-8 text: undecodable bytes of a POSIX name (kept by Python as
    surrogate escapes, PEP 383) become ``\\xff``; the real name is still used to open the file."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        try:
            return os.fsencode(name).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return name.encode("utf-8", "backslashreplace").decode("utf-8")


# What reading an archive member (zip, npz, tar.gz) can raise, at open or only when the member is read to its
# end: BadZipFile (bad header, bad CRC-32), zlib.error (corrupt deflate data), RuntimeError (zipfile: the member
# is encrypted), NotImplementedError (zipfile: an unsupported compression method), EOFError and OSError
# (truncated, BadGzipFile, bz2 errors), lzma.LZMAError (xz data).
try:
    from lzma import LZMAError
except ImportError:  # Python built without lzma
    LZMAError = zlib.error
ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, LZMAError, RuntimeError, NotImplementedError, EOFError, OSError)


def archive_problem(exc: BaseException) -> str:
    """The InputError problem for one of ARCHIVE_ERRORS."""
    kind = "zlib.error" if isinstance(exc, zlib.error) else exc.__class__.__name__  # zlib.error is named "error"
    what = f"{kind}: {exc}" if str(exc) else kind
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
        return "is encrypted (password-protected); sdmem reads unencrypted archives only"
    if isinstance(exc, NotImplementedError):
        return f"uses an unsupported compression method ({exc}); re-create the archive with deflate or no compression"
    if isinstance(exc, EOFError):
        return f"archive is truncated ({what})"
    return f"corrupt or unreadable archive data ({what})"


def to_rgb_array(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 [..., H, W] or [..., H, W, C] with C in 1, 2, 3, 4 -> uint8 [..., H, W, 3].

    The one colour rule of sdmem, also applied to decoded files: grey is copied to the three
    channels, alpha is dropped (what PIL's ``convert("RGB")`` does).
    """
    if arr.dtype != np.uint8:
        raise InputError(where, f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim >= 3 and arr.shape[-1] in (1, 2, 3, 4):
        c = arr.shape[-1]
        if c == 3:
            return arr
        if c == 4:
            return np.ascontiguousarray(arr[..., :3])
        return np.repeat(arr[..., :1], 3, axis=-1)  # grey or grey+alpha
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    raise InputError(where, f"expected an image array [H, W] or [H, W, C] with C in 1..4, got shape {arr.shape}")


def pil_to_rgb(img: Image.Image, where: str) -> np.ndarray:
    """A decoded PIL image -> uint8 [H, W, 3] by the same rule as :func:`to_rgb_array`."""
    if img.mode in _HIGH_DEPTH_MODES:
        raise InputError(where, f"{img.mode} images (16-bit or float) are not supported; save as 8-bit")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGB")
    return to_rgb_array(np.asarray(img), where)


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _open_image(data: bytes | str | BinaryIO, where: str) -> Image.Image:
    """Image.open, refusing images over MAX_IMAGE_PIXELS from the header alone, before anything is decoded."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise InputError(where, f"image is {w}x{h} = {w * h:,} pixels, over the limit of {_CAP}; "
                                "not decoded (possible decompression bomb)")
    return img


@contextmanager
def _image_errors(where: str):
    """Context: PIL's errors -> InputError; its DecompressionBombWarning never escapes (the cap above decides)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as exc:  # PIL's own limit, if a caller set it below ours
        raise InputError(where, f"image is over the limit of {_CAP} ({exc}); not decoded") from None
    except _DECODE_ERRORS as exc:
        raise InputError(where, f"unreadable or corrupt image ({exc.__class__.__name__}: {exc})") from None


def decode_image(data: bytes | str | BinaryIO, where: str) -> np.ndarray:
    """Decode one image file (path, bytes or open binary file) to uint8 [H, W, 3]; corrupt -> InputError."""
    with _image_errors(where), _open_image(data, where) as img:
        img.load()  # ImageFile.LOAD_TRUNCATED_IMAGES stays False: a truncated file is an error, never grey pixels
        return pil_to_rgb(img, where)


def center_crop_resize(img: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop uint8 [H, W, 3] to a square and resize it to resolution² with Lanczos."""
    h, w = img.shape[:2]
    if (h, w) == (resolution, resolution):
        return img
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    pil = Image.fromarray(img[top : top + s, left : left + s])
    if s != resolution:
        pil = pil.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(pil)


class ImageSource:
    """N images read lazily as uint8 RGB blocks [n, H, W, 3].

    Attributes:
        name: the SRC string as the user gave it (used in messages).
        files: one identifier per image (relative path, or ``name[i]`` for arrays), len N.
        labels: int64 [N] or None.
        class_names: names for label values, or None.
        shape: (H, W, 3) of every image returned (after ``resolution``).
    """

    name: str
    kind: str = "images"  # what the source is, for describe(): "cifar10 train", "image folder", ...
    files: list[str]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def dim(self) -> int:
        """C·H·W, the feature dimension of one flattened image."""
        h, w, c = self.shape
        return h * w * c

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] for the given image indices."""
        raise NotImplementedError

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.read(np.arange(start, stop))

    def iter_blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, uint8 [n, H, W, 3]) over the whole source, in order, n <= block_size."""
        for start in range(0, len(self), block_size):
            yield start, self.read_range(start, min(start + block_size, len(self)))

    def load(self) -> np.ndarray:
        """All images at once, uint8 [N, H, W, 3]."""
        return self.read_range(0, len(self))


class ArraySource(ImageSource):
    """Images held in an array (possibly memory-mapped) of shape [N, H, W] or [N, H, W, C]."""

    def __init__(self, name: str, images: np.ndarray, *, files: list[str] | None = None,
                 labels: np.ndarray | None = None, class_names: list[str] | None = None,
                 resolution: int | None = None):
        if images.dtype != np.uint8:
            raise InputError(name, f"expected uint8 images, got dtype {images.dtype}")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 2, 3, 4)):
            raise InputError(name, f"expected images of shape N×H×W×C with C in 1, 3 (or 2, 4), got {images.shape}")
        self.name = name
        self._images = images
        self.files = files if files is not None else [f"{i:06d}" for i in range(images.shape[0])]
        self.labels = labels
        self.class_names = class_names
        self.resolution = resolution = check_resolution(resolution)
        h, w = images.shape[1:3]
        self.shape = (resolution, resolution, 3) if resolution else (h, w, 3)

    def read(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and np.all(np.diff(idx) == 1):
            block = np.asarray(self._images[idx[0] : idx[-1] + 1])  # contiguous: slice (fast on memmaps)
        else:
            block = np.asarray(self._images[idx])
        block = to_rgb_array(block, self.name) if block.ndim == 4 else to_rgb_array(block[..., None], self.name)
        if self.resolution:
            block = np.stack([center_crop_resize(im, self.resolution) for im in block]) if len(block) else \
                np.zeros((0, *self.shape), np.uint8)
        block = np.ascontiguousarray(block)
        # a fresh, writable array: never a view that would let a caller change (or fail to write) the source
        block = block.copy() if np.may_share_memory(block, self._images) else block
        release_pages(self._images)
        return block


def release_pages(arr: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident memory (they stay in the page cache).

    Streaming a training file larger than RAM through a memmap would otherwise leave every page read so far
    mapped and resident; with this, memory stays at one block whatever the file size.
    """
    mm = getattr(arr, "_mmap", None)  # np.memmap keeps its mmap.mmap object here
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class FileSource(ImageSource):
    """Images decoded one by one from files: ``loader(i) -> bytes or path`` for image i.

    Sizes are checked up front from the file headers (cheap), so mixed sizes fail before any work.
    """

    def __init__(self, name: str, files: list[str], loader: Callable[[int], bytes | str],
                 sizes: list[tuple[int, int]], *, labels: np.ndarray | None = None,
                 class_names: list[str] | None = None, resolution: int | None = None):
        self.name = name
        self.files = files
        self._loader = loader
        self.labels = labels
        self.class_names = class_names
        self.resolution = resolution = check_resolution(resolution)
        if not files:
            raise InputError(name, "no images found")
        if resolution:
            self.shape = (resolution, resolution, 3)
        else:
            distinct = sorted(set(sizes))
            if len(distinct) > 1:
                first = sizes[0]
                other = next(i for i, s in enumerate(sizes) if s != first)
                raise InputError(name, f"images have different sizes ({files[0]} is {first[1]}x{first[0]}, "
                                       f"{files[other]} is {sizes[other][1]}x{sizes[other][0]}); "
                                       "pass --resolution R to centre-crop and resize them")
            h, w = sizes[0]
            self.shape = (h, w, 3)

    def read(self, indices) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), np.uint8)
        for k, i in enumerate(indices):
            where = f"{self.name}/{self.files[i]}" if not self.files[i].startswith(self.name) else self.files[i]
            img = decode_image(self._loader(int(i)), where)
            if self.resolution:
                img = center_crop_resize(img, self.resolution)
            elif img.shape != self.shape:
                raise InputError(where, f"decoded to {img.shape[1]}x{img.shape[0]}, expected "
                                        f"{self.shape[1]}x{self.shape[0]} like the header said")
            out[k] = img
        return out


def image_size(data: bytes | str | BinaryIO, where: str) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels (over MAX_IMAGE_PIXELS: InputError)."""
    with _image_errors(where), _open_image(data, where) as img:
        w, h = img.size
        return h, w
