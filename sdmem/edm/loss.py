"""EDM's three training losses (Karras et al., 2022, Table 1 and Eq. 2): VP, VE and EDM, without augmentation.

Each draws one noise level σ per image from its training distribution p_train(σ), adds n ~ N(0, σ² I) and
returns the weighted per-pixel denoising error

    λ(σ) · (D_θ(y + n; σ, labels) − y)²                                      (Karras et al., 2022, Eq. 2 / 8)

as a tensor of the images' shape (the caller reduces it; EDM sums per image and divides by the batch).
``net`` is a denoiser called as ``net(x, sigma, labels)`` with sigma [B, 1, 1, 1] (e.g. a `precond` wrapper).
All randomness comes from the optional ``generator`` (on the images' device), σ first and then the noise,
so a run resumed with the generator's state draws exactly the same numbers. Registry: `LOSSES`.
"""

from __future__ import annotations

import torch

__all__ = ["VPLoss", "VELoss", "EDMLoss", "LOSSES"]


def _noise(images: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n = σ · ε, ε ~ N(0, I) of the images' shape, drawn from `generator`."""
    eps = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return eps * sigma


def _weighted_error(net, images, labels, sigma, weight, generator):
    """λ(σ) · (D(y + n; σ) − y)² with n = σ ε (Eq. 2 weighted by λ)."""
    n = _noise(images, sigma, generator)
    denoised = net(images + n, sigma, labels)
    return weight * (denoised - images) ** 2


class VPLoss:
    """VP loss: t ~ U(ε_t, 1), σ = σ_VP(t), λ(σ) = 1/σ² (Table 1, VP column)."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = sqrt(exp(½ β_d t² + β_min t) − 1) (Table 1, VP schedule)."""
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()  # expm1: exact at tiny t

    def __call__(self, net, images: torch.Tensor, labels=None, generator: torch.Generator | None = None):
        """Per-pixel weighted loss [B, C, H, W]."""
        u = torch.rand([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
        # Table 1 (VP training): t = 1 + u (ε_t − 1) ~ U(ε_t, 1); λ(σ) = 1/σ².
        sigma = self.sigma(1 + u * (self.epsilon_t - 1))
        return _weighted_error(net, images, labels, sigma, 1 / sigma ** 2, generator)


class VELoss:
    """VE loss: ln σ ~ U(ln σ_min, ln σ_max), λ(σ) = 1/σ² (Table 1, VE column)."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, net, images: torch.Tensor, labels=None, generator: torch.Generator | None = None):
        """Per-pixel weighted loss [B, C, H, W]."""
        u = torch.rand([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
        # Table 1 (VE training): σ = σ_min (σ_max / σ_min)^u, u ~ U(0, 1); λ(σ) = 1/σ².
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        return _weighted_error(net, images, labels, sigma, 1 / sigma ** 2, generator)


class EDMLoss:
    """EDM loss: ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_d²) / (σ σ_d)² (Table 1, EDM column)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images: torch.Tensor, labels=None, generator: torch.Generator | None = None):
        """Per-pixel weighted loss [B, C, H, W]."""
        z = torch.randn([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
        # Table 1 (EDM training): ln σ ~ N(P_mean, P_std²); λ(σ) = (σ² + σ_d²) / (σ σ_d)².
        sigma = (z * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _weighted_error(net, images, labels, sigma, weight, generator)


LOSSES: dict[str, type] = {"vp": VPLoss, "ve": VELoss, "edm": EDMLoss}
