"""`audit()`: the Python face of `sdmem audit`, returning an :class:`AuditReport`."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..data import ArraySource, ImageSource, open_source
from ..errors import InputError
from . import report as rep
from .knn import search_top2
from .replicas import bootstrap_interval, distance_ratio, parse_threshold, replica_flags, rms_distance

GRID_MAX = 32  # replicas shown in replicas.png (two rows of 16 pairs)


@dataclass
class AuditReport:
    """Everything an audit found; ``summary()`` is what summary.json holds."""

    train: ImageSource
    generated: ImageSource
    threshold: Fraction
    backend: str
    device: str
    seconds: float
    num_distinct_train: int
    num_duplicates: int
    nn1_index: np.ndarray
    nn2_index: np.ndarray
    nn1_distance: np.ndarray
    nn2_distance: np.ndarray
    ratio: np.ndarray
    replica: np.ndarray
    ci95: tuple[float, float] = field(default=(float("nan"), float("nan")))
    fid: float | None = None  # FID against the training set, when asked for (`sdmem audit --fid`)

    @property
    def memorization_ratio(self) -> float:
        return float(np.mean(self.replica)) if len(self.replica) else float("nan")

    @property
    def knn_distance(self) -> float:
        """Mean distance to the nearest training image (paper Eq. 63), RMS in 0–255 units."""
        return float(np.mean(self.nn1_distance)) if len(self.nn1_distance) else float("nan")

    @property
    def num_replicas(self) -> int:
        return int(np.sum(self.replica))

    def summary(self) -> dict:
        h, w, c = self.train.shape
        return {
            "memorization_ratio": self.memorization_ratio,
            "memorization_ratio_ci95": list(self.ci95),
            "knn_distance": self.knn_distance,
            "num_generated": len(self.generated),
            "num_train": len(self.train),
            "num_train_distinct": self.num_distinct_train,
            "num_train_duplicates": self.num_duplicates,
            "num_replicas": self.num_replicas,
            "threshold": float(self.threshold),
            "threshold_exact": str(self.threshold),
            "distance": "RMS per-pixel l2 in 0-255 units, ||a-b||_2 / sqrt(C*H*W)",
            "image_shape": [h, w, c],
            "backend": self.backend,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "train_source": self.train.name,
            "generated_source": self.generated.name,
        } | ({"fid": self.fid} if self.fid is not None else {})

    def one_line(self) -> str:
        lo, hi = self.ci95
        return (f"memorization ratio {100 * self.memorization_ratio:.2f}% "
                f"[95% CI {100 * lo:.2f}-{100 * hi:.2f}] ({self.num_replicas}/{len(self.generated)} replicas), "
                f"KNN distance {self.knn_distance:.3f}, train {len(self.train)} images "
                f"({self.num_duplicates} duplicates), {self.backend}/{self.device}, {self.seconds:.1f} s"
                + (f", FID {self.fid:.2f}" if self.fid is not None else ""))

    def per_sample(self) -> dict[str, np.ndarray | list]:
        return {"index": np.arange(len(self.generated)), "file": self.generated.files,
                "nn1_index": self.nn1_index, "nn1_distance": self.nn1_distance, "nn2_index": self.nn2_index,
                "nn2_distance": self.nn2_distance, "ratio": self.ratio, "replica": self.replica}

    def grid(self, max_pairs: int = GRID_MAX) -> tuple[np.ndarray, int]:
        """The strongest replicas (lowest d1/d2) above their nearest training images; if there are none,
        the closest non-replicas. Returns (image, how many shown are replicas)."""
        order = np.lexsort((np.arange(len(self.ratio)), self.ratio))[:max_pairs]
        top = self.generated.read(np.sort(order))
        pos = {i: k for k, i in enumerate(np.sort(order))}
        top = top[[pos[i] for i in order]]
        nn = self.nn1_index[order]
        uniq, inv = np.unique(nn, return_inverse=True)
        bottom = self.train.read(uniq)[inv]
        return rep.image_grid(top, bottom), int(np.sum(self.replica[order]))

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write summary.json, per_sample.csv, replicas.png and ratio_hist.png into out_dir."""
        summary = self.summary()
        grid, shown = self.grid() if len(self.generated) else (None, 0)
        summary["grid"] = {"file": "replicas.png", "pairs": int(min(GRID_MAX, len(self.generated))),
                           "replicas_shown": shown,
                           "layout": "top row generated, bottom row its nearest training image"}
        title = (f"{len(self.ratio)} generated: {self.num_replicas} replicas "
                 f"({100 * self.memorization_ratio:.2f}%)")
        writers = {
            "summary.json": lambda p: rep.write_json(p, summary),
            "per_sample.csv": lambda p: rep.write_per_sample_csv(p, self.per_sample()),
            "ratio_hist.png": lambda p: rep.write_histogram(p, self.ratio, float(self.threshold), title=title),
        }
        if grid is not None:
            writers["replicas.png"] = lambda p: rep.write_png(p, grid)
        return rep.write_outputs(out_dir, writers)


