"""SD fine-tuning end to end on a tiny SD built from configs (offline): full and LoRA runs through `accelerate
launch`, checkpoint rotation, outputs that reload exactly, cached = uncached loss, seeded generation, audit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("diffusers", "transformers", "peft"):  # the sd extra
    pytest.importorskip(_name)

from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd  # noqa: E402

BASE = {
    "kind": "sd", "seed": 1,
    "data": {"size": 20, "resolution": 32, "prompt": "class"},
    "model": {"method": "lora", "rank": 4, "alpha": 2},
    "train": {"images_seen": 48, "batch_size": 4, "gradient_accumulation": 2, "checkpoint_steps": 2,
              "checkpoints_total_limit": 2, "log_every_steps": 1, "validation_every_steps": 3,
              "validation_images": 2},
    "generate": {"steps": 4},
}


def write_config(tmp: Path, name: str, assets: dict, **sections) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg["out_dir"] = str(tmp / name)
    cfg["data"]["source"] = str(assets["data"])
    cfg["model"]["pretrained"] = str(assets["model"])
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


# Module-wide: the module-scoped runs and images are made with the same thread count (one).
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-assets")
    return {"model": make_tiny_sd(root / "tiny-sd"), "data": make_imagenette_like(root / "inet", per_class=4)}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """A LoRA run (class prompts, two gloo processes) and a full run (plain prompt, one process), both through
    `accelerate launch`, side by side."""
    tmp = tmp_path_factory.mktemp("sd-runs")
    lora = write_config(tmp, "lora", assets)
    full = write_config(tmp, "full", assets, model={"method": "full"}, data={"prompt": "plain"})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    two = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(29500 + os.getpid() % 1000)]
    one = ["--cpu", "--num_processes", "1"]
    procs = [subprocess.Popen([*launch, *flags, "-m", "sdmem", "train", str(p), "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for flags, p in ((two, lora), (one, full))]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert out.count("trained 6 steps (48 images seen) on 20 images") == 1, out  # one line, not one per rank
    return {"lora": tmp / "lora", "full": tmp / "full", "tmp": tmp}


def test_runs_write_the_expected_folder(runs):
    from sdmem.data.subset import load_subset

    for name in ("lora", "full"):
        run = runs[name]
        # Rotation: checkpoints every 2 steps (2, 4, 6), the newest 2 kept; no temporary folders left.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004.safetensors",
                                                                          "step-0000006.safetensors"]
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
        assert rows[0]["lr"] == pytest.approx(3e-4 if name == "lora" else 1e-4) and rows[-1]["lr"] < rows[0]["lr"]
        assert [r["ema_decay"] for r in rows[:3]] == [0.0, pytest.approx(2 / 11), pytest.approx(3 / 12)]
        assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-0000003", "step-0000006"]
        assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
        final = json.loads((run / "final.json").read_text())
        assert final["step"] == 6 and final["weights"] == "ema" and final["method"] == name
        # The exact subset: 2 images per class at 32x32, files and class names recorded.
        d = load_subset(run)
        info = json.loads((run / "subset.json").read_text())
        assert d.images.shape == (20, 32, 32, 3) and np.bincount(d.labels).tolist() == [2] * 10
        assert len(info["files"]) == 20 and info["files"][0].startswith("train/n01440764/")
        assert info["class_names"][:2] == ["tench", "English springer"]
        assert info["prompts"] == (["a picture"] if name == "full" else
                                   [f"a picture of a {c}" for c in info["class_names"]])
    assert (runs["lora"] / "pytorch_lora_weights.safetensors").exists()
    assert (runs["full"] / "model_index.json").exists() and (runs["full"] / "unet").is_dir()


def _ema_pipeline(run: Path):
    """The trained model rebuilt from its last checkpoint's EMA tensors (not from the saved outputs)."""
    from sdmem.sd.generate import load_run_pipeline

    return load_run_pipeline(run, snapshot="6")[0]


