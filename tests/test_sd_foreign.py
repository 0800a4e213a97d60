"""``sdmem generate --model``: images from a diffusers pipeline sdmem did not train (tiny SD, offline), with a
LoRA in diffusers and kohya format, prompts, prompt files and class prompts, through the shared generation core."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import LORA_RANK, lora_layers, raises
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdmem.generation import MANIFEST, generate_folder, seeded_latents  # noqa: E402
from sdmem.sd.foreign import foreign_plan, model_fingerprint  # noqa: E402
from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd  # noqa: E402

SEEDS = list(range(6))
PROMPT = "a red fox"
FAST = dict(steps=4, device="cpu")  # the tiny model's default size: sample_size 8 x VAE factor 8 = 64


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def images(folder, seeds=SEEDS) -> np.ndarray:
    return np.stack([np.array(Image.open(folder / f"{s:06d}.png")) for s in seeds])


def to_kohya(layers: dict) -> dict:
    """The same weights with kohya-ss names: lora_unet_<module path, dots as underscores>.lora_down/up.weight and
    .alpha (= rank, so the scale alpha/rank is 1 as in the diffusers file)."""
    out = {}
    for key, value in layers.items():
        module, kind = key.removeprefix("unet.").rsplit(".lora.", 1)
        base = "lora_unet_" + module.replace(".", "_")
        out[base + (".lora_down.weight" if kind.startswith("down") else ".lora_up.weight")] = value.clone()
        out[base + ".alpha"] = torch.tensor(float(LORA_RANK))
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny SD folder; a LoRA output folder laid out as train_text_to_image_lora.py leaves it (final
    pytorch_lora_weights.safetensors, checkpoint-N/ with accelerate's state beside the LoRA file, logs/); the
    final LoRA in kohya format; an Imagenette-like folder."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("foreign")
    model = make_tiny_sd(root / "tiny-sd")
    out_dir = root / "sd-model-finetuned-lora"
    ckpt = out_dir / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (out_dir / "logs").mkdir()
    final = lora_layers(model, seed=1)
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=final,
                                              safe_serialization=True)
    StableDiffusionPipeline.save_lora_weights(save_directory=str(ckpt), unet_lora_layers=lora_layers(model, seed=2),
                                              safe_serialization=True)
    # accelerator.save_state's files beside it: the whole (wrapped) UNet, optimizer, scheduler, RNG states.
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(ckpt / "model.safetensors"))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (ckpt / name).write_bytes(b"accelerate state")
    kohya = root / "kohya_lora.safetensors"
    save_file(to_kohya(final), str(kohya))
    inet = make_imagenette_like(root / "inet", per_class=1, num_classes=3, val_per_class=1)
    return {"root": root, "model": model, "lora_dir": out_dir, "ckpt": ckpt, "kohya": kohya, "inet": inet}


@pytest.fixture(scope="module")
def base6(assets):
    """The base model's images of SEEDS with PROMPT, batch 6 (the folder, once)."""
    out = assets["root"] / "base6"
    generate_folder(out, SEEDS, foreign_plan(assets["model"], SEEDS, prompt=PROMPT, batch=6, **FAST), progress=False)
    return images(out)


