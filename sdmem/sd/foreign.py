"""``sdmem generate --model DIR|HUB_ID [--lora FILE]``: images from a diffusers text-to-image pipeline that sdmem
did not train, under the same rules as an sdmem SD run (DDIM on the model's own noise schedule, classifier-free
guidance, one seed per image with its noise drawn on the CPU, safety checker off, fp16 on CUDA / fp32 on CPU) and
through the shared generation core (fixed seed grid, manifest, verified resume).

- **Model**: a local pipeline folder (as ``save_pretrained`` writes it) or a hub id found in the local Hugging Face
  cache (nothing is downloaded). Loaded with ``DiffusionPipeline.from_pretrained``, so any UNet text-to-image
  pipeline of diffusers works (Stable Diffusion 1.x/2.x, SDXL-style folders); its scheduler is replaced by DDIM
  built from the model's ``scheduler/`` config exactly as for sdmem runs (``components.ddim_scheduler``).
- **LoRA** (optional): one ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors`` (the
  layout of diffusers' ``train_text_to_image_lora.py``: ``output_dir/`` and each ``output_dir/checkpoint-N/``),
  loaded by diffusers' own ``pipe.load_lora_weights``: diffusers format (``save_lora_weights``) and kohya format
  (``lora_unet_..._to_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, converted by diffusers). A LoRA
  whose keys do not all fit the model is refused, never silently half-applied.
- **Weights are checked**: a LoRA tensor, or a parameter or buffer of a loaded component, holding NaN or inf is
  refused (naming the file or component and the tensor) before anything is written, as are weights in fp16 on
  CUDA that overflow the cast. A component folder without safetensors weights is read from its ``*.bin``
  files only if torch's weights-only loader reads them as plain tensors; one that pickles anything else is
  refused, naming the file (nothing in it runs).
- **Prompts**, exactly one of: ``prompt`` (every seed); ``prompts_file`` (UTF-8 text, one prompt per line, lines
  stripped, blank lines ignored: seed s gets line s mod L, counting from 0); ``class_prompts`` (an image folder
  whose sub-folders are the classes, or an Imagenette folder, whose wnids are named as ``sdmem.data.imagenette``
  names them; classes in sorted folder order): count/C seeds per class in seed order as for sdmem runs, prompt =
  ``template`` with ``{class}`` replaced by the class name, condition ``{"prompt": ..., "class": index}``.

The manifest's ``settings.made_by`` is ``{"kind": "diffusers", "lora_sha256", "model_fingerprint", "model",
"revision"}``: ``model`` is the absolute folder or the hub id, ``revision`` the cached snapshot's commit (None
for a folder), ``model_fingerprint`` see :func:`model_fingerprint`, ``lora_sha256`` the sha256 of the whole LoRA
file (None without one). A later call into the same folder must agree on all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..generation import Plan
from ..records import read_object
from ..utils import file_sha256, resolve_device
from .components import check_diffusers_folder, ddim_scheduler, is_hub_id, quiet_transformers
from .config import CLASS_FIELD
from .generate import PROMPT_ENCODING, check_options, class_prompt_rule, fuse_lora, sampling_renderer
from .lora import LORA_WEIGHTS

FINGERPRINT_RULE = ("sha256 over model_index.json and every top-level file of each loaded component folder: "
                    "relative path, size, and the whole content (files <= 2 MiB) or the first and last MiB")
_MIB = 1 << 20
# Weight files that diffusers' / transformers' loaders read in preference to the pickled *.bin files.
_SAFETENSORS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                        "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")  # optional parts sdmem sets to None


# ----------------------------------------------------------------------------------------------------- the model


def resolve_model(model: str | os.PathLike, revision: str | None = None) -> tuple[Path, str, str | None]:
    """(local folder, identity, revision) of ``model``: a pipeline folder (identity: its absolute path, revision
    None) or a hub id from the local cache only (identity: the id, revision: the cached snapshot's commit)."""
    name = os.fspath(model)
    if not is_hub_id(name):
        if revision is not None:
            raise InputError("--revision", f"applies to hub ids only; {name} is a local path")
        if not os.path.exists(name):
            raise InputError("--model", f"{name}: no such folder (expected a diffusers pipeline folder as "
                                        "save_pretrained writes it, or a hub id owner/name in the local cache)")
        root = check_diffusers_folder(name, "--model").resolve()
        return root, str(root), None
    from huggingface_hub import constants, snapshot_download

    try:
        path = Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, an unknown revision, a broken cache entry ...
        at = f" at revision {revision}" if revision else ""
        raise InputError("--model", f"{name}: no such local folder, and as a hub id{at} it is not in the local "
                                    f"Hugging Face cache {constants.HF_HUB_CACHE} ({exc.__class__.__name__}); "
                                    "nothing is downloaded here: fetch it where there is network (`hf download "
                                    f"{name}`) into that cache (or point HF_HOME / HF_HUB_CACHE at a copy of one "
                                    "that holds it), or pass a local diffusers folder (save_pretrained layout)"
                         ) from None
    root = check_diffusers_folder(path, "--model")
    return root, name, path.name  # the snapshot folder is named by its commit


def loaded_components(root: Path) -> list[str]:
    """The component folders ``DiffusionPipeline.from_pretrained`` will load (model_index.json minus the safety
    checker, feature extractor and image encoder, which sdmem leaves out); each must be present."""
    index = _read_json(root / "model_index.json")
    names = sorted(k for k, v in index.items() if not k.startswith("_") and k not in _NOT_LOADED
                   and isinstance(v, list) and len(v) == 2 and None not in v)
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise InputError("--model", f"{root}: model_index.json lists {', '.join(missing)} but the folder lacks "
                                    f"{', '.join(m + '/' for m in missing)} (an incomplete copy or download)")
    return names


def model_fingerprint(root: Path) -> str:
    """sha256 (hex) over ``model_index.json`` and every top-level, non-hidden file of each loaded component folder
    (configs, tokenizer files, weights), in path order: the relative path, the size, and the whole content of a
    file up to 2 MiB, else its first and last MiB. Cheap (a few MiB read for a multi-GB model) yet it changes with
    any config, tokenizer, dtype, shape or file-size change and with edits near a weight file's ends (a
    safetensors header, holding every tensor's name, dtype, shape and offsets, is at the start)."""
    h = hashlib.sha256(b"sdmem-model-fingerprint/1\n")
    files = ["model_index.json"]
    for comp in loaded_components(root):
        files += sorted(f"{comp}/{e.name}" for e in os.scandir(root / comp)
                        if not e.name.startswith(".") and e.is_file())
    for rel in files:
        path = root / rel
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                if size <= 2 * _MIB:
                    body = f.read()
                else:
                    body = f.read(_MIB)
                    f.seek(size - _MIB)
                    body += f.read(_MIB)
        except OSError as exc:
            raise InputError(path, f"unreadable ({exc.strerror or exc})") from None
        h.update(f"{rel}\0{size}\0".encode())
        h.update(body)
    return h.hexdigest()


def default_resolution(root: Path) -> int:
    """The UNet's sample_size times the VAE's scale factor (2^(levels - 1)), as the pipeline's own default."""
    unet, vae = _read_json(root / "unet" / "config.json"), _read_json(root / "vae" / "config.json")
    size, levels = unet.get("sample_size"), vae.get("block_out_channels")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or not isinstance(levels, list) or not levels:
        raise InputError("--resolution", f"{root}: cannot read a square default size from unet/config.json "
                                         f"(sample_size {size!r}) and vae/config.json; pass --resolution")
    return size * 2 ** (len(levels) - 1)


def _read_json(path: Path) -> dict:
    return read_object(path, "JSON file")


# ------------------------------------------------------------------------------------------------------ the LoRA


def resolve_lora(lora: str | os.PathLike) -> Path:
    """The LoRA weights file: ``lora`` itself, or in a folder ``pytorch_lora_weights.safetensors`` (else its only
    ``.safetensors`` file). It must be a readable safetensors file holding LoRA tensors."""
    path = Path(lora)
    if not path.exists():
        raise InputError(path, "no such LoRA file or folder")
    if path.is_dir():
        if (path / LORA_WEIGHTS).is_file():
            path = path / LORA_WEIGHTS
        else:
            found = sorted(e.name for e in os.scandir(path) if e.name.endswith(".safetensors") and e.is_file())
            if len(found) != 1:
                raise InputError(path, f"holds no {LORA_WEIGHTS}" + (f" and {len(found)} other .safetensors files "
                                       f"({', '.join(found[:4])}); pass the LoRA file itself" if found else
                                       " and no other .safetensors file (expected a LoRA file or a folder as "
                                       "save_lora_weights writes it)"))
            path = path / found[0]
    if path.suffix.lower() != ".safetensors":
        raise InputError(path, "is not a .safetensors file; LoRA weights are read only from safetensors (a .bin, "
                               ".pt or .ckpt is a pickle, which can run code when loaded): convert it first")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # SafetensorError: a truncated or foreign file; OSError
        raise InputError(path, f"unreadable or corrupt safetensors file ({_summary(exc)})") from None
    if not any("lora" in k.lower() for k in keys):
        raise InputError(path, f"holds no LoRA weights ({len(keys)} tensors, none named *lora*, e.g. "
                               f"{keys[0] if keys else 'none'})")
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in keys:
                bad = nonfinite(f.get_tensor(key))
                if bad:
                    raise InputError(path, f"tensor {key} holds non-finite values ({bad}); a LoRA with NaN or "
                                           "inf weights gives black or noise images")
    except InputError:
        raise
    except Exception as exc:  # SafetensorError: a tensor's bytes beyond the end of the file
        raise InputError(path, f"unreadable or corrupt safetensors file ({_summary(exc)})") from None
    return path


def nonfinite(t) -> str | None:
    """None when every value of tensor ``t`` is finite (one ``torch.isfinite(t).all()``, no copy; integer and bool
    tensors always are), else a short count of its NaN and inf values."""
    import torch

    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    try:
        if bool(torch.isfinite(t).all()):
            return None
    except (RuntimeError, NotImplementedError):  # a dtype without isfinite here (float8 on some builds)
        t = t.float()
        if bool(torch.isfinite(t).all()):
            return None
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN and {int((~torch.isfinite(t)).sum()) - nan} inf of {t.numel()} values"


def check_finite(pipe, root: Path, *, cast: str | None = None) -> None:
    """InputError naming the component folder and the tensor when a parameter or buffer of one of ``pipe``'s
    modules holds NaN or inf (``cast``: the dtype the weights were just cast to, named as the cause)."""
    import torch

    for comp, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
            for name, t in named:
                bad = nonfinite(t.detach())
                if bad and cast:
                    raise InputError(root / comp, f"{kind} {name} overflows {cast} ({bad} after the cast); run with "
                                                  "--device cpu (float32)")
                if bad:
                    raise InputError(root / comp, f"{kind} {name} holds non-finite values ({bad}); NaN or inf "
                                                  "weights give black or noise images")


def check_pickled_weights(root: Path) -> None:
    """Every component folder that diffusers/transformers would read from pickled ``*.bin`` files (no
    safetensors weights beside them) must hold plain tensors: each file is opened with torch's weights-only
    loader (memory-mapped, so only its pickled index is read); one that pickles anything else, or is corrupt, is
    an InputError naming the file, the same for the UNet, the VAE, the text encoder(s) and any other part."""
    import pickle

    import torch

    for comp in loaded_components(root):
        folder = root / comp
        names = os.listdir(folder)
        if any(n in names for n in _SAFETENSORS_WEIGHTS):
            continue
        for name in sorted(n for n in names if n.endswith(".bin") and (folder / n).is_file()):
            path = folder / name
            try:
                try:
                    torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
            except pickle.UnpicklingError as exc:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
                why = f"it asks for {found.group(1)}" if found else _summary(exc, 160)
                raise InputError(path, f"pickles Python objects, not plain tensors (torch's weights-only loader "
                                       f"refused it: {why}); sdmem never unpickles them: save the component as "
                                       "safetensors (save_pretrained(..., safe_serialization=True))") from None
            except Exception as exc:  # a truncated zip, a foreign file
                raise InputError(path, f"unreadable or corrupt weights file ({_summary(exc)})") from None


def _summary(exc: BaseException, limit: int = 300) -> str:
    """One line: the exception's class and the start of its message."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:limit]}{'...' if len(text) > limit else ''}" if text else \
        exc.__class__.__name__


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _diffusers_warnings():
    """Collect (instead of printing) diffusers' warnings for a block; yields the list of messages."""
    logger = logging.getLogger("diffusers")
    saved = logger.handlers[:], logger.level, logger.propagate
    capture = _Capture()
    logger.handlers, logger.propagate = [capture], False
    logger.setLevel(logging.WARNING)
    try:
        yield capture.messages
    finally:
        logger.handlers, logger.level, logger.propagate = saved[0], saved[1], saved[2]


def load_lora(pipe, path: Path) -> None:
    """``pipe.load_lora_weights`` from ``path``; InputError when it fails or leaves keys unmatched."""
    if not hasattr(pipe, "load_lora_weights"):
        raise InputError(path, f"{type(pipe).__name__} cannot load LoRA weights (no load_lora_weights)")
    with _diffusers_warnings() as warnings:
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        except Exception as exc:  # ValueError (unknown keys), RuntimeError (shapes), KeyError, SafetensorError
            raise InputError(path, f"does not load into this model ({_summary(exc)})") from None
    unfit = [m for m in warnings if "unexpected keys" in m or "missing keys" in m]
    if unfit:
        raise InputError(path, f"does not fit this model ({unfit[0][:300]})")
    adapters = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
    if not any(adapters.values()):
        raise InputError(path, "no LoRA weight matched a module of this model")


# ----------------------------------------------------------------------------------------------------- prompts


def read_lines(path: str | os.PathLike, what: str, expected: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; an unreadable one is an InputError naming ``what`` (e.g.
    "prompts file") and what was ``expected`` (e.g. "one prompt per line")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
        raise InputError(path, f"unreadable {what} ({why}; expected UTF-8 text, {expected})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file: one per line, stripped, blank lines ignored."""
    path = Path(path)
    prompts = read_lines(path, "prompts file", "one prompt per line")
    if not prompts:
        raise InputError(path, "holds no prompt (expected one prompt per line; blank lines are ignored)")
    return prompts


def folder_class_names(folder: str | os.PathLike) -> list[str]:
    """The class names of an image folder, in label order, as an sdmem SD run names them (Imagenette wnids by
    sdmem.data.imagenette, other class folders by their names, sorted)."""
    from ..data.subset import open_data_source

    source = open_data_source(os.fspath(folder), labels=True, key="--class-prompts")
    if source.labels is None or not len(source.labels):
        raise InputError("--class-prompts", f"{folder} has no class labels (expected sub-folders, one per class)")
    names = source.class_names
    ids = sorted({int(c) for c in np.unique(source.labels)})
    return [names[c] if names and 0 <= c < len(names) else str(c) for c in ids]


# -------------------------------------------------------------------------------------------------------- plan


def foreign_plan(model: str | os.PathLike, seeds: Sequence[int], *, lora: str | os.PathLike | None = None,
                 prompt: str | None = None, prompts_file: str | os.PathLike | None = None,
                 class_prompts: str | os.PathLike | None = None, template: str = "a picture of a {class}",
                 steps: int = 50, guidance: float = 7.5, eta: float = 0.0, batch: int = 16,
                 resolution: int | None = None, revision: str | None = None, device: str = "auto",
                 fuse: bool = True, compile: bool = False) -> Plan:
    """The generation plan of a diffusers pipeline (+ LoRA) that sdmem did not train; everything is checked here,
    the pipeline loads only when images are missing. Use with ``generation.generate_folder(out, seeds, plan)``."""
    given = {"--prompt": prompt is not None, "--prompts": prompts_file is not None,
             "--class-prompts": class_prompts is not None}
    if sum(given.values()) != 1:
        named = [k for k, v in given.items() if v]
        raise InputError(" / ".join(named) if named else "--prompt",
                         ("got " + " and ".join(named) + "; " if named else "no prompt given; ") +
                         "give exactly one of --prompt TEXT, --prompts FILE or --class-prompts FOLDER")
    check_options(steps=steps, guidance=guidance, batch=batch)
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 <= eta <= 1):
        raise InputError("--eta", f"expected a DDIM eta in [0, 1], got {eta}")
    seeds = [int(s) for s in seeds]
    dev = resolve_device(device)

    root, ident, rev = resolve_model(model, revision)
    fingerprint = model_fingerprint(root)  # also checks that every component folder is present
    scale = 2 ** (len(_read_json(root / "vae" / "config.json").get("block_out_channels") or [0]) - 1)
    res = default_resolution(root) if resolution is None else resolution
    if not isinstance(res, int) or not 8 <= res <= 4096 or res % max(scale, 8):
        raise InputError("--resolution", f"expected a size in [8, 4096] that is a multiple of {max(scale, 8)} "
                                         f"(the VAE's scale factor), got {res}")
    lora_file = resolve_lora(lora) if lora is not None else None
    lora_sha = file_sha256(lora_file) if lora_file is not None else None

    info: dict = {"model_path": str(root), "device": dev, "dtype": "float16" if dev == "cuda" else "float32",
                  "fingerprint_rule": FINGERPRINT_RULE}
    if lora_file is not None:
        info["lora"] = str(lora_file.resolve())
    if prompt is not None:
        text = str(prompt)
        condition = lambda seed: {"prompt": text}  # noqa: E731
        info["prompt_mode"] = "prompt"
    elif prompts_file is not None:
        prompts = read_prompts(prompts_file)
        condition = lambda seed: {"prompt": prompts[seed % len(prompts)]}  # noqa: E731
        info.update(prompt_mode="prompts_file", prompts_file=str(Path(prompts_file).resolve()),
                    prompts_rule="seed s gets non-blank line s mod L (from 0)")
    else:
        if CLASS_FIELD not in template:
            raise InputError("--template", f"expected a template containing {CLASS_FIELD} (e.g. 'a picture of a "
                                           f"{{class}}'), got {template!r}")
        names = folder_class_names(class_prompts)
        # The rule of sdmem SD runs with class prompts: count/C seeds per class in seed order.
        condition = class_prompt_rule(template, names, "random", min(seeds, default=0), max(len(seeds), 1))
        info.update(prompt_mode="class_prompts", class_prompts=str(Path(class_prompts).resolve()),
                    template=template, class_names=names)

    # made_by's key order puts what tells two folders apart first: a refusal shows its first 80 characters.
    settings = {"made_by": {"kind": "diffusers", "lora_sha256": lora_sha, "model_fingerprint": fingerprint,
                            "model": ident, "revision": rev},
                "sampler": "ddim", "steps": int(steps), "guidance_scale": float(guidance), "eta": float(eta),
                "batch": int(batch), "size": [res, res]}
    # Prompts encoded once per run, each alone, where the pipeline is a StableDiffusionPipeline (other pipelines,
    # e.g. SDXL's, encode each batch's prompts themselves).
    encode_once = _read_json(root / "model_index.json").get("_class_name") == "StableDiffusionPipeline"
    if encode_once:
        settings["prompt_encoding"] = PROMPT_ENCODING
    fuse = fuse and lora_file is not None
    if fuse:  # sampling with the LoRA merged into the weights: the images change within rounding
        settings["lora_fused"] = True
    if compile:
        settings["compile"] = True

    def load():
        pipe = load_pipeline(root, device=dev)
        if lora_file is not None:
            load_lora(pipe, lora_file)
        info["pipeline"] = type(pipe).__name__
        if fuse:
            fuse_lora(pipe.unet)
        return sampling_renderer(pipe, resolution=res, steps=steps, guidance_scale=guidance, eta=eta,
                                 compile=compile, encode_once=encode_once)

    return Plan(settings, condition, load, info)


@contextlib.contextmanager
def _quiet_loading():
    from diffusers.utils import logging as dlogging

    bars, level = dlogging.is_progress_bar_enabled(), dlogging.get_verbosity()
    dlogging.disable_progress_bar()
    # CRITICAL, not ERROR: diffusers logs "An error occurred while trying to fetch ..." (and then reads the *.bin
    # weights) for a component without safetensors; real failures are raised.
    dlogging.set_verbosity(dlogging.CRITICAL)
    try:
        with quiet_transformers():
            yield
    finally:
        dlogging.set_verbosity(level)
        if bars:
            dlogging.enable_progress_bar()


def load_pipeline(root: Path, *, device: str = "cpu"):
    """The folder's pipeline with sdmem's DDIM sampler, no safety checker, fp16 on CUDA and fp32 on CPU."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    index = _read_json(root / "model_index.json")
    check_pickled_weights(root)
    with _quiet_loading():
        from diffusers import DDPMScheduler, DiffusionPipeline

        try:
            noise = DDPMScheduler.from_pretrained(str(root), subfolder="scheduler")
            extra = {k: None for k in _NOT_LOADED if k in index}
            if "safety_checker" in index or "requires_safety_checker" in index:
                extra["requires_safety_checker"] = False
            pipe = DiffusionPipeline.from_pretrained(str(root), scheduler=ddim_scheduler(noise), **extra)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            raise InputError("--model", f"{root}: cannot load the pipeline ({_summary(exc)})") from None
    if getattr(pipe, "unet", None) is None or not hasattr(pipe, "vae_scale_factor"):
        raise InputError("--model", f"{root}: {type(pipe).__name__} is not a UNet text-to-image pipeline")
    check_finite(pipe, root)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    cast = not all(m.dtype == dtype for m in modules)
    with _quiet_loading():  # a cast warns about _keep_in_fp32_modules even when there are none
        pipe.to(device, dtype) if cast else pipe.to(device)
    if cast and dtype == torch.float16:
        check_finite(pipe, root, cast="float16")
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
