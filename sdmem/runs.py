"""One run folder for every kind of model (``kind: edm`` and ``kind: sd``): where each file lives, which kind a
folder holds, the config it was trained with, the reuse check, the training subset, and append-only logs that
a resume trims back to its checkpoint.

A run folder holds ``config.json`` (the resolved config), ``subset.npz`` + ``subset.json`` (the exact training
set D), ``log.jsonl``, ``tensorboard/`` and ``checkpoints/step-N.safetensors`` (the resumable state, one format for every
kind: sdmem.checkpoint); then what each kind keeps: EMA ``snapshots/`` and tracking (EDM), or validation images and
the final weights (SD).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import config as _engine
from .config import changed_training_keys, config_to_dict, keys_added_since, stored_config
from .errors import InputError
from .kinds import CONFIGS
from .records import read_json  # noqa: F401 (the one JSON reader; sdmem.runs.read_json kept for callers)
from .utils import atomic_write_text

KINDS: dict[str, type] = CONFIGS  # kind name -> config class (sdmem.kinds registers them)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()):
    """Read a YAML run config of any kind (``kind: edm`` or ``sd``), apply ``--set`` overrides, check it."""
    return _engine.load_config(path, overrides, KINDS)


def config_from_mapping(data, overrides: Sequence[str] = (), where: str = ""):
    """A run config of any kind from a raw mapping (e.g. a sweep's inline base) with ``--set`` overrides."""
    return _engine.config_from_mapping(data, overrides, KINDS, where)


class RunPaths:
    """Where a run keeps the files every kind's run folder has. A kind's own files are in its subclass (the kind's
    ``files``: sdmem.edm.run.EDMPaths, sdmem.sd.run.SDPaths)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.config = self.root / "config.json"
        self.subset = self.root / "subset.npz"
        self.subset_info = self.root / "subset.json"
        self.log = self.root / "log.jsonl"
        self.tensorboard = self.root / "tensorboard"
        self.checkpoints = self.root / "checkpoints"  # sdmem.checkpoint: step-N.safetensors, the newest kept

    def checkpoint(self, step: int) -> Path:
        from .checkpoint import file_for

        return file_for(self.checkpoints, step)

    def list_checkpoints(self) -> dict[int, Path]:
        """{step: file} of the run's checkpoints in step order (those of earlier sdmem versions included)."""
        from .checkpoint import listing

        return listing(self.root)


@dataclass(frozen=True)
class RunRef:
    """A run folder found from what the user gave: ``label`` (the point's or folder's name; the given path when two
    share a name), ``run`` (the trainer's run folder), ``point`` (its sweep point folder, or None)."""

    label: str
    run: Path
    point: Path | None
    given: Path


def find_runs(paths, *, sweeps: bool = True) -> list[RunRef]:
    """The run folders behind each input: a run folder, a sweep point folder (``point.json`` + ``run/``), a point's
    ``run/``, or (``sweeps``) a sweep folder, for all its point folders. A sweep folder with no point folder yet is
    an InputError; anything else is returned as a run folder, for the caller to check."""
    found = []
    for given in map(Path, paths):
        points = sorted(p for p in given.iterdir() if (p / "point.json").is_file() and (p / "run").is_dir()) \
            if sweeps and given.is_dir() and not (given / "config.json").is_file() else []
        if points:
            found += [(p.name, p / "run", p, given) for p in points]
        elif (given / "point.json").is_file() and (given / "run").is_dir():
            found.append((given.name, given / "run", given, given))
        elif given.name == "run" and (given.parent / "point.json").is_file():
            found.append((given.parent.name, given, given.parent, given))
        elif sweeps and (given / "results.csv").is_file():
            raise InputError(given, "is a sweep folder without finished point folders (<point>/run)")
        else:
            found.append((given.name, given, None, given))
    labels = [name for name, *_ in found]  # a name shared by two runs: their paths tell them apart
    return [RunRef(name if labels.count(name) == 1 else str(run), run, point, given)
            for name, run, point, given in found]


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a folder that ``sdmem train`` wrote (config.json and subset.npz)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "subset.npz").is_file()


