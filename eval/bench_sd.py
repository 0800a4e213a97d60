"""Benchmark: SD fine-tuning steps/s with the latent/text cache against the uncached path (the VAE encoder and the
text encoder run every step), in the same process on the same batches, and DDIM generation images/s.

The tiny SD (built from configs, no download) always runs; a real pipeline (e.g. a local copy of
lambdalabs/miniSD-diffusers) runs too when --pretrained points at it. Images come from a small Imagenette-like
folder written to a temporary directory (or --data), centre-cropped and resized to --resolution.

    python eval/bench_sd.py [--resolution 256] [--batch 4] [--steps 4] [--method lora|full] [--rank 4]
                            [--gen-num 8] [--gen-steps 50] [--pretrained DIR] [--sd1-shaped] [--device auto|cpu|cuda]

On a shared CPU machine run it with OMP_NUM_THREADS=1: oversubscribed threads make small kernels tens of times
slower and the ratio meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _width(c: int, scale: float, group: int) -> int:
    return max(group, group * round(c * scale / group))


def sd1_shaped_components(scale: float = 1.0):
    """Stable Diffusion v1 / miniSD's architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M) with
    random weights, built in memory: the same FLOPs as the real model, so the same cache ratio, with no download.

    ``scale`` < 1 keeps the layout (UNet block types, two layers per block, attention at the first three levels,
    8 heads, a 4-level VAE, a 12-layer CLIP text encoder with 77 positions) and multiplies every width by it
    (UNet widths rounded to multiples of 32, VAE widths to multiples of 8, text heads of width 64·scale)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdmem.sd.components import Components
    from sdmem.sd.tiny import tiny_tokenizer

    torch.manual_seed(0)
    head = max(2, round(64 * scale))
    text_width = 12 * head
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=text_width, attention_head_dim=8,
                                block_out_channels=tuple(_width(c, scale, 32) for c in (320, 640, 1280, 1280)),
                                layers_per_block=2)
    vae_group = 32 if scale == 1 else 8
    vae = AutoencoderKL(block_out_channels=tuple(_width(c, scale, vae_group) for c in (128, 256, 512, 512)),
                        layers_per_block=2, latent_channels=4, norm_num_groups=vae_group,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=256)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width,
                                        num_attention_heads=12, num_hidden_layers=12, vocab_size=49408,
                                        max_position_embeddings=77, projection_dim=text_width,
                                        hidden_act="quick_gelu"))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for m in (vae, text):
        m.requires_grad_(False).eval()
    return Components(tiny_tokenizer(), text, vae, unet, sched, path=None)


