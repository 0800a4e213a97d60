"""The one generation core behind ``sdmem generate`` (EDM and SD runs), ``sdmem optimum`` and the demo.

- **A fixed seed grid.** Images are rendered in blocks k = seeds [kB, (k+1)B) for the folder's batch B, always
  whole: a resume re-renders every block that misses a file and writes only the missing files, so a resumed
  folder is byte-equal to an uninterrupted one whatever the CPU (a batched kernel sees the same batch).
- **Per-seed noise on the CPU** (each sampler draws image b's noise from a CPU generator seeded with seeds[b]),
  so a CPU and a GPU start from the same noise.
- **A manifest** (``manifest.json``) records what made the folder (a run and its fingerprint, or the training
  set's fingerprint), the snapshot, sampler, steps, guidance, batch and image size, and the class or prompt of
  every seed. A later call whose settings differ is refused (exit 2) naming the setting; equal settings extend
  the folder.
- **Verified resume.** An existing image counts as done only if it decodes at the recorded size.
- **PNGs written off the critical path**: a writer thread takes rendered blocks from a bounded queue (two blocks)
  and writes each file atomically while the next block renders; its first error is re-raised in the caller, and
  blocks already rendered are still written when rendering fails. The files are those a direct write gives.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .errors import InputError
from .pipeline import Background
from .utils import atomic_write_text, save_png

MANIFEST = "manifest.json"
FORMAT = "sdmem-generated/1"

Condition = dict  # what an image is conditioned on: {} (unconditional), {"class": c}, {"prompt": p, "class": c}


@dataclass
class Plan:
    """How a folder's images are made.

    Args:
        settings: every setting that decides the pixels besides the per-seed condition (JSON values): what made
            the images, snapshot, sampler, steps, guidance, batch, ``size`` [H, W]. Compared key by key on reuse.
        condition: the condition of one seed under these settings (a pure function of the seed).
        load: builds the renderer, ``render(seeds, conditions) -> uint8 [n, H, W, 3]``; called only when
            something is missing (loading a model is the expensive part).
    """

    settings: dict
    condition: Callable[[int], Condition]
    load: Callable[[], Callable[[list[int], list[Condition]], np.ndarray]]
    info: dict = field(default_factory=dict)  # recorded, never compared (e.g. the device, the weights' path)

    @property
    def batch(self) -> int:
        return int(self.settings["batch"])

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.settings["size"]
        return int(h), int(w)


def image_name(seed: int) -> str:
    return f"{seed:06d}.png"


def read_manifest(out: Path) -> dict | None:
    """The folder's manifest (None when the folder is new); a folder of images without one is refused."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; --out must be a folder")
    if not path.exists():
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
        if others:
            raise InputError(out, f"is not empty ({len(others)} entries, e.g. {others[0]!r}) and holds no {MANIFEST}, "
                                  "so what made its images is unknown; refusing to mix: use a new --out folder")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"unreadable manifest ({exc.__class__.__name__}: {exc}); refusing to extend this "
                               "folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("settings"), dict) or not isinstance(manifest.get("images"), dict):
        raise InputError(path, f"not an sdmem generation manifest (format {FORMAT}); refusing to extend this folder")
    return manifest


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_compatible(out: Path, manifest: dict, settings: dict, images: dict[str, dict]) -> None:
    """Refuse (naming the setting, or the first seed whose condition differs) to mix images made otherwise."""
    old = manifest["settings"]
    for key in [*old, *(k for k in settings if k not in old)]:
        if old.get(key) != settings.get(key):
            raise InputError(out, f"was generated with {key} = {_show(old.get(key))}, this call asks for "
                                  f"{_show(settings.get(key))}; refusing to mix images made with different settings "
                                  "(use another --out, or the folder's settings)")
    for name, cond in images.items():
        had = manifest["images"].get(name)
        if had is not None and had != cond:
            key = next((k for k in [*had, *cond] if had.get(k) != cond.get(k)), "condition")
            raise InputError(out, f"{name} was generated with {key} = {_show(had.get(key))}, this call asks for "
                                  f"{_show(cond.get(key))}; refusing to mix (use another --out, or the same "
                                  "class/prompt choice)")


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk that closes every complete PNG


