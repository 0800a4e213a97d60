"""The kind: sd config (paper defaults, Table 3 sweep, smoke config), prompt construction, the EMA schedule, and
every bad input reported as one line with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("diffusers", "transformers", "peft"):  # the sd extra
    pytest.importorskip(_name)

from sdmem import cli  # noqa: E402
from sdmem.config import apply_overrides, config_to_dict  # noqa: E402
from sdmem.runs import load_config  # noqa: E402
from sdmem.errors import InputError  # noqa: E402
from sdmem.sd.config import SDConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "kind: sd\nout_dir: {out}\ndata: {{source: {src}, size: {size}, resolution: 32, prompt: {prompt}}}\n" \
          "model: {{pretrained: {model}, method: {method}}}\n"


def write(tmp_path, name="run", *, src="data", model="model", method="lora", prompt="class", size=20, extra=""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(MINIMAL.format(out=tmp_path / name, src=src, model=model, method=method, prompt=prompt,
                                   size=size) + extra)
    return path


def test_defaults_are_the_papers(tmp_path):
    cfg = load_config(write(tmp_path))
    assert isinstance(cfg, SDConfig) and cfg.kind == "sd"
    assert (cfg.train.lr, cfg.model.rank, cfg.model.alpha) == (3e-4, 16, 16.0)  # LoRA: lr 3e-4, alpha = rank
    assert load_config(write(tmp_path, method="full")).train.lr == 1e-4
    t = cfg.train
    assert (t.batch_size, t.gradient_accumulation, t.images_seen, t.weight_decay, t.lr_schedule, t.ema) == \
        (16, 4, 400_000, 1e-6, "cosine", True)
    assert (cfg.images_per_step, cfg.total_steps) == (64, 6250)
    assert load_config_from_dict().model.pretrained == "lambdalabs/miniSD-diffusers"
    assert cfg.model.target_modules == ("to_k", "to_q", "to_v", "to_out.0")
    assert (cfg.generate.steps, cfg.generate.guidance_scale) == (50, 7.5)
    assert (cfg.data.plain_template, cfg.data.class_template) == ("a picture", "a picture of a {class}")
    # --set works on kind: sd; the resolved config round-trips through its JSON form.
    cfg2 = load_config(write(tmp_path), ["model.rank=1024", "data.size=400", "train.images_seen=1000"])
    assert (cfg2.model.rank, cfg2.model.alpha, cfg2.data.size, cfg2.total_steps) == (1024, 1024.0, 400, 16)
    assert load_config(write(tmp_path), ["model.alpha=8"]).model.alpha == 8.0
    from sdmem.config import config_from_dict
    assert config_from_dict(SDConfig, json.loads(json.dumps(config_to_dict(cfg2)))) == cfg2
    assert apply_overrides(cfg2, ["train.cache=false"]).train.cache is False


@pytest.mark.parametrize("sets, key, problem", [
    (["model.rank=0"], "model.rank", ">= 1"),
    (["model.rank=-4"], "model.rank", ">= 1"),
    (["model.method=qlora"], "model.method", "one of full, lora"),
    (["data.prompt=classes"], "data.prompt", "did you mean 'class'"),
    (["data.class_template=a photo"], "data.class_template", "{class}"),
    (["train.batch_szie=4"], "--set train.batch_szie", "did you mean 'batch_size'"),
    (["data.size=0"], "data.size", ">= 1"),
    (["train.mixed_precision=fp8"], "train.mixed_precision", "one of no, fp16, bf16"),
])
def test_bad_keys_and_values(tmp_path, sets, key, problem):
    with pytest.raises(InputError) as exc:
        load_config(write(tmp_path), sets)
    assert key in exc.value.where and problem in exc.value.problem


def test_unknown_key_in_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"kind: sd\nout_dir: {tmp_path / 'o'}\ndata: {{source: d, size: 4}}\nmodel: {{ranks: 4}}\n")
    with pytest.raises(InputError, match="model.ranks: unknown key .did you mean 'rank'"):
        load_config(path)
    path.write_text(f"kind: sd\nout_dir: {tmp_path / 'o'}\ndata: {{source: d, size: 4, labels: true}}\n")
    with pytest.raises(InputError, match="data.labels: unknown key"):  # an EDM key is not an SD key
        load_config(path)


def test_paper_configs_table3_and_smoke_config():
    lora = load_config(ROOT / "train_configs/sd/imagenette_lora.yaml")
    full = load_config(ROOT / "train_configs/sd/imagenette_full.yaml")
    assert (lora.model.method, lora.train.lr, full.model.method, full.train.lr) == ("lora", 3e-4, "full", 1e-4)
    for cfg in (lora, full):
        assert (cfg.data.resolution, cfg.train.batch_size, cfg.train.gradient_accumulation) == (256, 16, 4)
        assert (cfg.train.images_seen, cfg.train.weight_decay, cfg.train.ema, cfg.generate.steps) == \
            (400_000, 1e-6, True, 50)
    # Table 3 is one sweep spec: 40 points, each cell with the paper's values.
    from sdmem.study.sweep import load_spec, points

    pts = points(load_spec(ROOT / "train_configs/sd/table3.yaml"))
    assert len(pts) == 40
    seen = set()
    for p in pts:
        cfg = p.config
        rank = cfg.model.rank if cfg.model.method == "lora" else None
        seen.add((cfg.model.method, rank, cfg.data.prompt, cfg.data.size))
        assert cfg.train.lr == (1e-4 if cfg.model.method == "full" else 3e-4)
        assert (cfg.data.resolution, cfg.train.batch_size, cfg.train.gradient_accumulation, cfg.train.images_seen,
                cfg.train.weight_decay, cfg.train.ema, cfg.generate.steps) == (256, 16, 4, 400_000, 1e-6, True, 50)
        assert cfg.model.alpha == (rank or cfg.model.alpha) and str(cfg.out_dir).startswith("runs/sd/table3/")
    assert seen == {(m, r, p, n) for m, r in [("lora", 16), ("lora", 256), ("lora", 1024), ("full", None)]
                    for p in ("plain", "class") for n in (400, 500, 800, 1000, 2000)}
    assert "prompt-class_size-400_lora-r256" in {p.name for p in pts}
    smoke = load_config(ROOT / "train_configs/smoke/sd_imagenette.yaml")
    assert smoke.model.pretrained == "runs/tiny-sd-random" and smoke.data.source == "data/imagenette-tiny"
    smoke = load_config(ROOT / "train_configs/smoke/sd.yaml")  # the pretrained tiny SD's (tests/test_sd_pretrained)
    assert smoke.model.pretrained == "runs/tiny-sd" and smoke.data.source == "builtin:photos"


def test_prompt_construction():
    from sdmem.sd.data import prompt_table

    names = ["tench", "English springer", "cassette player"]
    plain = load_config_from_dict(prompt="plain")
    klass = load_config_from_dict(prompt="class")
    assert prompt_table(plain.data, names) == ["a picture"]
    assert prompt_table(klass.data, names) == ["a picture of a tench", "a picture of a English springer",
                                               "a picture of a cassette player"]
    custom = apply_overrides(klass, ["data.class_template=a photo of {class}, from Imagenette"])
    assert prompt_table(custom.data, names)[1] == "a photo of English springer, from Imagenette"
    with pytest.raises(InputError, match="class names"):
        prompt_table(klass.data, None)


def test_class_rule_gives_n_over_c_per_class_in_seed_order_or_one_class():
    from sdmem.sd.generate import class_rule

    names = ["tench", "English springer", "cassette player"]
    plain, klass = load_config_from_dict(prompt="plain"), load_config_from_dict(prompt="class")

    def conds(cfg, seeds, class_names, label="random"):
        rule = class_rule(cfg, class_names, label, min(seeds), len(seeds))
        return [rule(s) for s in seeds]

    # The paper: 1k per class for 10k images, in seed order.
    ten = [f"c{k}" for k in range(10)]
    c = conds(klass, list(range(10_000)), ten)
    classes = [x["class"] for x in c]
    assert np.bincount(classes).tolist() == [1000] * 10 and classes[999] == 0 and classes[1000] == 1
    assert c[9999]["prompt"] == "a picture of a c9"
    classes = [x["class"] for x in conds(klass, list(range(100, 125)), ten)]  # 25 seeds: 2 or 3 per class
    assert sorted(set(np.bincount(classes).tolist())) == [2, 3] and classes == sorted(classes)
    assert [x["class"] for x in conds(klass, [0, 1], names, "English springer")] == [1, 1]
    assert conds(klass, [0], names, "2")[0]["prompt"] == "a picture of a cassette player"
    assert conds(plain, [5, 6], None) == [{"prompt": "a picture"}] * 2
    # Seeds outside the request (a grid block's padding) get a valid class too.
    assert class_rule(klass, names, "random", 10, 9)(25)["class"] == 2
    with pytest.raises(InputError, match="--class"):
        conds(plain, [0], None, "1")
    with pytest.raises(InputError, match="--class"):
        conds(klass, [0], names, "7")


def load_config_from_dict(**data):
    from sdmem.config import config_from_dict
    return config_from_dict(SDConfig, {"out_dir": "o", "data": {"source": "d", "size": 10, **data}})


def test_ema_decay_is_diffusers_schedule():
    from diffusers.training_utils import EMAModel

    from sdmem.sd.train import ema_decay

    ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.9999)
    assert [ema_decay(k, 0.9999) for k in range(1, 300)] == [ref.get_decay(k) for k in range(1, 300)]
    assert ema_decay(10**6, 0.9999) == 0.9999 and ema_decay(6250, 0.9999) == pytest.approx(6250 / 6259)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd

    root = tmp_path_factory.mktemp("sd-bad")
    model, data = make_tiny_sd(root / "tiny-sd"), make_imagenette_like(root / "inet", per_class=2, num_classes=3)
    flat = root / "flat"  # images and no class folders
    flat.mkdir()
    for k in range(4):
        Image.fromarray(np.full((40, 40, 3), 30 * k, np.uint8)).save(flat / f"{k}.png")
    broken = root / "broken"  # a labelled folder with one truncated JPEG
    for c in ("cats", "dogs"):
        (broken / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)).save(broken / c / f"{k}.jpg")
    data_bytes = (broken / "dogs" / "1.jpg").read_bytes()
    (broken / "dogs" / "1.jpg").write_bytes(data_bytes[:100])
    pets = root / "pets"  # any labelled folder: class names are the folder names
    for c in ("cat", "dog"):
        (pets / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((40, 50, 3), 90 * k + (c == "dog") * 40, np.uint8)).save(pets / c / f"{k}.png")
    notdiff = root / "not-diffusers"
    (notdiff / "unet").mkdir(parents=True)
    (notdiff / "unet" / "config.json").write_text("{}")
    return {"model": model, "data": data, "flat": flat, "broken": broken, "pets": pets, "notdiff": notdiff}


@pytest.mark.parametrize("case, sets, fragments", [
    ("not a diffusers folder", ["model.pretrained={notdiff}"], ["model.pretrained", "not a diffusers", "model_index"]),
    ("no such folder", ["model.pretrained=./no/such/folder"], ["model.pretrained", "no such folder"]),
    ("hub id offline", ["model.pretrained=someone/not-cached-sd"],
     ["model.pretrained", "HF_HUB_OFFLINE", "local diffusers folder"]),
    ("rank 0", ["model.rank=0"], ["model.rank", ">= 1"]),
    ("|D| too large", ["data.size=30"], ["data.size", "needs 10 images per class", "has 2 images"]),
    ("|D| not divisible", ["data.size=4"], ["data.size", "divisible by the 3 classes"]),
    ("unreadable image", ["data.source={broken}", "data.size=4"], ["1.jpg", "unreadable or corrupt"]),
    ("class prompt, no labels", ["data.source={flat}", "data.size=4"], ["data.prompt", "class labels"]),
    ("fp16 on a CPU", ["train.mixed_precision=fp16"], ["train.mixed_precision", "GPU"]),
    ("resolution", ["data.resolution=36"], ["data.resolution", "multiple of 16"]),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, assets, capsys, monkeypatch, case, sets, fragments):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = write(tmp_path, src=assets["data"], model=assets["model"], size=6,
                 extra="train: {images_seen: 8, batch_size: 4}\n")
    sets = [s.format(**assets) for s in sets]
    assert cli.main(["train", str(path), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdmem train: error:") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (case, err)
    assert not (tmp_path / "run").exists()  # nothing written


def test_plain_prompt_on_unlabelled_data_and_dry_run(tmp_path, assets, capsys):
    path = write(tmp_path, src=assets["flat"], model=assets["model"], prompt="plain")
    assert cli.main(["train", str(path), "--dry-run", "--set", "data.size=4", "--set", "model.rank=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["num_train"], out["num_classes"], out["prompts"], out["total_steps"]) == (4, None, ["a picture"], 6250)
    # LoRA rank 4 on to_q/k/v/out of the tiny UNet's two transformer blocks... counted without building weights.
    assert out["num_params"] > 0 and out["model"]["rank"] == 4 and out["train"]["lr"] == 3e-4
    assert not (tmp_path / "run").exists()
    path = write(tmp_path, src=assets["data"], model=assets["model"])
    assert cli.main(["train", str(path), "--dry-run", "--set", "model.method=full", "--set", "data.size=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"][0] == "a picture of a tench" and out["num_params"] > 500_000
    assert cli.main(["train", str(path), "--dry-run", "--set", f"data.source={assets['pets']}", "--set",
                     "data.size=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class_names"] == ["cat", "dog"] and out["prompts"] == ["a picture of a cat", "a picture of a dog"]


def test_exit_code_and_message_from_a_real_process(tmp_path, assets):
    path = write(tmp_path, src=assets["data"], model="someone/not-cached-sd", extra="train: {images_seen: 8}\n")
    out = subprocess.run([sys.executable, "-m", "sdmem", "train", str(path), "--set", "data.size=3"],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "someone/not-cached-sd" in out.stderr and "local diffusers folder" in out.stderr
    assert not (tmp_path / "run").exists()


def test_smoke_config_runs_as_documented(tmp_path, monkeypatch, capsys):
    """The README's smoke recipe, from a fresh folder: make the tiny model and data, then train (shortened)."""
    from sdmem.sd.tiny import main as tiny_main

    monkeypatch.chdir(tmp_path)
    assert tiny_main(["runs/tiny-sd-random", "--imagenette", "data/imagenette-tiny"]) == 0
    torch.set_num_threads(1)
    smoke = str(ROOT / "train_configs/smoke/sd_imagenette.yaml")
    assert cli.main(["train", smoke, "--quiet", "--set", "train.images_seen=32", "--set",
                     "train.validation_every_steps=0"]) == 0
    assert "trained 2 steps (32 images seen) on 40 images" in capsys.readouterr().out
    assert (tmp_path / "runs/smoke-sd-imagenette/pytorch_lora_weights.safetensors").exists()
