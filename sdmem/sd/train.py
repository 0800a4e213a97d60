"""Stable Diffusion UNet fine-tuning (Sec. 6, Appendix G): full or LoRA, plain or class prompts, EMA, resume.

Randomness is a pure function of (seed, rank, step), as in the EDM trainer: the images of each pass come from
per-epoch seeded permutations and one generator, re-seeded every optimizer step, draws the VAE posterior sample,
the noise and the timesteps. A checkpoint (safetensors + JSON, no pickles) holds the trained weights, their
EMA, the optimizer state, the LR schedule and the fp16 loss scale; with the step count that is the whole state.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..config import config_to_dict
from ..data.subset import Subset
from ..errors import InputError
from ..runs import JsonlLog, read_json
from ..training import (Trainer, batch_indices, finish_accelerator, fit, make_optimizer, prepare, rank_share, set_tf32,
                        step_seed, update_ema)
from ..utils import save_png
from .components import make_pipeline
from .config import SDConfig
from .run import SDPaths, save_outputs

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EMPTY_PROMPT_STREAM = 1  # the caption-dropout draw's own seed stream (see empty_prompt_mask)


def ema_decay(step: int, max_decay: float) -> float:
    """diffusers' EMAModel decay after optimizer step ``step`` (1-based): min(max_decay, (1 + s) / (10 + s)) with
    s = step − 1, 0 at the first step. Below step ~90k this is s+1/s+10, i.e. roughly an average of the last
    ~10% of the steps seen so far (with 0.9999, the cap never binds in a 6250-step paper run)."""
    s = step - 1
    return 0.0 if s <= 0 else min(max_decay, (1 + s) / (10 + s))


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


def empty_prompt_mask(seed: int, step: int, micro: int, batch: int, p: float) -> torch.Tensor:
    """Caption dropout (train.empty_prompt_prob = p): which images of the global batch of pass ``micro`` of
    optimizer step ``step`` (0-based) train on the empty prompt "": image i of the batch (its position in
    batch_indices) when u_i < p, u = torch.rand(batch) from a CPU torch.Generator seeded with
    step_seed(step_seed(seed, 0, step), micro, EMPTY_PROMPT_STREAM).

    Its own stream: the noise generator and the global RNG are not touched (p = 0 never draws, so such runs are
    as before the key). The same on every process and device: the dropped images do not depend on the number of
    processes, each process takes its share (rank_share) and knows the step's count without a collective."""
    gen = torch.Generator().manual_seed(step_seed(step_seed(seed, 0, step), micro, EMPTY_PROMPT_STREAM))
    return torch.rand(batch, generator=gen) < p


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


