"""Assertions and small builders shared by the test modules (pytest puts tests/ on the path: pyproject's
``pythonpath``); fixtures are in conftest.py."""

import contextlib
from pathlib import Path

import pytest
import yaml

from sdmem.errors import InputError


def raises(fn, where: str, *problem: str) -> InputError:
    """fn() must raise an InputError whose location contains `where` and whose message contains each `problem`."""
    with pytest.raises(InputError) as info:
        fn()
    assert where in info.value.where, info.value
    for p in problem:
        assert p in info.value.problem, info.value
    return info.value


def lora_pipeline(model, *, fuse: bool = False):
    """A pipeline of the tiny SD at ``model`` with a perturbed rank-4 LoRA on the attention projections (B is zero
    at init: perturbed so that it matters), unfused peft layers or (``fuse``) fused into the weights."""
    import torch

    from sdmem.sd.components import load_components, make_pipeline
    from sdmem.sd.generate import fuse_lora
    from sdmem.sd.lora import add_lora

    comps = load_components(str(model))
    torch.manual_seed(0)
    params = add_lora(comps.unet, rank=4, alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    if fuse:
        fuse_lora(comps.unet)
    comps.unet.eval()
    return make_pipeline(comps, comps.unet)


@contextlib.contextmanager
def pinned_threads(n: int = 1):
    """torch on ``n`` threads inside the block (tiny nets on a shared 2-core machine: more only add contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def one_line_error(self, *words: str) -> None:
        """Exit 2, exactly one line on stderr (no traceback) that contains every word."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 2, (self.code, self.err)
        assert len(lines) == 1 and "Traceback" not in self.err, self.err
        for w in words:
            assert w in lines[0], (w, lines[0])


TINY_EDM = """
kind: edm
out_dir: {out}
seed: 3
data: {{source: builtin:digits, size: 32, num_classes: 2, labels: {labels}}}
model: {{arch: ddpmpp, precond: edm, channels: 8, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [],
        dropout: 0.1}}
train: {{epochs: {epochs}, batch_size: 16, warmup_epochs: 2, ema_rate: 0.9, snapshot_epochs: 4,
        checkpoint_epochs: 2, log_every_steps: 2}}
track: {{num_images: {track}, batch: 16, steps: 4}}
"""


def write_tiny_edm(tmp: Path, name: str = "run", *, labels: str = "none", epochs: int = 8, track: int = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(TINY_EDM.format(out=tmp / name, labels=labels, epochs=epochs, track=track))
    return path


# The sweep tests' tiny EDM spec (also used by the FID and failure check-lists).
BASE = {"kind": "edm", "seed": 3,
        "data": {"source": "builtin:digits", "size": 32, "num_classes": 2, "labels": "none"},
        "model": {"arch": "ddpmpp", "precond": "edm", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                  "attn_resolutions": [], "dropout": 0.1},
        "train": {"epochs": 8, "batch_size": 16, "warmup_epochs": 2, "ema_rate": 0.9, "snapshot_epochs": 4,
                  "checkpoint_epochs": 2, "log_every_steps": 2},
        "track": {"batch": 16, "steps": 3}}


def write_spec(tmp_path, name="spec.yaml", **over):
    spec = {"out_dir": str(tmp_path / "sweep"), "base": BASE, "axes": {"data.size": [16, 32]},
            "zip": [{"data.labels": ["none", "true"], "model.channels": [8, 16]}], "generate": {"num": 8},
            "report": "best", **over}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def random_state_dict(seed: int = 0) -> dict:
    """Inception-v3 weights of the right keys and shapes, randomly initialised (He-normal convolutions)."""
    import math

    import torch

    from sdmem import fid

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in fid.expected_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2 / fan_in)
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = torch.ones(shape)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        elif key == "fc.weight":
            out[key] = torch.randn(shape, generator=g) * 0.01
        else:
            out[key] = torch.zeros(shape)
    return out
