"""`sdmem generate` for an SD run: DDIM (50 steps), safety checker off, classifier-free guidance 7.5, one seed per
image (file name = seed), the plain prompt for every image or |seeds|/C per class; through the shared generation
core (fixed seed grid, per-seed CPU noise, manifest, verified resume)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import fingerprint
from ..errors import InputError
from ..generation import Plan, generate_folder, seeded_latents
from ..runs import RunPaths, read_json, read_run_config
from ..utils import resolve_device
from .config import SDConfig
from .data import class_prompt

_ETA_STREAM = 1  # DDIM eta > 0 draws its step noise from a per-seed stream apart from the initial noise


def class_names_of(run_dir: str | os.PathLike) -> list[str] | None:
    info = read_json(RunPaths(run_dir).subset_info, "subset record")
    return info.get("class_names") if isinstance(info, dict) else None


def class_rule(cfg: SDConfig, class_names: list[str] | None, class_label: str | int | None, first: int,
               count: int) -> Callable[[int], dict]:
    """The prompt (and class) of each seed: the plain prompt; or, for class prompts, class ⌊(s − first)·C/count⌋
    of seed s (count/C per class in seed order: 10k seeds -> seeds 0-999 class 0, ...), or one fixed class."""
    if cfg.data.prompt == "plain":
        if class_label not in (None, "random", "balanced"):
            raise InputError("--class", "this run uses the plain prompt; it takes no class")
        return lambda seed: {"prompt": cfg.data.plain_template}
    if not class_names:
        raise InputError("--class", "the run folder records no class names (subset.json)")
    c_count = len(class_names)
    if class_label in (None, "random", "balanced"):
        def pick(seed: int) -> int:
            return min(max((seed - first) * c_count // count, 0), c_count - 1)
    else:
        text, lowered = str(class_label), [c.lower() for c in class_names]
        if text.lower() in lowered:
            fixed = lowered.index(text.lower())
        else:
            try:
                fixed = int(text)
            except ValueError:
                raise InputError("--class", f"expected a class index or name ({', '.join(class_names)}), got "
                                            f"{text!r}") from None
        if not 0 <= fixed < c_count:
            raise InputError("--class", f"expected a class in [0, {c_count}), got {fixed}")

        def pick(seed: int) -> int:
            return fixed
    return lambda seed: {"prompt": class_prompt(cfg.data.class_template, class_names[pick(seed)]),
                         "class": pick(seed)}


def load_run_pipeline(run_dir: str | os.PathLike, *, snapshot: str = "final", device: str = "cpu",
                      dtype=torch.float32):
    """(pipeline with the DDIM sampler, config, weights description) for a LoRA or a full run."""
    from .components import load_components, make_pipeline, quiet_diffusers
    from .run import read_checkpoint

    cfg, paths = read_run_config(run_dir, "sd"), RunPaths(run_dir)
    if snapshot in ("final", "latest"):
        if not paths.final.exists():
            raise InputError(run_dir, "has no final weights yet (final.json); finish training (re-run sdmem train) "
                                      "or pass --snapshot STEP for a checkpoint")
        final = read_json(paths.final, "final weights record")
        if cfg.model.method == "full":
            comps = load_components(str(paths.root), where=str(run_dir))
            pipe = make_pipeline(comps, comps.unet)
        else:
            comps = load_components(cfg.model.pretrained, cfg.model.revision)
            pipe = make_pipeline(comps, comps.unet)
            with quiet_diffusers():  # "No LoRA keys associated to CLIPTextModel": there are none, by design
                pipe.load_lora_weights(str(paths.root))
        weights = f"final ({final.get('weights')}, step {final.get('step')})"
    else:
        step = checkpoint_step(run_dir, snapshot)
        tensors, meta = read_checkpoint(paths.list_checkpoints()[step])
        comps = load_components(cfg.model.pretrained, cfg.model.revision)
        if cfg.model.method == "lora":
            from .lora import add_lora

            add_lora(comps.unet, rank=cfg.model.rank, alpha=cfg.model.alpha, target_modules=cfg.model.target_modules)
        use_ema = cfg.train.ema and cfg.train.final_weights == "ema"
        prefix = "ema." if use_ema else "param."
        named = dict(comps.unet.named_parameters())
        try:
            with torch.no_grad():
                for n in meta["param_names"]:
                    named[n].copy_(tensors[prefix + n])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise InputError(paths.list_checkpoints()[step], f"does not fit this run's model ({exc})") from None
        pipe = make_pipeline(comps, comps.unet)
        weights = f"checkpoint step {step} ({'ema' if use_ema else 'last'})"
    pipe.to(device) if pipe.unet.dtype == dtype else pipe.to(device, dtype)
    pipe.unet.eval()
    return pipe, cfg, weights


def checkpoint_step(run_dir: str | os.PathLike, snapshot: str) -> int:
    """The checkpoint step that ``--snapshot STEP`` names (it must exist)."""
    try:
        step = int(snapshot)
    except ValueError:
        raise InputError("--snapshot", f"expected final or a checkpoint step, got {snapshot!r}") from None
    ckpts = RunPaths(run_dir).list_checkpoints()
    if step not in ckpts:
        raise InputError("--snapshot", f"no checkpoint at step {step} in {run_dir}; present: {list(ckpts)}")
    return step


def generate_images(pipe, prompts: list[str], seeds: list[int], *, resolution: int, steps: int, guidance_scale: float,
                    eta: float = 0.0) -> np.ndarray:
    """uint8 [n, R, R, 3]; image i starts from its own seed's noise drawn on the CPU, whatever the batch or device."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    side = resolution // pipe.vae_scale_factor
    latents = seeded_latents(seeds, (pipe.unet.config.in_channels, side, side), device, dtype)
    gens = None
    if eta > 0:  # DDIM's per-step noise, per seed, on the CPU too
        gens = [torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([int(s), _ETA_STREAM])
                                                       .generate_state(1, np.uint64)[0] >> 1)) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta, generator=gens,
                   latents=latents, height=resolution, width=resolution, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def check_options(*, steps: int, guidance: float, batch: int) -> None:
    """Refuse non-finite or out-of-range sampling options before anything loads."""
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and 0 <= guidance <= 100):
        raise InputError("--guidance", f"expected a finite scale in [0, 100], got {guidance}")
    if not 1 <= steps <= 1000:
        raise InputError("--steps", f"expected 1 to 1000 DDIM steps (the scheduler's training timesteps), got {steps}")
    if not 1 <= batch <= 4096:
        raise InputError("--batch", f"expected 1 to 4096 images per batch, got {batch}")