@pytest.mark.parametrize("name", ["lora", "full"])
def test_saved_outputs_reload_into_a_fresh_pipeline_exactly(runs, name):
    from diffusers import StableDiffusionPipeline

    from sdmem.sd.components import ddim_scheduler, quiet_diffusers
    from sdmem.sd.generate import generate_images

    run = runs[name]
    if name == "lora":  # diffusers' own loader on a fresh pipeline of the base model
        base = json.loads((run / "config.json").read_text())["model"]["pretrained"]
        fresh = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        with quiet_diffusers():
            fresh.load_lora_weights(str(run))
    else:
        fresh = StableDiffusionPipeline.from_pretrained(str(run))
    fresh.scheduler = ddim_scheduler(fresh.scheduler)
    fresh.set_progress_bar_config(disable=True)
    ref = _ema_pipeline(run)
    prompts, seeds = ["a picture of a tench", "a picture"], [3, 4]
    a = generate_images(fresh, prompts, seeds, resolution=32, steps=4, guidance_scale=7.5)
    b = generate_images(ref, prompts, seeds, resolution=32, steps=4, guidance_scale=7.5)
    assert np.array_equal(a, b)
    # ... and the trained weights differ from the base model's (the LoRA is not a no-op).
    base = StableDiffusionPipeline.from_pretrained(json.loads((run / "config.json").read_text())["model"]["pretrained"],
                                                   safety_checker=None, requires_safety_checker=False)
    base.scheduler = ddim_scheduler(base.scheduler)
    base.set_progress_bar_config(disable=True)
    assert not np.array_equal(a, generate_images(base, prompts, seeds, resolution=32, steps=4, guidance_scale=7.5))


def _pngs(folder: Path, seeds) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{k:06d}.png")) for k in seeds])


@pytest.fixture(scope="module")
def generated(runs):
    """Seeds 0-9 of the LoRA run (class prompts) on the batch grid 3."""
    from sdmem.sd.generate import generate_run

    out = runs["tmp"] / "g1"
    assert generate_run(runs["lora"], out, seeds=list(range(10)), batch=3, steps=4, device="cpu", progress=False) == 10
    return out


GEN = dict(seeds=list(range(10)), steps=4, device="cpu", progress=False)


def test_generation_records_every_seed_prompt_in_the_manifest(generated):
    record = json.loads((generated / "manifest.json").read_text())
    assert [v["class"] for v in record["images"].values()] == list(range(10))  # N/10 per class, in seed order
    assert record["images"]["000001.png"]["prompt"] == "a picture of a English springer"
    assert record["settings"]["guidance_scale"] == 7.5 and record["settings"]["steps"] == 4
    assert record["settings"]["batch"] == 3 and record["settings"]["size"] == [32, 32]
    assert len({im.tobytes() for im in _pngs(generated, range(10))}) == 10


def test_generation_on_another_batch_grid_agrees_within_one_level(runs, generated):
    from sdmem.sd.generate import generate_run

    assert generate_run(runs["lora"], runs["tmp"] / "g2", batch=7, **GEN) == 10
    a, b = _pngs(generated, range(10)).astype(int), _pngs(runs["tmp"] / "g2", range(10)).astype(int)
    # The same per-seed noise; batched kernels may round differently on another grid (a stated tolerance).
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


def test_resumed_generation_is_byte_equal(runs, generated):
    from sdmem.sd.generate import generate_run

    before = {k: (generated / f"{k:06d}.png").read_bytes() for k in range(10)}
    os.remove(generated / "000004.png")
    (generated / "000007.png").write_bytes(b"")  # emptied: not done
    assert generate_run(runs["lora"], generated, batch=3, **GEN) == 2  # only the missing and the broken seed
    assert all((generated / f"{k:06d}.png").read_bytes() == before[k] for k in range(10))


@pytest.mark.parametrize("change,name", [(dict(guidance=3.0), "guidance_scale"), (dict(steps=5), "steps"),
                                         (dict(batch=4), "batch"), (dict(snapshot="4"), "snapshot"),
                                         (dict(class_label="tench"), "class")])
def test_generation_with_other_settings_is_refused(runs, generated, change, name):
    from sdmem.errors import InputError
    from sdmem.sd.generate import generate_run

    with pytest.raises(InputError, match=name):
        generate_run(runs["lora"], generated, **{"batch": 3, **GEN, **change})


def test_full_run_generates_with_the_plain_prompt_and_refuses_a_class(runs):
    from sdmem.errors import InputError
    from sdmem.sd.generate import generate_run

    assert generate_run(runs["full"], runs["tmp"] / "g3", batch=4, **dict(GEN, seeds=[0, 1, 2])) == 3
    with pytest.raises(InputError, match="--class"):
        generate_run(runs["full"], runs["tmp"] / "g4", class_label="2", **GEN)


def test_audit_takes_the_run_folder(runs, generated):
    from sdmem.audit import audit
    from sdmem.data.subset import load_subset

    assert len(audit(runs["lora"], generated, progress=False).replica) == 10
    d = load_subset(runs["full"])
    assert audit(runs["full"], np.asarray(d.images[:2]), progress=False).replica.all()


