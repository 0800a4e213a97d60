"""`sdmem generate` for an SD run: DDIM (50 steps), safety checker off, classifier-free guidance 7.5, one seed per
image (file name = seed), the plain prompt for every image or |seeds|/C per class; through the shared generation
core (fixed seed grid, per-seed CPU noise, manifest, verified resume).

For speed (eval/bench_sd_speed.py): each distinct prompt (and the empty prompt of classifier-free guidance) is
encoded once per run, alone, so its embedding never depends on the batch it came in (diffusers' own call encodes
each batch's prompts together, and a batched GEMM may round a row differently: images within 1/255 of its, recorded
as ``prompt_encoding`` in the manifest's settings); the conditional and unconditional halves go through the UNet in one call (diffusers' pipeline does
that); the VAE decodes a whole block at once; PNGs are written by the generation core's writer thread. A LoRA is
fused into the UNet's weights for sampling (``fuse_lora``: no LoRA matmuls per step), which changes the images
within rounding (max 2/255 per pixel, recorded as ``lora_fused`` in the manifest's settings); each block's text
keys and values of the cross-attentions are projected at its first step and reused at the others
(``kernels.ContextKV``: bit-identical images); ``compile=True``
(``--compile``) runs the UNet through ``torch.compile`` (images equal within a tolerance, recorded as ``compile``).
"""

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
from ..runs import read_json, read_run_config
from ..utils import resolve_device
from .config import SDConfig
from .data import class_prompt
from .kernels import ContextKV
from .run import SDPaths

_ETA_STREAM = 1  # DDIM eta > 0 draws its step noise from a per-seed stream apart from the initial noise


def class_names_of(run_dir: str | os.PathLike) -> list[str] | None:
    info = read_json(SDPaths(run_dir).subset_info, "subset record")
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
    return class_prompt_rule(cfg.data.class_template, class_names, class_label, first, count)


def class_prompt_rule(template: str, class_names: list[str], class_label: str | int | None, first: int,
                      count: int) -> Callable[[int], dict]:
    """Class prompts (``template`` with each class name): class ⌊(s − first)·C/count⌋ of seed s, or one fixed
    class (``class_label``: an index or a name); shared by SD runs and any diffusers pipeline."""
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
    return lambda seed: {"prompt": class_prompt(template, class_names[pick(seed)]), "class": pick(seed)}


def load_run_pipeline(run_dir: str | os.PathLike, *, snapshot: str = "final", device: str = "cpu",
                      dtype=torch.float32):
    """(pipeline with the DDIM sampler, config, weights description) for a LoRA or a full run."""
    from .components import load_components, make_pipeline, quiet_diffusers
    from .. import checkpoint

    cfg, paths = read_run_config(run_dir, "sd"), SDPaths(run_dir)
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
        ck = checkpoint.read(paths.list_checkpoints()[step])
        comps = load_components(cfg.model.pretrained, cfg.model.revision)
        if cfg.model.method == "lora":
            from .lora import add_lora

            add_lora(comps.unet, rank=cfg.model.rank, alpha=cfg.model.alpha, target_modules=cfg.model.target_modules)
        use_ema = cfg.train.ema and cfg.train.final_weights == "ema"
        tensors = ck.ema if use_ema else ck.model
        named = dict(comps.unet.named_parameters())
        try:
            with torch.no_grad():
                for n in ck.model:
                    named[n].copy_(tensors[n])
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
    ckpts = SDPaths(run_dir).list_checkpoints()
    if step not in ckpts:
        raise InputError("--snapshot", f"no checkpoint at step {step} in {run_dir}; present: {list(ckpts)}")
    return step


def fuse_lora(module) -> int:
    """Merge every peft LoRA layer of ``module`` into its base layer's weights (as diffusers' ``fuse_lora`` and
    peft's ``merge_and_unload`` do; here computed in float32 and cast back) and put the base layer back in its
    place, so that a forward pass runs no LoRA matmul. Returns how many layers were fused."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad():
        for name, layer in layers:
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            layer.to(torch.float32)
            layer.merge()  # the active adapters, with their scaling (alpha / rank, set_adapters weights)
            base.to(dtype)
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, base)
    return len(layers)


PROMPT_ENCODING = "each prompt alone, once"  # the manifest's record of PromptEmbeddings' rule


class PromptEmbeddings:
    """The text embeddings of a pipeline's prompts, each distinct prompt encoded once and alone (by the pipeline's
    own ``encode_prompt``), so its embedding never depends on which batch asked for it. The unconditional half of
    classifier-free guidance is the empty prompt's embedding, as diffusers computes it."""

    def __init__(self, pipe):
        self.pipe, self.table = pipe, {}

    @staticmethod
    def supports(pipe) -> bool:
        from diffusers import StableDiffusionPipeline

        return isinstance(pipe, StableDiffusionPipeline)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for text in dict.fromkeys(prompts):
            if text not in self.table:
                with torch.no_grad():
                    self.table[text] = self.pipe.encode_prompt([text], self.pipe.unet.device, 1, False)[0]
        return torch.cat([self.table[t] for t in prompts])


