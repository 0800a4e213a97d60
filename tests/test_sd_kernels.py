"""The SD UNet's faster forward passes keep its mathematics: a LoRA layer computed with its merged weight gives
peft's outputs and gradients (float64: to 1e-12; float32: within rounding), trains the same up to rounding and
resumes bit for bit; the cross-attention keys and values kept across sampling steps give bit-identical images."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("diffusers", "transformers", "peft"):  # the sd extra
    pytest.importorskip(_name)

from helpers import lora_pipeline  # noqa: E402
from sdmem.sd.kernels import ContextKV, merge_lora_forward, merged_is_cheaper  # noqa: E402
from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    return {"model": make_tiny_sd(root / "tiny-sd"), "data": make_imagenette_like(root / "inet", per_class=2, num_classes=4)}


def test_the_merged_form_is_chosen_where_it_needs_fewer_flops():
    # Per token: separate 2·i·o + 3·r·(i + o), merged 3·i·o (forward, input gradient, LoRA or weight gradient).
    assert merged_is_cheaper(32, 32, 6) and not merged_is_cheaper(32, 32, 5)  # 3072 < 3200; 3072 > 3008
    assert merged_is_cheaper(32, 64, 8) and not merged_is_cheaper(32, 64, 7)  # 6144 < 6400; 6144 > 6112
    # With T rows the merged weight's own cost counts: training 3·T·i·o + 3·i·o·r against T·(2·i·o + 3·r·(i + o)),
    # sampling T·i·o + i·o·r against T·(i·o + r·(i + o)) (32x32, rank 8: T > 48 and T > 16; at equality: separate).
    assert not merged_is_cheaper(32, 32, 8, 48) and merged_is_cheaper(32, 32, 8, 49)
    assert not merged_is_cheaper(32, 32, 8, 16, training=False) and merged_is_cheaper(32, 32, 8, 17, training=False)
    # SD v1's UNet (widths 320-1280, text width 768), the paper's batch 16 at 256x256 (latent 32², 16², 8²; 77 text
    # tokens): rank 256 merges the projections at 32² and 16² and keeps those at 8² separate; rank 16 merges none.
    levels = [(320, 16 * 32 * 32), (640, 16 * 16 * 16), (1280, 16 * 8 * 8)]
    merged = [(merged_is_cheaper(c, c, 256, t), merged_is_cheaper(768, c, 256, 16 * 77)) for c, t in levels]
    assert merged == [(True, True), (True, True), (False, False)]
    shapes = [(c, c) for c in (320, 640, 1280)] + [(768, c) for c in (320, 640, 1280)]
    assert all(merged_is_cheaper(i, o, 256) for i, o in shapes)  # per token
    assert not any(merged_is_cheaper(i, o, 16) for i, o in shapes)


def _lora_linear(dtype, bias=True, rank=6, alpha=3.0, dropout=0.0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 20, bias=bias))
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"],
                                               lora_dropout=dropout), model)
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()  # B is zero at init: make the LoRA matter
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_merged_lora_layer_gives_peft_outputs_and_gradients(dtype, tol, bias):
    x = torch.randn(3, 7, 24, dtype=dtype)
    results = []
    for mode in ("separate", "merged"):
        model = _lora_linear(dtype, bias)
        assert merge_lora_forward(model, mode) == (mode == "merged")
        y = model(x)
        (y * torch.linspace(-1, 1, 20, dtype=dtype)).sum().backward()
        layer = model[0]
        results.append([y, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad])
    for a, b in zip(*results):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())
    assert model[0].base_layer.weight.grad is None  # the frozen base gets no gradient


def test_auto_merges_a_call_only_when_its_rows_make_it_cheaper(monkeypatch):
    builds = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: builds.append(a[0].shape) or addmm(*a, **k))
    auto, separate = _lora_linear(torch.float32, rank=8), _lora_linear(torch.float32, rank=8)
    assert merge_lora_forward(auto, "auto") == 1  # 24 -> 20 at rank 8: merging is cheaper per token
    # Training: merged once 3·T·480 + 3·480·8 < T·(960 + 3·8·44), i.e. T > 20.
    for rows, merges in ((20, False), (21, True)):
        x = torch.randn(rows, 24)
        builds.clear()
        y = auto(x)
        assert bool(builds) == merges
        if not merges:  # peft's own path: the same bits
            assert torch.equal(y, separate(x))
        torch.testing.assert_close(y, separate(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # sampling: merged once T·480 + 480·8 < T·(480 + 8·44), i.e. T >= 11
        builds.clear()
        auto(torch.randn(10, 24))
        assert not builds
        auto(torch.randn(11, 24))
        assert builds


def test_a_merged_lora_layer_under_bf16_autocast_keeps_the_base_dtype_and_is_within_bf16_rounding():
    from peft import LoraConfig, inject_adapter_in_model

    x = torch.randn(5, 24)
    outs = []
    for mode in ("separate", "merged"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 20)).to(torch.bfloat16)  # the frozen base in bf16
        model = inject_adapter_in_model(LoraConfig(r=6, lora_alpha=6, target_modules=["0"]), model)
        layer = model[0]
        layer.lora_A.float()
        layer.lora_B.float()
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(std=0.1)
        merge_lora_forward(model, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x.to(torch.bfloat16)))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)


def test_only_plain_lora_layers_are_switched_and_auto_follows_the_flop_rule(assets):
    from sdmem.sd.components import load_components
    from sdmem.sd.lora import add_lora

    assert merge_lora_forward(_lora_linear(torch.float32, dropout=0.1), "merged") == 0  # dropout: peft's forward
    counts = {}
    for mode in ("separate", "auto", "merged"):
        unet = load_components(str(assets["model"])).unet
        add_lora(unet, rank=8, alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        counts[mode] = merge_lora_forward(unet, mode)
        shapes = [(m.base_layer.in_features, m.base_layer.out_features) for m in unet.modules()
                  if hasattr(m, "lora_A")]
    # The tiny UNet: widths 32 and 64, text width 32. At rank 8 the 32x32 projections and the 32->64 keys and
    # values merge (3·i·o is less), the 64x64 ones do not.
    assert counts["separate"] == 0 and counts["merged"] == len(shapes) == 32
    assert counts["auto"] == sum(s in ((32, 32), (32, 64)) for s in shapes) and 0 < counts["auto"] < 32
    with pytest.raises(ValueError, match="lora forward"):
        merge_lora_forward(unet, "fast")


def _train(tmp, name, assets, *, steps=4, **model):
    import yaml

    from sdmem.runs import load_config
    from sdmem.sd.train import train

    cfg = {"kind": "sd", "seed": 3, "out_dir": str(tmp / name),
           "data": {"source": str(assets["data"]), "size": 8, "resolution": 32, "prompt": "class"},
           "model": {"pretrained": str(assets["model"]), "method": "lora", "rank": 8, **model},
           "train": {"images_seen": 4 * steps, "batch_size": 4, "gradient_accumulation": 1, "checkpoint_steps": 2,
                     "checkpoints_total_limit": None, "log_every_steps": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(path), progress=False), tmp / name


def _state(run, step):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:07d}.safetensors"))


def test_merged_lora_training_matches_peft_up_to_rounding_and_resumes_bitwise(tmp_path, assets, one_thread):
    merged_summary, merged = _train(tmp_path, "merged", assets, lora_forward="merged")
    separate_summary, separate = _train(tmp_path, "separate", assets, lora_forward="separate")
    assert json.loads((merged / "config.json").read_text())["model"]["lora_forward"] == "merged"
    # The same training up to float rounding.
    assert merged_summary["loss"] == pytest.approx(separate_summary["loss"], rel=1e-4)
    wa, wb = _state(merged, 4), _state(separate, 4)
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the merged form did run (other rounding)
    for k in wa:
        if k.startswith(("model.", "ema.")):
            x, y = wa[k].float(), wb[k].float()
            assert (x - y).abs().max() <= 1e-3 * x.abs().max() + 1e-12, k
    # Resuming the merged run from its step-2 checkpoint ends where it ended, bit for bit.
    shutil.copytree(merged, tmp_path / "resumed")
    (tmp_path / "resumed" / "config.json").write_text(
        (merged / "config.json").read_text().replace(str(merged), str(tmp_path / "resumed")))
    (tmp_path / "resumed" / "final.json").unlink()
    (tmp_path / "resumed" / "checkpoints" / "step-0000004.safetensors").unlink()
    summary, resumed = _train(tmp_path, "resumed", assets, lora_forward="merged")
    assert summary["steps"] == 4 and not summary.get("already_done")
    ra = _state(resumed, 4)
    assert ra.keys() == wa.keys() and all(torch.equal(ra[k], wa[k]) for k in wa)


def test_cross_attention_keys_and_values_are_kept_across_steps_with_identical_images(assets, one_thread):
    from sdmem.sd.generate import PromptEmbeddings, generate_images

    kw = dict(resolution=64, steps=4, guidance_scale=7.5)
    prompts, seeds = ["a picture of a tench", "a picture"], [0, 1]
    pipe = lora_pipeline(assets["model"], fuse=True)
    table = PromptEmbeddings(pipe)
    plain = [generate_images(pipe, prompts, seeds, embeddings=table, **kw) for _ in range(2)]
    kv = ContextKV(pipe.unet)
    cross = sum(m.is_cross_attention for m in pipe.unet.modules() if hasattr(m, "is_cross_attention"))
    assert len(kv) == 2 * cross > 0  # to_k and to_v of every cross-attention
    kept = [generate_images(pipe, prompts, seeds, embeddings=table, **kw) for _ in range(2)]
    # Each block projects its text once, at its first step: (steps - 1) answers from memory per projection.
    assert kv.hits == len(kv) * (kw["steps"] - 1) * 2
    for a, b in zip(plain, kept):
        np.testing.assert_array_equal(a, b)
    # Weights changed in place are seen (the weight's version), and the result follows them.
    with torch.no_grad():
        for m in pipe.unet.modules():
            if getattr(m, "is_cross_attention", False):
                m.to_v.weight.mul_(1.5)
    changed = generate_images(pipe, prompts, seeds, embeddings=table, **kw)
    kv.remove()
    assert not any("forward" in vars(m) for m in pipe.unet.modules())
    np.testing.assert_array_equal(changed, generate_images(pipe, prompts, seeds, embeddings=table, **kw))
    assert np.abs(changed.astype(int) - kept[0]).max() > 0


def test_with_autograd_on_nothing_is_kept(assets):
    pipe = lora_pipeline(assets["model"], fuse=True)
    kv = ContextKV(pipe.unet)
    attn = next(m for m in pipe.unet.modules() if getattr(m, "is_cross_attention", False))
    ctx = torch.randn(2, 77, 32)
    a = attn.to_k(ctx)
    b = attn.to_k(ctx)
    assert a is not b and kv.hits == 0 and torch.equal(a, b)
    with torch.no_grad():
        c = attn.to_k(ctx)
        assert attn.to_k(ctx) is c and kv.hits == 1
        assert attn.to_k(ctx.clone()) is not c  # another tensor: projected again
        ctx.add_(1.0)
        assert not torch.equal(attn.to_k(ctx), c)  # modified in place: projected again