def as_source(src, *, resolution: int | None, what: str) -> ImageSource:
    """A SRC string/path, an ImageSource or a uint8 array -> ImageSource."""
    if isinstance(src, ImageSource):
        return src
    if isinstance(src, np.ndarray):
        return ArraySource(what, src, resolution=resolution)
    return open_source(src, resolution=resolution)


def audit(train, generated, *, out: str | os.PathLike | None = None, backend: str = "auto",
          device: str = "auto", threshold: str | float | Fraction = "1/3", resolution: int | None = None,
          dedup: bool = True, progress: bool = True, bootstrap_seed: int = 0, fid: bool = False,
          fid_weights: str | os.PathLike | None = None) -> AuditReport:
    """Audit generated images against a training set with the paper's replica rule, in this process.

    Both sets stream: the training set in blocks, the generated set in chunks (see
    :func:`~sdmem.audit.knn.search_top2`), so neither has to fit in memory.

    Args:
        train, generated: an image SRC (folder, npz, EDM zip/folder, CIFAR archive, Imagenette, ``hf:``),
            an :class:`ImageSource`, or a uint8 array [N, H, W, C].
        out: when given, the folder that receives summary.json, per_sample.csv and the pictures; one that
            cannot be created or written is refused before the search (:func:`check_out`).
        backend: ``auto`` | ``int8`` | ``faiss`` | ``torch``; device: ``auto`` | ``cpu`` | ``cuda``.
        threshold: replica iff d1/d2 < threshold (strict), default 1/3.
        resolution: centre-crop and Lanczos-resize both sets to this square size.
        dedup: search over distinct training images (exact duplicates would give d1 = d2).
        fid: also the FID of the generated set against the training set (``report.fid``, in summary.json);
            fid_weights: the Inception-v3 weights file (default: see :func:`sdmem.fid.default_weights_path`).
    """
    extractor = _fid_extractor(fid_weights, device) if fid else None  # a missing or wrong file fails before any work
    if out is not None:
        check_out(out)  # an --out that cannot be written fails before the search, not after it
    result = _audit(train, generated, backend=backend, device=device, threshold=threshold, resolution=resolution,
                    dedup=dedup, progress=progress, bootstrap_seed=bootstrap_seed, comm=None)
    if extractor is not None:
        result.fid = _fid_against_train(result, extractor, progress)
    if out is not None:
        result.save(out)
    return result


def audit_distributed(train, generated, *, out: str | os.PathLike | None = None, backend: str = "auto",
                      device: str = "auto", threshold: str | float | Fraction = "1/3", resolution: int | None = None,
                      dedup: bool = True, progress: bool = True, bootstrap_seed: int = 0, fid: bool = False,
                      fid_weights: str | os.PathLike | None = None) -> AuditReport | None:
    """:func:`audit`, sharded over the processes of a launcher (``accelerate launch``, ``torchrun``).

    Without a launcher (torch.distributed not initialised and WORLD_SIZE unset or 1) this is :func:`audit`.
    Under one, each process streams its contiguous share of the training set against all generated images;
    candidates and duplicates are merged exactly across processes (see :mod:`sdmem.audit.shard`), so flags,
    distances and neighbours are identical to a single-process audit. torch.distributed is initialised
    through accelerate's ``PartialState`` when needed (and destroyed when the process exits). Every process
    must call this with the same arguments.

    Rank 0 alone writes ``out``; its failures are every process's: an ``out`` it cannot create or write is
    refused on every process before the search, and a failure while it computes the FID or writes the report
    is raised on every process too (the same InputError), so none exits 0 while rank 0 fails.

    Returns:
        The report on the main process (rank 0); None on the others.
    """
    from .shard import launched, process_group

    kw = dict(backend=backend, device=device, threshold=threshold, resolution=resolution, dedup=dedup,
              bootstrap_seed=bootstrap_seed)
    if not launched():
        return audit(train, generated, out=out, progress=progress, fid=fid, fid_weights=fid_weights, **kw)
    # Every process checks the FID weights first (the same refusal everywhere); rank 0 alone computes the FID.
    extractor = _fid_extractor(fid_weights, "cpu") if fid else None
    with process_group(device) as comm:
        return _audit_sharded(train, generated, comm, out=out, progress=progress, extractor=extractor, **kw)


