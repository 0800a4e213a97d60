"""Benchmark: Heun-sampling the closed-form optimum (paper Eq. 2) over a random uint8 training set.

Prints seconds for --num samples × --steps steps over --train × 3072 training images, the FLOPs done
(two GEMMs of B×N×D per evaluation: 4·B·N·D, 2·steps − 1 evaluations), the achieved GFLOP/s, its fraction
of this machine's fp32 GEMM rate (torch.mm 2048×3072×8192, measured in the same run), and the per-FLOP
speed-up over a naive denoiser (torch.cdist, then torch.softmax over the whole training set) run in the
same process on fewer samples.

    python eval/bench_optimum.py [--num 1000] [--train 5000] [--steps 18] [--device cpu|cuda] [--small]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sdmem.edm.optimum import OptimalDenoiser
from sdmem.edm.sampler import heun_sampler, seeded_latents, to_uint8


class NaiveDenoiser:
    """Baseline D*(x; σ): the full [B, N] distance matrix with torch.cdist, then torch.softmax."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __call__(self, x, sigma, class_labels=None):
        q = x.reshape(x.shape[0], -1).to(torch.float32)
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=q.device).reshape(-1, 1)
        # Eq. 2 / Eq. 32 without streaming: softmax(−||x − x_n||² / 2σ²) @ X.
        w = torch.softmax(-torch.cdist(q, self.data) ** 2 / (2 * sig**2), dim=1)
        return (w @ self.data).reshape(x.shape)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device: str) -> float:
    """fp32 GFLOP/s of torch.mm 2048×3072 @ 3072×8192 on this machine (best of 3)."""
    a = torch.randn(2048, 3072, device=device)
    b = torch.randn(3072, 8192, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * 3072 * 8192 / best / 1e9


def sample(denoiser, num: int, batch: int, steps: int, shape_chw, device: str) -> tuple[float, np.ndarray]:
    """Seconds to sample seeds 0..num−1 in batches (after a small warm-up run), and the uint8 images."""
    heun_sampler(denoiser, seeded_latents([0, 1], shape_chw, device), num_steps=2)
    out = []
    sync(device)
    t = time.perf_counter()
    for lo in range(0, num, batch):
        latents = seeded_latents(range(lo, min(lo + batch, num)), shape_chw, device)
        out.append(to_uint8(heun_sampler(denoiser, latents, num_steps=steps)))
    sync(device)
    return time.perf_counter() - t, np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--naive-num", type=int, default=None, help="samples for the naive baseline (default num/5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--small", action="store_true", help="quick run: 100 samples over 1000 training images")
    args = p.parse_args()
    if args.small:
        args.num, args.train = 100, 1000
    naive_num = args.naive_num or max(1, args.num // 5)
    dev, res = args.device, 32
    dim, nfe = 3 * res * res, 2 * args.steps - 1
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" torch {torch.__version__}, fp32 matmul precision {torch.get_float32_matmul_precision()}")

    peak = gemm_rate(dev)
    print(f"fp32 GEMM rate (torch.mm 2048x3072x8192): {peak:.1f} GFLOP/s")

    train = np.random.default_rng(0).integers(0, 256, (args.train, res, res, 3), dtype=np.uint8)
    t = time.perf_counter()
    den = OptimalDenoiser(train, device=dev)
    sync(dev)
    print(f"OptimalDenoiser setup ({args.train} x {dim}): {time.perf_counter() - t:.2f} s")

    secs, ours = sample(den, args.num, args.batch, args.steps, den.shape_chw, dev)
    flops = 4.0 * args.num * args.train * dim * nfe
    rate = flops / secs / 1e9
    print(f"optimum: {args.num} samples x {args.steps} steps ({nfe} NFE) over {args.train} x {dim}: {secs:.2f} s, "
          f"{flops / 1e12:.2f} TFLOP, {rate:.1f} GFLOP/s = {rate / peak:.0%} of the fp32 GEMM rate")

    naive = NaiveDenoiser(den.data)
    nsecs, nimg = sample(naive, naive_num, args.batch, args.steps, den.shape_chw, dev)
    nrate = 4.0 * naive_num * args.train * dim * nfe / nsecs / 1e9
    same = float((nimg == ours[:naive_num]).all(axis=(1, 2, 3)).mean())
    print(f"naive cdist+softmax: {naive_num} samples in {nsecs:.2f} s, {nrate:.1f} GFLOP/s; "
          f"optimum is {rate / nrate:.2f}x faster per FLOP; identical PNG pixels on {same:.1%} of those samples")
    seen = {im.tobytes() for im in train}
    print(f"samples equal to a training image: {np.mean([im.tobytes() in seen for im in ours]):.1%}")

if __name__ == "__main__":
    main()