def run_kind(path: str | os.PathLike) -> str:
    """The kind (edm or sd) of the run folder ``path``; anything else is an InputError naming what is wrong."""
    paths = RunPaths(path)
    if not is_run_dir(path):
        raise InputError(path, "is not an sdmem run folder (expected config.json and subset.npz from sdmem train)")
    raw = read_json(paths.config, "run config")
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind not in KINDS:
        raise InputError(paths.config, f"holds a run of kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def read_run_config(run_dir: str | os.PathLike, kind: str | None = None):
    """The config a run folder was trained with (its config.json); ``kind`` requires that kind."""
    found = run_kind(run_dir)
    if kind is not None and found != kind:
        raise InputError(run_dir, f"holds a run of kind {found}, not {kind}")
    path = RunPaths(run_dir).config
    return stored_config(KINDS[found], read_json(path, "run config"), str(path))


def check_reuse(cfg, paths: RunPaths) -> None:
    """Refuse a folder of another run (naming the training keys that differ) or one that is not a run at all."""
    if paths.config.exists():
        raw = read_json(paths.config, "run config")
        kind = raw.get("kind") if isinstance(raw, dict) else None
        if kind != cfg.kind:
            raise InputError(paths.root, f"holds a run of kind {kind!r}, not {cfg.kind}; refusing to reuse this "
                                         "folder: use another out_dir")
        try:
            stored = stored_config(type(cfg), raw, str(paths.config))
        except InputError as exc:
            raise InputError(paths.root, f"holds an unreadable or foreign run config ({exc}); refusing to reuse "
                                         "this folder") from None
        keys = changed_training_keys(stored, cfg)
        if keys:
            older = keys_added_since(type(cfg), raw, keys)
            hint = (f"; it was made before {', '.join(older)} existed: finish it with "
                    + " ".join(f"--set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in older.items())
                    ) if older else ""
            raise InputError(paths.root, "holds a run trained with a different config (" + ", ".join(keys)
                             + " differ); refusing to resume it: use another out_dir or the original settings"
                             + hint)
    elif paths.root.exists() and not paths.root.is_dir():
        raise InputError(paths.root, "exists and is not a folder; out_dir must be a folder")
    elif paths.root.exists() and any(p.name != "tensorboard" for p in paths.root.iterdir()):
        raise InputError(paths.root, "exists, is not empty and is not an sdmem run folder (no config.json); "
                                     "refusing to write into it")


def load_or_build_subset(paths: RunPaths, build):
    """The run's saved training subset when there is one (verified against subset.json), else ``build()``."""
    from .data.subset import load_subset

    return load_subset(paths.root) if paths.subset.exists() else build()


def write_run_folder(cfg, paths: RunPaths, subset) -> None:
    """Create the run folder: config.json (the resolved config) and, once, the exact training subset D."""
    from .data.subset import save_subset

    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, json.dumps(config_to_dict(cfg), indent=2) + "\n")
    if not paths.subset.exists():
        save_subset(subset, paths.root)


class JsonlLog:
    """An append-only JSON-lines log keyed by ``step``. A resume first trims the rows past its checkpoint, so
    steps that are replayed after a kill are logged once, never twice."""

    def __init__(self, path: Path, key: str = "step"):
        self.path, self.key = Path(path), key

    def rows(self) -> list[dict]:
        """The complete rows (a torn last line, from a kill mid-write, is skipped)."""
        if not self.path.exists():
            return []
        out = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(self.path, f"unreadable log ({exc.__class__.__name__}: {exc})") from None
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def trim(self, last_step: int) -> list[dict]:
        """Keep only the rows with ``step <= last_step`` (rewritten atomically); returns the rows kept."""
        rows = self.rows()
        kept = [r for r in rows if isinstance(r.get(self.key), int) and r[self.key] <= last_step]
        if self.path.exists() and len(kept) != len(self.path.read_text(encoding="utf-8").splitlines()):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, row: dict) -> None:
        """One row, written and flushed in one call."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(finite_json(row)) + "\n")


def finite_json(obj):
    """``obj`` with every non-finite float (nan, inf) replaced by None: JSON has no such numbers."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
