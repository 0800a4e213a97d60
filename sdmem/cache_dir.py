"""sdmem's cache folder, shared by the FID weights and the named datasets (imports nothing from sdmem)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """sdmem's cache folder: ``$SDMEM_CACHE``, else ``$XDG_CACHE_HOME/sdmem``, else ``~/.cache/sdmem``."""
    if os.environ.get("SDMEM_CACHE"):
        return Path(os.environ["SDMEM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sdmem"
