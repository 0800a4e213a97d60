"""What an SD run folder holds beyond the shared layout (sdmem.runs): resumable checkpoints (safetensors + JSON, no
pickles) and the final inference weights (a LoRA in diffusers' format, or the whole pipeline)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import config_to_dict, fingerprint
from ..errors import InputError
from ..runs import RunPaths, read_json
from ..utils import atomic_write_text
from .config import SDConfig

CHECKPOINT_FORMAT = "sdmem-sd-checkpoint/1"


# Checkpoints: <run>/checkpoints/step-XXXXXXX/{state.safetensors, meta.json}, written to a temporary folder and
# renamed into place, the oldest removed beyond train.checkpoints_total_limit.

def save_checkpoint(cfg: SDConfig, paths: RunPaths, step: int, named: list[tuple[str, torch.nn.Parameter]],
                    ema: list[torch.Tensor] | None, optimizer, lr_scheduler, scaler) -> Path:
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach() for n, p in named}
    if ema is not None:
        tensors.update({f"ema.{n}": e for (n, _), e in zip(named, ema)})
    opt_keys = {}
    for i, st in optimizer.state_dict()["state"].items():
        opt_keys[str(i)] = sorted(st)
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "images_seen": step * cfg.images_per_step,
            "fingerprint": fingerprint(cfg), "param_names": [n for n, _ in named], "optimizer": opt_keys,
            "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": None if scaler is None else scaler.state_dict(),
            "config": config_to_dict(cfg)}
    final = paths.checkpoint_dir(step)
    tmp = paths.checkpoints / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"),
              metadata={"format": CHECKPOINT_FORMAT, "step": str(step)})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in (tmp / "state.safetensors", tmp / "meta.json"):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again (e.g. the end of a run that was re-run): replace it
        old = paths.checkpoints / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def rotate_checkpoints(paths: RunPaths, limit: int | None) -> list[Path]:
    """Remove all but the newest ``limit`` checkpoints; returns the removed folders."""
    ckpts = list(paths.list_checkpoints().values())
    gone = ckpts[: max(len(ckpts) - limit, 0)] if limit else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint folder; a foreign or corrupt one is an InputError (left as it is)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
        raise InputError(path, f"corrupt or unreadable checkpoint ({exc.__class__.__name__}: {exc}); it was left "
                               "as it is (move it away to resume from an older one)") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(path, f"not an sdmem SD checkpoint (format {found!r}); refusing to use it")
    return tensors, meta


def load_checkpoint(cfg: SDConfig, paths: RunPaths, device, named, ema, optimizer,
                    lr_scheduler) -> tuple[int, dict | None]:
    """Restore the newest checkpoint into the weights, EMA, optimizer and LR schedule; (step, scaler state)."""
    ckpts = paths.list_checkpoints()
    if not ckpts:
        return 0, None
    path = ckpts[max(ckpts)]
    tensors, meta = read_checkpoint(path)
    if meta.get("fingerprint") != fingerprint(cfg):
        raise InputError(path, "was written by a run with a different training config; refusing to resume from it "
                               "(it was left as it is)")
    try:
        if meta["param_names"] != [n for n, _ in named]:
            raise ValueError("its trained parameters are not this run's")
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[f"param.{n}"])
            for (n, _), e in zip(named, ema or []):
                e.copy_(tensors[f"ema.{n}"])
        sd = optimizer.state_dict()
        sd["state"] = {int(i): {k: tensors[f"opt.{i}.{k}"].to(device) if tensors[f"opt.{i}.{k}"].dim() else
                                tensors[f"opt.{i}.{k}"] for k in keys} for i, keys in meta["optimizer"].items()}
        optimizer.load_state_dict(sd)
        lr_scheduler.load_state_dict(meta["lr_scheduler"])
        for group, lr in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
            group["lr"] = lr
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(path, f"does not fit this run's model/optimizer ({exc}); left as it is") from None
    return int(meta["step"]), meta.get("grad_scaler")


def save_outputs(cfg: SDConfig, paths: RunPaths, comps, unet, step: int) -> dict:
    """The run's inference weights: the LoRA (diffusers format) or the whole pipeline (save_pretrained), then
    final.json last. The frozen parts of a full run are copied from the pretrained folder, byte for byte."""
    if cfg.model.method == "lora":
        from .lora import save_lora

        files = [save_lora(unet, paths.root).name]
    else:
        tmp = paths.root / f".pipeline.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(comps.path / part, tmp / part)
        index = read_json(comps.path / "model_index.json", "pipeline index")
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        index.pop("image_encoder", None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        files = ["unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"]
        for name in files:
            target = paths.root / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        shutil.rmtree(tmp, ignore_errors=True)
    final = {"step": step, "images_seen": step * cfg.images_per_step, "method": cfg.model.method,
             "weights": "ema" if (cfg.train.ema and cfg.train.final_weights == "ema") else "last",
             "pretrained": cfg.model.pretrained, "files": files, "fingerprint": fingerprint(cfg)}
    atomic_write_text(paths.final, json.dumps(final, indent=2) + "\n")
    return final