def _audit_sharded(train, generated, comm, *, out, progress, extractor, **kw) -> AuditReport | None:
    """One process's part of :func:`audit_distributed` (``comm``: its collectives)."""
    if out is not None:  # rank 0 will write out: it checks that it can, and every process learns the outcome
        comm.check_main(_failure(check_out, out) if comm.rank == 0 else None)
    result = _audit(train, generated, progress=progress and comm.rank == 0, comm=comm, **kw)
    err = None
    if comm.rank == 0:
        def finish():
            if extractor is not None:
                result.fid = _fid_against_train(result, extractor.to(kw["device"]), progress)
            if out is not None:
                result.save(out)  # before the closing barrier: the outputs exist when every process returns
        err = _failure(finish)
    comm.check_main(err)
    return result if comm.rank == 0 else None


def _failure(fn, *args) -> BaseException | None:
    """``fn(*args)``'s exception (None when it returns), to be shared with the other processes."""
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 (re-raised on this process by Comm.check_main)
        return exc
    return None


def check_out(out: str | os.PathLike) -> None:
    """InputError (as :func:`~sdmem.audit.report.write_outputs` would raise it at the end) unless ``out`` can be
    created and written: the folders it lacks and a temporary folder inside are made and removed again."""
    path = Path(out)
    created = path  # the outermost folder the probe creates (None: path exists already)
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    created = None if path.exists() else created
    rep.write_outputs(path, {})
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def _fid_extractor(weights, device):
    from ..fid import load_extractor

    return load_extractor(weights, device=device, option="--fid-weights")


def _fid_against_train(result: AuditReport, extractor, progress: bool) -> float:
    from ..fid import compute_fid

    return compute_fid(result.generated, result.train, extractor=extractor, progress=progress).fid


def _audit(train, generated, *, backend, device, threshold, resolution, dedup, progress, bootstrap_seed,
           comm) -> AuditReport:
    if comm is None:
        t, train_src, gen_src = _open(train, generated, threshold, resolution)
    else:  # a refusal on one process (say a file missing on one node) is raised on every process
        err = opened = None
        try:
            opened = _open(train, generated, threshold, resolution)
        except Exception as exc:  # noqa: BLE001 (re-raised on this process by comm.check)
            err = exc
        comm.check(err)
        t, train_src, gen_src = opened
        comm.agree({"threshold": str(t), "resolution": resolution})
    start = time.perf_counter()
    top2 = search_top2(gen_src, train_src, backend=backend, device=device, dedup=dedup, progress=progress,
                       comm=comm)
    seconds = time.perf_counter() - start
    flags = replica_flags(top2.sqdist, t)
    return AuditReport(
        train=train_src, generated=gen_src, threshold=t, backend=top2.backend, device=top2.device,
        seconds=seconds, num_distinct_train=top2.num_distinct, num_duplicates=top2.num_train - top2.num_distinct,
        nn1_index=top2.index[:, 0], nn2_index=top2.index[:, 1],
        nn1_distance=rms_distance(top2.sqdist[:, 0], train_src.dim),
        nn2_distance=rms_distance(top2.sqdist[:, 1], train_src.dim),
        ratio=distance_ratio(top2.sqdist), replica=flags,
        ci95=bootstrap_interval(flags, seed=bootstrap_seed),
    )


def _open(train, generated, threshold, resolution) -> tuple[Fraction, ImageSource, ImageSource]:
    t = parse_threshold(threshold)
    if resolution is not None and (not isinstance(resolution, int) or resolution <= 0):
        raise InputError("--resolution", f"expected a positive integer, got {resolution!r}")
    train_src = as_source(train, resolution=resolution, what="train")
    gen_src = as_source(generated, resolution=resolution, what="generated")
    if len(gen_src) == 0:
        raise InputError(gen_src.name, "holds no images")
    if gen_src.shape != train_src.shape:
        gh, gw, _ = gen_src.shape
        th, tw, _ = train_src.shape
        raise InputError(gen_src.name, f"generated images are {gw}x{gh} but training images ({train_src.name}) "
                                       f"are {tw}x{th}; pass --resolution R to compare both at R x R")
    return t, train_src, gen_src
