"""Peak memory of an audit over a large training set streamed from disk (the bounded-memory promise).

    python eval/bench_memory.py                  # 1M x 32x32x3 training images (3.1 GB npz on disk), 1k queries
    python eval/bench_memory.py --train 200000   # smaller

Writes an uncompressed npz of seeded random uint8 images block by block (never whole in RAM), then runs
``search_top2`` over it (memory-mapped by the npz reader) and prints the process's peak resident memory
next to the size of the training set, plus the RSS of a bare ``import torch`` baseline.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def write_npz(path: str, n: int, shape=(32, 32, 3), block: int = 50000, seed: int = 0) -> None:
    """An uncompressed npz with one `images` member, streamed so RAM stays small."""
    rng = np.random.default_rng(seed)
    header = {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for s in range(0, n, block):
                f.write(rng.integers(0, 256, (min(block, n - s), *shape), dtype=np.uint8).tobytes())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(npz: str, queries: int) -> None:
    import torch  # noqa: F401

    from sdmem.audit.knn import search_top2
    from sdmem.data import open_source

    base = peak_rss_mb()
    train = open_source(npz)
    q = np.random.default_rng(1).integers(0, 256, (queries, *train.shape), dtype=np.uint8)
    q[:10] = train.read(np.arange(10))  # ten planted exact copies
    t0 = time.perf_counter()
    top2 = search_top2(q, train, backend="int8", progress=True)
    dt = time.perf_counter() - t0
    assert top2.index[:10, 0].tolist() == list(range(10)), "planted copies not found"
    size_gb = len(train) * train.dim / 1e9
    print(f"training set {len(train)} x {train.dim} = {size_gb:.2f} GB on disk; {queries} queries; "
          f"search {dt:.1f} s")
    print(f"peak RSS {peak_rss_mb():.0f} MB (after importing torch and sdmem: {base:.0f} MB); "
          f"limit promised: 2048 MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dir", default=None, help="where the npz goes (default: a temporary folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.queries)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        npz = os.path.join(tmp, "train.npz")
        t0 = time.perf_counter()
        write_npz(npz, args.train)
        print(f"wrote {npz} ({os.path.getsize(npz) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        # A fresh process, so the peak RSS is the audit's own.
        subprocess.run([sys.executable, __file__, "--child", npz, "--queries", str(args.queries)], check=True)


if __name__ == "__main__":
    main()
