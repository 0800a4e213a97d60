"""The check-list of foreign-weight failures (``sdmem generate --model``): a LoRA file, a diffusers pipeline's
components and a published EDM pickle holding NaN/inf weights, and pickled ``*.bin`` weights in any component
folder, each end in exit 2 and one line naming the file (or component) and the tensor, with no --out folder."""

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file  # noqa: E402

from helpers import lora_layers, raises, tiny_denoiser, write_pickle  # noqa: E402
from sdmem.sd.tiny import make_tiny_sd  # noqa: E402

# The EDM-style pickle fixtures (persistence: a fake torch_utils.persistence; standin: the stand-in network source
# counted as known) are in conftest.py.

# A component's weights file, and the pickled file its loader falls back to without it.
WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "text_encoder": ("model.safetensors", "pytorch_model.bin")}
RAN = []  # what a pickled call appended: must stay empty


def _ran(*args):  # pragma: no cover - reaching it is the failure
    RAN.append(args)
    return {}


class Payload:
    """Pickles as a call of _ran: what a malicious .bin does (here, harmlessly)."""

    def __reduce__(self):
        return _ran, ("unpickled",)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("foreign-failures") / "tiny-sd")


def generate(cli, model, out, *extra):
    return cli("generate", "--model", model, "--prompt", "a red fox", "--num", 2, "--out", out, "--steps", 2,
               "--batch", 2, "--device", "cpu", "--quiet", *extra)


def poison(tensors: dict, value: float) -> str:
    """Set one element of the first floating-point tensor (in name order) to ``value``; its name."""
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel() > 1)
    t = tensors[name].clone()
    t.view(-1)[1] = value
    tensors[name] = t
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lora_file(cli, tiny, tmp_path, one_thread, value):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(save_directory=str(tmp_path / "lora"),
                                              unet_lora_layers=lora_layers(tiny, seed=1), safe_serialization=True)
    layers = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    name = poison(layers, value)
    lora = tmp_path / "broken-lora.safetensors"
    save_file(layers, str(lora))
    out = tmp_path / "out"
    generate(cli, tiny, out, "--lora", lora).one_line_error(str(lora), name, "non-finite",
                                                            "NaN" if value != value else "inf")
    assert not out.exists()


@pytest.mark.parametrize("component", sorted(WEIGHTS))
def test_non_finite_pipeline_component(cli, tiny, tmp_path, one_thread, component):
    model = shutil.copytree(tiny, tmp_path / "model")
    file = model / component / WEIGHTS[component][0]
    tensors = load_file(str(file))
    name = poison(tensors, float("nan"))
    save_file(tensors, str(file), metadata={"format": "pt"})
    out = tmp_path / "out"
    generate(cli, model, out).one_line_error(str(model / component), name, "non-finite")
    assert not out.exists()


def test_weights_that_overflow_float16_are_refused(tiny, tmp_path, one_thread):
    """On CUDA the pipeline runs in fp16: a finite fp32 weight beyond 65504 becomes inf in the cast (the check
    load_pipeline makes after it, run here on a CPU cast)."""
    from sdmem.sd.foreign import check_finite, load_pipeline

    model = shutil.copytree(tiny, tmp_path / "model")
    file = model / "vae" / WEIGHTS["vae"][0]
    tensors = load_file(str(file))
    name = poison(tensors, 1e6)
    save_file(tensors, str(file), metadata={"format": "pt"})
    pipe = load_pipeline(model, device="cpu")  # finite in float32: accepted
    pipe.to(torch.float16)
    raises(lambda: check_finite(pipe, model, cast="float16"), str(model / "vae"), name, "overflows float16",
           "1 inf", "--device cpu")


@pytest.mark.parametrize("component", sorted(WEIGHTS))
def test_pickled_bin_weights_in_any_component(cli, tiny, tmp_path, one_thread, component):
    """Only a pickled .bin in the folder (no safetensors): refused alike for the UNet, the VAE and the text
    encoder, naming the file, and nothing in it runs; a .bin of plain tensors loads."""
    model = shutil.copytree(tiny, tmp_path / "model")
    safe, pickled = WEIGHTS[component]
    tensors = load_file(str(model / component / safe))
    (model / component / safe).unlink()
    torch.save({**tensors, "extra": Payload()}, model / component / pickled)
    out = tmp_path / "out"
    generate(cli, model, out).one_line_error(str(model / component / pickled), "pickles Python objects",
                                             "weights-only")
    assert not out.exists() and not RAN

    torch.save(tensors, model / component / pickled)  # plain tensors: read by the weights-only loader
    r = generate(cli, model, out)
    assert r.code == 0 and not r.err.strip(), r.err
    assert len(list(out.glob("*.png"))) == 2


def test_non_finite_edm_pickle_tensor(cli, tmp_path, standin, persistence, one_thread):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    name = sorted(k for k, p in net.named_parameters() if p.numel() > 1)[0]
    with torch.no_grad():
        net.get_parameter(name).view(-1)[1] = float("inf")
    path = write_pickle(tmp_path / "edm-broken.pkl", net, persistence, kwargs)
    out = tmp_path / "out"
    cli("generate", "--model", path, "--num", 2, "--out", out, "--steps", 2, "--batch", 2, "--device", "cpu",
        "--quiet").one_line_error(str(path), f"tensor {name}", "non-finite", "1 inf")
    assert not out.exists()
