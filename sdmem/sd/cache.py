"""VAE latents and text embeddings: computed once (the encoders are frozen and nothing is augmented) or per
batch. Both paths go through the same two functions and draw the latent sample from the same seeded noise, so
for one seed the cached and the uncached loss are the same."""

from __future__ import annotations

import numpy as np
import torch


def to_pixels(images: np.ndarray | torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 [n, R, R, 3] -> [n, 3, R, R] in [-1, 1] (what the SD VAE expects)."""
    x = torch.tensor(np.asarray(images)).to(device)  # a copy: subset images may be a read-only memmap
    return (x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1).to(dtype)


@torch.no_grad()
def encode_images(vae, images: np.ndarray | torch.Tensor, *, device, dtype=torch.float32,
                  batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(mean, std²) of each image, as float32 (mean, std) [n, 4, R/8, R/8]."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(to_pixels(images[start : start + batch], device, dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor, vae_config) -> torch.Tensor:
    """A scaled latent z = (mean + std·noise − shift)·scaling_factor (DiagonalGaussianDistribution.sample)."""
    z = mean + std * noise
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae_config.scaling_factor


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], *, device, batch: int = 64) -> torch.Tensor:
    """The text encoder's last hidden states [len(prompts), 77, D] as float32 (SD's conditioning)."""
    out = [text_encoder(tokenize(tokenizer, prompts[s : s + batch], device))[0].float()
           for s in range(0, len(prompts), batch)]
    return torch.cat(out)


class LatentCache:
    """The moments of every training image's VAE posterior and the embedding of every distinct prompt."""

    def __init__(self, vae, tokenizer, text_encoder, images: np.ndarray, prompts: list[str], *, device, dtype):
        self.mean, self.std = encode_images(vae, images, device=device, dtype=dtype)
        self.text = encode_prompts(tokenizer, text_encoder, prompts, device=device)

    def batch(self, idx: torch.Tensor, prompt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, text embeddings) of the training images ``idx`` with prompts ``prompt_idx``."""
        return self.mean[idx], self.std[idx], self.text[prompt_idx]


class Uncached:
    """The same interface, encoding each batch afresh (the VAE encoder runs every step)."""

    def __init__(self, vae, tokenizer, text_encoder, images: np.ndarray, prompts: list[str], *, device, dtype):
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        self.images, self.prompts, self.device, self.dtype = images, prompts, device, dtype

    def batch(self, idx: torch.Tensor, prompt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = idx.cpu().numpy()
        mean, std = encode_images(self.vae, np.asarray(self.images)[ids], device=self.device, dtype=self.dtype,
                                  batch=max(len(ids), 1))
        text = encode_prompts(self.tokenizer, self.text_encoder, [self.prompts[int(i)] for i in prompt_idx],
                              device=self.device)
        return mean, std, text
