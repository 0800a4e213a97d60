"""sdmem: find out whether a diffusion model memorizes its training data, and why."""

__version__ = "0.1.0"
