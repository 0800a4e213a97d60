"""Benchmark: `sdmem detect`'s scores in prompts/s, against generating the same prompts' images (the sampling a
user would otherwise run to look for collapse by eye), in the same process on the same model.

    python eval/bench_detect.py [--model DIR] [--prompts 32] [--seeds 4] [--gen-steps 20] [--collapse-seeds 16]

The model defaults to the pretrained tiny SD (sdmem.sd.pretrained: built here once, then cached); prompts are
class prompts of its pretraining classes. Each method runs through the functions `sdmem detect` calls (batched
prompts x seeds, each prompt encoded once); the baseline generates `--seeds` images per prompt with DDIM
`--gen-steps` steps and guidance. Ratios are the figure (absolute times on shared machines are noise); run with
OMP_NUM_THREADS set to the cores you have.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a diffusers folder or sdmem run (default: the pretrained tiny SD)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--gen-steps", type=int, default=20)
    p.add_argument("--collapse-seeds", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)

    from sdmem.data.photos import PRETRAIN
    from sdmem.sd import detect as D
    from sdmem.sd.generate import PromptEmbeddings, generate_images
    from sdmem.sd.pretrained import pretrained_tiny_sd

    model = args.model or str(pretrained_tiny_sd())
    _, load, res = D.model_identity(model, None)
    pipe = load("cpu")
    pipe.set_progress_bar_config(disable=True)
    names = list(PRETRAIN) + ["digit", "face"]
    prompts = [f"a picture of a {names[i % len(names)]} {i // len(names)}" for i in range(args.prompts)]
    s = D.DetectSettings(seeds=args.seeds, collapse_seeds=args.collapse_seeds, collapse_steps=args.gen_steps,
                         batch=args.batch)
    embed = PromptEmbeddings(pipe)
    embed(prompts + [""])  # encoded once for every method alike

    def timed(fn) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        return time.perf_counter() - t0

    def generate(seeds: int):
        for i in range(0, len(prompts), max(1, args.batch // seeds)):
            chunk = prompts[i:i + max(1, args.batch // seeds)]
            generate_images(pipe, [q for q in chunk for _ in range(seeds)], list(range(seeds)) * len(chunk),
                            resolution=res, steps=args.gen_steps, guidance_scale=s.guidance_scale, embeddings=embed)

    def collapse():
        for q in prompts:
            seeds = list(range(s.collapse_seeds))
            D.collapse_score(generate_images(pipe, [q] * len(seeds), seeds, resolution=res, steps=s.collapse_steps,
                                             guidance_scale=s.guidance_scale, embeddings=embed))

    base = timed(lambda: generate(args.seeds))
    rows = [("wen (K=1)", timed(lambda: D.wen_scores(pipe, prompts, embed, s, res))),
            ("aniso", timed(lambda: D.aniso_scores(pipe, prompts, embed, s, res))),
            (f"collapse ({s.collapse_seeds} images)", timed(collapse))]
    n = len(prompts)
    print(f"model {model}, {n} prompts x {args.seeds} seeds, {res}x{res}, threads {torch.get_num_threads()}")
    print(f"baseline: generating {args.seeds} images per prompt (DDIM {args.gen_steps} steps, guidance "
          f"{s.guidance_scale}): {n / base:.2f} prompts/s")
    for name, t in rows:
        print(f"{name:24s} {n / t:8.2f} prompts/s   {base / t:6.2f}x the baseline")


if __name__ == "__main__":
    main()
