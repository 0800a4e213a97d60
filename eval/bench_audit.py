"""Benchmark the exact two-nearest-neighbour search behind ``sdmem audit``.

    python eval/bench_audit.py                 # CIFAR scale: 10k generated x 50k training x 3072 (minutes)
    python eval/bench_audit.py --small         # 1k x 5k x 3072, a quick look
    python eval/bench_audit.py --sd            # 2k x 2k x 256*256*3 (Stable-Diffusion-sized images)
    python eval/bench_audit.py --queries 4096 --train 16384 --dim 3072 --backends int8 torch

On seeded random uint8 images it measures, in the same run: the machine's int8 GEMM rate
(``torch._int_mm``, 2048x3072x8192, best of a few) and fp32 GEMM rate (``torch.mm``, same shape); a plain
baseline (``torch.cdist`` + ``topk(2)`` in fp32, 2048-query blocks); and each ``search_top2`` backend.
Each row reports seconds, GOP/s (2·Q·N·D operations), the fraction of the int8 and fp32 GEMM rates, the
speed-up over the baseline, and whether its top-2 indices agree with the int8 (exact) backend.

Rows are a list of ``(name, callable)``: a callable returns an ``(index [Q, 2])`` array or None, so an
end-to-end timing (e.g. the ``sdmem audit`` command on npz files written by :func:`save_npz`) is one more
``rows.append(...)`` in :func:`build_rows`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sdmem.audit.knn import search_top2  # noqa: E402

Row = tuple[str, Callable[[], "np.ndarray | None"]]


def gemm_rates(device: str, m: int = 2048, k: int = 3072, n: int = 8192, reps: int = 4) -> tuple[float, float]:
    """(int8 GOP/s of torch._int_mm, fp32 GFLOP/s of torch.mm), best of ``reps``, at m x k x n."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen).to(dev)
    b8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen).to(dev)
    out8 = torch.empty((m, n), dtype=torch.int32, device=dev)
    af, bf = a8.float(), b8.float()
    outf = torch.empty((m, n), dtype=torch.float32, device=dev)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        return min(times)

    ops = 2.0 * m * n * k
    t8 = best(lambda: torch._int_mm(a8, b8.T, out=out8))
    tf = best(lambda: torch.mm(af, bf.T, out=outf))
    return ops / t8 / 1e9, ops / tf / 1e9


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def baseline_cdist(queries: np.ndarray, train: np.ndarray, device: str, block: int = 2048) -> np.ndarray:
    """The plain way: fp32 ``torch.cdist`` of 2048-query blocks against the whole set, then ``topk(2)``."""
    dev = torch.device(device)
    t = torch.from_numpy(train.reshape(len(train), -1)).to(dev).float()
    q = torch.from_numpy(queries.reshape(len(queries), -1))
    out = []
    for s in range(0, len(q), block):
        d = torch.cdist(q[s : s + block].to(dev).float(), t)
        out.append(torch.topk(d, 2, dim=1, largest=False).indices.cpu())
        del d
    return torch.cat(out).numpy()