def test_cached_and_uncached_paths_give_the_same_loss(runs):
    from sdmem.data.subset import load_subset
    from sdmem.sd.cache import LatentCache, Uncached
    from sdmem.sd.components import load_components
    from sdmem.sd.train import sd_loss

    cfg = json.loads((runs["lora"] / "config.json").read_text())
    comps = load_components(cfg["model"]["pretrained"])
    d = load_subset(runs["lora"])
    prompts = json.loads((runs["lora"] / "subset.json").read_text())["prompts"]
    args = (comps.vae, comps.tokenizer, comps.text_encoder, np.asarray(d.images), prompts)
    cached, uncached = LatentCache(*args, device="cpu", dtype=torch.float32), Uncached(*args, device="cpu",
                                                                                       dtype=torch.float32)
    idx = torch.tensor([5, 0, 19, 7])
    pidx = torch.tensor(d.labels)[idx]
    losses = []
    for data in (cached, uncached):
        mean, std, text = data.batch(idx, pidx)
        gen = torch.Generator().manual_seed(123)
        losses.append(sd_loss(comps.unet, comps.noise_scheduler, mean, std, text, gen, comps.vae.config).item())
    # The same seeded draws; only the batch composition of the VAE encoder differs (float rounding).
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)
    gen = torch.Generator().manual_seed(124)
    other = sd_loss(comps.unet, comps.noise_scheduler, *cached.batch(idx, pidx), gen, comps.vae.config).item()
    assert other != pytest.approx(losses[0], rel=1e-3)


def test_lora_save_then_load_is_exact(tmp_path, assets):
    """A LoRA with alpha != rank saved in diffusers' format gives identical images in a fresh pipeline."""
    from diffusers import StableDiffusionPipeline

    from sdmem.sd.components import ddim_scheduler, load_components, quiet_diffusers
    from sdmem.sd.generate import generate_images
    from sdmem.sd.lora import add_lora, save_lora
    from sdmem.sd.components import make_pipeline

    comps = load_components(str(assets["model"]))
    torch.manual_seed(0)
    params = add_lora(comps.unet, rank=4, alpha=1.5, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))  # B is zero at init: make the LoRA matter
    trained = make_pipeline(comps, comps.unet)
    path = save_lora(comps.unet, tmp_path / "out")
    assert path.name == "pytorch_lora_weights.safetensors" and not list((tmp_path / "out").glob(".*"))
    fresh = StableDiffusionPipeline.from_pretrained(str(assets["model"]), safety_checker=None,
                                                    requires_safety_checker=False)
    with quiet_diffusers():
        fresh.load_lora_weights(str(tmp_path / "out"))
    fresh.scheduler = ddim_scheduler(fresh.scheduler)
    kw = dict(resolution=32, steps=3, guidance_scale=7.5)
    a = generate_images(trained, ["a picture"] * 2, [0, 1], **kw)
    assert np.array_equal(a, generate_images(fresh, ["a picture"] * 2, [0, 1], **kw))


def _train_in_process(tmp, name, assets, **train):
    from sdmem.runs import load_config
    from sdmem.sd.train import train as sd_train

    path = write_config(tmp, name, assets, train={"images_seen": 16, "gradient_accumulation": 1,
                                                  "validation_every_steps": 0, **train})
    summary = sd_train(load_config(path), progress=False)
    ckpt = max((tmp / name / "checkpoints").glob("step-*"))
    from safetensors.torch import load_file

    return summary, load_file(str(ckpt))


def _assert_same_training_up_to_rounding(a, b):
    (sa, wa), (sb, wb) = a, b
    assert sa["steps"] == sb["steps"] == 4 and sa["loss"] == pytest.approx(sb["loss"], rel=1e-4)
    assert wa.keys() == wb.keys()
    for k in wa:  # Adam normalises each update, so a gradient near zero may move differently: bound mean and max
        x, y = wa[k].float(), wb[k].float()
        assert (x - y).abs().mean() <= 1e-3 * x.abs().mean() + 1e-12, k
        assert (x - y).abs().max() <= 2e-2 * x.abs().max() + 1e-12, k


def test_channels_last_trains_the_same_up_to_rounding(tmp_path, assets):
    _assert_same_training_up_to_rounding(_train_in_process(tmp_path, "plain", assets),
                                         _train_in_process(tmp_path, "cl", assets, channels_last=True))


@pytest.mark.slow  # compiling the tiny UNet's forward and backward takes minutes on 2 CPU cores
def test_compiled_unet_trains_the_same_up_to_rounding(tmp_path, assets):
    _assert_same_training_up_to_rounding(_train_in_process(tmp_path, "plain", assets),
                                         _train_in_process(tmp_path, "compiled", assets, compile=True))
