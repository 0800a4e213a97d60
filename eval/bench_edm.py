"""Benchmark: EDM training and sampling speed of the paper's basic CIFAR network and the smoke network.

For each network it prints, per training-loop variant, images/s of one optimizer step (best of --steps
timed steps after a warm-up; the variants run interleaved, one step each per round, so that a busy machine
slows them alike), the achieved FLOP/s (FlopCounterMode count of forward + backward per image) as a
fraction of this machine's fp32 GEMM rate (torch.mm 2048x3072x8192) and conv rate (F.conv2d 8x256x32x32,
256 3x3 filters), both measured in the same run (at the start and after each network's training steps,
the best seen), and the ratio over a naive loop. Variants:

  ours            the project's step: train.accumulate_gradients, torch.optim.Adam as train.py builds it,
                  optimizer.step + zero_grad, EMA by torch._foreach_lerp_ (as train.py does them)
  naive           plain loss.backward, Adam(foreach=False), per-parameter Python EMA loop (mul_ + add_)
  + fused Adam    ours with torch.optim.Adam(fused=True) (not bitwise: differs by a few ulp)
  + bf16 / tf32   ours with train.precision=bf16 (autocast; CIFAR only) and, on cuda, tf32
Then images/s of generate_images (EDM Heun, 18 steps = 35 network evaluations) on the EMA network.
Training data are random images in [-1, 1] (unconditional, as both configs are). util = process CPU
seconds / wall seconds of the best step: about --threads when the cores were free, less when shared
(CPU only; a shared machine: compare only rows of one run, rerun when util is low). On CPU torch's
default Adam is the single-tensor for-loop (foreach defaults on only for CUDA), so ours ~ naive there.

    python eval/bench_edm.py [--device cpu|cuda] [--only cifar|small] [--batch N] [--steps N]
                             [--sample-num N] [--threads N]

On CPU the CIFAR network trains on a small batch (default 8 images per step, not the paper's 512).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdmem.config import apply_overrides
from sdmem.runs import load_config
from sdmem.edm.generate import generate_images
from sdmem.edm.loss import LOSSES
from sdmem.edm.run import build_denoiser
from sdmem.edm.train import accumulate_gradients, ema_beta
from sdmem.training import step_seed

NETS = {"cifar": ("train_configs/edm/cifar10.yaml", 32), "small": ("train_configs/smoke/edm.yaml", 8)}
NUM_TRAIN = 512  # random training images the steps draw their minibatches from
NFE = 35  # network evaluations of an 18-step Heun sample (2 · 18 − 1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device: str, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def machine_rates(device: str) -> tuple[float, float]:
    """fp32 GFLOP/s of torch.mm 2048x3072 @ 3072x8192 and of F.conv2d 8x256x32x32 * 256x256x3x3 (best of 3)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    a, b = torch.randn(2048, 3072, device=device), torch.randn(3072, 8192, device=device)
    gemm = 2 * 2048 * 3072 * 8192 / best_of(lambda: torch.mm(a, b), device) / 1e9
    x, w = torch.randn(8, 256, 32, 32, device=device), torch.randn(256, 256, 3, 3, device=device)
    conv = 2 * 8 * 256 * 256 * 9 * 32 * 32 / best_of(lambda: F.conv2d(x, w, padding=1), device) / 1e9
    return gemm, conv


class Trainer:
    """One variant of the training loop on its own freshly built network, EMA and optimizer."""

    def __init__(self, name: str, cfg, res: int, images: torch.Tensor, batch: int, *, naive: bool = False,
                 fused: bool = False, precision: str | None = None):
        if precision:
            cfg = apply_overrides(cfg, [f"train.precision={precision}"])
        self.name, self.cfg, self.images, self.batch, self.naive = name, cfg, images, batch, naive
        self.device = images.device.type
        self.tf32 = cfg.train.precision == "tf32"
        torch.manual_seed(cfg.seed)
        self.net = build_denoiser(cfg, res, 0).to(images.device).train()  # build_denoiser: use_bf16 for bf16
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        kw = dict(foreach=False) if naive else dict(fused=True) if fused else {}  # ours: train.py's defaults
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.train.lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=cfg.train.weight_decay, **kw)
        self.params, self.ema_params = list(self.net.parameters()), list(self.ema.parameters())
        self.beta = ema_beta(cfg.train.ema_rate, batch, 1.0)  # after warm-up
        self.loss_fn = LOSSES[cfg.model.precond]()
        self.gen = torch.Generator(device=images.device)
        self.k, self.wall, self.cpu = 0, [], []

    def step(self, timed: bool = True) -> None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32  # as train.py
        s = step_seed(self.cfg.seed, 0, self.k)
        idx = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(s))[: self.batch]
        idx = idx.to(self.images.device)
        torch.manual_seed(s)
        self.gen.manual_seed(s)
        sync(self.device)
        t, c = time.perf_counter(), time.process_time()
        if self.naive:
            loss = self.loss_fn(self.net, self.images[idx], None, generator=self.gen).sum()
            (loss / self.batch).backward()
            self.opt.step()
            self.opt.zero_grad()
            with torch.no_grad():
                for p, e in zip(self.params, self.ema_params):
                    e.mul_(self.beta).add_(p, alpha=1 - self.beta)
            float(loss.detach())
        else:  # the body of train.py's loop, without logging and snapshots
            loss_total = accumulate_gradients(self.net, self.loss_fn, self.images, None, idx, self.gen,
                                              batch_gpu=self.batch, scale=1.0 / self.batch)
            float(loss_total)  # train.py reads the loss (finiteness check) before the optimizer step
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - self.beta)
        sync(self.device)
        if timed:
            self.wall.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)
        self.k += 1


