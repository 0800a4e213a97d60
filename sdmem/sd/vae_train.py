"""Training a small diffusers AutoencoderKL to reconstruct real pictures: the tiny SD's VAE (sdmem.sd.pretrained).

The routine, measured on 2 CPU cores (see the README, "The pretrained tiny SD"):
- a deterministic autoencoder: the decoder learns from the posterior mean (sampling the posterior while training
  was worse: held-out RMS 35 against 22 after 300 steps), and after training the posterior's log-variance is set to
  diffusers' floor (-30, std 3e-7), so ``latent_dist.sample()`` is the mean;
- loss L1 + 0.5 MSE in [-1, 1]; AdamW with a one-cycle schedule, gradient norm clipped at 1; small batches (8: at
  the same compute, 2400 steps of 8 reached held-out RMS 7.1 where 600 of 32 reached 18);
- colour augmentation: a random channel permutation and a random 3 x 3 colour mix near the identity per image, so
  grey pictures teach colour too;
- ``scaling_factor`` = 1 / the standard deviation of the training latents, as SD's 0.18215 was chosen.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

LOGVAR_FLOOR = -30.0  # diffusers' DiagonalGaussianDistribution clamps the log-variance to [-30, 20]


def make_vae(arch: dict, seed: int):
    """An AutoencoderKL from ``arch`` (block_out_channels, layers_per_block, latent_channels, norm_num_groups,
    mid_block_add_attention), its weights drawn from ``seed``."""
    from diffusers import AutoencoderKL

    ch = tuple(arch["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=ch,
                         layers_per_block=arch["layers_per_block"], latent_channels=arch["latent_channels"],
                         down_block_types=("DownEncoderBlock2D",) * len(ch),
                         up_block_types=("UpDecoderBlock2D",) * len(ch), norm_num_groups=arch["norm_num_groups"],
                         mid_block_add_attention=arch["mid_block_add_attention"], sample_size=arch["sample_size"])


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def posterior_mean(vae, x: torch.Tensor) -> torch.Tensor:
    moments = vae.quant_conv(vae.encoder(x)) if vae.quant_conv is not None else vae.encoder(x)
    return moments[:, : vae.config.latent_channels]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])
    x = x[torch.arange(b)[:, None], perm]
    mix = torch.eye(3) + 0.3 * torch.randn(b, 3, 3, generator=g)
    return torch.einsum("bij,bjhw->bihw", mix, x).clamp(-1, 1)


def train_vae(images: np.ndarray, arch: dict, *, steps: int, batch: int, lr: float, seed: int,
              progress: bool = True):
    """Train the VAE of ``arch`` on uint8 ``images`` (N x H x W x 3); returns it in eval mode, its posterior
    log-variance at the floor and its scaling_factor set."""
    vae = make_vae(arch, seed).train()
    x_all = _to_unit(images)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="VAE", unit="step", disable=not progress)
    for _ in bar:
        x = _augment(x_all[torch.randint(len(x_all), (batch,), generator=g)], g)
        r = vae.decode(posterior_mean(vae, x)).sample
        loss = (r - x).abs().mean() + 0.5 * (r - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        lat = vae.config.latent_channels
        vae.quant_conv.weight[lat:] = 0.0  # the log-variance rows: a constant floor, the posterior is its mean
        vae.quant_conv.bias[lat:] = LOGVAR_FLOOR
        std = torch.cat([posterior_mean(vae, x_all[i : i + 256]) for i in range(0, len(x_all), 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return vae


@torch.no_grad()
def reconstruction_rms(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Per image, the RMS per-pixel l2 between the picture and its reconstruction, in 0-255 units (the decoded
    image rounded to uint8 as a saved picture is)."""
    out = []
    for i in range(0, len(images), batch):
        x = _to_unit(images[i : i + batch])
        r = vae.decode(vae.encode(x).latent_dist.sample()).sample
        r = torch.round((r.clamp(-1, 1) + 1) * 127.5)
        out.append(((r - (x + 1) * 127.5) ** 2).mean(dim=(1, 2, 3)).sqrt())
    return torch.cat(out).numpy().astype(np.float64)
