"""The pretrained tiny Stable Diffusion: a StableDiffusionPipeline at 32 x 32 trained here, on 2 CPU cores, from
real pictures that ship with scikit-learn and scikit-image (sdmem.data.photos), so that the SD half of sdmem can be
seen measuring something on any machine.

    python -m sdmem.sd.tiny OUT --pretrained

- VAE: an AutoencoderKL without downsampling (32 channels, 4 latent channels, latents 32 x 32 x 4), trained to
  reconstruct by :func:`sdmem.sd.vae_train.train_vae` on the pretraining mix;
- text encoder and tokenizer: the random CLIP text model (width 32) and character tokenizer of the tiny SD,
  frozen;
- UNet (16, 32, 64), cross-attention at the lowest level: trained by sdmem's own SD trainer (a full run of
  ``kind: sd``) on ``builtin:pretrain-mix``, 18 classes with class prompts, 10% caption dropout
  (``train.empty_prompt_prob``), so classifier-free guidance has a trained unconditional branch.

The result is cached under ``<cache>/tiny-sd/<fingerprint>/`` (:func:`sdmem.cache_dir.cache_root`), the fingerprint
being the recipe's; ``sdmem_tiny.json`` in it records the recipe, every file's SHA-256 and what the build measured
(the VAE's held-out reconstruction RMS, the base's replica ratio against its pretraining set). A second build is a
digest check; a damaged entry is rebuilt. An interrupted build resumes (the UNet from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..cache_dir import cache_root
from ..errors import InputError
from ..utils import atomic_write_text, file_sha256

FORMAT = "sdmem-tiny-sd/1"
MARKER = "sdmem_tiny.json"  # in every tiny SD folder sdmem writes (random or pretrained)
PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")

RECIPE = {
    "format": FORMAT,
    "resolution": 32,
    "data": "builtin:pretrain-mix",
    "vae": {"arch": {"block_out_channels": [32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
                     "mid_block_add_attention": False, "sample_size": 32},
            "steps": 2400, "batch": 8, "lr": 2e-3, "seed": 0},
    "unet": {"block_out_channels": [16, 32, 64], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8, "sample_size": 32, "in_channels": 4, "out_channels": 4},
    "train": {"seed": 0, "data": {"size": 3600, "resolution": 32, "prompt": "class"},
              "train": {"images_seen": 16000, "batch_size": 16, "gradient_accumulation": 1, "lr": 1e-3,
                        "lr_warmup_steps": 50, "empty_prompt_prob": 0.1, "ema_decay": 0.999,
                        "checkpoint_steps": 250, "checkpoints_total_limit": 1, "log_every_steps": 50}},
    # Zero terminal SNR with v-prediction (Lin et al., 2024, as diffusers' rescale_betas_zero_snr): with SD's own
    # schedule the latent keeps sqrt(alpha_bar_T) = 6.8% of the image at t = T, which on a 32 x 32 latent carries
    # its mean colour above the noise; a model that reads it there samples shifted colours from pure noise.
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                  "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False,
                  "clip_sample": False},
    "check": {"samples": 64, "steps": 20, "guidance_scale": 3.0},
}


def recipe_fingerprint(recipe: dict | None = None) -> str:
    return hashlib.sha256(json.dumps(recipe or RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(recipe: dict | None = None) -> Path:
    return cache_root() / "tiny-sd" / recipe_fingerprint(recipe)


def folder_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of the pipeline parts, by path relative to ``folder``."""
    out = {}
    for part in PIPELINE_PARTS:
        p = folder / part
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        out.update({str(q.relative_to(folder)): file_sha256(q) for q in files})
    return out


def read_marker(folder: Path) -> dict | None:
    """The folder's sdmem_tiny.json when it is one sdmem wrote (a JSON object of this format), else None."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def check_entry(folder: Path, fp: str) -> str | None:
    """None when ``folder`` holds the intact pretrained tiny SD of fingerprint ``fp``, else what is wrong."""
    marker = read_marker(folder)
    if marker is None:
        return f"no readable {MARKER}"
    if marker.get("fingerprint") != fp or not marker.get("pretrained"):
        return f"{MARKER} names another build ({marker.get('fingerprint')})"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    try:
        found = folder_digests(folder)
    except OSError as exc:
        return f"cannot read its files ({exc.strerror or exc})"
    if found != files:
        bad = sorted(set(files) ^ set(found) | {k for k in files if k in found and found[k] != files[k]})
        return f"files differ from their recorded SHA-256 ({', '.join(bad[:3])})"
    return None


def pretrained_tiny_sd(*, progress: bool = True, log=print, recipe: dict | None = None) -> Path:
    """The cached pretrained tiny SD (a diffusers folder), built now if the cache lacks it or holds it damaged.
    ``recipe``: RECIPE's shape with other numbers (the tests build a small one)."""
    recipe = recipe or RECIPE
    fp, entry = recipe_fingerprint(recipe), cache_entry(recipe)
    if entry.exists():
        problem = check_entry(entry, fp)
        if problem is None:
            return entry
        if read_marker(entry) is None and any(entry.iterdir()):
            raise InputError(entry, f"is in sdmem's cache but was not written by it ({problem}); move it away")
        log(f"the cached tiny SD in {entry} is damaged ({problem}): rebuilding it")
    return _build(recipe, fp, entry, progress=progress, log=log)


def _lock(folder: Path) -> Path:
    from ..utils import _pid_alive

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    try:
        pid = int(lock.read_text())
    except (OSError, ValueError):
        pid = None
    if pid and pid != os.getpid() and _pid_alive(pid):
        raise InputError(folder, f"another process (pid {pid}) is building the tiny SD here; wait for it")
    lock.write_text(str(os.getpid()))
    return lock


