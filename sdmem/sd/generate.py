"""`sdmem generate` for an SD run: DDIM (50 steps), safety checker off, classifier-free guidance 7.5, one seed per
image (file name = seed), plain prompt for every image or |seeds|/C per class; batched and resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import config_from_dict
from ..errors import InputError
from ..utils import atomic_write_text, resolve_device, save_png
from .config import SDConfig
from .data import class_prompt

def load_run_config(run_dir: str | os.PathLike) -> SDConfig:
    path = Path(run_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(run_dir, f"is not an sdmem run folder ({path.name}: {exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("kind") != "sd":
        raise InputError(path, f"holds a run of kind {raw.get('kind') if isinstance(raw, dict) else None!r}, not sd")
    return config_from_dict(SDConfig, raw, str(path))


def class_names_of(run_dir: str | os.PathLike) -> list[str] | None:
    try:
        return json.loads((Path(run_dir) / "subset.json").read_text()).get("class_names")
    except (OSError, json.JSONDecodeError):
        return None


def seed_prompts(cfg: SDConfig, seeds: list[int], class_names: list[str] | None,
                 class_label: str | int | None = None) -> tuple[list[str], list[int | None]]:
    """(prompt, class) of every seed: the plain prompt; or, for class prompts, class ⌊i·C/n⌋ for the i-th of the
    n seeds (|seeds|/C per class, in seed order: 10k seeds -> seeds 0-999 class 0, ...), or one fixed class."""
    if cfg.data.prompt == "plain":
        if class_label not in (None, "random", "balanced"):
            raise InputError("--class", "this run uses the plain prompt; it takes no class")
        return [cfg.data.plain_template] * len(seeds), [None] * len(seeds)
    if not class_names:
        raise InputError("--class", "the run folder records no class names (subset.json)")
    c_count, n = len(class_names), len(seeds)
    if class_label in (None, "random", "balanced"):
        classes = [i * c_count // n for i in range(n)]
    else:
        text = str(class_label)
        lowered = [c.lower() for c in class_names]
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
        classes = [fixed] * n
    return [class_prompt(cfg.data.class_template, class_names[c]) for c in classes], classes


def load_run_pipeline(run_dir: str | os.PathLike, *, snapshot: str = "final", device: str = "cpu",
                      dtype=torch.float32):
    """(pipeline with the DDIM sampler, config, weights description) for a LoRA or a full run."""
    from .components import load_components, quiet_diffusers
    from .run import SDRunPaths, read_checkpoint
    from .train import make_pipeline

    cfg, paths = load_run_config(run_dir), SDRunPaths(run_dir)
    if snapshot in ("final", "latest"):
        if not paths.final.exists():
            raise InputError(run_dir, "has no final weights yet (final.json); finish training (re-run sdmem train) "
                                      "or pass --snapshot STEP for a checkpoint")
        final = json.loads(paths.final.read_text())
        if cfg.model.method == "full":
            comps = load_components(str(paths.root), where=str(run_dir))
            pipe = make_pipeline(comps, comps.unet)
        else:
            comps = load_components(cfg.model.pretrained, cfg.model.revision)
            pipe = make_pipeline(comps, comps.unet)
            with quiet_diffusers():  # "No LoRA keys associated to CLIPTextModel": there are none, by design
                pipe.load_lora_weights(str(paths.root))
        weights = f"final ({final['weights']}, step {final['step']})"
    else:
        try:
            step = int(snapshot)
        except ValueError:
            raise InputError("--snapshot", f"expected final or a checkpoint step, got {snapshot!r}") from None
        ckpts = paths.list_checkpoints()
        if step not in ckpts:
            raise InputError("--snapshot", f"no checkpoint at step {step} in {run_dir}; present: {list(ckpts)}")
        tensors, meta = read_checkpoint(ckpts[step])
        comps = load_components(cfg.model.pretrained, cfg.model.revision)
        if cfg.model.method == "lora":
            from .lora import add_lora

            add_lora(comps.unet, rank=cfg.model.rank, alpha=cfg.model.alpha, target_modules=cfg.model.target_modules)
        use_ema = cfg.train.ema and cfg.train.final_weights == "ema"
        prefix = "ema." if use_ema else "param."
        named = dict(comps.unet.named_parameters())
        with torch.no_grad():
            for n in meta["param_names"]:
                named[n].copy_(tensors[prefix + n])
        pipe = make_pipeline(comps, comps.unet)
        weights = f"checkpoint step {step} ({'ema' if use_ema else 'last'})"
    pipe.to(device) if pipe.unet.dtype == dtype else pipe.to(device, dtype)
    pipe.unet.eval()
    return pipe, cfg, weights


def generate_images(pipe, prompts: list[str], seeds: list[int], *, resolution: int, steps: int, guidance_scale: float,
                    eta: float = 0.0) -> np.ndarray:
    """uint8 [n, R, R, 3]; image i starts from the noise of its own generator (seeds[i]), whatever the batch."""
    device = pipe.unet.device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta, generator=gens,
                   height=resolution, width=resolution, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def generate_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seeds: list[int],
                 snapshot: str = "final", class_label: str | int | None = "random", batch: int | None = None,
                 steps: int | None = None, guidance: float | None = None, device: str = "auto",
                 progress: bool = True) -> int:
    """Write ``{seed:06d}.png`` for every seed not already in ``out_dir`` (and prompts.json); returns how many
    were new. Defaults: the run's generate section (DDIM 50 steps, guidance 7.5, its batch). A flagged replica
    is regenerated alone with its seed and class (``seeds=[s]``, ``class_label=c`` from prompts.json)."""
    cfg = load_run_config(run_dir)
    steps = cfg.generate.steps if steps is None else steps
    guidance = cfg.generate.guidance_scale if guidance is None else guidance
    batch = cfg.generate.batch if batch is None else batch
    if guidance < 0:
        raise InputError("--guidance", f"expected a scale >= 0, got {guidance}")
    prompts, classes = seed_prompts(cfg, seeds, class_names_of(run_dir), class_label)
    out = Path(out_dir)
    record_path = out / "prompts.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    snapshot = "final" if snapshot == "latest" else str(snapshot)
    from .run import fingerprint

    settings = {"fingerprint": fingerprint(cfg), "snapshot": snapshot, "steps": steps, "guidance_scale": guidance,
                "eta": cfg.generate.eta, "resolution": cfg.data.resolution}
    images = {f"{s:06d}.png": {"prompt": p, "class": c} for s, p, c in zip(seeds, prompts, classes)}
    if record is not None:
        differ = [k for k in settings if record.get(k) != settings[k]]
        clash = [f for f, v in images.items() if f in record.get("images", {}) and record["images"][f] != v]
        if differ or clash:
            what = f"settings {', '.join(differ)} differ" if differ else \
                f"{len(clash)} seeds had other prompts (e.g. {clash[0]}: {record['images'][clash[0]]['prompt']!r})"
            raise InputError(out, f"holds images generated otherwise ({what}); use another --out or the same "
                                  "settings")
    todo = [i for i, s in enumerate(seeds) if not (out / f"{s:06d}.png").exists()]
    dev = resolve_device(device)
    pipe, cfg, weights = load_run_pipeline(run_dir, snapshot=snapshot, device=dev,
                                           dtype=torch.float16 if dev == "cuda" else torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    merged = dict(record.get("images", {})) if record else {}
    merged.update(images)
    atomic_write_text(record_path, json.dumps({"run": str(Path(run_dir).resolve()), **settings, "weights": weights,
                                               "prompt_mode": cfg.data.prompt,
                                               "images": dict(sorted(merged.items()))}, indent=1) + "\n")
    if cfg.data.prompt == "class":  # file -> class index, like an EDM run's labels.json
        atomic_write_text(out / "labels.json", json.dumps({f: v["class"] for f, v in sorted(merged.items())},
                                                          indent=1) + "\n")
    bar = tqdm(total=len(todo), disable=not progress, desc="generate", unit="img")
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        imgs = generate_images(pipe, [prompts[i] for i in chunk], [seeds[i] for i in chunk],
                               resolution=cfg.data.resolution, steps=steps, guidance_scale=guidance,
                               eta=cfg.generate.eta)
        for i, img in zip(chunk, imgs):
            save_png(out / f"{seeds[i]:06d}.png", img)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