def test_prompt_generation_manifest_resume_and_refusal(assets, tmp_path, one_thread):
    model, out = assets["model"], tmp_path / "out"
    plan = foreign_plan(model, SEEDS, prompt=PROMPT, batch=4, **FAST)
    assert generate_folder(out, SEEDS, plan, progress=False) == 6
    manifest = json.loads((out / MANIFEST).read_text())
    made_by = manifest["settings"]["made_by"]
    assert made_by == {"kind": "diffusers", "model": str(model.resolve()), "revision": None,
                       "model_fingerprint": model_fingerprint(model), "lora_sha256": None}
    assert {k: manifest["settings"][k] for k in ("sampler", "steps", "guidance_scale", "eta", "batch", "size")} == \
        {"sampler": "ddim", "steps": 4, "guidance_scale": 7.5, "eta": 0.0, "batch": 4, "size": [64, 64]}
    assert manifest["images"]["000003.png"] == {"seed": 3, "prompt": PROMPT}
    assert manifest["info"]["pipeline"] == "StableDiffusionPipeline" and manifest["info"]["dtype"] == "float32"
    first = {s: (out / f"{s:06d}.png").read_bytes() for s in SEEDS}
    assert len(set(first.values())) == 6  # per-seed noise: six different images

    # Complete: nothing loads. Resume after a lost image: its block [4, 8) is re-rendered, byte-equal.
    plan = foreign_plan(model, SEEDS, prompt=PROMPT, batch=4, **FAST)
    plan.load = lambda: pytest.fail("a complete folder must not load the model")
    assert generate_folder(out, SEEDS, plan, progress=False) == 0
    (out / "000005.png").unlink()
    assert generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=4, **FAST),
                           progress=False) == 1
    assert {s: (out / f"{s:06d}.png").read_bytes() for s in SEEDS} == first

    # Another guidance (or prompt) into the same folder is refused, naming the setting; nothing changes.
    raises(lambda: generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=4, guidance=3.0,
                                                            **FAST), progress=False), str(out), "guidance_scale")
    raises(lambda: generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt="a cat", batch=4, **FAST),
                                   progress=False), str(out), "prompt")
    assert {s: (out / f"{s:06d}.png").read_bytes() for s in SEEDS} == first


