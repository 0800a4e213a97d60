"""Stable Diffusion UNet fine-tuning (Sec. 6, Appendix G): full or LoRA, plain or class prompts, EMA, resume.

Randomness is a pure function of (seed, rank, step), as in the EDM trainer: the images of each pass come from
per-epoch seeded permutations and one generator, re-seeded every optimizer step, draws the VAE posterior sample,
the noise and the timesteps. A checkpoint (safetensors + JSON, no pickles) holds the trained weights, their
EMA, the optimizer state, the LR schedule and the fp16 loss scale; with the step count that is the whole state.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import flatten_config, config_to_dict
from ..data.subset import Subset, load_subset, save_subset
from ..edm.train import batch_indices, step_seed
from ..errors import InputError, SdmemError
from ..utils import atomic_write_text, finish_accelerator, make_accelerator
from .config import SDConfig
from .run import SDRunPaths, check_run_folder, load_checkpoint, rotate_checkpoints, save_checkpoint, save_outputs

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ema_decay(step: int, max_decay: float) -> float:
    """diffusers' EMAModel decay after optimizer step ``step`` (1-based): min(max_decay, (1 + s) / (10 + s)) with
    s = step − 1, 0 at the first step. Below step ~90k this is s+1/s+10, i.e. roughly an average of the last
    ~10% of the steps seen so far (with 0.9999, the cap never binds in a 6250-step paper run)."""
    s = step - 1
    return 0.0 if s <= 0 else min(max_decay, (1 + s) / (10 + s))


def prepare(cfg: SDConfig) -> tuple[SDRunPaths, Subset]:
    """Check the run folder and build (or reload) the training subset D, writing nothing yet."""
    from .data import build_sd_subset

    paths = SDRunPaths(cfg.out_dir)
    check_run_folder(cfg, paths)
    subset = load_subset(paths.root) if (paths.root / "subset.npz").exists() else build_sd_subset(cfg.data)
    return paths, subset


def sd_loss(unet, noise_scheduler, mean: torch.Tensor, std: torch.Tensor, text: torch.Tensor,
            gen: torch.Generator, vae_config) -> torch.Tensor:
    """The SD denoising loss of one pass: ||target − unet(z_t, t, text)||² averaged, target by prediction_type.

    Draws, in this order, the VAE posterior sample z = mean + std·ε₁, the noise ε₂, timesteps t ~ U{0..T−1}.
    """
    from .cache import sample_latents

    device = mean.device
    latents = sample_latents(mean, std, torch.randn(mean.shape, generator=gen, device=device), vae_config)
    noise = torch.randn(latents.shape, generator=gen, device=device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kind = noise_scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": latents}.get(kind)
    if kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    if target is None:
        raise InputError("model.pretrained", f"unsupported scheduler prediction_type {kind!r}")
    pred = unet(noisy, t, text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")


def _make_accelerator(cfg: SDConfig, paths: SDRunPaths):
    if not torch.cuda.is_available() and cfg.train.mixed_precision == "fp16":
        raise InputError("train.mixed_precision", "fp16 needs a GPU; use bf16 or no on a CPU")
    return make_accelerator(paths.root, paths.tensorboard, mixed_precision=cfg.train.mixed_precision)


def check_resolution(cfg: SDConfig, comps) -> None:
    """The UNet halves the latent (R / vae_scale) len(block_out_channels) − 1 times: R must allow that."""
    down = len(comps.unet.config.block_out_channels) - 1
    need = comps.vae_scale_factor * 2 ** down
    if cfg.data.resolution % need:
        raise InputError("data.resolution", f"expected a multiple of {need} for {cfg.model.pretrained} (the VAE "
                                            f"downsamples {comps.vae_scale_factor}x, the UNet 2^{down}), "
                                            f"got {cfg.data.resolution}")


def to_device(module, device, dtype):
    """``module.to(device, dtype)``, casting only when the dtype changes (diffusers warns on every cast)."""
    from .components import quiet_diffusers

    if next(module.parameters()).dtype == dtype:
        return module.to(device)
    with quiet_diffusers():  # "modules that should be kept in float32: []"
        return module.to(device, dtype=dtype)


def build_trainable(cfg: SDConfig, comps, device, weight_dtype) -> list[tuple[str, torch.nn.Parameter]]:
    """Put the UNet on ``device`` and make what trains trainable: every weight (full) or a new LoRA (seeded)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = comps.unet
    unet.set_attn_processor(AttnProcessor2_0() if cfg.train.attention == "sdpa" else AttnProcessor())
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(cfg.seed)
    if cfg.model.method == "lora":
        from .lora import add_lora

        to_device(unet, device, weight_dtype)  # the frozen base in the compute dtype; the LoRA in float32
        add_lora(unet, rank=cfg.model.rank, alpha=cfg.model.alpha, target_modules=cfg.model.target_modules,
                 dropout=cfg.model.lora_dropout)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        to_device(unet, device, torch.float32).requires_grad_(True)
    unet.train()
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def swapped_in(params: list[torch.Tensor], values: list[torch.Tensor] | None):
    """Temporarily copy ``values`` (e.g. the EMA) into ``params``; restored bit for bit afterwards."""
    if values is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, [v.to(p.dtype) for p, v in zip(params, values)])
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


