"""Benchmark: SD fine-tuning and generation at Stable Diffusion v1's proportions, sdmem against the straightforward
diffusers way of doing the same work, in one run; prints images/s, the ratios and the share of each stage.

The model is SD v1's (miniSD's) layout built from configs with random weights (eval/bench_sd.py's
``sd1_shaped_components``): the UNet's block types, two layers per block, attention at three levels, a 4-level
VAE and a 12-layer CLIP text encoder, every width times ``--scale`` (1.0: the real sizes, for a GPU). The LoRA
rank scales with the width too (256·scale: the paper's r = 256 at miniSD's width), so LoRA's share of the work is
the paper's. Images: a small Imagenette-like folder at --resolution, class prompts.

- **Training**, the same optimizer steps (batch, LoRA or full, EMA, fp32):
  sdmem: ``sdmem.sd.train.SDTrainer`` (latent/text cache built once, its named steps);
  diffusers: ``train_text_to_image_lora.py``'s loop: every step the batch's image files are decoded, cropped and
  resized (the script's dataset transform), the VAE encodes them and the text encoder their prompts, stock
  ``torch.optim.AdamW``, diffusers' ``EMAModel`` (the LoRA script has none; kept so that both paths do the same
  work).
  Both paths run interleaved rounds of steps (the fastest round of each kept: the machine's load drifts).
  Checkpointing is timed once per path and counted as every ``--checkpoint-every`` steps (sdmem's default 500);
  sdmem's cache build is counted as a paper run spends it (|D| = 400 images encoded once per 400k seen).
- **Generation**, the same seeds, batches, DDIM steps and guidance 7.5, PNGs written:
  sdmem: ``sdmem.sd.generate.generate_run`` on the trained run (the whole core: manifest, fused LoRA, prompts
  encoded once, cross-attention keys and values kept across steps, PNG writer thread); diffusers: ``StableDiffusionPipeline.from_pretrained`` + ``load_lora_weights``
  and a loop of plain pipeline calls (one generator per seed) saving each PIL image. Loading is not timed.

    OMP_NUM_THREADS=1 python eval/bench_sd_speed.py [--scale 0.25] [--resolution 128] [--method lora|full]
        [--batch 4] [--lora-forward auto|merged|separate] [--context-kv on|off] [--train-steps 3]
        [--train-rounds 3] [--gen-num 4] [--gen-batch 4] [--gen-steps 50] [--gen-rounds 2] [--device auto|cpu|cuda]

On a shared CPU machine run it with OMP_NUM_THREADS=1 (oversubscribed threads make the timings meaningless);
the ratios are measured in the same run. --scale 1 --resolution 256 is miniSD itself (random weights): on one CPU
thread about 25 minutes and 17 GB of memory at the defaults; on a GPU add larger --batch/--gen-num.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sd import sd1_shaped_components, sync  # noqa: E402


class Clock:
    """Seconds per stage; ``hook(module, stage)`` times a module's forward passes, ``wrap(obj, name, stage)`` a
    method; everything synchronises the device first."""

    def __init__(self, device):
        self.device, self.s = device, defaultdict(float)
        self.lock = __import__("threading").Lock()

    @contextmanager
    def stage(self, name):
        sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            with self.lock:
                self.s[name] += time.perf_counter() - t

    def hook(self, module, name):
        start = {}

        def pre(m, args, kwargs=None):
            sync(self.device)
            start[id(m)] = time.perf_counter()

        def post(m, args, out):
            sync(self.device)
            self.s[name] += time.perf_counter() - start.pop(id(m))
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def wrap(self, obj, attr, name):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self.stage(name):
                return fn(*a, **k)
        setattr(obj, attr, timed)
        return fn


def save_model(comps, out: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    from sdmem.sd.components import quiet_transformers

    with quiet_transformers():
        StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                unet=comps.unet, scheduler=comps.noise_scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False
                                ).save_pretrained(str(out), safe_serialization=True)
    return out


# ------------------------------------------------------------------------------------------------------ training


def best_round(rounds: list[list[dict]]) -> dict:
    """Stage seconds per step of the fastest round (each round: a list of per-step stage dicts)."""
    per_round = [{k: float(np.mean([s.get(k, 0.0) for s in steps])) for k in steps[0]} for steps in rounds]
    return min(per_round, key=lambda p: p["total"])


def sdmem_trainer(cfg_dict: dict, args, device):
    """sdmem's trainer: ``round(n) -> [stage seconds of each of n steps]``, and ``finish() -> (extra stage seconds
    per step: checkpointing and the cache's share, run folder)``."""
    from sdmem.config import config_from_dict
    from sdmem.sd.config import SDConfig
    from sdmem.sd.train import SDTrainer

    import sdmem.sd.cache as cache

    cfg = config_from_dict(SDConfig, cfg_dict)
    clock = Clock(device)
    build = cache.LatentCache.__init__

    def timed_build(self, *a, **k):
        with clock.stage("cache build"):
            build(self, *a, **k)
    cache.LatentCache.__init__ = timed_build
    try:
        tr = SDTrainer(cfg, progress=False)
        tr.open()
        tr._t_last = time.perf_counter()
    finally:
        cache.LatentCache.__init__ = build
    cache_s = clock.s.pop("cache build", 0.0)
    clock.wrap(tr.data, "batch", "data")
    clock.hook(tr.comps.unet, "UNet forward")
    clock.wrap(tr.opt, "step", "optimizer")

    def one_round(n: int) -> list[dict]:
        steps = []
        for _ in range(n):
            clock.s.clear()
            with clock.stage("total"):
                with clock.stage("loss step"):
                    loss = tr.backward()
                    tr.stop_if_nonfinite(loss)
                with clock.stage("EMA"):  # the optimizer step, the LR schedule and the EMA update
                    columns = tr.update()
                tr.step += 1
                tr.loss = loss
                with clock.stage("log/validation"):
                    tr.log_step(columns)
                    if tr.snapshot_due(tr.step):
                        tr.snapshot()
            step = dict(clock.s)
            step["UNet backward"] = step.pop("loss step") - step["data"] - step["UNet forward"]
            step["EMA"] -= step["optimizer"]
            steps.append(step)
        return steps

    def finish() -> tuple[dict, Path]:
        t = time.perf_counter()
        tr.save_checkpoint()
        extra = {"checkpointing": (time.perf_counter() - t) / args.checkpoint_every}
        # The cache: |D| images through the VAE encoder and text encoder once; a paper run sees 1000x |D| images.
        extra["VAE/text encode"] = cache_s / len(tr.subset) * args.batch / 1000
        tr.finish()
        return extra, Path(cfg.out_dir)
    return one_round, finish