def make_data(num_queries: int, num_train: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random uint8 images ([N, S, S, 3] when dim = 3·S², else [N, dim]); a tenth of the
    generated images are noisy copies of training images, so some pairs are close."""
    rng = np.random.default_rng(seed)
    side = int(round((dim / 3) ** 0.5))
    shape = (side, side, 3) if 3 * side * side == dim else (dim,)
    train = rng.integers(0, 256, (num_train, *shape), dtype=np.uint8)
    queries = rng.integers(0, 256, (num_queries, *shape), dtype=np.uint8)
    k = num_queries // 10
    src = rng.integers(0, num_train, k)
    for i, j in enumerate(src):
        noise = rng.integers(-8, 9, shape)
        queries[i] = np.clip(train[j].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return queries, train


def save_npz(folder: str, queries: np.ndarray, train: np.ndarray) -> tuple[str, str]:
    """Write train.npz / gen.npz (uncompressed ``images``) for an end-to-end ``sdmem audit`` row."""
    os.makedirs(folder, exist_ok=True)
    paths = os.path.join(folder, "train.npz"), os.path.join(folder, "gen.npz")
    np.savez(paths[0], images=train)
    np.savez(paths[1], images=queries)
    return paths


def _faiss_ok() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def build_rows(args, queries: np.ndarray, train: np.ndarray) -> list[Row]:
    """The timed rows, in order. Add a row here to time something else on the same data."""
    rows: list[Row] = []
    devices = args.devices
    if not args.no_baseline:
        for dev in devices:
            rows.append((f"baseline cdist+topk fp32 ({dev})", lambda dev=dev: baseline_cdist(queries, train, dev)))
    for dev in devices:
        for backend in args.backends:
            if backend == "faiss" and not _faiss_ok():
                print(f"(skipping faiss on {dev}: not installed)")
                continue
            if backend == "faiss" and dev == "cuda":
                import faiss
                if faiss.get_num_gpus() == 0:
                    continue  # CPU faiss is already timed
            rows.append((f"search_top2 {backend} ({dev})",
                         lambda b=backend, d=dev: search_top2(queries, train, backend=b, device=d).index))
    # The whole `sdmem audit` command (process start, npz reading, dedup, search, report files).
    if not args.no_cli:
        train_npz, gen_npz = save_npz(args.workdir, queries, train)
        for dev in devices:
            rows.append((f"sdmem audit command ({dev})",
                         lambda dev=dev: time_cli_audit(train_npz, gen_npz, dev, os.path.join(args.workdir, "out"))))
    return rows


def time_cli_audit(train_npz: str, gen_npz: str, device: str, out: str) -> np.ndarray:
    """Run `python -m sdmem audit` end to end in a subprocess; returns its nn1/nn2 indices."""
    import csv
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "sdmem", "audit", "--train", train_npz, "--generated", gen_npz,
                    "--out", out, "--device", device, "--quiet"], check=True, env=env)
    with open(os.path.join(out, "per_sample.csv")) as f:
        return np.array([[int(r["nn1_index"]), int(r["nn2_index"])] for r in csv.DictReader(f)])


def run_rows(rows: list[Row], repeat: int = 1) -> list[tuple[str, float, np.ndarray | None]]:
    """Time each row (best of ``repeat``: other jobs on a shared machine only ever add time)."""
    results = []
    for name, fn in rows:
        print(f"  running {name} ...", flush=True)
        best, idx = math.inf, None
        for _ in range(repeat):
            t0 = time.perf_counter()
            idx = fn()
            best = min(best, time.perf_counter() - t0)
        print(f"    {best:.2f} s", flush=True)
        results.append((name, best, idx))
    return results


def print_table(results, ops: float, int8_rate: float, fp32_rate: float, reference: np.ndarray | None) -> None:
    base = next((dt for name, dt, _ in results if name.startswith("baseline")), None)
    head = f"{'row':40s} {'seconds':>9s} {'GOP/s':>8s} {'/int8 GEMM':>10s} {'/fp32 GEMM':>10s} " \
           f"{'vs baseline':>11s} {'top-2 = int8':>12s}"
    print(head)
    print("-" * len(head))
    for name, dt, idx in results:
        rate = ops / dt / 1e9
        speed = f"{base / dt:10.2f}x" if base else f"{'-':>11s}"
        if idx is None or reference is None:
            agree = "-"
        else:
            agree = f"{100 * np.mean(np.all(idx == reference, axis=1)):.2f}%"
        print(f"{name:40s} {dt:9.3f} {rate:8.1f} {rate / int8_rate:10.2f} {rate / fp32_rate:10.2f} "
              f"{speed} {agree:>12s}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--dim", type=int, default=3072, help="C*H*W (3072 = 32x32x3)")
    p.add_argument("--sd", action="store_true", help="2k x 2k x 256*256*3")
    p.add_argument("--small", action="store_true", help="1k x 5k x 3072")
    p.add_argument("--backends", nargs="+", default=["int8", "faiss", "torch"])
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-cli", action="store_true", help="skip the end-to-end `sdmem audit` command row")
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sdmem-bench-audit"),
                   help="where the npz files of the command row go")
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="default: cpu, plus cuda when torch sees a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="time each row this many times, keep the best")
    args = p.parse_args(argv)
    if args.sd:
        args.queries, args.train, args.dim = 2000, 2000, 256 * 256 * 3
    elif args.small:
        args.queries, args.train, args.dim = 1000, 5000, 3072

    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"data: {args.queries} generated x {args.train} training x D={args.dim} (uint8, seed {args.seed})")
    queries, train = make_data(args.queries, args.train, args.dim, args.seed)
    ops = 2.0 * args.queries * args.train * args.dim

    rates = {}
    for dev in args.devices:
        rates[dev] = gemm_rates(dev)
        print(f"{dev} GEMM 2048x3072x8192: int8 {rates[dev][0]:.1f} GOP/s, fp32 {rates[dev][1]:.1f} GFLOP/s")

    results = run_rows(build_rows(args, queries, train), args.repeat)
    reference = next((idx for name, _, idx in results if name.startswith("search_top2 int8")), None)
    for dev in args.devices:  # again after the rows (other load on the machine): keep the better one
        again = gemm_rates(dev)
        print(f"{dev} GEMM again after the rows: int8 {again[0]:.1f} GOP/s, fp32 {again[1]:.1f} GFLOP/s")
        rates[dev] = (max(rates[dev][0], again[0]), max(rates[dev][1], again[1]))
    print()
    for dev in args.devices:
        sel = [r for r in results if f"({dev})" in r[0]]
        if not sel:
            continue
        i8, f32 = rates[dev]
        print(f"[{dev}] GEMM reference: int8 {i8:.1f} GOP/s, fp32 {f32:.1f} GFLOP/s; "
              f"{args.queries} x {args.train} x {args.dim}, {ops / 1e12:.2f} T ops")
        print_table(sel, ops, i8, f32, reference)
        print()


if __name__ == "__main__":
    main()
