"""Assertions and small builders shared by the test modules."""

import pytest

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
