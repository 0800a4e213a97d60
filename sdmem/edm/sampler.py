"""EDM's deterministic Heun sampler (Karras et al., 2022, Alg. 1 with S_churn = 0) and per-seed noise.

Pure functions shared by `sdmem optimum` and the EDM trainer. Images live in EDM's data space: float
[-1, 1], channels first [B, C, H, W]. A denoiser is any callable ``denoiser(x, sigma, class_labels)``
returning D(x; σ) with x's shape; the sampler passes x as float64 [B, C, H, W], sigma as a float64 [B]
tensor and class_labels as int64 [B] (or None), and casts what comes back to float64.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..generation import seed32 as _seed32, seeded_latents  # noqa: F401 (seeded_latents: shared per-seed noise)

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

_LABEL_STREAM = 0x1ABE1  # second word of the label generator's seed: a stream apart from the latents'


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 [num_steps + 1]: Karras et al. (2022) Eq. 5 noise levels from sigma_max down to sigma_min, then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    # Karras et al. (2022) Eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, σ_N = 0.
    frac = i / (num_steps - 1) if num_steps > 1 else torch.zeros_like(i)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def seeded_class_labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """int64 [B] uniform in [0, num_classes): one label per seed, from a generator apart from the latents'."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = [np.random.default_rng([_seed32(s), _LABEL_STREAM]).integers(num_classes) for s in seeds]
    return torch.tensor(labels, dtype=torch.int64).reshape(len(seeds))


@torch.no_grad()
def heun_sampler(denoiser: Denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                 num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> torch.Tensor:
    """Integrate the probability-flow ODE from unit-normal latents down to σ = 0; float32 [B, C, H, W]."""
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    batch = latents.shape[0]

    def d_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Karras et al. (2022) Eq. 4 with σ(t) = t: dx/dt = (x − D(x; t)) / t.
        denoised = denoiser(x, t.expand(batch), class_labels).to(torch.float64)
        return (x - denoised) / t

    # x_0 ~ N(0, σ_max² I): the unit-normal latents scaled by σ_max (Alg. 1 line 2).
    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        # Alg. 1 lines 5-6: Euler step x_{i+1} = x_i + (t_{i+1} − t_i) d_i.
        d_cur = d_of(x_cur, t_cur)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            # Alg. 1 lines 7-8: 2nd-order (trapezoidal) correction, skipped at the last step (t_N = 0).
            d_prime = d_of(x_next, t_next)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C] by EDM's rule (x·127.5 + 128, clipped, truncated)."""
    # EDM generate.py: (x · 127.5 + 128).clip(0, 255) cast to uint8, i.e. round((x + 1) · 127.5) half up.
    x = x.detach().to(torch.float32)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [-1, 1] (EDM's u / 127.5 − 1)."""
    u = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if u.dtype != torch.uint8 or u.ndim != 4:
        raise ValueError(f"expected uint8 [B, H, W, C] images, got {u.dtype} {tuple(u.shape)}")
    # EDM training/dataset: x = u / 127.5 − 1.
    return (u.to(device).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1).contiguous()
