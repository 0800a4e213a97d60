"""SD generation's speed changes keep the images: prompts encoded once, each alone (diffusers' own call's images
within 1/255, byte-equal where its batched text encoding rounds alike), the LoRA fused into the weights (within rounding: max 2/255 per
pixel, mean far below), torch.compile (slow; the same tolerance)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("diffusers", "transformers", "peft"):  # the sd extra
    pytest.importorskip(_name)

from helpers import lora_pipeline  # noqa: E402
from sdmem.generation import seeded_latents  # noqa: E402
from sdmem.sd.tiny import make_tiny_sd  # noqa: E402

PROMPTS = ["a picture of a tench", "a picture", "a picture of a tench", "a picture of a church"]
SEEDS = [0, 1, 2, 3]
KW = dict(resolution=64, steps=4, guidance_scale=7.5)


def pipeline_call(pipe, prompts, seeds):
    """diffusers' plain call: the pipeline encodes the prompts of the batch itself."""
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=KW["steps"], guidance_scale=KW["guidance_scale"],
                   latents=seeded_latents(seeds, (4, 8, 8)), height=64, width=64, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("speed") / "tiny-sd")


@pytest.fixture(scope="module")
def reference(model):
    with torch.inference_mode(False):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return pipeline_call(lora_pipeline(model), PROMPTS, SEEDS)
        finally:
            torch.set_num_threads(n)


def within_rounding(a, b):
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 2 and d.mean() < 0.05, (d.max(), d.mean())


def test_prompts_are_encoded_once_each_alone(model, reference, one_thread):
    from sdmem.sd.generate import PromptEmbeddings, generate_images

    pipe = lora_pipeline(model)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    table = PromptEmbeddings(pipe)
    # Two blocks of one run share the table: each distinct prompt and the empty one are encoded once, alone.
    a = generate_images(pipe, PROMPTS[:2], SEEDS[:2], embeddings=table, **KW)
    b = generate_images(pipe, PROMPTS[2:], SEEDS[2:], embeddings=table, **KW)
    assert sorted(table.table) == sorted({"", *PROMPTS}) and calls == [1] * 4
    # A prompt's embedding is the same whatever batch asks for it: equal blocks give equal bytes.
    np.testing.assert_array_equal(generate_images(pipe, PROMPTS[:2], SEEDS[:2], embeddings=table, **KW), a)
    # Two images per call: diffusers' own call (which encodes the batch's prompts together) gives the same bytes.
    np.testing.assert_array_equal(a, pipeline_call(pipe, PROMPTS[:2], SEEDS[:2]))
    np.testing.assert_array_equal(b, pipeline_call(pipe, PROMPTS[2:], SEEDS[2:]))
    # In larger batches a batched GEMM may round the text encoder's last row differently: within 1/255.
    d = np.abs(generate_images(pipe, PROMPTS, SEEDS, **KW).astype(int) - reference)
    assert d.max() <= 1 and d.mean() < 0.01


def test_a_fused_lora_runs_no_lora_layer_and_keeps_the_images_within_rounding(model, reference, one_thread):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdmem.sd.generate import fuse_lora, generate_images

    pipe = lora_pipeline(model)
    wrapped = sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert wrapped == 4 * 8 and fuse_lora(pipe.unet) == wrapped  # 4 projections x 8 attention layers
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    fused = generate_images(pipe, PROMPTS, SEEDS, **KW)
    within_rounding(fused, reference)
    base = generate_images(make_base(model), PROMPTS, SEEDS, **KW)
    assert np.abs(base.astype(int) - fused).max() > 10  # the fused LoRA still matters


def make_base(model):
    from sdmem.sd.components import load_components, make_pipeline

    comps = load_components(str(model))
    return make_pipeline(comps, comps.unet)


@pytest.mark.slow
def test_a_compiled_unet_keeps_the_images_within_rounding(model, reference, one_thread):
    from sdmem.sd.generate import fuse_lora, sampling_renderer

    pipe = lora_pipeline(model)
    fuse_lora(pipe.unet)
    render = sampling_renderer(pipe, compile=True, **KW)  # about a minute of compiling on a CPU
    within_rounding(render(SEEDS, [{"prompt": p} for p in PROMPTS]), reference)


def test_compile_is_for_sd_only(tiny_edm_run, tmp_path, cli):
    r = cli("generate", tiny_edm_run, "--num", 2, "--out", tmp_path / "g", "--compile")
    assert r.code == 2 and "--compile" in r.err and not (tmp_path / "g").exists()