def script_transform(path: Path, resolution: int) -> np.ndarray:
    """The example script's per-image transform: decode, resize the short side (bilinear), centre-crop; uint8."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        return np.asarray(img.crop((left, top, left + resolution, top + resolution)))


def diffusers_trainer(model: Path, files: list[Path], prompts: list[str], labels: np.ndarray, args, device):
    """train_text_to_image(_lora).py's loop on the same model, batches and LoRA: ``round(n)`` and ``finish()`` as
    :func:`sdmem_trainer`'s. Its data stage is the script's dataset transform: every step decodes the batch's image
    files, resizes and centre-crops them, then normalises and tokenises."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdmem.training import batch_indices

    tok = CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae").to(device).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet").to(device)
    sched = DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")
    if args.method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    autocast = contextlib.nullcontext()
    if args.precision != "no":  # as the example scripts do: frozen weights in the half dtype, trained ones in fp32
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        text.to(dtype=half)
        vae.to(dtype=half)
        if args.method == "lora":
            unet.to(dtype=half)
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        autocast = torch.autocast(torch.device(device).type, dtype=half)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-6)
    ema = EMAModel(params, decay=0.9999)
    clock = Clock(device)
    clock.hook(unet, "UNet forward")
    count = [0]

    def one_round(n: int) -> list[dict]:
        steps = []
        for _ in range(n):
            k, count[0] = count[0], count[0] + 1
            clock.s.clear()
            with clock.stage("total"):
                idx = batch_indices(k, args.batch, len(files), 0)
                with clock.stage("data"):
                    pixels = torch.from_numpy(np.stack([script_transform(files[i], args.resolution) for i in idx]))
                    pixels = pixels.permute(0, 3, 1, 2)
                    x = (pixels.float() / 127.5 - 1).to(device)
                    ids = tok([prompts[labels[i]] for i in idx], padding="max_length",
                              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
                with clock.stage("VAE/text encode"), torch.no_grad(), autocast:
                    latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
                    hidden = text(ids, return_dict=False)[0]
                with clock.stage("loss step"), autocast:
                    noise = torch.randn_like(latents)
                    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), device=device)
                    pred = unet(sched.add_noise(latents, noise, t), t, hidden, return_dict=False)[0]
                    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
                    loss.backward()
                with clock.stage("optimizer"):
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                with clock.stage("EMA"):
                    ema.step(params)
            step = dict(clock.s)
            step["UNet backward"] = step.pop("loss step") - step["UNet forward"]
            steps.append(step)
        return steps

    def finish() -> tuple[dict, None]:
        with tempfile.TemporaryDirectory() as tmp:  # what accelerator.save_state writes: weights, optimizer, EMA
            t = time.perf_counter()
            save_file({n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad},
                      os.path.join(tmp, "model.safetensors"))
            torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.bin"))
            torch.save(ema.state_dict(), os.path.join(tmp, "ema.bin"))
            return {"checkpointing": (time.perf_counter() - t) / args.checkpoint_every}, None
    return one_round, finish