def run_plan(run_dir: str | os.PathLike, seeds: list[int], *, snapshot: str = "final",
             class_label: str | int | None = "random", batch: int | None = None, steps: int | None = None,
             guidance: float | None = None, device: str = "auto") -> Plan:
    """The generation plan of an SD run (the pipeline loads only when images are missing)."""
    cfg = read_run_config(run_dir, "sd")
    steps = cfg.generate.steps if steps is None else steps
    guidance = cfg.generate.guidance_scale if guidance is None else guidance
    batch = cfg.generate.batch if batch is None else batch
    check_options(steps=steps, guidance=guidance, batch=batch)
    snapshot = "final" if snapshot in ("final", "latest") else f"step {checkpoint_step(run_dir, snapshot)}"
    if snapshot == "final" and not RunPaths(run_dir).final.exists():
        raise InputError(run_dir, "has no final weights yet (final.json); finish training (re-run sdmem train) "
                                  "or pass --snapshot STEP for a checkpoint")
    condition = class_rule(cfg, class_names_of(run_dir), class_label, min(seeds, default=0), max(len(seeds), 1))
    dev = resolve_device(device)
    res = cfg.data.resolution
    settings = {"made_by": {"kind": "sd", "fingerprint": fingerprint(cfg)}, "snapshot": snapshot,
                "sampler": "ddim", "steps": steps, "guidance_scale": float(guidance), "eta": cfg.generate.eta,
                "batch": batch, "size": [res, res]}
    info = {"run": str(Path(run_dir).resolve()), "device": dev, "prompt_mode": cfg.data.prompt}

    def load():
        dtype = torch.float16 if dev == "cuda" else torch.float32
        pipe, _, weights = load_run_pipeline(run_dir, snapshot=snapshot.removeprefix("step "), device=dev,
                                             dtype=dtype)
        info["weights"] = weights

        def render(block: list[int], conds: list[dict]) -> np.ndarray:
            return generate_images(pipe, [c["prompt"] for c in conds], block, resolution=res, steps=steps,
                                   guidance_scale=guidance, eta=cfg.generate.eta)
        return render

    return Plan(settings, condition, load, info)


def generate_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seeds: list[int],
                 snapshot: str = "final", class_label: str | int | None = "random", batch: int | None = None,
                 steps: int | None = None, guidance: float | None = None, device: str = "auto",
                 progress: bool = True) -> int:
    """Write ``{seed:06d}.png`` for every seed not already done in ``out_dir`` (and its manifest); returns how many
    were new. Defaults: the run's generate section (DDIM 50 steps, guidance 7.5, its batch). A flagged replica is
    regenerated with its seed and class (``seeds=[s]``, ``class_label=c`` from manifest.json) into a new folder
    with the same batch: its grid block is re-rendered, so the image is the same."""
    plan = run_plan(run_dir, seeds, snapshot=snapshot, class_label=class_label, batch=batch, steps=steps,
                    guidance=guidance, device=device)
    return generate_folder(out_dir, seeds, plan, progress=progress)
