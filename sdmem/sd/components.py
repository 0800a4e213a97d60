"""Stable Diffusion parts from a hub id or a local diffusers folder: tokenizer, text encoder, VAE, UNet and the
training noise scheduler. Hub ids are resolved to a local snapshot first, so a missing network is one clear
error (with the advice to use a local folder) instead of a traceback from deep inside a loader."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS = (".safetensors", ".bin")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' import-time notices (e.g. about torchvision) while diffusers pipelines import."""
    import transformers

    level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars of tiny and real text encoders alike
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' logger at error level for a block (its notices about absent optional parts)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_diffusers_folder(path: str | os.PathLike, where: str = "model.pretrained") -> Path:
    """``path`` if it holds a Stable Diffusion pipeline as save_pretrained writes it; InputError otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(where, f"{path} is not a folder (expected a diffusers folder or a hub id like "
                                f"lambdalabs/miniSD-diffusers)")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if not (root / "model_index.json").is_file() or missing:
        what = "no model_index.json" if not (root / "model_index.json").is_file() else \
            f"no {', '.join(m + '/' for m in missing)}"
        raise InputError(where, f"{path} is not a diffusers Stable Diffusion folder ({what}; expected "
                                f"model_index.json and {', '.join(c + '/' for c in COMPONENTS)} as written by "
                                "StableDiffusionPipeline.save_pretrained)")
    for c in ("unet", "vae", "text_encoder"):
        files = os.listdir(root / c)
        if "config.json" not in files or not any(f.endswith(_WEIGHTS) for f in files):
            raise InputError(where, f"{root / c} has no config.json or no weights (*.safetensors / *.bin)")
    return root


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as owner/name and is not an existing local path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def resolve_pretrained(name: str, revision: str | None = None, *, download: bool = True,
                       where: str = "model.pretrained") -> Path:
    """A local diffusers folder for ``name``: the folder itself, or a hub snapshot (downloaded if allowed)."""
    if not is_hub_id(name):
        if not os.path.exists(name):
            raise InputError(where, f"{name}: no such folder (and not a hub id of the form owner/name)")
        return check_diffusers_folder(name, where)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = ["model_index.json", *(f"{c}/*.json" for c in COMPONENTS), "tokenizer/*.txt",
                *(f"{c}/*.safetensors" for c in ("unet", "vae", "text_encoder"))]
    offline = _offline() or not download
    try:
        path = Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=offline))
        need_bin = [c for c in ("unet", "vae", "text_encoder")
                    if (path / c).is_dir() and not any(f.endswith(".safetensors") for f in os.listdir(path / c))]
        if need_bin:  # an older repo without safetensors weights
            path = Path(snapshot_download(name, revision=revision, allow_patterns=[f"{c}/*.bin" for c in need_bin],
                                          local_files_only=offline))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise InputError(where, f"{name}: no such model on the Hugging Face hub ({exc.__class__.__name__})") from None
    except (LocalEntryNotFoundError, OSError, ConnectionError) as exc:
        why = "HF_HUB_OFFLINE is set" if _offline() else "no network" if download else "not downloaded yet"
        raise InputError(where, f"cannot get {name} from the Hugging Face hub ({why}, and it is not in the local "
                                f"cache: {exc.__class__.__name__}); download it where there is network "
                                f"(`hf download {name}`) or set model.pretrained to a local diffusers folder "
                                "(e.g. python -m sdmem.sd.tiny runs/tiny-sd for a tiny offline one)") from None
    return check_diffusers_folder(path, where)


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training needs (scheduler: the training noise schedule)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    path: Path | None  # the local folder (None: built in memory)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_components(name: str, revision: str | None = None, *, download: bool = True, unet_from: str | None = None,
                    where: str = "model.pretrained") -> Components:
    """Load every part from ``name`` (hub id or folder); ``unet_from``: a folder whose unet/ replaces it."""
    path = resolve_pretrained(name, revision, download=download, where=where)
    with quiet_transformers():
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder")
            vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae")
            unet = UNet2DConditionModel.from_pretrained(unet_from or str(path), subfolder="unet")
            noise_scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InputError(where, f"{name}: cannot load the Stable Diffusion parts ({exc.__class__.__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for module in (text_encoder, vae):
        module.requires_grad_(False).eval()
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, path)


def ddim_scheduler(noise_scheduler):
    """The DDIM sampler of a run (Appendix G), on the training scheduler's noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1, clip_sample=False,
                                     set_alpha_to_one=False)


def make_pipeline(comps, unet, scheduler=None):
    """A StableDiffusionPipeline around these parts with the DDIM sampler and no safety checker."""
    with quiet_transformers():
        from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=unet, scheduler=scheduler or ddim_scheduler(comps.noise_scheduler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