def count_flops(tr: Trainer) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of the fp32 network, by FlopCounterMode."""
    x = tr.images[:2]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        tr.net(x, torch.ones(2, device=x.device), None)
    fwd = fc.get_total_flops() / 2
    with FlopCounterMode(display=False) as fc:
        accumulate_gradients(tr.net, tr.loss_fn, x, None, torch.arange(2, device=x.device), tr.gen,
                             batch_gpu=2, scale=0.5)
    tr.net.zero_grad(set_to_none=True)
    return fwd, fc.get_total_flops() / 2


def bench_network(which: str, args, gemm: float, conv: float) -> tuple[float, float]:
    path, res = NETS[which]
    cfg, dev, cuda = load_config(path), args.device, args.device == "cuda"
    batch = args.batch or (cfg.train.batch_size if which == "small" else 128 if cuda else 8)
    steps = args.steps or (20 if which == "small" or cuda else 2)
    images = (torch.rand(NUM_TRAIN, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
    variants = [("ours", {}), ("naive", dict(naive=True)), ("ours + fused Adam", dict(fused=True))]
    if which == "cifar":
        variants += ([("ours, tf32", dict(precision="tf32"))] if cuda else [])
        variants += [("ours + bf16 autocast", dict(precision="bf16"))]
    trainers = [Trainer(name, cfg, res, images, batch, **kw) for name, kw in variants]
    n_par = sum(p.numel() for p in trainers[0].params)
    fwd, fwdbwd = count_flops(trainers[0])
    print(f"\n== {which}: {path} at {res}x{res}, {n_par / 1e6:.2f}M params, batch {batch} images/step, "
          f"best of {steps} steps after 1 warm-up ==")
    print(f"model FLOPs/image: forward {fwd / 1e9:.3f} GFLOP, forward+backward {fwdbwd / 1e9:.3f} GFLOP "
          f"({fwdbwd / fwd:.2f}x forward)")
    for tr in trainers:
        tr.step(timed=False)
    for _ in range(steps):
        for tr in trainers:  # interleaved: a busy spell hits every variant
            tr.step()
    gemm, conv = (max(a, b) for a, b in zip((gemm, conv), machine_rates(dev)))  # re-measured: best seen
    base = batch / min(trainers[1].wall)
    print(f"{'training':22s} {'best s':>7s} {'median':>7s} {'img/s':>9s} {'GFLOP/s':>8s} {'%GEMM':>6s} "
          f"{'%conv':>6s} {'util':>5s} {'vs naive':>8s}")
    for tr in trainers:
        i = min(range(steps), key=tr.wall.__getitem__)
        best, med = tr.wall[i], sorted(tr.wall)[steps // 2]
        ips, util = batch / best, tr.cpu[i] / best
        rate = ips * fwdbwd / 1e9
        busy = dev == "cpu" and util < 0.8 * torch.get_num_threads()  # a core was taken by another process
        print(f"{tr.name:22s} {best:7.3f} {med:7.3f} {ips:9.2f} {rate:8.1f} {rate / gemm:6.0%} {rate / conv:6.0%} "
              f"{util:5.2f} {ips / base:7.2f}x" + ("  <- contended (util < 0.8 x threads): rerun" if busy else ""))
    print(f"(img/s, GFLOP/s and ratios from the best step; %: of the best fp32 rates seen so far, GEMM "
          f"{gemm:.1f} and conv {conv:.1f} GFLOP/s; bf16 rows are compared with these fp32 rates too)")
    num = args.sample_num or (batch if which == "small" else 256 if cuda else 2)
    ema = trainers[0].ema
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 sampling
    generate_images(ema, [0], resolution=res, label_dim=0, device=dev, batch=1, steps=1)  # warm-up
    sync(dev)
    t = time.perf_counter()
    generate_images(ema, list(range(num)), resolution=res, label_dim=0, device=dev, batch=num, steps=18)
    sync(dev)
    secs = time.perf_counter() - t
    rate = num * NFE * fwd / secs / 1e9
    print(f"sampling (EMA net, fp32, Heun 18 steps = {NFE} evaluations): {num} images in {secs:.2f} s = "
          f"{num / secs:.3f} img/s, {rate:.1f} GFLOP/s = {rate / gemm:.0%} of GEMM, {rate / conv:.0%} of conv")
    return gemm, conv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", choices=list(NETS), help="benchmark one network (default: both)")
    p.add_argument("--batch", type=int, help="images per training step (default: cifar 8 on cpu / 128 on cuda, "
                                             "small: its config's 64)")
    p.add_argument("--steps", type=int, help="timed training steps per variant (default: cifar on cpu 2, else 20)")
    p.add_argument("--sample-num", type=int, help="images to sample (default: cifar 2 on cpu / 256 on cuda, "
                                                  "small: the batch)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {dev} ({name}), torch {torch.__version__}, mkldnn {torch.backends.mkldnn.is_available()}")
    gemm, conv = machine_rates(dev)
    print(f"fp32 rates: GEMM (torch.mm 2048x3072x8192) {gemm:.1f} GFLOP/s, "
          f"conv (F.conv2d 8x256x32x32, 256 3x3) {conv:.1f} GFLOP/s")
    for which in [args.only] if args.only else ["cifar", "small"]:
        gemm, conv = bench_network(which, args, gemm, conv)


if __name__ == "__main__":
    main()