def make_pipeline(comps, unet, scheduler=None):
    """A StableDiffusionPipeline around these parts with the DDIM sampler and no safety checker."""
    from .components import ddim_scheduler, quiet_transformers

    with quiet_transformers():
        from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=unet, scheduler=scheduler or ddim_scheduler(comps.noise_scheduler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validate(cfg: SDConfig, paths: SDRunPaths, comps, unet, prompts: list[str], step: int, acc) -> Path:
    """A few images at generate.{steps, guidance_scale}, seeds generate.seed + i, prompts cycling over classes."""
    from .generate import save_png

    k = cfg.train.validation_images
    texts = [prompts[i % len(prompts)] for i in range(k)]
    gens = [torch.Generator(device=acc.device).manual_seed(cfg.generate.seed + i) for i in range(k)]
    pipe = make_pipeline(comps, unet)
    unet.eval()
    with torch.no_grad(), acc.autocast():
        images = pipe(texts, num_inference_steps=cfg.generate.steps, guidance_scale=cfg.generate.guidance_scale,
                      generator=gens, height=cfg.data.resolution, width=cfg.data.resolution, output_type="np").images
    unet.train()
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    folder = paths.validation / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(folder / f"{i:02d}.png", img)
    tracker = next((t for t in acc.trackers if t.name == "tensorboard"), None)
    if tracker is not None:
        tracker.writer.add_images("validation", images, step, dataformats="NHWC")
    return folder


def _write_run_folder(cfg: SDConfig, paths: SDRunPaths, subset: Subset, acc) -> None:
    if acc.is_main_process:
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.config, json.dumps(config_to_dict(cfg), indent=2) + "\n")
        if not (paths.root / "subset.npz").exists():
            save_subset(subset, paths.root)
        for stale in paths.checkpoints.glob(".step-*") if paths.checkpoints.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # a write that a kill interrupted
        acc.init_trackers("sd", config={k: str(v) for k, v in flatten_config(cfg).items()})
    acc.wait_for_everyone()


