"""Audit outputs: summary.json, per_sample.csv, the replica grid (paper Fig. 1 layout) and the ratio histogram."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

PER_SAMPLE_COLUMNS = ["index", "file", "nn1_index", "nn1_distance", "nn2_index", "nn2_distance", "ratio", "replica"]


def write_outputs(out_dir: str | os.PathLike, writers: dict[str, Callable[[Path], None]]) -> list[Path]:
    """Write every file into a temporary folder inside ``out_dir``, then move each into place (atomic per file).

    The temporary folder (``out_dir/.tmp-XXXX``) is on the same file system as its target, so every move is
    a rename. A failure while writing leaves ``out_dir`` as it was: nothing half-written, and a folder this
    call created is removed again. An OSError (read-only, disk full, ``out_dir`` is a file) is an InputError.
    """
    from ..errors import InputError

    out = Path(out_dir)
    created = out  # the outermost folder this call creates (None: out exists already)
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    created = None if out.exists() else created
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
        for name, write in writers.items():
            write(tmp / name)
        placed = []
        for name in writers:
            os.replace(tmp / name, out / name)
            placed.append(out / name)
        return placed
    except BaseException as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        if out.exists() and not out.is_dir():
            raise InputError(out, "exists and is not a folder; expected a folder for the outputs") from None
        why = exc.strerror or str(exc)
        raise InputError(out, f"cannot write the outputs here ({why}"
                              + (f": {exc.filename}" if exc.filename else "") + ")") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_per_sample_csv(path: Path, rows: dict[str, np.ndarray | list]) -> None:
    """One row per generated image, in input order, with the columns of PER_SAMPLE_COLUMNS."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PER_SAMPLE_COLUMNS)
    n = len(rows["index"])
    for i in range(n):
        w.writerow([
            int(rows["index"][i]), rows["file"][i], int(rows["nn1_index"][i]), f"{rows['nn1_distance'][i]:.6f}",
            int(rows["nn2_index"][i]), f"{rows['nn2_distance'][i]:.6f}", f"{rows['ratio'][i]:.6f}",
            int(bool(rows["replica"][i])),
        ])
    path.write_text(buf.getvalue())


def image_grid(top: np.ndarray, bottom: np.ndarray, *, columns: int = 16, gutter: int = 2,
               min_cell: int = 64) -> np.ndarray:
    """Pairs of rows, generated images above their nearest training images (paper Fig. 1).

    ``top`` and ``bottom`` are uint8 [K, H, W, 3]; small images are enlarged by an integer factor
    (nearest neighbour) so a 32×32 picture stays legible; cells are separated by white gutters.
    """
    k, h, w, _ = top.shape
    scale = max(1, -(-min_cell // max(h, w)))
    if scale > 1:
        top = top.repeat(scale, 1).repeat(scale, 2)
        bottom = bottom.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    cols = min(columns, k)
    pairs = -(-k // cols)
    height = pairs * (2 * h + gutter) + (pairs - 1) * 3 * gutter + 2 * gutter
    width = cols * (w + gutter) + gutter
    grid = np.full((height, width, 3), 255, np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        y = gutter + r * (2 * h + 4 * gutter)
        x = gutter + c * (w + gutter)
        grid[y : y + h, x : x + w] = top[i]
        grid[y + h + gutter : y + 2 * h + gutter, x : x + w] = bottom[i]
    return grid


def write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG")


def write_histogram(path: Path, ratio: np.ndarray, threshold: float, *, title: str = "") -> None:
    """Histogram of d1/d2 over the generated images with the replica threshold marked."""
    # The object-oriented Agg API: no pyplot import (≈0.8 s) and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(np.clip(ratio, 0, 1), bins=np.linspace(0, 1, 51), color="#4477aa", edgecolor="white", linewidth=0.4)
    ax.axvline(threshold, color="#cc3311", linestyle="--", linewidth=1.5,
               label=f"threshold {threshold:.3g} (replica if d1/d2 < it)")
    share = float(np.mean(ratio < threshold)) if len(ratio) else 0.0
    ax.set_xlabel("d1 / d2 (nearest / second-nearest training distance)")
    ax.set_ylabel("generated images")
    ax.set_title(title or f"{len(ratio)} generated images, {100 * share:.2f}% left of the threshold", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
