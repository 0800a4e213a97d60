"""The ``kind: sd`` run config: Stable Diffusion UNet fine-tuning (full or LoRA) on a few hundred images with
plain or class prompts. Defaults: the paper's setup (Sec. 6, Appendix G). Imports no diffusers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from ..config import Section, need, setting

DEFAULT_PRETRAINED = "lambdalabs/miniSD-diffusers"  # the paper's base model (Appendix G, footnote 4)
DEFAULT_LR = {"full": 1e-4, "lora": 3e-4}  # Appendix G
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # the attention projections
CLASS_FIELD = "{class}"


@dataclass(frozen=True, kw_only=True)
class SDDataConfig(Section):
    """The training set D and its prompts: |D| images, an equal share per class, centre crop + resize."""
    _prefix: ClassVar[str] = "data"
    source: str = setting()  # an Imagenette folder, any labelled image folder, hf:NAME[:SPLIT], npz, ...
    split: Optional[str] = setting(None)  # Imagenette / hf: / CIFAR splits (null: train)
    size: int = setting(ge=1)  # |D|, |D|/C images per class
    resolution: int = setting(256, ge=8)  # centre crop + Lanczos resize (Appendix G: 256x256)
    prompt: Literal["plain", "class"] = setting("plain")
    plain_template: str = setting("a picture")
    class_template: str = setting("a picture of a {class}")
    seed: int = setting(0, ge=0)  # the subset draw

    def _check(self):
        need(CLASS_FIELD in self.class_template, "data.class_template",
              f"expected a template containing {CLASS_FIELD} (e.g. 'a picture of a {{class}}'), got "
              f"{self.class_template!r}")
        need(bool(self.plain_template.strip()), "data.plain_template", "expected a non-empty prompt")


@dataclass(frozen=True, kw_only=True)
class SDModelConfig(Section):
    """The pretrained pipeline and what of its UNet trains: all of it (full) or a LoRA on the attention."""
    _prefix: ClassVar[str] = "model"
    pretrained: str = setting(DEFAULT_PRETRAINED)  # a hub id or a local diffusers folder
    revision: Optional[str] = setting(None)  # hub revision (branch, tag or commit)
    method: Literal["full", "lora"] = setting("lora")
    rank: int = setting(16, ge=1)  # LoRA rank r
    alpha: Optional[float] = setting(None, gt=0.0)  # LoRA alpha (scale alpha / r); null: = rank
    target_modules: tuple[str, ...] = setting(DEFAULT_TARGET_MODULES)  # peft target_modules (UNet module names)
    lora_dropout: float = setting(0.0, ge=0.0, lt=1.0)
    # How a LoRA layer computes while it trains (sdmem.sd.kernels): "separate" is peft's x·Wᵀ + s·(x·Aᵀ)·Bᵀ,
    # "merged" x·(W + s·B·A)ᵀ, "auto" merged where that needs fewer FLOPs (high ranks). Same mathematics, other
    # rounding; runs made before this key computed "separate".
    lora_forward: Literal["auto", "merged", "separate"] = setting("auto", before="separate")

    def _check(self):
        need(len(self.target_modules) > 0, "model.target_modules", "expected at least one module name")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))


@dataclass(frozen=True, kw_only=True)
class SDTrainConfig(Section):
    """The optimisation (Appendix G): AdamW, cosine LR, batch 16 x accumulation 4, EMA, 400k images seen."""
    _prefix: ClassVar[str] = "train"
    images_seen: int = setting(400_000, ge=1)  # stop after this many training images (Appendix G: 400k)
    batch_size: int = setting(16, ge=1)  # images per forward pass, all processes together (before accumulation)
    gradient_accumulation: int = setting(4, ge=1)  # passes per optimizer step: a step sees batch_size x this
    lr: Optional[float] = setting(None, gt=0.0)  # null: 1e-4 (full) or 3e-4 (lora)
    lr_schedule: Literal["cosine", "constant", "linear", "constant_with_warmup", "cosine_with_restarts",
                         "polynomial"] = setting("cosine")
    lr_warmup_steps: int = setting(0, ge=0)
    weight_decay: float = setting(1e-6, ge=0.0)  # AdamW (decoupled)
    adam_beta1: float = setting(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = setting(0.999, ge=0.0, lt=1.0)
    adam_eps: float = setting(1e-8, gt=0.0)
    max_grad_norm: float = setting(1.0, ge=0.0)  # 0: no clipping
    # torch's fused AdamW kernel (one pass over every trained tensor; 3.8x faster than the default on CPU): updates
    # differ from the default implementation by rounding only. Runs made before this key used torch's default.
    fused_adam: bool = setting(True, before=False)
    # Caption dropout (diffusers' --proportion_empty_prompts): each training image's prompt is replaced by the empty
    # prompt "" with this probability (a seeded draw per image and pass), so the unconditional branch that
    # classifier-free guidance uses trains too. Runs made before this key trained with none.
    empty_prompt_prob: float = setting(0.0, ge=0.0, le=1.0, before=0.0)
    ema: bool = setting(True)  # EMA of the trained weights (the LoRA's, for LoRA)
    ema_decay: float = setting(0.9999, ge=0.0, lt=1.0)  # cap of diffusers' EMA warm-up min(decay, k / (k + 9))
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", aliases={"false": "no"})
    final_weights: Literal["ema", "last"] = setting("ema", training=False)  # which weights the run's outputs hold
    gradient_checkpointing: bool = setting(False, training=False)
    attention: Literal["sdpa", "eager"] = setting("sdpa", training=False)  # scaled_dot_product_attention or plain
    # The UNet in channels_last memory format (faster convolutions on many GPUs; 0.95x on a 2-core CPU) and through
    # torch.compile (a slow first step): both change float rounding only, so the run is not bit-equal to one without.
    channels_last: bool = setting(False, training=False)
    compile: bool = setting(False, training=False)
    allow_tf32: bool = setting(False, training=False)
    cache: bool = setting(True, training=False)  # precompute VAE latent moments and text embeddings (exact)
    checkpoint_steps: int = setting(500, ge=1, training=False)  # full resumable state every N optimizer steps
    checkpoints_total_limit: Optional[int] = setting(2, ge=1, training=False)  # keep the newest N (null: all)
    log_every_steps: int = setting(10, ge=1, training=False)
    validation_every_steps: int = setting(0, ge=0, training=False)  # 0: no validation images
    validation_images: int = setting(4, ge=1, training=False)


@dataclass(frozen=True, kw_only=True)
class SDGenerateConfig(Section):
    """Sampling for validation images and the default of ``sdmem generate`` (Appendix G: DDIM, 50 steps)."""
    _prefix: ClassVar[str] = "generate"
    steps: int = setting(50, ge=1, le=1000, training=False)
    guidance_scale: float = setting(7.5, ge=0.0, le=100.0, training=False)  # the paper gives none: diffusers' default
    eta: float = setting(0.0, ge=0.0, training=False)  # DDIM eta (0: deterministic given the seed)
    batch: int = setting(16, ge=1, le=4096, training=False)
    seed: int = setting(0, ge=0, training=False)  # validation images use seeds seed .. seed + k - 1


@dataclass(frozen=True, kw_only=True)
class SDConfig(Section):
    """One Stable Diffusion fine-tuning run (kind: sd)."""
    kind: Literal["sd"] = setting("sd")
    out_dir: str = setting(training=False)
    seed: int = setting(0, ge=0)  # LoRA init, noise, timesteps, minibatch order
    data: SDDataConfig = setting()
    model: SDModelConfig = setting(factory=SDModelConfig)
    train: SDTrainConfig = setting(factory=SDTrainConfig)
    generate: SDGenerateConfig = setting(factory=SDGenerateConfig)

    def _check(self):
        if self.train.lr is None:
            object.__setattr__(self, "train", dataclasses.replace(self.train, lr=DEFAULT_LR[self.model.method]))

    def ignored_keys(self) -> set[str]:
        """Training keys this config does not use (LoRA keys of a full run, the other prompt template)."""
        keys = {"data.class_template" if self.data.prompt == "plain" else "data.plain_template"}
        if self.model.method == "full":
            keys |= {"model.rank", "model.alpha", "model.target_modules", "model.lora_dropout", "model.lora_forward"}
        if not self.train.ema:
            keys.add("train.ema_decay")
        return keys

    @property
    def images_per_step(self) -> int:
        """Images per optimizer step: train.batch_size x train.gradient_accumulation."""
        return self.train.batch_size * self.train.gradient_accumulation

    @property
    def total_steps(self) -> int:
        """Optimizer steps until train.images_seen images have been seen (rounded up)."""
        return -(-self.train.images_seen // self.images_per_step)