# ---------------------------------------------------------------------------------------------------- generation


def generate_sdmem(run: Path, out: Path, seeds: list[int], args, device, warm: bool = True) -> tuple[float, dict]:
    import sdmem.generation as core
    import sdmem.sd.generate as gen

    clock = Clock(device)
    make = gen.sampling_renderer

    def timed_renderer(pipe, **kw):  # the pipeline of the run, with its stages timed
        clock.hook(pipe.unet, "UNet")
        clock.hook(pipe.text_encoder, "text encode")
        clock.hook(pipe.vae.decoder, "VAE decode")
        return make(pipe, **kw, context_kv=args.context_kv == "on")
    save = core.save_png

    def timed_save(path, img):
        t = time.perf_counter()
        save(path, img)
        with clock.lock:
            clock.s["PNG writing (writer thread)"] += time.perf_counter() - t
    gen.sampling_renderer, core.save_png = timed_renderer, timed_save
    try:
        plan = gen.run_plan(run, seeds, batch=args.gen_batch, steps=args.gen_steps, device=device)
        load = plan.load

        def timed_load():
            with clock.stage("load"):
                return load()
        plan.load = timed_load
        if warm:  # one block at 2 steps, into another folder
            first = gen.run_plan(run, seeds[: args.gen_batch], batch=args.gen_batch, steps=2, device=device)
            core.generate_folder(out.with_name(out.name + "-warm-up"), seeds[: args.gen_batch], first,
                                 progress=False)
        clock.s.clear()
        with clock.stage("total"):
            core.generate_folder(out, seeds, plan, progress=False)
    finally:
        gen.sampling_renderer, core.save_png = make, save
    per = dict(clock.s)
    per["total"] -= per.pop("load")
    return len(seeds) / per["total"], per


def diffusers_generator(model: Path, run: Path, seeds: list[int], prompts: list[str], args, device):
    """The plain pipeline loop, loaded and warmed up: ``round(out) -> (images/s, stage seconds)``."""
    from diffusers import StableDiffusionPipeline

    from sdmem.sd.components import ddim_scheduler, quiet_diffusers

    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False,
                                                   dtype=dtype)
    pipe.scheduler = ddim_scheduler(pipe.scheduler)
    if args.method == "lora":
        with quiet_diffusers():
            pipe.load_lora_weights(str(run))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(run), safety_checker=None, requires_safety_checker=False,
                                                       dtype=dtype)
        pipe.scheduler = ddim_scheduler(pipe.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    clock = Clock(device)
    clock.hook(pipe.unet, "UNet")
    clock.hook(pipe.text_encoder, "text encode")
    clock.hook(pipe.vae.decoder, "VAE decode")

    def call(block, steps):
        return pipe([prompts[s] for s in block], num_inference_steps=steps, guidance_scale=7.5,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in block], height=args.resolution,
                    width=args.resolution).images
    call(seeds[: args.gen_batch], 2)

    def one_round(out: Path) -> tuple[float, dict]:
        out.mkdir(parents=True, exist_ok=True)
        clock.s.clear()
        with clock.stage("total"):
            for k in range(0, len(seeds), args.gen_batch):
                block = seeds[k : k + args.gen_batch]
                images = call(block, args.gen_steps)
                with clock.stage("PNG writing"):
                    for s, img in zip(block, images):
                        img.save(out / f"{s:06d}.png")
        return len(seeds) / clock.s["total"], dict(clock.s)
    return one_round


