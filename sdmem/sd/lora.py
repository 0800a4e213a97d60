"""LoRA on the UNet through peft, saved and loaded in diffusers' format (``pytorch_lora_weights.safetensors``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default weight name


def add_lora(unet, *, rank: int, alpha: float, target_modules, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, attach a LoRA adapter (Gaussian init of A, zero B) and return its trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules),
                        lora_dropout=dropout)
    try:
        unet.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise InputError("model.target_modules", f"{list(target_modules)} match no UNet module ({exc})") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise InputError("model.target_modules", f"{list(target_modules)} gave no trainable LoRA parameters")
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights with diffusers' key names (what save_lora_weights expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` atomically, with the adapter config as metadata
    (so alpha != rank survives), loadable by ``StableDiffusionPipeline.load_lora_weights(out_dir)``."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = f".{LORA_WEIGHTS}.tmp-{os.getpid()}"
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=state, safe_serialization=True,
                                              weight_name=tmp,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    os.replace(out / tmp, out / LORA_WEIGHTS)
    return out / LORA_WEIGHTS