class SDTrainer(Trainer):
    """One SD fine-tuning run on the training skeleton (sdmem.training.fit): AdamW with diffusers' LR schedule,
    ``gradient_accumulation`` passes per optimizer step, EMA with diffusers' warm-up, validation images and a
    checkpoint every ``validation_every_steps`` / ``checkpoint_steps`` (the newest ``checkpoints_total_limit``
    kept), then the final inference weights."""

    name = "sd"
    files = SDPaths

    def __init__(self, cfg: SDConfig, *, progress: bool = True):
        super().__init__(cfg, progress=progress)
        if not torch.cuda.is_available() and cfg.train.mixed_precision == "fp16":
            raise InputError("train.mixed_precision", "fp16 needs a GPU; use bf16 or no on a CPU")
        self.total = cfg.total_steps
        self.keep_checkpoints = cfg.train.checkpoints_total_limit
        self.nonfinite_allowance = 8 if cfg.train.mixed_precision == "fp16" else 0
        self.scaler_state = None
        self.empty_step = self.empty_seen = 0  # empty prompts trained on: this step, the run so far

    def build_subset(self) -> Subset:
        from .data import build_sd_subset

        return build_sd_subset(self.cfg.data)

    def mixed_precision(self) -> str:
        return self.cfg.train.mixed_precision

    def build(self) -> None:
        """The model: the frozen encoders in float32 (they run once when cached), the trained weights in float32 (a
        LoRA's frozen base in the compute dtype), their EMA, AdamW with the LR schedule."""
        from diffusers.optimization import get_scheduler

        from .components import load_components
        from .data import prompt_indices, prompt_table

        cfg, t = self.cfg, self.cfg.train
        with self.acc.main_process_first():
            self.comps = comps = load_components(cfg.model.pretrained, cfg.model.revision)
        check_resolution(cfg, comps)
        set_tf32(t.allow_tf32)
        self.prompts = prompt_table(cfg.data, self.subset.class_names)
        self.prompt_idx = torch.from_numpy(prompt_indices(cfg.data, self.subset))
        for module in (comps.vae, comps.text_encoder):
            to_device(module, self.device, torch.float32)
        self.named = build_trainable(cfg, comps, self.device, DTYPES[t.mixed_precision])
        self.params = [p for _, p in self.named]
        self.ema = [p.detach().clone().float() for p in self.params] if t.ema else None
        self.optimizer = make_optimizer(self.params, lr=t.lr, weight_decay=t.weight_decay, decoupled=True,
                                        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=t.fused_adam)
        self.lr_scheduler = get_scheduler(t.lr_schedule, self.optimizer, num_warmup_steps=t.lr_warmup_steps,
                                          num_training_steps=self.total)

    def weights(self) -> tuple[dict, dict | None]:
        model = {n: p.detach() for n, p in self.named}
        return model, None if self.ema is None else {n: e for (n, _), e in zip(self.named, self.ema)}

    def load_weights(self, model: dict, ema: dict | None) -> None:
        if list(model) != [n for n, _ in self.named]:
            raise ValueError("its trained parameters are not this run's")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(model[n])
            for (n, _), e in zip(self.named, self.ema or []):
                e.copy_(ema[n])

    def extra_state(self) -> dict:
        scaler = self.acc.scaler
        extra = {"lr_scheduler": self.lr_scheduler.state_dict(),
                 "grad_scaler": None if scaler is None else scaler.state_dict()}
        if self.cfg.train.empty_prompt_prob > 0:
            extra["empty_prompts_seen"] = self.empty_seen
        return extra

    def load_extra(self, extra: dict) -> None:
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        self.scaler_state = extra.get("grad_scaler")
        self.empty_seen = int(extra.get("empty_prompts_seen", 0))

    def finished(self) -> bool:
        return self.step >= self.total and self.paths.final.exists()

    def begin(self) -> None:
        from .cache import LatentCache, Uncached

        t, comps, acc = self.cfg.train, self.comps, self.acc
        if t.channels_last:
            comps.unet.to(memory_format=torch.channels_last)
        if t.compile:
            # In place (the module, its parameters and their names stay); static shapes: recompiling with dynamic
            # shapes (after another compiled run of the UNet in this process) broke inductor on the UNet.
            comps.unet.compile(dynamic=False)
        self.ddp_unet = acc.prepare_model(comps.unet)
        self.opt = acc.prepare_optimizer(self.optimizer)
        if self.scaler_state and acc.scaler is not None:
            acc.scaler.load_state_dict(self.scaler_state)
        # With caption dropout the empty prompt is the table's last row, encoded like the others (diffusers' pipeline
        # encodes a negative prompt so: tokenizer("") padded to model_max_length, the text encoder's last states).
        prompts = self.prompts + [""] if t.empty_prompt_prob > 0 else self.prompts
        self.data = (LatentCache if t.cache else Uncached)(
            comps.vae, comps.tokenizer, comps.text_encoder, np.asarray(self.subset.images), prompts,
            device=self.device, dtype=torch.float32)
        self.gen = torch.Generator(device=self.device)

    def backward(self) -> float:
        """``gradient_accumulation`` passes of batch_size images (per_rank here), seeded by the step; the loss
        averaged over passes and processes."""
        cfg, acc, accum = self.cfg, self.acc, self.cfg.train.gradient_accumulation
        s = step_seed(cfg.seed, self.rank, self.step)
        torch.manual_seed(s)
        self.gen.manual_seed(s)
        loss_sum = torch.zeros((), device=self.device)
        self.empty_step = 0
        for micro in range(accum):
            idx = rank_share(batch_indices(self.step * accum + micro, cfg.train.batch_size, len(self.subset),
                                           cfg.seed), self.rank, self.world)
            idx = torch.from_numpy(idx)
            mean, std, text = self.data.batch(idx.to(self.device), self.prompt_rows(micro, idx).to(self.device))
            ctx = acc.no_sync(self.ddp_unet) if micro < accum - 1 else contextlib.nullcontext()
            with ctx:
                loss = sd_loss(self.ddp_unet, self.comps.noise_scheduler, mean, std, text, self.gen,
                               self.comps.vae.config)
                acc.backward(loss / accum)
            loss_sum += loss.detach()
        return float(acc.reduce(loss_sum, reduction="sum")) / (self.world * accum)

    def prompt_rows(self, micro: int, idx: torch.Tensor) -> torch.Tensor:
        """The prompt-table rows of the images ``idx`` (this process's share of pass ``micro``): their own, or with
        caption dropout the empty prompt's (the last row) where empty_prompt_mask says; counts the global batch's."""
        rows, t = self.prompt_idx[idx], self.cfg.train
        if t.empty_prompt_prob == 0:
            return rows
        mask = empty_prompt_mask(self.cfg.seed, self.step, micro, t.batch_size, t.empty_prompt_prob)
        self.empty_step += int(mask.sum())
        return torch.where(rank_share(mask, self.rank, self.world), len(self.prompts), rows)

    def update(self) -> dict:
        """Clip, AdamW and the LR schedule; then ema <- d·ema + (1 − d)·weights, with diffusers' warm-up of d."""
        t = self.cfg.train
        if t.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.params, t.max_grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad(set_to_none=True)
        decay = None
        if self.ema is not None:
            decay = ema_decay(self.step + 1, t.ema_decay)
            update_ema(self.ema, self.params, decay)
        columns = {"lr": lr, "ema_decay": decay}
        if t.empty_prompt_prob > 0:  # empty prompts trained on in this step (all processes) and in the run so far
            self.empty_seen += self.empty_step
            columns.update(empty_prompts=self.empty_step, empty_prompts_seen=self.empty_seen)
        return columns

    def images_seen(self, step: int) -> int:
        return step * self.cfg.images_per_step

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_steps == 0 or step == self.total

    def snapshot_due(self, step: int) -> bool:
        every = self.cfg.train.validation_every_steps
        return bool(every) and (step % every == 0 or step == self.total)

    def final_ema(self) -> list[torch.Tensor] | None:
        """The weights the run's outputs and validation images use: the EMA, unless train.final_weights is last."""
        return self.ema if self.cfg.train.final_weights == "ema" else None

    def snapshot(self) -> None:
        """A few validation images at generate.{steps, guidance_scale}, seeds generate.seed + i, prompts cycling
        over the classes."""
        with swapped_in(self.params, self.final_ema()):
            validate(self.cfg, self.paths, self.comps, self.comps.unet, self.prompts, self.step, self.acc)

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
        summary = {"out_dir": str(paths.root), "steps": self.step, "images_seen": self.images_seen(self.step),
                   "num_train": len(self.subset), "loss": loss, "final": final,
                   "already_done": self.done, "main_process": acc.is_main_process}
        finish_accelerator(acc)
        return summary


def train(cfg: SDConfig, *, progress: bool = True) -> dict:
    """Fine-tune (or resume) the run of ``cfg``; returns a summary (steps, images seen, last loss, outputs)."""
    return fit(SDTrainer(cfg, progress=progress))


def validate(cfg: SDConfig, paths: SDPaths, comps, unet, prompts: list[str], step: int, acc) -> Path:
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

    from .data import build_sd_subset

    _, subset = prepare(cfg, lambda: build_sd_subset(cfg.data), SDPaths)
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
