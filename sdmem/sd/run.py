"""What an SD run folder holds beyond the shared layout (sdmem.runs; its resumable checkpoints: sdmem.checkpoint): the
final inference weights (a LoRA in diffusers' format, or the whole pipeline), final.json written last."""

from __future__ import annotations

import json
import os
import shutil

from ..config import fingerprint
from ..runs import RunPaths, read_json
from ..utils import atomic_write_text
from .config import SDConfig


class SDPaths(RunPaths):
    """An SD run folder: the shared files, validation images (``validation/step-N/``) and the final inference
    weights, ``final.json`` written last."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__(run_dir)
        self.validation = self.root / "validation"
        self.final = self.root / "final.json"


def save_outputs(cfg: SDConfig, paths: SDPaths, comps, unet, step: int) -> dict:
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