def bench_model(name: str, comps, images: np.ndarray, prompts: list[str], labels: np.ndarray, args,
                device: str) -> dict:
    """steps/s cached and uncached (interleaved rounds, best of each), cache build time, generation images/s."""
    from sdmem.config import config_from_dict
    from sdmem.training import batch_indices
    from sdmem.sd.cache import LatentCache, Uncached
    from sdmem.sd.config import SDConfig
    from sdmem.sd.generate import generate_images
    from sdmem.sd.components import make_pipeline
    from sdmem.sd.train import DTYPES, build_trainable, sd_loss, to_device

    cfg = config_from_dict(SDConfig, {"out_dir": "unused", "data": {"source": "unused", "size": len(images),
                                                                      "resolution": args.resolution},
                                      "model": {"pretrained": "unused", "method": args.method, "rank": args.rank},
                                      "train": {"mixed_precision": args.precision}})
    for module in (comps.vae, comps.text_encoder):
        to_device(module, device, torch.float32)
    params = [p for _, p in build_trainable(cfg, comps, device, DTYPES[args.precision])]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-6)
    autocast = torch.autocast(torch.device(device).type, dtype=DTYPES[args.precision]) \
        if args.precision != "no" else contextlib.nullcontext()
    sync(device)
    t = time.perf_counter()
    cached = LatentCache(comps.vae, comps.tokenizer, comps.text_encoder, images, prompts, device=device,
                         dtype=torch.float32)
    sync(device)
    build = time.perf_counter() - t
    uncached = Uncached(comps.vae, comps.tokenizer, comps.text_encoder, images, prompts, device=device,
                        dtype=torch.float32)
    gen = torch.Generator(device=device)
    labels_t = torch.from_numpy(labels)

    def run(data, steps: int, start: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for k in range(start, start + steps):
            idx = torch.from_numpy(batch_indices(k, args.batch, len(images), 0))
            gen.manual_seed(k)
            with autocast:
                loss = sd_loss(comps.unet, comps.noise_scheduler, *data.batch(idx.to(device), labels_t[idx].to(device)),
                               gen, comps.vae.config)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        return steps / (time.perf_counter() - t0)

    run(cached, 1, 0), run(uncached, 1, 0)  # warm-up (kernel selection, allocator)
    rates = {"cached": [], "uncached": []}
    for r in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        rates["cached"].append(run(cached, args.steps, 1 + 2 * r * args.steps))
        rates["uncached"].append(run(uncached, args.steps, 1 + (2 * r + 1) * args.steps))
    best = {k: max(v) for k, v in rates.items()}

    # Generation: DDIM, guidance 7.5, one generator per image (fp16 on a GPU, as sdmem generate does).
    if not args.gen_num:
        return {"name": name, "unet_params": sum(p.numel() for p in comps.unet.parameters()),
                "trainable": sum(p.numel() for p in params), "cache_build_s": build, "cached": best["cached"],
                "uncached": best["uncached"], "ratio": best["cached"] / best["uncached"], "gen_images_per_s": None}
    pipe = make_pipeline(comps, comps.unet)
    if torch.device(device).type == "cuda":
        pipe.to(device, torch.float16)
    comps.unet.eval()
    seeds = list(range(args.gen_num))
    texts = [prompts[i % len(prompts)] for i in seeds]
    generate_images(pipe, texts[:1], seeds[:1], resolution=args.resolution, steps=2, guidance_scale=7.5)
    sync(device)
    t = time.perf_counter()
    for s in range(0, len(seeds), args.gen_batch):
        generate_images(pipe, texts[s : s + args.gen_batch], seeds[s : s + args.gen_batch],
                        resolution=args.resolution, steps=args.gen_steps, guidance_scale=7.5)
    sync(device)
    gen_rate = len(seeds) / (time.perf_counter() - t)
    unet_params = sum(p.numel() for p in comps.unet.parameters())
    return {"name": name, "unet_params": unet_params, "trainable": sum(p.numel() for p in params),
            "cache_build_s": build, "cached": best["cached"], "uncached": best["uncached"],
            "ratio": best["cached"] / best["uncached"], "gen_images_per_s": gen_rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="images per training step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and path")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--gen-num", type=int, default=8)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--gen-steps", type=int, default=50)
    p.add_argument("--pretrained", metavar="DIR", help="also benchmark this local diffusers folder (e.g. miniSD)")
    p.add_argument("--sd1-shaped", action="store_true", help="also benchmark SD v1's architecture (miniSD's) with "
                   "random weights (no download; slow on a CPU: use small --batch/--steps/--gen-num)")
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny SD")
    p.add_argument("--data", metavar="DIR", help="an Imagenette(-like) folder (default: a generated one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()

    from sdmem.config import config_from_dict
    from sdmem.sd.config import SDDataConfig
    from sdmem.sd.data import build_sd_subset, prompt_table
    from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd
    from sdmem.utils import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(make_imagenette_like(os.path.join(tmp, "inet"), per_class=2, size=(320, 400)))
        dcfg = config_from_dict(SDDataConfig, {"source": data, "size": 20, "resolution": args.resolution,
                                               "prompt": "class"})
        subset = build_sd_subset(dcfg)
        prompts = prompt_table(dcfg, subset.class_names)
        from sdmem.sd.components import load_components

        models = [] if args.no_tiny else \
            [("tiny SD", lambda: load_components(str(make_tiny_sd(os.path.join(tmp, "tiny-sd"))), download=False))]
        if args.pretrained:
            models.append((os.path.basename(os.path.normpath(args.pretrained)),
                           lambda: load_components(args.pretrained, download=False)))
        else:
            print("(no --pretrained: the real miniSD is skipped; pass a local lambdalabs/miniSD-diffusers folder)")
        if args.sd1_shaped:
            models.append(("SD v1 architecture, random weights", sd1_shaped_components))
        print(f"device {device}" + (f" ({torch.get_num_threads()} threads)" if device == "cpu" else
                                    f" ({torch.cuda.get_device_name()})") +
              f", {args.resolution}x{args.resolution}, {args.method}" + (f" r{args.rank}" if args.method == "lora"
                                                                         else "") +
              f", batch {args.batch}, precision {args.precision}")
        for name, make in models:
            r = bench_model(name, make(), np.asarray(subset.images), prompts, subset.labels, args, device)
            print(f"{r['name']}: UNet {r['unet_params'] / 1e6:.1f}M params ({r['trainable'] / 1e6:.3f}M trained); "
                  f"cache built in {r['cache_build_s']:.2f} s for {len(subset)} images")
            print(f"  train steps/s: cached {r['cached']:.2f}, uncached {r['uncached']:.2f} -> "
                  f"cached/uncached {r['ratio']:.2f}x")
            if r["gen_images_per_s"] is not None:
                print(f"  generate: {r['gen_images_per_s']:.3f} images/s (DDIM {args.gen_steps} steps, guidance 7.5, "
                      f"batch {args.gen_batch})")


if __name__ == "__main__":
    main()
