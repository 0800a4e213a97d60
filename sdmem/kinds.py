"""The model kinds: one registry. A kind is a config class (its ``kind:`` value names it), a trainer, a generator
of its run folders, and a report that turns a run into a study's row. Shared code (the CLI, sdmem.study) reaches a
kind only through :func:`get`, never by comparing kind strings, so a new kind (say a DiT) is a config, a trainer
step, a sampler and one :class:`Kind` registered here, and nothing else.

EDM and SD implement their kind inside their packages (``sdmem.edm.kind``, ``sdmem.sd.kind``), imported only when
first asked for; their config classes are imported here (they are light), so configs of every kind parse without
loading a trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

from .edm.config import EDMConfig
from .errors import InputError
from .sd.config import SDConfig


class Kind:
    """What a kind provides. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    config: type = object
    # Training tracks the memorization ratio at each snapshot (``tracking.jsonl``: what `sdmem curves` plots).
    tracks_memorization: bool = False
    # `sdmem compare`'s default layout for runs of this kind: (row columns, column columns); None: the generic one
    # (every varying column against the size).
    layout: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    # Run-folder records (names) that hold memorization numbers when the run has no audit/summary.json.
    numbers: tuple[str, ...] = ()

    # The files of a run folder of this kind: a subclass of sdmem.runs.RunPaths (every kind's files) with its own.
    paths: type | None = None

    def files(self, run_dir):
        """The paths of the run folder ``run_dir`` (``paths``)."""
        if self.paths is None:
            raise NotImplementedError(f"kind {self.name} declares no run-folder paths")
        return self.paths(run_dir)

    def tracking_log(self, run_dir):
        """The JSON-lines record of the memorization tracked during training (rows of sdmem.records.TRACKED), for
        kinds that track it."""
        raise NotImplementedError(f"runs of kind {self.name} track no memorization")

    def train(self, cfg, *, progress: bool = True) -> dict:
        raise NotImplementedError

    def dry_run(self, cfg) -> dict:
        """The resolved config with ``num_params`` and ``num_train`` (nothing is written)."""
        raise NotImplementedError

    def trained_line(self, cfg, summary: dict) -> str:
        """The one line `sdmem train` prints when a run is trained."""
        return f"trained {summary.get('steps')} steps on {summary.get('num_train')} images; run folder " \
               f"{summary.get('out_dir')}"

    def generate(self, run_dir, out_dir, *, seeds: list[int], progress: bool = True, **options) -> int:
        """Write a run's images for ``seeds`` into ``out_dir`` through the generation core; how many were new.
        ``options`` (None: the kind's default): snapshot, class_label, batch, steps, guidance, device, compile."""
        raise NotImplementedError

    def sweep_settings(self, report: str, generate: dict) -> dict[str, Any]:
        """Dotted keys a sweep sets on each point of this kind unless the spec does (e.g. how many images tracking
        judges each snapshot on)."""
        return {}

    def report(self, point, generate: dict, report: str, *, progress: bool, device: str) -> dict:
        """A trained point's row (`sdmem sweep`): ``point`` has ``config``, ``dir`` and ``run_dir``; its audit goes
        to ``point.dir / "audit"`` (see :mod:`sdmem.reporting`)."""
        raise NotImplementedError


# name -> a Kind, or the module whose KIND is it (imported when first asked for).
_REGISTRY: dict[str, Kind | str] = {"edm": "sdmem.edm.kind", "sd": "sdmem.sd.kind"}
# name -> config class: what the config engine reads a ``kind:`` with (sdmem.runs.KINDS is this dict).
CONFIGS: dict[str, type] = {"edm": EDMConfig, "sd": SDConfig}


def register(kind: Kind) -> Kind:
    """Add (or replace) a kind; its config class then parses ``kind: NAME`` configs everywhere."""
    _REGISTRY[kind.name] = kind
    CONFIGS[kind.name] = kind.config
    return kind


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    CONFIGS.pop(name, None)


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Kind:
    """The kind named ``name``; an unknown one is an InputError naming the known kinds."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InputError("kind", f"unknown model kind {name!r}; expected one of {', '.join(_REGISTRY)}")
    if isinstance(entry, str):
        entry = _REGISTRY[name] = importlib.import_module(entry).KIND
    return entry