# ------------------------------------------------------------------------------------------------------- report


def shares(per: dict, order: list[str]) -> str:
    total = per["total"]
    parts = [(k, per[k]) for k in order if k in per]
    rest = total - sum(v for k, v in parts if "writer thread" not in k)
    parts.append(("other (scheduler, glue)", rest))
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.25,
                   help="width factor of SD v1's layout (1.0: miniSD's sizes; the default 0.25 at 128x128 keeps the "
                        "encoders' share of a step's FLOPs close to SD v1's at 256x256)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--rank", type=int, help="LoRA rank (default: 256 x scale, the paper's r = 256 in proportion)")
    p.add_argument("--batch", type=int, default=4, help="images per training step")
    p.add_argument("--lora-forward", default="auto", choices=["auto", "merged", "separate"],
                   help="sdmem's model.lora_forward (separate: peft's form, as sdmem trained before the key)")
    p.add_argument("--context-kv", default="on", choices=["on", "off"],
                   help="sdmem's sampling keeps the text's cross-attention keys and values across steps (off: as "
                        "before; the images are the same)")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"],
                   help="training precision of both paths (sdmem's train.mixed_precision; autocast for the other)")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per path and round")
    p.add_argument("--train-rounds", type=int, default=3, help="interleaved training rounds per path (best kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps per checkpoint (sdmem's default)")
    p.add_argument("--gen-num", type=int, default=4)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--gen-steps", type=int, default=50)
    p.add_argument("--gen-rounds", type=int, default=2, help="interleaved generation rounds per path (best kept)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--work", help="keep the model, run and images here (default: a temporary folder); a later run "
                                  "with the same --work and --scale reuses the model")
    args = p.parse_args()
    args.rank = args.rank or max(1, round(256 * args.scale))

    from sdmem.config import config_from_dict
    from sdmem.sd.config import SDDataConfig
    from sdmem.sd.data import build_sd_subset, prompt_table
    from sdmem.sd.tiny import make_imagenette_like
    from sdmem.utils import resolve_device

    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # the random model's scheduler config notices
    for lib in (diffusers, transformers):  # loading notices and progress bars
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for old in ("run", "gen"):  # a kept --work folder: this run's outputs start afresh, the model is reused
            shutil.rmtree(work / old, ignore_errors=True)
        model, marker = work / "model", work / "model" / "bench_sd_speed.json"
        n = json.loads(marker.read_text()) if marker.exists() else {}
        if n.get("scale") != args.scale:
            comps = sd1_shaped_components(args.scale)
            n = {k: sum(p.numel() for p in getattr(comps, k).parameters()) / 1e6 for k in ("unet", "vae",
                                                                                           "text_encoder")}
            shutil.rmtree(model, ignore_errors=True)
            save_model(comps, model)
            marker.write_text(json.dumps({**n, "scale": args.scale}))
            del comps
        data = make_imagenette_like(work / "inet", per_class=2, size=(320, 400))
        dcfg = config_from_dict(SDDataConfig, {"source": str(data), "size": 20, "resolution": args.resolution,
                                               "prompt": "class"})
        subset = build_sd_subset(dcfg)
        files = [data / f for f in subset.info["files"]]  # D's image files, for the script's data stage
        prompts = prompt_table(dcfg, subset.class_names)
        threads = f"{torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
        print(f"SD v1 layout x{args.scale}: UNet {n['unet']:.1f}M, VAE {n['vae']:.1f}M, text encoder "
              f"{n['text_encoder']:.1f}M params; {args.resolution}x{args.resolution}, {args.method}"
              + (f" r{args.rank}" if args.method == "lora" else "") + f", training precision {args.precision}, {device} ({threads})")

        total = args.warmup + args.train_rounds * args.train_steps
        cfg = {"kind": "sd", "seed": 0, "out_dir": str(work / "run"),
               "data": {"source": str(data), "size": 20, "resolution": args.resolution, "prompt": "class"},
               "model": {"pretrained": str(model), "method": args.method, "rank": args.rank,
                         "lora_forward": args.lora_forward},
               "train": {"images_seen": total * args.batch, "batch_size": args.batch, "gradient_accumulation": 1,
                         "checkpoint_steps": 10 ** 6, "mixed_precision": args.precision, "ema": True,
                         "validation_every_steps": 0},
               "generate": {"steps": args.gen_steps}}
        paths = {"sdmem": sdmem_trainer(cfg, args, device),
                 "diffusers": diffusers_trainer(model, files, prompts, subset.labels, args, device)}
        rounds = {k: [] for k in paths}
        for name, (one_round, _) in paths.items():
            one_round(args.warmup)
        for _ in range(args.train_rounds):  # interleaved, so that drift in the machine's load hits both alike
            for name, (one_round, _) in paths.items():
                rounds[name].append(one_round(args.train_steps))
        results = {}
        for name, (_, finish) in paths.items():
            per = best_round(rounds[name])
            extra, folder = finish()
            per["total"] += sum(extra.values())
            per.update({k: per.get(k, 0.0) + v for k, v in extra.items()})
            results[name] = (args.batch / per["total"], per)
            if folder is not None:
                run = folder
        (ours, ours_per), (base, base_per) = results["sdmem"], results["diffusers"]
        del paths, rounds  # both trainers' models and optimizer states (at --scale 1: ~10 GB) before generation
        gc.collect()
        train_order = ["data", "VAE/text encode", "UNet forward", "UNet backward", "optimizer", "EMA", "checkpointing",
                       "log/validation"]
        print(f"training ({args.train_rounds} interleaved rounds of {args.train_steps} steps of {args.batch} after "
              f"{args.warmup} warm-up, best round kept; a checkpoint every {args.checkpoint_every}): sdmem "
              f"{ours:.3f} img/s, diffusers way {base:.3f} img/s -> {ours / base:.2f}x")
        print(f"  sdmem:    {shares(ours_per, train_order)}")
        print(f"  diffusers: {shares(base_per, train_order)}")

        names = json.loads((run / "subset.json").read_text())["class_names"]
        seeds = list(range(args.gen_num))
        seed_prompts = [f"a picture of a {names[min(s * len(names) // args.gen_num, len(names) - 1)]}" for s in seeds]
        plain = diffusers_generator(model, run, seeds, seed_prompts, args, device)
        results = {"sdmem": [], "plain": []}
        for r in range(args.gen_rounds):  # interleaved, so that drift in the machine's load hits both alike
            results["sdmem"].append(generate_sdmem(run, work / "gen" / f"sdmem-{r}", seeds, args, device, r == 0))
            results["plain"].append(plain(work / "gen" / f"plain-{r}"))
        (ours, ours_per), (base, base_per) = (max(results[k], key=lambda x: x[0]) for k in ("sdmem", "plain"))
        gen_order = ["text encode", "UNet", "VAE decode", "PNG writing", "PNG writing (writer thread)"]
        print(f"generation ({args.gen_num} images, batch {args.gen_batch}, DDIM {args.gen_steps} steps, guidance "
              f"7.5, PNGs; best of {args.gen_rounds} interleaved rounds): sdmem {ours:.3f} img/s, plain pipeline loop {base:.3f} img/s -> {ours / base:.2f}x")
        print(f"  sdmem:    {shares(ours_per, gen_order)}")
        print(f"  pipeline: {shares(base_per, gen_order)}")


if __name__ == "__main__":
    main()
