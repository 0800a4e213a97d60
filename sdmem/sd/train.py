"""Stable Diffusion UNet fine-tuning (Sec. 6, Appendix G): full or LoRA, plain or class prompts, EMA, resume.

Randomness is a pure function of (seed, rank, step), as in the EDM trainer: the images of each pass come from
per-epoch seeded permutations and one generator, re-seeded every optimizer step, draws the VAE posterior sample,
the noise and the timesteps. A checkpoint (safetensors + JSON, no pickles) holds the trained weights, their
EMA, the optimizer state, the LR schedule and the fp16 loss scale; with the step count that is the whole state.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import config_to_dict, flatten_config
from ..data.subset import Subset
from ..errors import InputError, SdmemError
from ..runs import JsonlLog, RunPaths, check_reuse, load_or_build_subset, read_json, write_run_folder
from ..training import (batch_indices, check_world, finish_accelerator, make_accelerator, make_optimizer, rank_share,
                        set_tf32, step_seed, update_ema)
from ..utils import save_png
from .components import make_pipeline
from .config import SDConfig
from .run import load_checkpoint, rotate_checkpoints, save_checkpoint, save_outputs

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ema_decay(step: int, max_decay: float) -> float:
    """diffusers' EMAModel decay after optimizer step ``step`` (1-based): min(max_decay, (1 + s) / (10 + s)) with
    s = step − 1, 0 at the first step. Below step ~90k this is s+1/s+10, i.e. roughly an average of the last
    ~10% of the steps seen so far (with 0.9999, the cap never binds in a 6250-step paper run)."""
    s = step - 1
    return 0.0 if s <= 0 else min(max_decay, (1 + s) / (10 + s))


def prepare(cfg: SDConfig) -> tuple[RunPaths, Subset]:
    """Check the run folder and build (or reload) the training subset D, writing nothing yet."""
    from .data import build_sd_subset

    paths = RunPaths(cfg.out_dir)
    check_reuse(cfg, paths)
    return paths, load_or_build_subset(paths, lambda: build_sd_subset(cfg.data))


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
        from .kernels import merge_lora_forward
        from .lora import add_lora

        to_device(unet, device, weight_dtype)  # the frozen base in the compute dtype; the LoRA in float32
        add_lora(unet, rank=cfg.model.rank, alpha=cfg.model.alpha, target_modules=cfg.model.target_modules,
                 dropout=cfg.model.lora_dropout)
        merge_lora_forward(unet, cfg.model.lora_forward)
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


class SDTrainer:
    """One SD fine-tuning run, as named steps: ``setup`` (folder, model, optimizer, resume), then per optimizer
    step ``loss_step``, ``ema_step``, ``log_step``, ``validation_step`` and ``checkpoint_step``; ``finish``."""

    def __init__(self, cfg: SDConfig, *, progress: bool = True):
        from diffusers.optimization import get_scheduler

        from .components import load_components
        from .data import prompt_indices, prompt_table

        self.cfg, self.progress = cfg, progress
        self.paths, self.subset = prepare(cfg)
        if not torch.cuda.is_available() and cfg.train.mixed_precision == "fp16":
            raise InputError("train.mixed_precision", "fp16 needs a GPU; use bf16 or no on a CPU")
        self.acc = acc = make_accelerator(self.paths.root, self.paths.tensorboard,
                                          mixed_precision=cfg.train.mixed_precision)
        self.device, self.world, self.rank = acc.device, acc.num_processes, acc.process_index
        self.per_rank = check_world(cfg.train.batch_size, self.world)
        self.total = cfg.total_steps
        with acc.main_process_first():
            self.comps = comps = load_components(cfg.model.pretrained, cfg.model.revision)
        check_resolution(cfg, comps)
        set_tf32(cfg.train.allow_tf32)
        self.prompts = prompt_table(cfg.data, self.subset.class_names)
        self.prompt_idx = torch.from_numpy(prompt_indices(cfg.data, self.subset))

        # The model: the frozen encoders in float32 (they run once when cached), the trained weights in float32 (a
        # LoRA's frozen base in the compute dtype), their EMA, AdamW with the LR schedule.
        for module in (comps.vae, comps.text_encoder):
            to_device(module, self.device, torch.float32)
        self.named = build_trainable(cfg, comps, self.device, DTYPES[cfg.train.mixed_precision])
        self.params = [p for _, p in self.named]
        self.ema = [p.detach().clone().float() for p in self.params] if cfg.train.ema else None
        t = cfg.train
        self.optimizer = make_optimizer(self.params, lr=t.lr, weight_decay=t.weight_decay, decoupled=True,
                                        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=t.fused_adam)
        self.lr_scheduler = get_scheduler(t.lr_schedule, self.optimizer, num_warmup_steps=t.lr_warmup_steps,
                                          num_training_steps=self.total)
        self.step, scaler_state = load_checkpoint(cfg, self.paths, self.device, self.named, self.ema, self.optimizer,
                                                  self.lr_scheduler)

        # Now that everything checked out, write the run folder (config and the exact subset D), and drop log rows
        # past the checkpoint: the steps after it are replayed (identically) and logged again.
        if acc.is_main_process:
            write_run_folder(cfg, self.paths, self.subset)
            JsonlLog(self.paths.log).trim(self.step)
            for stale in self.paths.checkpoints.glob(".step-*") if self.paths.checkpoints.is_dir() else ():
                shutil.rmtree(stale, ignore_errors=True)  # a write that a kill interrupted
            acc.init_trackers("sd", config={k: str(v) for k, v in flatten_config(cfg).items()})
        acc.wait_for_everyone()
        self.done = self.step >= self.total and self.paths.final.exists()
        if self.done:
            return
        if t.channels_last:
            comps.unet.to(memory_format=torch.channels_last)
        if t.compile:
            # In place (the module, its parameters and their names stay); static shapes: recompiling with dynamic
            # shapes (after another compiled run of the UNet in this process) broke inductor on the UNet.
            comps.unet.compile(dynamic=False)
        self.ddp_unet = acc.prepare_model(comps.unet)
        self.opt = acc.prepare_optimizer(self.optimizer)
        if scaler_state and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)
        from .cache import LatentCache, Uncached

        self.data = (LatentCache if t.cache else Uncached)(
            comps.vae, comps.tokenizer, comps.text_encoder, np.asarray(self.subset.images), self.prompts,
            device=self.device, dtype=torch.float32)
        self.gen, self.bad, self.t_last = torch.Generator(device=self.device), 0, time.perf_counter()
        self.loss: float | None = None  # the last step's loss; None until a step runs in this process

    def loss_step(self) -> float:
        """One optimizer step: ``gradient_accumulation`` passes of batch_size images (per_rank here), seeded by the
        step; a non-finite loss skips the update (fp16: a few, as the scaler would) or stops training."""
        cfg, acc, accum = self.cfg, self.acc, self.cfg.train.gradient_accumulation
        s = step_seed(cfg.seed, self.rank, self.step)
        torch.manual_seed(s)
        self.gen.manual_seed(s)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            idx = rank_share(batch_indices(self.step * accum + micro, cfg.train.batch_size, len(self.subset),
                                           cfg.seed), self.rank, self.world)
            idx = torch.from_numpy(idx)
            mean, std, text = self.data.batch(idx.to(self.device), self.prompt_idx[idx].to(self.device))
            ctx = acc.no_sync(self.ddp_unet) if micro < accum - 1 else contextlib.nullcontext()
            with ctx:
                loss = sd_loss(self.ddp_unet, self.comps.noise_scheduler, mean, std, text, self.gen,
                               self.comps.vae.config)
                acc.backward(loss / accum)
            loss_sum += loss.detach()
        loss_value = float(acc.reduce(loss_sum, reduction="sum")) / (self.world * accum)
        if not math.isfinite(loss_value):
            self.opt.zero_grad(set_to_none=True)
            self.bad += 1
            if cfg.train.mixed_precision != "fp16" or self.bad > 8:
                ckpts = self.paths.list_checkpoints()
                last = f"the last good state is {ckpts[max(ckpts)]}" if ckpts else "no checkpoint was written yet"
                raise SdmemError(f"{self.paths.root}: the loss became {loss_value} at step {self.step}; training "
                                 f"stopped and {last} (left as it is)")
        else:
            self.bad = 0
        if cfg.train.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
        self.lr = self.lr_scheduler.get_last_lr()[0]
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.loss = loss_value
        return loss_value

    def ema_step(self) -> float | None:
        """ema <- d·ema + (1 − d)·weights, with diffusers' warm-up of d; returns d (None without EMA)."""
        if self.ema is None:
            return None
        decay = ema_decay(self.step, self.cfg.train.ema_decay)
        update_ema(self.ema, self.params, decay)
        return decay

    def log_step(self, decay: float | None) -> None:
        if not (self.step % self.cfg.train.log_every_steps == 0 or self.step == self.total):
            return
        now = time.perf_counter()
        row = {"step": self.step, "images_seen": self.step * self.cfg.images_per_step, "loss": self.loss,
               "lr": self.lr, "ema_decay": decay, "sec": round(now - self.t_last, 3)}
        self.t_last = now
        if self.acc.is_main_process:
            JsonlLog(self.paths.log).append(row)
            self.acc.log({"loss": self.loss, "lr": self.lr}, step=self.step)

    def final_ema(self) -> list[torch.Tensor] | None:
        """The weights the run's outputs and validation images use: the EMA, unless train.final_weights is last."""
        return self.ema if self.cfg.train.final_weights == "ema" else None

    def validation_step(self) -> None:
        """A few images at generate.{steps, guidance_scale}, seeds generate.seed + i, prompts cycling over classes."""
        every = self.cfg.train.validation_every_steps
        if not every or not (self.step % every == 0 or self.step == self.total):
            return
        if self.acc.is_main_process:
            with swapped_in(self.params, self.final_ema()):
                validate(self.cfg, self.paths, self.comps, self.comps.unet, self.prompts, self.step, self.acc)
        if self.world > 1:
            self.acc.wait_for_everyone()

    def checkpoint_step(self) -> None:
        """The full resumable state every train.checkpoint_steps and at the end, the oldest rotated out."""
        if not (self.step % self.cfg.train.checkpoint_steps == 0 or self.step == self.total):
            return
        if self.acc.is_main_process:
            save_checkpoint(self.cfg, self.paths, self.step, self.named, self.ema, self.optimizer, self.lr_scheduler,
                            self.acc.scaler)
            rotate_checkpoints(self.paths, self.cfg.train.checkpoints_total_limit)
        self.acc.wait_for_everyone()

    def finish(self) -> dict:
        """Save the outputs (EMA weights by default, then final.json) and end the processes; returns a summary."""
        cfg, paths, acc = self.cfg, self.paths, self.acc
        final = read_json(paths.final, "final weights record") if self.done else None
        if not self.done and acc.is_main_process:
            with swapped_in(self.params, self.final_ema()):
                final = save_outputs(cfg, paths, self.comps, self.comps.unet, self.step)
        loss = None if self.done else self.loss
        if loss is None and not self.done:  # resumed at the last step: no step ran here, its loss is in the log
            loss = next((r["loss"] for r in reversed(JsonlLog(paths.log).rows()) if r.get("step") == self.step), None)
        summary = {"out_dir": str(paths.root), "steps": self.step, "images_seen": self.step * cfg.images_per_step,
                   "num_train": len(self.subset), "loss": loss, "final": final,
                   "already_done": self.done, "main_process": acc.is_main_process}
        finish_accelerator(acc)
        return summary


