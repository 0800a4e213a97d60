"""The sharded audit against one process, and the peak memory of a streamed generated set.

    python eval/bench_shard.py                 # both parts, default sizes
    python eval/bench_shard.py --part shard --train 20000 --generated 2000 --side 32
    python eval/bench_shard.py --part rss --generated 10000 --side 256 --train 2000

Part ``shard``: writes a seeded training npz with planted replicas and a generated npz, then runs
``sdmem audit`` in one process (2 torch threads) and under ``accelerate launch --multi_gpu --num_processes 2``
(1 thread each: the same 2 cores), in the same run. Prints both wall times (process start included) and the
search seconds each report records, their ratio, and checks that ``per_sample.csv`` and ``summary.json`` are
identical (the flags, distances and neighbours).

Part ``rss``: writes the generated set as a folder of PNGs (what ``sdmem generate`` writes) and a training npz,
then audits in fresh processes, once streaming the generated set in the default chunks and once with
``query_chunk`` = the whole set (the old behaviour: every generated image resident), and prints each process's
peak resident memory next to the size of the generated set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def planted(n_train: int, n_gen: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth-ish random training images (copies across the shard boundary included) and generated images of
    which a tenth are noisy copies of training images."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (n_train, side, side, 3), dtype=np.uint8)
    train[n_train // 2] = train[n_train // 2 - 1]
    train[n_train - 1] = train[3]
    gen = rng.integers(0, 256, (n_gen, side, side, 3), dtype=np.uint8)
    k = n_gen // 10
    src = rng.integers(0, n_train, k)
    noise = rng.integers(-4, 5, (k, side, side, 3))
    gen[:k] = np.clip(train[src].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return train, gen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_audit(prefix: list[str], train: str, gen: str, out: str, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = prefix + ["-m", "sdmem", "audit", "--train", train, "--generated", gen, "--out", out, "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print("   ", proc.stdout.strip())
    return time.perf_counter() - t0


def part_shard(args, tmp: str) -> None:
    train, gen = planted(args.train, args.generated, args.side)
    np.savez(os.path.join(tmp, "T.npz"), images=train)
    np.savez(os.path.join(tmp, "G.npz"), images=gen)
    del train, gen
    t, g = os.path.join(tmp, "T.npz"), os.path.join(tmp, "G.npz")
    print(f"sharded audit: {args.generated} generated x {args.train} training images of {args.side}x{args.side}x3")
    walls, search = {}, {}
    for name, prefix, threads in (
            ("1 process, 2 threads", [sys.executable], 2),
            ("2 processes (accelerate launch), 1 thread each",
             [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port())], 1)):
        out = os.path.join(tmp, name.split()[0])
        walls[name] = run_audit(prefix, t, g, out, threads)
        search[name] = json.load(open(os.path.join(out, "summary.json")))["seconds"]
        print(f"  {name}: {walls[name]:.1f} s wall (start-up included), search {search[name]:.2f} s")
    a, b = (os.path.join(tmp, n.split()[0]) for n in walls)
    same_csv = open(os.path.join(a, "per_sample.csv")).read() == open(os.path.join(b, "per_sample.csv")).read()
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (a, b))
    sa.pop("seconds"), sb.pop("seconds")
    (w1, w2), (s1, s2) = walls.values(), search.values()
    print(f"  identical per-sample flags, distances and neighbours: {same_csv}; identical summary: {sa == sb}")
    print(f"  2 processes / 1 process: wall {w2 / w1:.2f}x, search {s2 / s1:.2f}x (the same 2 cores)")
    if not (same_csv and sa == sb):
        sys.exit("the sharded audit differs from the single-process one")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(train: str, gen: str, chunk: int) -> None:
    import torch  # noqa: F401

    from sdmem.audit.knn import search_top2
    from sdmem.data import open_source

    base = peak_rss_mb()
    g = open_source(gen)
    t0 = time.perf_counter()
    top2 = search_top2(g, open_source(train), query_chunk=chunk or None)
    print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0,
                      "nn1_first": top2.index[:5, 0].tolist()}))


def part_rss(args, tmp: str) -> None:
    from PIL import Image

    train, gen = planted(args.train, args.generated, args.side, seed=1)
    np.savez(os.path.join(tmp, "T.npz"), images=train)
    folder = os.path.join(tmp, "generated")
    os.makedirs(folder)
    t0 = time.perf_counter()
    for i, img in enumerate(gen):
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"), compress_level=1)
    size_mb = gen.nbytes / 2**20
    del train, gen
    print(f"peak RSS: {args.generated} generated PNGs of {args.side}x{args.side} ({size_mb:.0f} MiB of pixels, "
          f"written in {time.perf_counter() - t0:.0f} s) against {args.train} training images")
    results = {}
    for name, chunk in (("streamed (default chunks)", 0), ("whole generated set resident", args.generated)):
        proc = subprocess.run([sys.executable, __file__, "--child", os.path.join(tmp, "T.npz"), folder, str(chunk)],
                              capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        results[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name}: peak RSS {r['peak_mb']:.0f} MiB (torch + sdmem imported: {r['base_mb']:.0f} MiB), "
              f"search {r['seconds']:.1f} s")
    (a, b) = results.values()
    assert a["nn1_first"] == b["nn1_first"]
    print(f"  streamed / resident peak RSS: {a['peak_mb'] / b['peak_mb']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["shard", "rss", "both"], default="both")
    p.add_argument("--train", type=int, default=None, help="training images (shard: 20000, rss: 2000)")
    p.add_argument("--generated", type=int, default=None, help="generated images (shard: 2000, rss: 10000)")
    p.add_argument("--side", type=int, default=None, help="image side (shard: 32, rss: 256)")
    p.add_argument("--dir", default=None, help="where the sets go (default: a temporary folder)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))
    for part, defaults in (("shard", (20000, 2000, 32)), ("rss", (2000, 10000, 256))):
        if args.part in (part, "both"):
            a = argparse.Namespace(**vars(args))
            a.train, a.generated, a.side = (v if v is not None else d for v, d in
                                            zip((args.train, args.generated, args.side), defaults))
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                (part_shard if part == "shard" else part_rss)(a, tmp)


if __name__ == "__main__":
    main()
