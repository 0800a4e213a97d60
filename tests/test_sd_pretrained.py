"""The pretrained tiny SD (sdmem.sd.pretrained): its VAE learns to reconstruct (a small budget), the build is
cached by its recipe's fingerprint (a second call trains nothing, a damaged entry is rebuilt, a foreign one
refused), `python -m sdmem.sd.tiny OUT --pretrained` writes a folder stock diffusers loads and refuses folders sdmem
did not make. The full recipe (its three targets: held-out RMS <= 8, base replicas <= 5%, <= 6 minutes) is `slow`."""

import copy
import json
import os
import time

import numpy as np
import pytest

from helpers import pinned_threads
from sdmem.sd import pretrained as P

SMALL = copy.deepcopy(P.RECIPE)  # RECIPE's shape at a test budget (about 20 s on one thread)
SMALL["vae"]["steps"] = 40
SMALL["train"]["train"].update(images_seen=16 * 12, checkpoint_steps=6, lr_warmup_steps=0)
SMALL["train"]["data"]["size"] = 180
SMALL["check"].update(samples=8, steps=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder of its own with the SMALL build in it."""
    root = tmp_path_factory.mktemp("sdcache")
    before = os.environ.get("SDMEM_CACHE")
    os.environ["SDMEM_CACHE"] = str(root)
    try:
        with pinned_threads():
            entry = P.pretrained_tiny_sd(progress=False, log=lambda *_: None, recipe=SMALL)
        yield root, entry
    finally:
        if before is None:
            os.environ.pop("SDMEM_CACHE", None)
        else:
            os.environ["SDMEM_CACHE"] = before


def test_the_vae_learns_to_reconstruct_unseen_pictures_on_a_small_budget(one_thread):
    import torch

    from sdmem.data.photos import heldout_images, pretrain_images
    from sdmem.sd.vae_train import make_vae, reconstruction_rms, train_vae

    arch = P.RECIPE["vae"]["arch"]
    images, held = pretrain_images(32, per_picture=30)[0], heldout_images(32)
    untrained = reconstruction_rms(make_vae(arch, 0).eval(), held).mean()
    vae = train_vae(images, arch, steps=300, batch=8, lr=2e-3, seed=0, progress=False)
    rms = reconstruction_rms(vae, held)
    assert rms.mean() < 0.5 * untrained and rms.mean() < 35, (rms.mean(), untrained)
    # A deterministic autoencoder in AutoencoderKL's clothes: the posterior's std at diffusers' floor.
    x = torch.from_numpy(held[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    assert float(dist.std.max()) < 1e-6 and torch.equal(dist.mode(), dist.mean)
    # scaling_factor makes the training latents unit-variance, as SD's 0.18215 does.
    lat = dist.mean * vae.config.scaling_factor
    assert 0.3 < float(lat.std()) < 3.0


def test_the_build_is_a_stock_diffusers_folder_with_its_record(cache):
    import torch
    from diffusers import StableDiffusionPipeline

    root, entry = cache
    assert entry.parent == root / "tiny-sd" and entry.name == P.recipe_fingerprint(SMALL)
    marker = json.loads((entry / P.MARKER).read_text())
    assert marker["pretrained"] is True and marker["recipe"] == SMALL
    assert marker["files"] == P.folder_digests(entry)
    m = marker["measured"]
    assert m["vae_heldout_images"] > 100 and 0 <= m["base_replica_ratio"] <= 1 and m["vae_heldout_rms"] > 0
    assert not any(p.name.startswith(".building") for p in entry.parent.iterdir())  # the work folder is gone
    pipe = StableDiffusionPipeline.from_pretrained(str(entry), safety_checker=None)
    assert pipe.vae_scale_factor == 1 and pipe.unet.config.sample_size == 32
    # Zero terminal SNR with v-prediction: at t = T the latent is pure noise, as the sampler starts.
    from sdmem.sd.components import load_components

    sched = load_components(str(entry)).noise_scheduler
    assert sched.config.prediction_type == "v_prediction" and float(sched.alphas_cumprod[-1]) < 1e-6
    out = pipe("a picture of a moon", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_different_prompts_give_clearly_different_embeddings(cache):
    import torch

    from sdmem.sd.components import load_components

    comps = load_components(str(cache[1]))
    prompts = ["a picture of a cat", "a picture of a rocket", "a picture", ""]
    ids = comps.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = comps.text_encoder(ids.input_ids)[0]
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            rel = (emb[i] - emb[j]).norm() / emb[i].norm()
            assert rel > 0.05, (prompts[i], prompts[j], float(rel))


def test_a_second_build_is_a_digest_check_and_trains_nothing(cache, monkeypatch):
    import sdmem.sd.vae_train
    import sdmem.sd.train

    def fail(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(sdmem.sd.vae_train, "train_vae", fail)
    monkeypatch.setattr(sdmem.sd.train, "train", fail)
    t0 = time.perf_counter()
    assert P.pretrained_tiny_sd(progress=False, recipe=SMALL) == cache[1]
    assert time.perf_counter() - t0 < 30  # a digest check of about 4 MB, not a build (generous for slow disks)


def test_a_damaged_entry_is_detected_and_rebuilt(cache, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path))
    entry = P.cache_entry(SMALL)
    shutil.copytree(cache[1], entry)
    weights = entry / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "differ from their recorded SHA-256 (unet/" in P.check_entry(entry, P.recipe_fingerprint(SMALL))
    built, said = [], []
    monkeypatch.setattr(P, "_build", lambda recipe, fp, e, **k: built.append(e) or e)
    P.pretrained_tiny_sd(progress=False, log=said.append, recipe=SMALL)
    assert built == [entry] and "damaged" in said[0] and "rebuilding" in said[0]


def test_a_foreign_folder_in_the_cache_is_refused_not_removed(tmp_path, monkeypatch):
    from sdmem.errors import InputError

    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path))
    entry = P.cache_entry(SMALL)
    entry.mkdir(parents=True)
    (entry / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by it"):
        P.pretrained_tiny_sd(progress=False, recipe=SMALL)
    assert (entry / "notes.txt").read_text() == "mine"


def test_pretrained_cli_writes_the_folder_and_refuses_a_foreign_one(cache, tmp_path, monkeypatch, capsys):
    from sdmem.sd.tiny import main, make_tiny_sd

    monkeypatch.setattr(P, "RECIPE", SMALL)
    out = tmp_path / "tiny"
    assert main([str(out), "--pretrained", "--quiet"]) == 0
    assert P.check_entry(out, P.recipe_fingerprint(SMALL)) is None
    assert "VAE held-out RMS" in capsys.readouterr().out
    # A folder sdmem did not make: exit 2, one line, untouched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model_index.json").write_text("{}")
    assert main([str(mine), "--pretrained", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a tiny SD made by sdmem" in err[0]
    assert [p.name for p in mine.iterdir()] == ["model_index.json"]
    # The random-weight tiny SD sdmem wrote is replaced by the pretrained one.
    rand = make_tiny_sd(tmp_path / "rand")
    assert main([str(rand), "--pretrained", "--quiet"]) == 0
    assert json.loads((rand / P.MARKER).read_text())["pretrained"] is True


@pytest.mark.slow
def test_the_full_recipe_meets_its_three_targets(tmp_path, monkeypatch):
    """python -m sdmem.sd.tiny OUT --pretrained on an empty cache: held-out RMS <= 8, base replicas <= 5%, and
    (measured, not asserted: timings are noise on shared machines) the build time, printed."""
    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "cache"))
    t0 = time.time()
    entry = P.pretrained_tiny_sd(progress=False)
    m = json.loads((entry / P.MARKER).read_text())["measured"]
    print(f"built in {time.time() - t0:.0f} s: {m}")
    assert m["vae_heldout_rms"] <= 8 and m["base_replica_ratio"] <= 0.05


SD_TINY = {"size": 4, "images_seen": 32, "lr_full": 1e-3, "lr_lora": 1e-3, "num": 8, "steps": 3}


def test_the_sd_demo_part_lays_out_table_3_and_resumes(cache, tmp_path, monkeypatch, capsys):
    """`sdmem demo --part sd` at a test scale: every point trained, generated and audited against its own D, the
    results in Table 3's layout under DIR/sd, DIR/results.csv left to the EDM part; a re-run trains nothing."""
    import csv

    from sdmem.demo import run_demo
    from sdmem.demo_sd import POINTS, SD_COLUMNS

    out = tmp_path / "demo"
    with pinned_threads():
        done = run_demo(out, part="sd", progress=False, sd_settings=SD_TINY, sd_recipe=SMALL)["sd"]
    sd = out / "sd"
    assert not (out / "results.csv").exists() and (out / "demo.json").is_file()
    rows = list(csv.DictReader((sd / "results.csv").open()))
    assert tuple(rows[0]) == SD_COLUMNS and len(rows) == len(POINTS)
    assert [(r["model.method"], r["model.rank"], r["data.prompt"]) for r in rows] == \
        [(m, str(k) if m == "lora" else "", p) for m, k, p in POINTS]
    for r in rows:
        ratio, low, high = (float(r[k]) for k in ("memorization_ratio", "memorization_ratio_low",
                                                   "memorization_ratio_high"))
        assert 0 <= low <= ratio <= high <= 1 and float(r["knn_distance"]) > 0 and r["size"] == "4"
    ranks = sorted({int(r["model.rank"]) for r in rows if r["model.method"] == "lora"})
    assert ranks == [1, 8, 64]
    lora_params = [int(r["num_params"]) for r in rows if r["model.method"] == "lora"]
    assert lora_params == sorted(lora_params) and lora_params[0] < lora_params[-1]
    md = (sd / "compare.md").read_text()
    assert "model.method" in md and all((sd / f).is_file() for f in ("compare.csv", "compare.png", "summary.json"))
    assert sorted(p.name for p in (sd / "replicas").iterdir()) == sorted(f"{r['point']}.png" for r in rows)
    assert done["points"] == json.loads((sd / "summary.json").read_text())["points"]
    text = capsys.readouterr().out
    assert "LoRA r=1" in text and "full" in text
    # A re-run resumes: nothing is trained again.
    import sdmem.sd.train

    monkeypatch.setattr(sdmem.sd.train, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    again = run_demo(out, part="sd", progress=False, sd_settings=SD_TINY, sd_recipe=SMALL)["sd"]
    assert again["points"] == done["points"]


def test_the_sd_demo_part_refuses_a_foreign_folder_and_other_settings(cache, tmp_path):
    from sdmem.demo_sd import run_sd_demo
    from sdmem.errors import InputError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an sdmem demo folder"):
        run_sd_demo(mine, progress=False, settings=SD_TINY, recipe=SMALL)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_the_full_sd_demo_part_shows_the_papers_direction(tmp_path, monkeypatch):
    """`sdmem demo --part sd` as shipped (about 10 minutes on 2 cores with the tiny SD's build): the full fine-tune
    memorizes (>= 50%), the lowest LoRA rank hardly (<= 20%), and the ratio does not fall as the rank grows (each
    rank's interval reaches the previous rank's ratio)."""
    from sdmem.demo_sd import run_sd_demo

    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "cache"))
    rows = run_sd_demo(tmp_path / "sd", progress=False)["points"]
    lora = [r for r in rows if r["model.method"] == "lora"]
    full = [r for r in rows if r["model.method"] == "full" and r["data.prompt"] == "class"]
    assert [r["model.rank"] for r in lora] == sorted(r["model.rank"] for r in lora)
    assert full[0]["memorization_ratio"] >= 0.5 and lora[0]["memorization_ratio"] <= 0.2
    for lower, higher in zip(lora, lora[1:] + full):
        assert higher["memorization_ratio_high"] >= lower["memorization_ratio"], (lower, higher)
    assert any(r["data.prompt"] == "plain" for r in rows)
