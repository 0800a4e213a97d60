"""EDM's preconditioning wrappers (Karras et al., 2022, Table 1): VP, VE and EDM.

Each wraps a raw network F_θ (a `SongUNet` from `build_network`, or any module called as
``model(x, noise_labels, class_labels)``) into a denoiser with the interface the sampler and the optimal
denoiser share: ``D(x, sigma, class_labels=None)`` returning float32 D(x; σ) with x's shape, where

    D(x; σ) = c_skip(σ) · x + c_out(σ) · F_θ(c_in(σ) · x; c_noise(σ))      (Karras et al., 2022, Eq. 7)

x may be any float dtype ([B, C, R, R]); sigma a scalar or [B] (any float dtype); class_labels int64 [B]
indices, one-hot [B, label_dim], or None (zeros: no class). Registry: `PRECONDS`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import InputError
from .networks import build_network


def one_hot_labels(labels, label_dim: int, batch: int, device=None) -> torch.Tensor:
    """float32 [B, label_dim]: int labels [B] as one-hot, float labels as given, None as zeros (no class)."""
    if labels is None:
        return torch.zeros(batch, label_dim, device=device)
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        return labels.to(device=device, dtype=torch.float32).reshape(-1, label_dim)
    labels = labels.reshape(-1).long()
    # Range check only where it costs no GPU sync (CPU labels); CUDA labels are trusted.
    if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= label_dim):
        raise InputError("model.label_dim", f"class labels must lie in [0, {label_dim}), got "
                                            f"{int(labels.min())}..{int(labels.max())}")
    return torch.nn.functional.one_hot(labels.to(device), label_dim).to(torch.float32)


class _Precond(nn.Module):
    """Shared body: builds the network, casts, converts labels, applies Eq. 7 with the subclass's c_*(σ)."""

    sigma_min: float
    sigma_max: float

    def __init__(self, img_resolution: int, img_channels: int = 3, label_dim: int = 0, *, arch: str = "ddpmpp",
                 model: nn.Module | None = None, use_fp16: bool = False, use_bf16: bool = False, **network_kwargs):
        super().__init__()
        if use_fp16 and use_bf16:
            raise InputError("train.precision", "choose one of use_fp16 and use_bf16, not both")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        self.model = model if model is not None else build_network(
            arch, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
            label_dim=label_dim, **network_kwargs)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at float32 sigma [B, 1, 1, 1] (Karras et al., 2022, Table 1)."""
        raise NotImplementedError

    def round_sigma(self, sigma) -> torch.Tensor:
        """The noise level the network supports nearest to sigma (continuous σ: sigma itself)."""
        return torch.as_tensor(sigma)

    def _autocast(self, device: torch.device, force_fp32: bool):
        """Mixed precision context: fp16 on CUDA when use_fp16, bf16 anywhere when use_bf16, else none."""
        if force_fp32:
            return contextlib.nullcontext()
        if self.use_fp16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        if self.use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        """D(x; σ) in float32 (Eq. 7)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        labels = None
        if self.label_dim:
            labels = one_hot_labels(class_labels, self.label_dim, x.shape[0], x.device)
            if labels.shape[0] == 1 and x.shape[0] != 1:
                labels = labels.expand(x.shape[0], -1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        with self._autocast(x.device, force_fp32):
            f_x = self.model(c_in * x, c_noise.flatten(), labels, **model_kwargs)
        # Eq. 7: D = c_skip·x + c_out·F.
        return c_skip * x + c_out * f_x.to(torch.float32)


class VPPrecond(_Precond):
    """Variance preserving (Song et al., 2021) preconditioning; β_d = 19.9, β_min = 0.1, M = 1000, ε_t = 1e-5."""

    def __init__(self, img_resolution: int, img_channels: int = 3, label_dim: int = 0, *, beta_d: float = 19.9,
                 beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5, **kwargs):
        super().__init__(img_resolution, img_channels, label_dim, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # Table 1 (VP): σ range [σ(ε_t), σ(1)].
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1.0))

    def sigma(self, t) -> torch.Tensor:
        """VP schedule σ(t) = sqrt(exp(½ β_d t² + β_min t) − 1) (Table 1)."""
        t = t if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64)
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()  # expm1: exact at tiny t

    def sigma_inv(self, sigma) -> torch.Tensor:
        """Inverse schedule t(σ) = (sqrt(β_min² + 2 β_d ln(1 + σ²)) − β_min) / β_d (Table 1)."""
        sigma = torch.as_tensor(sigma)
        # log1p keeps c_noise accurate in fp32 at small σ (log(1 + σ²) loses σ² < 1e-5 to rounding).
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        # Table 1 (VP): c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = (M − 1) σ⁻¹(σ).
        return (torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma))


class VEPrecond(_Precond):
    """Variance exploding (Song et al., 2021) preconditioning; σ ∈ [0.02, 100]."""

    def __init__(self, img_resolution: int, img_channels: int = 3, label_dim: int = 0, *, sigma_min: float = 0.02,
                 sigma_max: float = 100.0, **kwargs):
        super().__init__(img_resolution, img_channels, label_dim, **kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        # Table 1 (VE): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ / 2).
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al., 2022, Sec. 5); σ_data = 0.5, σ ∈ [0, ∞)."""

    def __init__(self, img_resolution: int, img_channels: int = 3, label_dim: int = 0, *, sigma_data: float = 0.5,
                 sigma_min: float = 0.0, sigma_max: float = float("inf"), **kwargs):
        super().__init__(img_resolution, img_channels, label_dim, **kwargs)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        # Table 1 (EDM): c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d / sqrt(σ² + σ_d²), c_in = 1/sqrt(σ² + σ_d²),
        # c_noise = ¼ ln σ.
        sd2 = self.sigma_data ** 2
        return (sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt(),
                1 / (sigma ** 2 + sd2).sqrt(), sigma.log() / 4)


PRECONDS: dict[str, type[_Precond]] = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}
