"""Check a published EDM network pickle, loaded by sdmem's restricted loader, against its published FID.

    python eval/check_edm_checkpoint.py --pkl edm-cifar10-32x32-uncond-vp.pkl --ref cifar10-32x32.npz \
        --weights weights-inception-2015-12-05-6726825d.pth --out /scratch/edm-uncond-vp

Generates ``--num`` images (default 50,000, seeds 0..N-1, EDM's deterministic Heun sampler with the step
count the EDM paper used for that dataset) through ``sdmem generate``'s core (resumable: run it again to
finish an interrupted folder), computes their FID against ``--ref`` (EDM's reference statistics .npz, e.g.
``cifar10-32x32.npz`` from NVlabs' ``fid-refs``, or an image SRC) with ``sdmem fid``'s Inception-v3, and
prints it beside the published figure. The published figures are the minimum of three 50k evaluations, so
one run lands a little above them; the check fails (exit 1) when the gap exceeds ``--tolerance``.

Nothing here downloads: the pickle, the reference statistics and the Inception weights must be local files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Karras et al. 2022 (EDM), the pre-trained checkpoints' FIDs (their Table 2 / the repository's README), with
# the deterministic sampler's step count (35 NFE at 32x32, 79 NFE at 64x64).
PUBLISHED = {
    "edm-cifar10-32x32-cond-vp.pkl": (1.79, 18),
    "edm-cifar10-32x32-cond-ve.pkl": (1.79, 18),
    "edm-cifar10-32x32-uncond-vp.pkl": (1.97, 18),
    "edm-cifar10-32x32-uncond-ve.pkl": (1.98, 18),
    "edm-ffhq-64x64-uncond-vp.pkl": (2.39, 40),
    "edm-ffhq-64x64-uncond-ve.pkl": (2.53, 40),
    "edm-afhqv2-64x64-uncond-vp.pkl": (1.96, 40),
    "edm-afhqv2-64x64-uncond-ve.pkl": (2.16, 40),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pkl", required=True, help="an EDM network pickle (edm-*.pkl)")
    p.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma) or an image SRC")
    p.add_argument("--out", required=True, help="folder for the generated images (resumable)")
    p.add_argument("--weights", default=None, help="Inception-v3 weights (default: sdmem fid's default path)")
    p.add_argument("--num", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the EDM paper's)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--published", type=float, default=None, help="the FID to compare with (default: the table)")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()

    from sdmem.edm.generate import pickle_plan
    from sdmem.errors import SdmemError
    from sdmem.fid import compute_fid
    from sdmem.generation import generate_folder

    published, steps = PUBLISHED.get(os.path.basename(args.pkl), (args.published, args.steps or 18))
    published = args.published if args.published is not None else published
    steps = args.steps or steps
    try:
        t0 = time.perf_counter()
        plan = pickle_plan(args.pkl, steps=steps, batch=args.batch, device=args.device)
        new = generate_folder(args.out, range(args.num), plan)
        t1 = time.perf_counter()
        result = compute_fid(args.out, args.ref, weights=args.weights, device=args.device, progress=True)
    except SdmemError as exc:
        print(f"check_edm_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    print(f"{os.path.basename(args.pkl)}: {args.num} images ({new} new, {t1 - t0:.0f} s, {steps} Heun steps); "
          f"{result.one_line()}")
    if published is None:
        print("no published FID known for this file: pass --published X to compare")
        return 0
    gap = result.fid - published
    print(f"published {published:.2f}; measured - published = {gap:+.2f} (tolerance {args.tolerance})")
    return 0 if abs(gap) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
