"""FID statistics: feature moments streamed in batches, EDM's statistics files, and the reference cache."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .inception import FEATURE_DIM, Extractor, cache_root

STATS_VERSION = 1


# Statistics.

@dataclass
class Stats:
    """Mean and covariance of the features of ``num`` images (num is None for a file that does not say)."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int | None = None
    source: str = ""


class _Moments:
    """Running mean and scatter matrix in float64, merged batch by batch (Chan et al.): numerically stable,
    memory independent of the number of images."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        m = len(x)
        if m == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        delta = mean_b - self.mean
        total = self.n + m
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def stats(self, source: str) -> Stats:
        sigma = self.scatter / (self.n - 1)
        return Stats(self.mean.copy(), (sigma + sigma.T) / 2, self.n, source)


def source_stats(source, extractor: Extractor, *, batch: int = 64, progress: bool = False) -> Stats:
    """Feature statistics of an ImageSource, streamed in batches."""
    n = len(source)
    if n < 2:
        raise InputError(source.name, f"holds {n} image(s); FID needs at least 2 (a covariance)")
    acc = _Moments(FEATURE_DIM)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"Inception features {source.name}", unit="img", leave=False)
    try:
        for start in range(0, n, batch):
            images = source.read_range(start, min(start + batch, n))
            acc.add(extractor.features(images))
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    return acc.stats(source.name)


def read_stats(path: str | os.PathLike, *, required: bool = True) -> Stats | None:
    """EDM's reference statistics (an .npz with ``mu`` [2048] and ``sigma`` [2048, 2048]); sdmem's cache files are
    the same format with extra keys. ``required=False``: None for an .npz with neither mu nor sigma (images)."""
    where = os.fspath(path)
    try:
        with np.load(where, allow_pickle=False) as z:
            keys = list(z.files)
            if "mu" not in keys and "sigma" not in keys and not required:
                return None  # not statistics (an .npz of images, say)
            if "mu" not in keys or "sigma" not in keys:
                missing = " and ".join(k for k in ("mu", "sigma") if k not in keys)
                raise InputError(where, f"not FID reference statistics: no {missing} array (keys: "
                                        f"{', '.join(keys) or 'none'}); expected mu [{FEATURE_DIM}] and sigma "
                                        f"[{FEATURE_DIM}, {FEATURE_DIM}] as EDM's fid.py writes them")
            mu, sigma = z["mu"], z["sigma"]
            num = int(z["num_images"]) if "num_images" in keys and z["num_images"].size == 1 else None
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(where, f"not a readable .npz of FID statistics ({exc.__class__.__name__}: {exc})") from None
    for name, arr, shape in (("mu", mu, (FEATURE_DIM,)), ("sigma", sigma, (FEATURE_DIM, FEATURE_DIM))):
        if arr.dtype.kind not in "fiu":
            raise InputError(where, f"{name} has dtype {arr.dtype}; expected floating point numbers")
        if arr.shape != shape:
            raise InputError(where, f"{name} has shape {list(arr.shape)}; expected {list(shape)} (Inception-v3 "
                                    "pool3 features)")
        if not np.all(np.isfinite(arr)):
            raise InputError(where, f"{name} holds non-finite values (NaN or inf)")
    return Stats(mu.astype(np.float64), sigma.astype(np.float64), num, where)


def write_stats(path: str | os.PathLike, stats: Stats, **meta) -> None:
    """Statistics in EDM's format (mu, sigma) plus ``num_images`` and any ``meta`` strings, written atomically."""
    from ..utils import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
            np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.num or 0),
                     version=np.int64(STATS_VERSION), **{k: np.str_(v) for k, v in meta.items()})

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def pixels_key(source, extractor_digest: str, *, block: int = 1024) -> str:
    """sha256 over a source's shape, size and every pixel (streamed), and the weights' digest."""
    h = hashlib.sha256()
    h.update(f"sdmem-fid-ref v{STATS_VERSION}|{list(source.shape)}|{len(source)}|{extractor_digest}\n".encode())
    for start in range(0, len(source), block):
        h.update(np.ascontiguousarray(source.read_range(start, min(start + block, len(source)))).tobytes())
    return h.hexdigest()


def reference_stats(source, extractor: Extractor, *, batch: int = 64, progress: bool = False,
                    cache: bool = True) -> tuple[Stats, Path | None]:
    """Statistics of a reference (training) image set, cached under ``<cache>/fid-ref/``: (stats, cache file)."""
    if not cache:
        return source_stats(source, extractor, batch=batch, progress=progress), None
    path = cache_root() / "fid-ref" / f"{pixels_key(source, extractor.digest)[:32]}.npz"
    if path.is_file():
        try:
            cached = read_stats(path)
            if cached.num == len(source):
                cached.source = source.name
                return cached, path
        except InputError:
            pass  # a damaged cache file is recomputed and replaced
    stats = source_stats(source, extractor, batch=batch, progress=progress)
    try:
        write_stats(path, stats, source=source.name, weights_digest=extractor.digest)
    except OSError as exc:  # an unwritable cache is not the user's input problem: computed, just not kept
        print(f"sdmem: warning: FID statistics not cached in {path.parent} ({exc.strerror or exc})", file=sys.stderr)
        return stats, None
    return stats, path