def train(cfg: SDConfig, *, progress: bool = True) -> dict:
    """Fine-tune (or resume) the run of ``cfg``; returns a summary (steps, images seen, last loss, outputs)."""
    t = SDTrainer(cfg, progress=progress)
    if not t.done:
        bar = tqdm(total=t.total, initial=t.step, disable=not (progress and t.acc.is_main_process), desc="train",
                   unit="step")
        while t.step < t.total:
            loss = t.loss_step()
            decay = t.ema_step()
            t.log_step(decay)
            t.validation_step()
            t.checkpoint_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
        bar.close()
    return t.finish()


def validate(cfg: SDConfig, paths: RunPaths, comps, unet, prompts: list[str], step: int, acc) -> Path:
    """Validation images (per-seed CPU noise, as sdmem generate), saved as validation/step-N/II.png and logged."""
    from .generate import generate_images

    k = cfg.train.validation_images
    texts = [prompts[i % len(prompts)] for i in range(k)]
    pipe = make_pipeline(comps, unet)
    unet.eval()
    with acc.autocast():
        images = generate_images(pipe, texts, [cfg.generate.seed + i for i in range(k)], resolution=cfg.data.resolution,
                                 steps=cfg.generate.steps, guidance_scale=cfg.generate.guidance_scale,
                                 eta=cfg.generate.eta)
    unet.train()
    folder = paths.validation / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(folder / f"{i:02d}.png", img)
    tracker = next((t for t in acc.trackers if t.name == "tensorboard"), None)
    if tracker is not None:
        tracker.writer.add_images("validation", images, step, dataformats="NHWC")
    return folder


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
