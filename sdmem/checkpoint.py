"""One checkpoint format for every kind's trainer: the whole resumable state of a run in one safetensors file.

``<run>/checkpoints/step-NNNNNNN.safetensors`` holds the trained weights (``model.*``), their EMA (``ema.*``) and
the optimizer state (``opt.<param index>.<name>``) as tensors, and a JSON header in the file's metadata: the
format, kind, step, images seen, the training config and its fingerprint, the weights' names in order, the
optimizer's state keys, and what else a kind resumes from (``extra``: an LR schedule, an fp16 loss scale). It is
written once, atomically and fsynced (a kill leaves the old file set or the new one), and never unpickled.

Run folders made before this format still resume: their checkpoints (an EDM run's ``checkpoint.safetensors``, an
SD run's ``checkpoints/step-N/{state.safetensors, meta.json}``) are read into the same shape, and the next
checkpoint written replaces them in the rotation.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .utils import atomic_write

FORMAT = "sdmem-checkpoint/2"
EDM_V1 = "sdmem-edm-checkpoint/1"  # <run>/checkpoint.safetensors, before sdmem 0.5
SD_V1 = "sdmem-sd-checkpoint/1"  # <run>/checkpoints/step-N/{state.safetensors, meta.json}, before sdmem 0.5
_FILE_RE = re.compile(r"^step-(\d{7})\.safetensors$")
_V1_DIR_RE = re.compile(r"^step-(\d{7})$")


@dataclass
class Checkpoint:
    """A run's resumable state: ``model`` and ``ema`` (name -> tensor, ``ema`` None without one), ``optimizer``
    (torch's ``state_dict()["state"]``: param index -> {name: tensor}), ``extra`` (JSON: what else the kind keeps)."""

    step: int
    fingerprint: str | None
    model: dict
    ema: dict | None
    optimizer: dict
    extra: dict = field(default_factory=dict)
    path: Path | None = None
    header: dict = field(default_factory=dict)


def file_for(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:07d}.safetensors"


def save(path: Path, ck: Checkpoint, *, kind: str, images_seen: int, config: dict) -> Path:
    """Write ``ck`` to ``path`` in one atomic, fsynced write (tensors copied to the CPU first)."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in ck.model.items()}
    tensors.update({f"ema.{k}": v for k, v in (ck.ema or {}).items()})
    keys = {}
    for i, st in ck.optimizer.items():
        keys[str(i)] = sorted(st)
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    header = {"format": FORMAT, "kind": kind, "step": ck.step, "images_seen": images_seen,
              "fingerprint": ck.fingerprint, "model": list(ck.model), "ema": ck.ema is not None, "optimizer": keys,
              "extra": ck.extra, "config": config}
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(cpu, str(p), metadata={"format": FORMAT, "header": json.dumps(header)}),
                 fsync=True)
    return path


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(path, f"corrupt or unreadable checkpoint ({exc.__class__.__name__}: {exc}); it was left as it "
                            "is (move it away to resume from an older one)")


def _load(path: Path) -> tuple[dict, dict]:
    """(tensors, string metadata) of a safetensors file; anything unreadable is an InputError."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None


def _split(tensors: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer(tensors: dict, keys: dict, path: Path) -> dict:
    try:
        return {int(i): {k: tensors[f"opt.{i}.{k}"] for k in names} for i, names in keys.items()}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(path, f"optimizer state is incomplete ({exc.__class__.__name__}: {exc}); left as it is") \
            from None


def read(path: Path) -> Checkpoint:
    """A checkpoint of this format or of an earlier sdmem (see the module's docstring); a foreign or damaged one
    is an InputError naming it (left as it is)."""
    path = Path(path)
    if path.is_dir():
        return _read_sd_v1(path)
    tensors, meta = _load(path)
    if meta.get("format") == EDM_V1:
        return _read_edm_v1(path, tensors, meta)
    if meta.get("format") != FORMAT:
        raise InputError(path, f"not an sdmem file of format {FORMAT} (found {meta.get('format')!r}); refusing to "
                               "use or overwrite it")
    try:
        header = json.loads(meta["header"])
        if not isinstance(header, dict) or not isinstance(header["step"], int) or \
                not isinstance(header["model"], list) or not isinstance(header["optimizer"], dict) or \
                not isinstance(header.get("extra", {}), dict):
            raise ValueError("a field has the wrong type")
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(path, f"checkpoint header is incomplete or corrupt ({exc.__class__.__name__}: {exc}); "
                               "left as it is") from None
    model = _split(tensors, "model.")
    if list(model) != header["model"] and sorted(model) != sorted(header["model"]):
        raise InputError(path, "checkpoint tensors do not match its header's weight names; left as it is")
    model = {k: model[k] for k in header["model"]}
    ema = _split(tensors, "ema.") if header.get("ema") else None
    return Checkpoint(header["step"], header.get("fingerprint"), model, ema,
                      _optimizer(tensors, header["optimizer"], path), header.get("extra", {}), path, header)


def _read_edm_v1(path: Path, tensors: dict, meta: dict) -> Checkpoint:
    try:
        keys = json.loads(meta["optimizer"])
        step = int(meta["step"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(path, f"checkpoint metadata is incomplete or corrupt ({exc.__class__.__name__}: {exc}); "
                               "left as it is") from None
    return Checkpoint(step, meta.get("fingerprint", meta.get("config_hash")), _split(tensors, "net."),
                      _split(tensors, "ema."), _optimizer(tensors, keys, path), {}, path, dict(meta))


def _read_sd_v1(path: Path) -> Checkpoint:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(meta, dict) or meta.get("format") != SD_V1:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(path, f"not an sdmem SD checkpoint (format {found!r}); refusing to use it")
    tensors, _ = _load(path / "state.safetensors")
    try:
        names = list(meta["param_names"])
        model = {n: tensors[f"param.{n}"] for n in names}
        ema = {n: tensors[f"ema.{n}"] for n in names} if any(k.startswith("ema.") for k in tensors) else None
        step = int(meta["step"])
        extra = {"lr_scheduler": meta["lr_scheduler"], "grad_scaler": meta.get("grad_scaler")}
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(path, f"checkpoint is incomplete ({exc.__class__.__name__}: {exc}); left as it is") from None
    return Checkpoint(step, meta.get("fingerprint"), model, ema, _optimizer(tensors, meta["optimizer"], path), extra,
                      path, meta)


def listing(run_dir: Path) -> dict[int, Path]:
    """{step: path} of a run's checkpoints in step order, this format's and earlier ones' (where a step has both,
    this format's)."""
    run_dir = Path(run_dir)
    found: dict[int, Path] = {}
    legacy = run_dir / "checkpoint.safetensors"
    if legacy.is_file():
        found[_edm_v1_step(legacy)] = legacy
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        entries = sorted(folder.iterdir(), key=lambda p: p.is_file())  # v1 folders first, files win a tie
        for p in entries:
            m = (_FILE_RE if p.is_file() else _V1_DIR_RE).match(p.name)
            if m and (p.is_file() or (p / "meta.json").is_file()):
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def _edm_v1_step(path: Path) -> int:
    """The step of an old EDM checkpoint (its metadata only); an unreadable one sorts last, so resuming names it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError):
        return 1 << 62


def newest(run_dir: Path) -> Path | None:
    found = listing(run_dir)
    return found[max(found)] if found else None


def rotate(run_dir: Path, keep: int | None) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints (None: keep all); returns what was removed. Only sdmem's
    checkpoints are listed (step-N names, sdmem's formats), so nothing else is touched."""
    found = list(listing(run_dir).values())
    gone = found[: max(len(found) - keep, 0)] if keep else []
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def restore_optimizer(optimizer, state: dict, where: Path) -> None:
    """Load a checkpoint's optimizer state (torch casts each tensor to its parameter's device and dtype)."""
    sd = optimizer.state_dict()
    sd["state"] = state
    try:
        optimizer.load_state_dict(sd)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(where, f"does not fit this run's optimizer ({exc}); left as it is") from None
