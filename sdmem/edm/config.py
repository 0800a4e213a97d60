"""The ``kind: edm`` run config: a pixel-space EDM training run with every knob the paper studies. Defaults: the
paper's basic CIFAR-10 setup (Appendix B). Imports no torch (num_params imports it when called)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from ..config import Section, need, setting


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """The training set D: source, |D|, classes, label mode, resolution, blending."""
    _prefix: ClassVar[str] = "data"
    source: str = setting()  # any open_source SRC, or builtin:digits / builtin:lfw
    size: int = setting(ge=2)  # |D|
    split: Optional[str] = setting(None)
    num_classes: Optional[int] = setting(None, ge=1)  # C: the first C classes (null: all classes of a labelled source)
    classes: Optional[tuple[int, ...]] = setting(None, ge=0)  # explicit class ids instead (e.g. [5]: CIFAR-10's dog)
    labels: Literal["none", "true", "random", "unique"] = setting("none", aliases={"false": "none"})
    random_label_classes: int = setting(10, ge=1)  # C' for labels: random
    resolution: Optional[int] = setting(None, ge=1)  # Lanczos resize (centre crop first); null: the source's own
    blend_source: Optional[str] = setting(None)  # Sec. 3.2: same-class images from a second, labelled source
    blend_ratio: float = setting(0.0, ge=0.0, le=1.0)  # α: the fraction of each class taken from blend_source
    seed: int = setting(0, ge=0)  # the subset draw (and random labels)

    def _check(self):
        need(self.classes is None or len(set(self.classes)) == len(self.classes) > 0, "data.classes",
              f"expected distinct class ids, got {list(self.classes or ())}")
        need(self.classes is None or self.num_classes is None, "data.num_classes", "give data.num_classes "
              "(the first C classes) or data.classes (these class ids), not both")
        need(self.blend_ratio == 0 or self.blend_source is not None, "data.blend_source",
              f"data.blend_ratio is {self.blend_ratio}, so a blend source is needed")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """The denoiser: EDM preconditioning around a DDPM++ / NCSN++ SongUNet."""
    _prefix: ClassVar[str] = "model"
    arch: Literal["ddpmpp", "ncsnpp"] = setting("ddpmpp")
    precond: Literal["vp", "ve", "edm"] = setting("vp")
    channels: int = setting(128, ge=1)
    channel_mult: tuple[int, ...] = setting((2, 2, 2), ge=1)
    num_blocks: int = setting(2, ge=0)  # residual blocks per resolution (the paper's depth)
    attn_resolutions: tuple[int, ...] = setting((16,), ge=1)
    dropout: float = setting(0.13, ge=0.0, lt=1.0)
    embedding: Optional[Literal["positional", "fourier"]] = setting(None)  # null: the arch preset's
    skip_mask: Optional[tuple[bool, ...]] = setting(None)  # len(channel_mult)·(num_blocks + 1) switches; null: all on

    def _check(self):
        need(len(self.channel_mult) >= 1, "model.channel_mult", "expected a non-empty list of multipliers")
        n = len(self.channel_mult) * (self.num_blocks + 1)
        need(self.skip_mask is None or len(self.skip_mask) == n, "model.skip_mask",
              f"expected {n} switches (len(channel_mult) {len(self.channel_mult)} × (num_blocks {self.num_blocks}"
              f" + 1)), got {len(self.skip_mask or ())}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """The optimisation: Adam, epoch-wise warm-up, EMA, precision, snapshot cadence."""
    _prefix: ClassVar[str] = "train"
    epochs: int = setting(40000, ge=1, training=False)  # may grow on resume: the schedule is flat after warm-up
    batch_size: int = setting(512, ge=1)
    batch_gpu: Optional[int] = setting(None, ge=1, training=False)  # per-pass batch: gradient accumulation
    lr: float = setting(2e-4, gt=0.0)
    weight_decay: float = setting(0.0, ge=0.0)  # L2 penalty (Sec. 5)
    warmup_epochs: int = setting(200, ge=0)  # linear LR and EMA ramp, epoch-wise (Appendix B)
    ema_rate: float = setting(0.99929, ge=0.0, lt=1.0)  # EMA decay per optimizer step (ema_rule says of which batch)
    # per_step: ema_rate per optimizer step whatever the batch (the paper code's default); batch_scaled: ema_rate per
    # 512 images, i.e. a fixed half-life in images (EDM's 500 kimg). Equal at batch 512. Both ramp up in warm-up.
    ema_rule: Literal["per_step", "batch_scaled"] = setting("batch_scaled", since_default=True)
    precision: Literal["fp32", "tf32", "bf16"] = setting("fp32")
    # torch's fused Adam kernel (one pass over every tensor): updates differ from the default implementation by
    # rounding only. Runs made before this key used torch's default (for-loop on CPU, foreach on CUDA).
    fused_adam: bool = setting(True, before=False)
    snapshot_epochs: int = setting(1000, ge=1, training=False)  # EMA snapshot (+ memorization tracking)
    snapshot_kimg: Optional[int] = setting(None, ge=1, training=False)  # instead: every N thousand images (2500)
    checkpoint_epochs: int = setting(500, ge=1, training=False)  # full resumable state
    log_every_steps: int = setting(100, ge=1, training=False)

    def _check(self):
        need(self.batch_gpu is None or self.batch_size % self.batch_gpu == 0, "train.batch_gpu",
              f"expected a divisor of train.batch_size {self.batch_size}, got {self.batch_gpu}")


@dataclass(frozen=True, kw_only=True)
class TrackConfig(Section):
    """Memorization tracking at each snapshot: M generated images audited against D."""
    _prefix: ClassVar[str] = "track"
    num_images: int = setting(10000, ge=0, training=False)  # M generated per snapshot (0: no tracking)
    seed: int = setting(0, ge=0, training=False)  # images use seeds seed .. seed + M - 1
    backend: Literal["auto", "int8", "faiss", "torch"] = setting("auto", training=False)  # the 2-NN search
    batch: int = setting(500, ge=1, training=False)  # images per sampler batch
    steps: int = setting(18, ge=1, training=False)  # EDM Heun steps
    # The sampler's lowest noise level: never below the network's trained range (VE: 0.02, as the paper's
    # evaluation clamps it). `sdmem generate` uses the run's value.
    sigma_min: float = setting(0.002, gt=0.0, lt=80.0, training=False)


@dataclass(frozen=True, kw_only=True)
class EDMConfig(Section):
    """One EDM training run (kind: edm)."""
    kind: Literal["edm"] = setting("edm")
    out_dir: str = setting(training=False)
    seed: int = setting(0, ge=0)  # network init, noise, minibatch order
    data: DataConfig = setting()
    model: ModelConfig = setting(factory=ModelConfig)
    train: TrainConfig = setting(factory=TrainConfig)
    track: TrackConfig = setting(factory=TrackConfig)

    def _check(self):
        levels, res = len(self.model.channel_mult), self.data.resolution
        need(res is None or res % 2 ** (levels - 1) == 0, "data.resolution",
              f"expected a multiple of {2 ** (levels - 1)} (the U-Net halves it len(model.channel_mult) - 1 = "
              f"{levels - 1} times), got {res}")


def network_kwargs(model: ModelConfig | EDMConfig) -> dict:
    """The SongUNet overrides (build_network's ``**overrides``) that the model section asks for."""
    m = model.model if isinstance(model, EDMConfig) else model
    kw = dict(model_channels=m.channels, channel_mult=m.channel_mult, num_blocks=m.num_blocks,
              attn_resolutions=m.attn_resolutions, dropout=m.dropout, skip_mask=m.skip_mask)
    return kw if m.embedding is None else dict(kw, embedding_type=m.embedding)


def num_params(cfg: ModelConfig | EDMConfig, img_resolution: int, label_dim: int = 0) -> int:
    """Trainable parameters of the configured network, counted on the meta device (no memory, no init)."""
    import torch

    from .networks import build_network

    m = cfg.model if isinstance(cfg, EDMConfig) else cfg
    with torch.device("meta"):
        net = build_network(m.arch, img_resolution=img_resolution, label_dim=label_dim, **network_kwargs(m))
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