def generate_images(pipe, prompts: list[str], seeds: list[int], *, resolution: int, steps: int, guidance_scale: float,
                    eta: float = 0.0, embeddings: PromptEmbeddings | bool | None = None) -> np.ndarray:
    """uint8 [n, R, R, 3]; image i starts from its own seed's noise drawn on the CPU, whatever the batch or device.
    A StableDiffusionPipeline gets its prompts as embeddings from ``embeddings`` (a run's table: each prompt encoded
    once; by default a table for this call; False: the pipeline encodes the batch's prompts itself)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    side = resolution // pipe.vae_scale_factor
    latents = seeded_latents(seeds, (pipe.unet.config.in_channels, side, side), device, dtype)
    gens = None
    if eta > 0:  # DDIM's per-step noise, per seed, on the CPU too
        gens = [torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([int(s), _ETA_STREAM])
                                                       .generate_state(1, np.uint64)[0] >> 1)) for s in seeds]
    if embeddings is None and PromptEmbeddings.supports(pipe):
        embeddings = PromptEmbeddings(pipe)
    text = {"prompt": prompts}
    if embeddings:
        text = {"prompt_embeds": embeddings(prompts), "negative_prompt_embeds": embeddings([""] * len(prompts))}
    with torch.no_grad():
        out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta, generator=gens,
                   latents=latents, height=resolution, width=resolution, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def sampling_renderer(pipe, *, resolution: int, steps: int, guidance_scale: float, eta: float = 0.0,
                      compile: bool = False, encode_once: bool = True,
                      context_kv: bool = True) -> Callable[[list[int], list[dict]], np.ndarray]:
    """The generation core's ``render(seeds, conditions)`` for a loaded pipeline: prompts encoded once per run
    (``encode_once``; else by the pipeline, per batch), the text's cross-attention keys and values kept across a
    block's steps (``context_kv``; the same images either way), the UNet optionally compiled (``torch.compile``;
    the first block then includes the compile time)."""
    if encode_once and not PromptEmbeddings.supports(pipe):
        raise RuntimeError(f"{type(pipe).__name__}: prompts are encoded once only for a StableDiffusionPipeline")
    embeddings = PromptEmbeddings(pipe) if encode_once else False
    if compile:
        pipe.unet.compile(dynamic=False)  # static shapes: dynamic ones broke inductor on the UNet
    elif context_kv:  # each block's text keys and values projected once, not once per step (bit-identical images)
        ContextKV(pipe.unet)

    def render(block: list[int], conds: list[dict]) -> np.ndarray:
        return generate_images(pipe, [c["prompt"] for c in conds], block, resolution=resolution, steps=steps,
                               guidance_scale=guidance_scale, eta=eta, embeddings=embeddings)
    return render


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
             guidance: float | None = None, device: str = "auto", fuse: bool = True, compile: bool = False) -> Plan:
    """The generation plan of an SD run (the pipeline loads only when images are missing). ``fuse``: a LoRA run's
    LoRA fused into the UNet for sampling; ``compile``: the UNet through torch.compile (both recorded in the
    settings, as they change the images within rounding)."""
    cfg = read_run_config(run_dir, "sd")
    steps = cfg.generate.steps if steps is None else steps
    guidance = cfg.generate.guidance_scale if guidance is None else guidance
    batch = cfg.generate.batch if batch is None else batch
    check_options(steps=steps, guidance=guidance, batch=batch)
    snapshot = "final" if snapshot in ("final", "latest") else f"step {checkpoint_step(run_dir, snapshot)}"
    if snapshot == "final" and not SDPaths(run_dir).final.exists():
        raise InputError(run_dir, "has no final weights yet (final.json); finish training (re-run sdmem train) "
                                  "or pass --snapshot STEP for a checkpoint")
    condition = class_rule(cfg, class_names_of(run_dir), class_label, min(seeds, default=0), max(len(seeds), 1))
    dev = resolve_device(device)
    res = cfg.data.resolution
    settings = {"made_by": {"kind": "sd", "fingerprint": fingerprint(cfg)}, "snapshot": snapshot,
                "sampler": "ddim", "steps": steps, "guidance_scale": float(guidance), "eta": cfg.generate.eta,
                "batch": batch, "size": [res, res], "prompt_encoding": PROMPT_ENCODING}
    fuse = fuse and cfg.model.method == "lora"
    if fuse:
        settings["lora_fused"] = True
    if compile:
        settings["compile"] = True
    info = {"run": str(Path(run_dir).resolve()), "device": dev, "prompt_mode": cfg.data.prompt}

    def load():
        dtype = torch.float16 if dev == "cuda" else torch.float32
        pipe, _, weights = load_run_pipeline(run_dir, snapshot=snapshot.removeprefix("step "), device=dev,
                                             dtype=dtype)
        info["weights"] = weights
        if fuse:
            fuse_lora(pipe.unet)
        return sampling_renderer(pipe, resolution=res, steps=steps, guidance_scale=guidance, eta=cfg.generate.eta,
                                 compile=compile)

    return Plan(settings, condition, load, info)


def generate_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seeds: list[int],
                 snapshot: str = "final", class_label: str | int | None = "random", batch: int | None = None,
                 steps: int | None = None, guidance: float | None = None, device: str = "auto",
                 progress: bool = True, fuse: bool = True, compile: bool = False) -> int:
    """Write ``{seed:06d}.png`` for every seed not already done in ``out_dir`` (and its manifest); returns how many
    were new. Defaults: the run's generate section (DDIM 50 steps, guidance 7.5, its batch). A flagged replica is
    regenerated with its seed and class (``seeds=[s]``, ``class_label=c`` from manifest.json) into a new folder
    with the same batch: its grid block is re-rendered, so the image is the same."""
    plan = run_plan(run_dir, seeds, snapshot=snapshot, class_label=class_label, batch=batch, steps=steps,
                    guidance=guidance, device=device, fuse=fuse, compile=compile)
    return generate_folder(out_dir, seeds, plan, progress=progress)