def hand_loaded(model, lora_dir, seeds, prompt) -> np.ndarray:
    """The same images made by hand: the saved pipeline, the DDIM sampler of sdmem runs, diffusers'
    load_lora_weights(folder), each seed's CPU noise as latents, one batch."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from sdmem.sd.components import ddim_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = ddim_scheduler(DDPMScheduler.from_pretrained(str(model), subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir))
    latents = seeded_latents(seeds, (4, 8, 8))
    with torch.no_grad():
        out = pipe([prompt] * len(seeds), num_inference_steps=4, guidance_scale=7.5, latents=latents, height=64,
                   width=64, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def test_diffusers_lora_from_the_example_scripts_folder(assets, base6, tmp_path, one_thread):
    model, lora_dir, ckpt = assets["model"], assets["lora_dir"], assets["ckpt"]
    out = tmp_path / "lora"
    generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=6, lora=lora_dir, **FAST),
                    progress=False)
    got = images(out)
    assert np.abs(got.astype(int) - base6).max() > 10  # the LoRA changes the images
    # Sampling fuses the LoRA into the weights and encodes the prompt once, alone: diffusers' images (unfused, the
    # batch's prompts encoded together) within rounding (max 2/255, mean far below).
    by_hand = hand_loaded(model, lora_dir, SEEDS, PROMPT)
    diff = np.abs(got.astype(int) - by_hand)
    assert diff.max() <= 2 and diff.mean() < 0.05
    unfused = foreign_plan(model, SEEDS, prompt=PROMPT, batch=6, lora=lora_dir, fuse=False, **FAST)
    assert "lora_fused" not in unfused.settings
    generate_folder(tmp_path / "unfused", SEEDS, unfused, progress=False)
    diff = np.abs(images(tmp_path / "unfused").astype(int) - by_hand)
    assert diff.max() <= 1 and diff.mean() < 0.01
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["lora_fused"] is True
    assert manifest["settings"]["prompt_encoding"] == "each prompt alone, once"
    final_file = lora_dir / "pytorch_lora_weights.safetensors"
    assert manifest["settings"]["made_by"]["lora_sha256"] == sha256(final_file)
    assert manifest["info"]["lora"] == str(final_file.resolve())

    # The file itself names the same LoRA: the folder is complete, nothing to do.
    assert generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=6, lora=final_file,
                                                    **FAST), progress=False) == 0
    # A checkpoint-N/ folder: its pytorch_lora_weights.safetensors (not accelerate's model.safetensors), another
    # LoRA, so the folder above refuses it and a new folder gets other images.
    plan = foreign_plan(model, SEEDS, prompt=PROMPT, batch=6, lora=ckpt, **FAST)
    assert plan.settings["made_by"]["lora_sha256"] == sha256(ckpt / "pytorch_lora_weights.safetensors")
    raises(lambda: generate_folder(out, SEEDS, plan, progress=False), str(out), "made_by", "lora_sha256")
    generate_folder(tmp_path / "ckpt", SEEDS, plan, progress=False)
    assert np.abs(images(tmp_path / "ckpt").astype(int) - got).max() > 10
    # Without the LoRA into the LoRA's folder: refused too.
    raises(lambda: generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=6, **FAST),
                                   progress=False), str(out), "made_by")


def test_kohya_lora(assets, base6, tmp_path, one_thread):
    model, kohya = assets["model"], assets["kohya"]
    out = tmp_path / "kohya"
    generate_folder(out, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=6, lora=kohya, **FAST),
                    progress=False)
    got = images(out).astype(int)
    assert np.abs(got - base6).max() > 10
    assert json.loads((out / MANIFEST).read_text())["settings"]["made_by"]["lora_sha256"] == sha256(kohya)
    # diffusers' kohya conversion gives the diffusers-format LoRA's images (within 1/255).
    diffusers_format = tmp_path / "diffusers-format"
    generate_folder(diffusers_format, SEEDS, foreign_plan(model, SEEDS, prompt=PROMPT, batch=6,
                                                          lora=assets["lora_dir"], **FAST), progress=False)
    assert np.abs(got - images(diffusers_format).astype(int)).max() <= 1


def test_class_prompts_and_prompt_files(assets, tmp_path, one_thread):
    model, inet = assets["model"], assets["inet"]
    out = tmp_path / "classes"
    plan = foreign_plan(model, SEEDS, class_prompts=inet, batch=4, **FAST)
    generate_folder(out, SEEDS, plan, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    names = ["tench", "English springer", "cassette player"]  # n01440764, n02102040, n02979186
    assert manifest["info"]["class_names"] == names
    assert [manifest["images"][f"{s:06d}.png"] for s in SEEDS] == [
        {"seed": s, "prompt": f"a picture of a {names[s // 2]}", "class": s // 2} for s in SEEDS]
    assert len({(out / f"{s:06d}.png").read_bytes() for s in SEEDS}) == 6

    # Plain class folders, another template, seeds not from 0: N/C per class in seed order.
    pets = tmp_path / "pets"
    for c in ("dog", "cat"):
        (pets / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).save(pets / c / "0.png")
    seeds = list(range(10, 14))
    plan = foreign_plan(model, seeds, class_prompts=pets, template="a photo of my {class}", **FAST)
    assert [plan.condition(s) for s in seeds] == [{"prompt": f"a photo of my {c}", "class": k}
                                                   for k, c in ((0, "cat"), (0, "cat"), (1, "dog"), (1, "dog"))]

    # A prompts file: one per line, stripped, blank lines ignored; seed s gets line s mod L.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n  a blue whale  \n\na green frog\n")
    plan = foreign_plan(model, SEEDS, prompts_file=prompts, **FAST)
    assert [plan.condition(s)["prompt"] for s in SEEDS] == ["a red fox", "a blue whale", "a green frog"] * 2
    assert plan.info["prompt_mode"] == "prompts_file"


def test_hub_id_from_the_local_cache(assets, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-sd"
    shutil.copytree(assets["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    plan = foreign_plan("someone/tiny-sd", SEEDS, prompt=PROMPT, **FAST)
    made_by = plan.settings["made_by"]
    assert (made_by["model"], made_by["revision"]) == ("someone/tiny-sd", commit)
    assert made_by["model_fingerprint"] == model_fingerprint(assets["model"])  # same files, same identity
    err = raises(lambda: foreign_plan("someone/not-cached-sd", SEEDS, prompt=PROMPT, **FAST), "--model",
                 "someone/not-cached-sd", "not in the local Hugging Face cache", str(cache), "hf download")
    assert "\n" not in str(err)


def test_bad_inputs(assets, tmp_path, one_thread):
    model, lora_file = assets["model"], assets["lora_dir"] / "pytorch_lora_weights.safetensors"

    def plan(**kw):
        args = {"prompt": PROMPT, **FAST, **kw}
        return lambda: foreign_plan(args.pop("model", model), SEEDS, **args)

    missing = tmp_path / "no" / "such-model"
    raises(plan(model=missing), "--model", str(missing), "no such folder")
    (tmp_path / "half").mkdir()
    raises(plan(model=tmp_path / "half"), "--model", "not a diffusers", "model_index.json")
    raises(plan(revision="main"), "--revision", "hub ids only")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n")
    raises(plan(prompts_file=prompts), "--prompt", "--prompts", "exactly one")
    raises(lambda: foreign_plan(model, SEEDS, **FAST), "--prompt", "exactly one")
    raises(plan(prompt=None, prompts_file=prompts, class_prompts=assets["inet"]), "--prompts", "--class-prompts")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    raises(plan(prompt=None, prompts_file=empty), str(empty), "no prompt")
    raises(plan(prompt=None, prompts_file=tmp_path / "none.txt"), str(tmp_path / "none.txt"), "unreadable")
    raises(plan(prompt=None, class_prompts=assets["inet"], template="a picture"), "--template", "{class}")
    raises(plan(prompt=None, class_prompts=tmp_path / "nope"), "--class-prompts")
    raises(plan(guidance=float("nan")), "--guidance")
    raises(plan(steps=0), "--steps")
    raises(plan(eta=2.0), "--eta")
    raises(plan(resolution=60), "--resolution", "multiple of 8")

    # LoRA files: only safetensors; corrupt, truncated or LoRA-less files; folders without a LoRA file.
    pickle = tmp_path / "lora.bin"
    torch.save({"x.lora_down.weight": torch.zeros(1)}, pickle)
    raises(plan(lora=pickle), str(pickle), "not a .safetensors file")
    data = lora_file.read_bytes()
    truncated, junk = tmp_path / "truncated.safetensors", tmp_path / "junk.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    junk.write_bytes(b"this is not a safetensors file at all")
    raises(plan(lora=truncated), str(truncated), "corrupt")
    raises(plan(lora=junk), str(junk), "corrupt")
    raises(plan(lora=tmp_path / "no.safetensors"), str(tmp_path / "no.safetensors"), "no such")
    raises(plan(lora=assets["root"] / "inet"), str(assets["root"] / "inet"), "pytorch_lora_weights.safetensors")
    from safetensors.torch import load_file, save_file

    not_lora = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(2)}, str(not_lora))
    raises(plan(lora=not_lora), str(not_lora), "no LoRA weights")

    # A LoRA whose modules are not all in this model is refused when it loads (nothing written).
    layers = load_file(str(lora_file))
    partly = tmp_path / "partly.safetensors"
    save_file({**layers, **{k.replace("unet.", "unet.elsewhere.", 1): v.clone() for k, v in layers.items()}},
              str(partly))
    out = tmp_path / "out"
    raises(lambda: generate_folder(out, SEEDS, plan(lora=partly)(), progress=False), str(partly),
           "does not fit this model")
    wrong = tmp_path / "wrong.safetensors"
    save_file({k.replace("unet.", "unet.elsewhere.", 1): v for k, v in layers.items()}, str(wrong))
    raises(lambda: generate_folder(out, SEEDS, plan(lora=wrong)(), progress=False), str(wrong),
           "does not load into this model")
    assert not out.exists()


def test_the_cli_generates_from_a_foreign_model_with_a_lora(assets, base6, tmp_path, cli, one_thread):
    out = tmp_path / "cli"
    r = cli("generate", "--model", assets["model"], "--lora", assets["lora_dir"], "--prompt", PROMPT,
            "--seeds", f"{SEEDS[0]}-{SEEDS[-1]}", "--out", out, "--batch", 6, "--steps", FAST["steps"], "--quiet",
            "--device", "cpu")
    assert r.code == 0, r.err
    made_by = json.loads((out / "manifest.json").read_text())["settings"]["made_by"]
    assert made_by["kind"] == "diffusers" and made_by["lora_sha256"]
    assert not np.array_equal(images(out), base6)  # the LoRA changes the images


def test_the_cli_refuses_model_options_without_a_model_and_a_run_with_a_model(assets, tiny_edm_run, tmp_path, cli):
    cli("generate", tiny_edm_run, "--num", 2, "--out", tmp_path / "a", "--prompt", "x").one_line_error("--prompt")
    cli("generate", tiny_edm_run, "--model", assets["model"], "--num", 2, "--out", tmp_path / "b") \
        .one_line_error("RUN/--model")
    cli("generate", "--num", 2, "--out", tmp_path / "c").one_line_error("RUN/--model")
    assert not any((tmp_path / n).exists() for n in "abc")