def image_ok(path: Path, size: tuple[int, int]) -> bool:
    """True when ``path`` is a complete PNG (it ends with IEND) that decodes at ``size`` (H, W) as RGB."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), os.SEEK_END)
            if f.read() != _PNG_END:
                return False
        with Image.open(path) as img:
            if img.format != "PNG" or img.mode != "RGB" or img.size != (size[1], size[0]):
                return False
            img.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def blocks_of(seeds: Sequence[int], batch: int) -> list[list[int]]:
    """The whole grid blocks [kB, (k+1)B) that hold ``seeds``, in order."""
    return [list(range(k * batch, (k + 1) * batch)) for k in sorted({s // batch for s in seeds})]


def generate_folder(out: str | os.PathLike, seeds: Sequence[int], plan: Plan, *, progress: bool = True,
                    desc: str = "generate") -> int:
    """Write ``{seed:06d}.png`` for every seed of ``seeds`` not already done in ``out``; returns how many were new.

    The manifest is checked before anything is loaded and written before the first image, so an interrupted call
    leaves a folder that the same call completes.
    """
    out = Path(out)
    seeds = [int(s) for s in seeds]
    if any(s < 0 for s in seeds):
        raise InputError("--seeds", f"expected seeds >= 0, got {min(seeds)}")
    if plan.batch < 1:
        raise InputError("--batch", f"expected a positive batch, got {plan.batch}")
    manifest = read_manifest(out)
    images = {image_name(s): {"seed": s, **plan.condition(s)} for s in seeds}
    if manifest is not None:
        check_compatible(out, manifest, plan.settings, images)
    todo = [s for s in seeds if not (out.is_dir() and image_ok(out / image_name(s), plan.size))]
    if not todo:
        return 0
    render = plan.load()

    # Record the folder's settings and every seed's condition, then render whole grid blocks.
    out.mkdir(parents=True, exist_ok=True)
    merged = dict(manifest["images"]) if manifest else {}
    merged.update(images)
    record = {"format": FORMAT, "settings": plan.settings, "info": plan.info,
              "images": dict(sorted(merged.items()))}
    atomic_write_text(out / MANIFEST, json.dumps(record, indent=1) + "\n")
    wanted = set(todo)
    h, w = plan.size
    with tqdm(total=len(todo), disable=not progress, desc=desc, unit="img") as bar, \
            PngWriter(lambda n: bar.update(n)) as writer:
        for block in blocks_of(todo, plan.batch):
            pixels = render(block, [{"seed": s, **plan.condition(s)} for s in block])
            if pixels.shape != (len(block), h, w, 3) or pixels.dtype != np.uint8:
                raise RuntimeError(f"renderer returned {pixels.dtype} {pixels.shape}, expected uint8 "
                                   f"{(len(block), h, w, 3)}")
            # Copies: the writer must not see a buffer that the renderer reuses for its next block.
            writer.put([(out / image_name(s), img.copy()) for s, img in zip(block, pixels) if s in wanted])
    return len(todo)


class PngWriter:
    """Writes lists of (path, uint8 [H, W, 3]) as PNGs (atomically, ``save_png``) on one background thread.

    ``put`` blocks while ``depth`` lists wait (bounded memory) and re-raises the writer's first error; leaving the
    ``with`` block writes what is queued, then re-raises that error (an error raised inside the block wins; the
    queued images are still written, so a later resume has less to do). PIL's encoder releases the GIL, so the
    files are compressed while the caller renders the next block.
    """

    def __init__(self, done: Callable[[int], None] | None = None, depth: int = 2):
        self._done = done or (lambda n: None)
        self._writer = Background.consume(self._write, name="sdmem-png-writer", depth=depth)

    def _write(self, items: list) -> None:
        for path, img in items:
            save_png(path, img)
        self._done(len(items))

    def put(self, items: list) -> None:
        self._writer.put(items)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close()
        if kind is None:
            self._writer.check()


def seed32(seed: int) -> int:
    """The 32-bit generator seed of an image seed (EDM's StackedRandomGenerator rule)."""
    return int(seed) % (1 << 32)


def seeded_latents(seeds: Sequence[int], shape_chw: Sequence[int], device="cpu", dtype=None):
    """Unit-normal noise [B, *shape_chw]: image b's from its own CPU generator seeded with seeds[b], so a batch,
    a resume or a GPU run start each image from the same noise."""
    import torch

    out = torch.empty((len(seeds), *shape_chw), dtype=torch.float32)
    for b, seed in enumerate(seeds):
        gen = torch.Generator(device="cpu").manual_seed(seed32(seed))
        out[b] = torch.randn(tuple(shape_chw), generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype or torch.float32)


def array_fingerprint(*arrays: np.ndarray | None) -> str:
    """sha256 (hex) over arrays' dtype, shape and bytes (None counts as absent): a training set's identity."""
    import hashlib

    h = hashlib.sha256()
    for arr in arrays:
        if arr is None:
            h.update(b"none;")
            continue
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{list(arr.shape)};".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()
