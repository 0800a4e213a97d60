"""Faster forward passes for the SD UNet that keep its mathematics: a LoRA layer run as one matmul with its merged
weight while it trains, and the cross-attention keys and values of a fixed text context computed once per sampling
block instead of once per denoising step.

``merge_lora_forward``: peft computes a LoRA layer as ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ``; this runs ``x·(W + s·B·A)ᵀ`` instead
(the product B·A is formed once per forward pass, gradients reach A and B through it). For T tokens (rows of x)
through a layer of i inputs, o outputs and rank r, training (forward and backward) costs ``T·(2·i·o + 3·r·(i + o))``
multiply-adds in the separate form and ``3·T·i·o + 3·i·o·r`` merged (sampling: ``T·(i·o + r·(i + o))`` against
``T·i·o + i·o·r``); ``"auto"`` takes the cheaper form at each call, from the shapes alone, so a run makes the same
choices at every step and on resume. At the paper's rank 256 it merges SD v1's attention projections at the 32²
and 16² latent levels and keeps the 8² ones separate; at rank 16 it merges none. The results differ from peft's by
float rounding only (the sums are associated differently), so this is a training setting (``model.lora_forward``)
and a run keeps the form it was made with.

``ContextKV``: in classifier-free-guidance sampling every step of a block passes the same text embeddings to the
UNet, and a cross-attention's ``to_k``/``to_v`` of them are the same at every step. They are kept from the first
step and reused while the embeddings tensor is the same object, unmodified, the weights unmodified and autograd
off; so the images are bit-identical to computing them every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LORA_FORWARDS = ("auto", "merged", "separate")


def merged_is_cheaper(in_features: int, out_features: int, rank: int, tokens: int | None = None, *,
                      training: bool = True) -> bool:
    """Whether ``x·(W + s·B·A)ᵀ`` needs fewer multiply-adds than peft's separate form for ``tokens`` rows of x
    (None: per token, as the rows grow without bound), with gradients for A and B (``training``) or without; the
    frozen W gets no gradient either way."""
    i, o, r = in_features, out_features, rank
    if tokens is None:
        return 3 * i * o < 2 * i * o + 3 * r * (i + o) if training else i * o < i * o + r * (i + o)
    if training:
        return 3 * tokens * i * o + 3 * i * o * r < tokens * (2 * i * o + 3 * r * (i + o))
    return tokens * i * o + i * o * r < tokens * (i * o + r * (i + o))


def _mergeable(layer) -> bool:
    """A peft LoRA ``Linear`` with one plain (no DoRA or other variant) adapter, no dropout, not merged."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or len(layer.active_adapters) != 1 or layer.merged or layer.fan_in_fan_out:
        return False
    name = layer.active_adapters[0]
    return (name in layer.lora_A and name not in getattr(layer, "lora_variant", {})
            and isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and isinstance(layer.get_base_layer(), torch.nn.Linear))


def _merged_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or layer.disable_adapters or layer.merged:  # anything unusual: peft's own forward
        return type(layer).forward(layer, x, *args, **kwargs)
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if layer._lora_forward == "auto":
        training = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        if not merged_is_cheaper(base.in_features, base.out_features, a.shape[0], x.numel() // x.shape[-1],
                                 training=training):
            return type(layer).forward(layer, x)
    with torch.autocast(x.device.type, enabled=False):  # W + s·B·A in the LoRA's float32, whatever the autocast
        weight = torch.addmm(base.weight.to(a.dtype), b, a, alpha=layer.scaling[name])
    bias = base.bias
    if not torch.is_autocast_enabled(x.device.type):  # as peft: the base layer's result dtype
        dtype = base.weight.dtype
        weight, x = weight.to(dtype), x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return F.linear(x, weight, bias)


def merge_lora_forward(module: torch.nn.Module, mode: str = "auto") -> int:
    """Make ``module``'s peft LoRA Linear layers compute with their merged weight: ``"merged"`` every eligible
    layer, ``"auto"`` at each call where :func:`merged_is_cheaper` for its shapes, ``"separate"`` none (peft's
    form). Parameters, names and state dicts are unchanged. Returns how many layers may merge (for ``"auto"``: those
    where merging is cheaper per token, i.e. once a call has enough rows)."""
    if mode not in LORA_FORWARDS:
        raise ValueError(f"lora forward {mode!r}: expected one of {LORA_FORWARDS}")
    count = 0
    for layer in module.modules():
        if mode == "separate" or not _mergeable(layer):
            continue
        base, rank = layer.get_base_layer(), layer.r[layer.active_adapters[0]]
        if mode == "merged" or merged_is_cheaper(base.in_features, base.out_features, rank):
            layer._lora_forward = mode
            layer.forward = _merged_forward.__get__(layer)
            count += 1
    return count


class ContextKV:
    """Reuse each cross-attention's key and value projections of the text context across the denoising steps of a
    sampling block (see the module's docstring); ``remove()`` puts the projections back as they were."""

    def __init__(self, unet: torch.nn.Module):
        from diffusers.models.attention_processor import Attention

        self.slots = []
        for attn in unet.modules():
            if isinstance(attn, Attention) and attn.is_cross_attention:
                for proj in (attn.to_k, attn.to_v):
                    if isinstance(proj, torch.nn.Linear) and "forward" not in vars(proj):
                        self.slots.append(_Remembered(proj))

    @property
    def hits(self) -> int:
        """Projections answered from memory so far."""
        return sum(slot.hits for slot in self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def remove(self) -> None:
        for slot in self.slots:
            slot.remove()
        self.slots = []


class _Remembered:
    """One projection's last (input, weight versions, output), its forward replaced by a lookup."""

    def __init__(self, proj: torch.nn.Linear):
        self.proj, self.last, self.hits = proj, None, 0
        proj.forward = self.forward

    def key(self, x: torch.Tensor) -> tuple:
        p = self.proj
        return x._version, p.weight._version, None if p.bias is None else p.bias._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.requires_grad:
            return F.linear(x, self.proj.weight, self.proj.bias)
        last = self.last
        key = self.key(x)
        if last is not None and last[0] is x and last[1] == key:
            self.hits += 1
            return last[2]
        y = F.linear(x, self.proj.weight, self.proj.bias)
        self.last = (x, key, y)
        return y

    def remove(self) -> None:
        self.last = None
        vars(self.proj).pop("forward", None)