def _build(recipe: dict, fp: str, entry: Path, *, progress: bool, log) -> Path:
    from .vae_train import train_vae

    t0 = time.time()
    work = entry.parent / f".building-{fp}"
    lock = _lock(work)
    init, run = work / "init", work / "run"
    if read_marker(init) is None:  # step 1: the VAE, then the untrained pipeline around it
        from ..data.photos import pretrain_images

        log("training the tiny SD's VAE on the pretraining mix (digits, faces, picture crops)")
        images = pretrain_images(recipe["resolution"])[0]
        v = recipe["vae"]
        vae = train_vae(images, v["arch"], steps=v["steps"], batch=v["batch"], lr=v["lr"], seed=v["seed"],
                        progress=progress)
        _write_init(init, vae, recipe, fp)
    log("pretraining the tiny SD's UNet with sdmem's SD trainer (re-run to resume)")
    from .config import SDConfig
    from .train import train
    from ..config import config_from_dict

    raw = json.loads(json.dumps(recipe["train"]))
    raw["data"]["source"] = recipe["data"]
    raw.update(kind="sd", out_dir=str(run), model={"pretrained": str(init), "method": "full"})
    train(config_from_dict(SDConfig, raw, "the tiny SD recipe"), progress=progress)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for part in PIPELINE_PARTS:
        (shutil.copytree if (run / part).is_dir() else shutil.copyfile)(run / part, out / part)
    measured = measure(out, recipe, progress=progress)
    measured["build_seconds"] = round(time.time() - t0, 1)
    marker = {"format": FORMAT, "pretrained": True, "fingerprint": fp, "recipe": recipe,
              "files": folder_digests(out), "measured": measured, "training_log": "run/log.jsonl (not kept)"}
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")
    if entry.exists():  # a damaged entry of ours (checked by the caller): replaced
        shutil.rmtree(entry)
    os.replace(out, entry)
    lock.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"tiny SD built in {measured['build_seconds']:.0f} s: VAE held-out RMS {measured['vae_heldout_rms']:.2f}, "
        f"base replicas {100 * measured['base_replica_ratio']:.1f}% of {measured['base_samples']} samples")
    return entry


def _write_init(init: Path, vae, recipe: dict, fp: str) -> None:
    """The pipeline the UNet run starts from: the trained VAE, a random UNet of the recipe, the tiny text parts."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from .tiny_model import tiny_pipeline

    shutil.rmtree(init, ignore_errors=True)
    base = tiny_pipeline(seed=0)
    torch.manual_seed(recipe["train"]["seed"])
    base.unet = UNet2DConditionModel(**recipe["unet"])
    base.vae = vae
    base.scheduler = DDIMScheduler(**recipe["scheduler"])
    base.register_modules(unet=base.unet, vae=vae, scheduler=base.scheduler)
    base.save_pretrained(str(init), safe_serialization=True)
    atomic_write_text(init / MARKER, json.dumps({"format": FORMAT, "pretrained": False, "fingerprint": fp,
                                                 "stage": "init"}) + "\n")


def measure(folder: Path, recipe: dict, *, progress: bool = True) -> dict:
    """The build's two quality figures: the VAE's reconstruction RMS on pictures no part trained on (mean, median
    and max over images), and the replica ratio of the base's own samples against its pretraining set."""
    import torch

    from ..audit.api import audit
    from ..data.photos import heldout_images, pretrain_source
    from .components import load_components, make_pipeline
    from .generate import generate_images
    from .vae_train import reconstruction_rms

    comps = load_components(str(folder), where=str(folder))
    rms = reconstruction_rms(comps.vae, heldout_images(recipe["resolution"]))
    c = recipe["check"]
    train_set = pretrain_source()
    names = train_set.class_names
    prompts = [f"a picture of a {names[i % len(names)]}" for i in range(c["samples"])]
    pipe = make_pipeline(comps, comps.unet)
    with torch.no_grad():
        images = generate_images(pipe, prompts, list(range(c["samples"])), resolution=recipe["resolution"],
                                 steps=c["steps"], guidance_scale=c["guidance_scale"])
    report = audit(train_set, images, progress=progress).summary()
    return {"vae_heldout_rms": float(rms.mean()), "vae_heldout_rms_median": float(np.median(rms)),
            "vae_heldout_rms_max": float(rms.max()), "vae_heldout_images": int(len(rms)),
            "base_replica_ratio": float(report["memorization_ratio"]), "base_samples": int(c["samples"]),
            "base_knn_distance": float(report["knn_distance"])}


def copy_pretrained(out: str | os.PathLike, *, progress: bool = True, log=print, recipe: dict | None = None) -> Path:
    """``python -m sdmem.sd.tiny OUT --pretrained``: the cached build copied into OUT. OUT may be absent, empty or a
    tiny SD sdmem wrote (replaced); any other existing folder or file is refused."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(out, "exists and is not a folder")
        if any(out.iterdir()) and read_marker(out) is None:
            raise InputError(out, f"is not a tiny SD made by sdmem (no {MARKER}); refusing to write into it "
                                  "(use a new or empty folder)")
    entry = pretrained_tiny_sd(progress=progress, log=log, recipe=recipe)
    fp = recipe_fingerprint(recipe)
    if out.exists() and check_entry(out, fp) is None:
        return out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(entry, tmp)
    if out.exists():
        for e in out.iterdir():  # an sdmem tiny SD: its parts and marker are replaced, anything else kept
            if e.name in (*PIPELINE_PARTS, MARKER):
                shutil.rmtree(e) if e.is_dir() else e.unlink()
        for e in tmp.iterdir():
            os.replace(e, out / e.name)
        tmp.rmdir()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out