def train(cfg: SDConfig, *, progress: bool = True) -> dict:
    """Fine-tune (or resume) the run of ``cfg``; returns a summary (steps, images seen, last loss, outputs)."""
    from diffusers.optimization import get_scheduler

    from .cache import LatentCache, Uncached
    from .components import load_components
    from .data import prompt_indices, prompt_table

    paths, subset = prepare(cfg)
    acc = _make_accelerator(cfg, paths)
    device, world, rank = acc.device, acc.num_processes, acc.process_index
    if cfg.train.batch_size % world:
        raise InputError("train.batch_size", f"must be divisible by the {world} processes")
    per_rank, accum, total = cfg.train.batch_size // world, cfg.train.gradient_accumulation, cfg.total_steps
    with acc.main_process_first():
        comps = load_components(cfg.model.pretrained, cfg.model.revision)
    check_resolution(cfg, comps)
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    prompts, prompt_idx = prompt_table(cfg.data, subset.class_names), prompt_indices(cfg.data, subset)

    # The model: the frozen encoders in float32 (they run once when cached), the trained weights in float32 (a
    # LoRA's frozen base in the compute dtype), their EMA, AdamW with the cosine schedule.
    for module in (comps.vae, comps.text_encoder):
        to_device(module, device, torch.float32)
    named = build_trainable(cfg, comps, device, weight_dtype)
    params = [p for _, p in named]
    ema = [p.detach().clone().float() for p in params] if cfg.train.ema else None
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                  eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
    lr_scheduler = get_scheduler(cfg.train.lr_schedule, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
                                 num_training_steps=total)
    step, scaler_state = load_checkpoint(cfg, paths, device, named, ema, optimizer, lr_scheduler)

    # Now that everything checked out, write the run folder (config and the exact subset D).
    _write_run_folder(cfg, paths, subset, acc)
    if step >= total and paths.final.exists():
        summary = {"out_dir": str(paths.root), "steps": step, "images_seen": step * cfg.images_per_step,
                   "num_train": len(subset), "loss": None, "already_done": True, "main_process": acc.is_main_process,
                   "final": json.loads(paths.final.read_text())}
        finish_accelerator(acc)
        return summary
    ddp_unet = acc.prepare_model(comps.unet)
    opt = acc.prepare_optimizer(optimizer)
    if scaler_state and acc.scaler is not None:
        acc.scaler.load_state_dict(scaler_state)
    data = (LatentCache if cfg.train.cache else Uncached)(
        comps.vae, comps.tokenizer, comps.text_encoder, np.asarray(subset.images), prompts, device=device,
        dtype=torch.float32)
    prompt_idx_t = torch.from_numpy(prompt_idx)

    bar = tqdm(total=total, initial=step, disable=not (progress and acc.is_main_process), desc="train", unit="step")
    gen, loss_value, t_last, bad = torch.Generator(device=device), float("nan"), time.perf_counter(), 0
    while step < total:
        # One optimizer step: `accum` passes of batch_size images (per_rank on this process), seeded by the step.
        s = step_seed(cfg.seed, rank, step)
        torch.manual_seed(s)
        gen.manual_seed(s)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            idx = batch_indices(step * accum + micro, cfg.train.batch_size, len(subset), cfg.seed)
            idx = torch.from_numpy(idx[rank * per_rank : (rank + 1) * per_rank])
            mean, std, text = data.batch(idx.to(device), prompt_idx_t[idx].to(device))
            ctx = acc.no_sync(ddp_unet) if micro < accum - 1 else contextlib.nullcontext()
            with ctx:
                loss = sd_loss(ddp_unet, comps.noise_scheduler, mean, std, text, gen, comps.vae.config)
                acc.backward(loss / accum)
            loss_sum += loss.detach()
        loss_value = float(acc.reduce(loss_sum, reduction="sum")) / (world * accum)
        if not math.isfinite(loss_value):
            opt.zero_grad(set_to_none=True)
            bad += 1
            if cfg.train.mixed_precision != "fp16" or bad > 8:  # fp16: a few overflows are skipped, as the scaler would
                ckpts = paths.list_checkpoints()
                last = f"the last good state is {ckpts[max(ckpts)]}" if ckpts else "no checkpoint was written yet"
                raise SdmemError(f"{paths.root}: the loss became {loss_value} at step {step}; training stopped and "
                                 f"{last} (left as it is)")
        else:
            bad = 0
        if cfg.train.max_grad_norm > 0:
            acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
        lr = lr_scheduler.get_last_lr()[0]
        opt.step()
        lr_scheduler.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        # Update the EMA: ema <- d·ema + (1 − d)·weights, with diffusers' warm-up of d.
        decay = ema_decay(step, cfg.train.ema_decay) if ema is not None else None
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1.0 - decay)

        if step % cfg.train.log_every_steps == 0 or step == total:
            now = time.perf_counter()
            row = {"step": step, "images_seen": step * cfg.images_per_step, "loss": loss_value, "lr": lr,
                   "ema_decay": decay, "sec": round(now - t_last, 3)}
            t_last = now
            if acc.is_main_process:
                with open(paths.log, "a") as f:
                    f.write(json.dumps(row) + "\n")
                acc.log({"loss": loss_value, "lr": lr}, step=step)
                bar.set_postfix(loss=f"{loss_value:.4g}")

        # Validation images (EMA weights when final_weights is ema), then the full resumable state.
        every = cfg.train.validation_every_steps
        if every and (step % every == 0 or step == total) and acc.is_main_process:
            use = ema if cfg.train.final_weights == "ema" else None
            with swapped_in(params, use):
                validate(cfg, paths, comps, comps.unet, prompts, step, acc)
        if step % cfg.train.checkpoint_steps == 0 or step == total:
            if acc.is_main_process:
                save_checkpoint(cfg, paths, step, named, ema, optimizer, lr_scheduler, acc.scaler)
                rotate_checkpoints(paths, cfg.train.checkpoints_total_limit)
            acc.wait_for_everyone()
        elif every and world > 1 and step % every == 0:
            acc.wait_for_everyone()
    bar.close()

    # The outputs: EMA weights by default (train.final_weights), then final.json.
    final = None
    if acc.is_main_process:
        use = ema if cfg.train.final_weights == "ema" else None
        with swapped_in(params, use):
            final = save_outputs(cfg, paths, comps, comps.unet, step)
    summary = {"out_dir": str(paths.root), "steps": step, "images_seen": step * cfg.images_per_step,
               "num_train": len(subset), "loss": loss_value, "final": final, "main_process": acc.is_main_process}
    finish_accelerator(acc)
    return summary


def dry_run(cfg: SDConfig) -> dict:
    """The resolved config with what it implies: D, prompts, steps, and the trainable parameter count when the
    model is available locally (nothing is downloaded or written)."""
    from .components import resolve_pretrained
    from .data import prompt_table

    _, subset = prepare(cfg)
    out = {"num_train": len(subset), "num_classes": len(subset.class_names or []) or None,
           "class_names": subset.class_names, "prompts": prompt_table(cfg.data, subset.class_names),
           "images_per_step": cfg.images_per_step, "total_steps": cfg.total_steps}
    try:
        path = resolve_pretrained(cfg.model.pretrained, cfg.model.revision, download=False)
    except InputError as exc:
        if not exc.problem.startswith("cannot get"):
            raise
        out["num_params"] = None
        out["note"] = f"{cfg.model.pretrained} is not in the local cache; sdmem train will download it"
    else:
        out["num_params"] = count_trainable(cfg, path)
    return {**out, **config_to_dict(cfg)}


def count_trainable(cfg: SDConfig, path: Path) -> int:
    """Trainable parameters (the whole UNet, or the LoRA), counted on the meta device (no memory, no init)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(path), subfolder="unet"))
        if cfg.model.method == "lora":
            from .lora import add_lora

            add_lora(unet, rank=cfg.model.rank, alpha=cfg.model.alpha, target_modules=cfg.model.target_modules)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)
