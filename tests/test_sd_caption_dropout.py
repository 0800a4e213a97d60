"""Caption dropout (train.empty_prompt_prob, diffusers' --proportion_empty_prompts): the seeded per-image draw and
its count in the log, p = 0 as before the key, p = 1 all empty prompts (encoded as diffusers' pipeline encodes a
negative prompt), the key in the fingerprint and its refusals, and bitwise resume with p > 0."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("diffusers", "transformers", "peft"):  # the sd extra
    pytest.importorskip(_name)

from sdmem.runs import load_config  # noqa: E402
from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd  # noqa: E402

KEY = "train.empty_prompt_prob"
BATCH, ACCUM = 4, 2

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-assets")
    return {"model": make_tiny_sd(root / "tiny-sd"), "data": make_imagenette_like(root / "inet", per_class=2,
                                                                                  num_classes=4)}


def write_config(tmp: Path, name: str, assets: dict, *, steps: int, **train) -> Path:
    cfg = {"kind": "sd", "out_dir": str(tmp / name), "seed": 3,
           "data": {"source": str(assets["data"]), "size": 8, "resolution": 32, "prompt": "class"},
           "model": {"pretrained": str(assets["model"]), "method": "lora", "rank": 2},
           "train": {"images_seen": BATCH * ACCUM * steps, "batch_size": BATCH, "gradient_accumulation": ACCUM,
                     "checkpoint_steps": 5, "checkpoints_total_limit": 2, "log_every_steps": 1, **train}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_capturing(path: Path, overrides=()) -> list[torch.Tensor]:
    """Train the run of ``path`` in-process; the text embeddings the UNet was fed, pass by pass."""
    import sdmem.sd.train as sd_train

    fed, loss = [], sd_train.sd_loss

    def spy(unet, scheduler, mean, std, text, *args):
        fed.append(text.detach().clone())
        return loss(unet, scheduler, mean, std, text, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd_train, "sd_loss", spy)
        sd_train.train(load_config(path, list(overrides)), progress=False)
    return fed


def prompt_embeddings(run: Path) -> tuple[list[str], torch.Tensor]:
    """The run's prompt table and the embeddings of it plus "" (the rows the trainer's cache holds)."""
    from sdmem.sd.cache import encode_prompts
    from sdmem.sd.components import load_components

    comps = load_components(json.loads((run / "config.json").read_text())["model"]["pretrained"])
    prompts = json.loads((run / "subset.json").read_text())["prompts"]
    return prompts, encode_prompts(comps.tokenizer, comps.text_encoder, prompts + [""], device="cpu")


def documented_mask(seed: int, step: int, micro: int, p: float) -> torch.Tensor:
    """empty_prompt_mask as its docstring states it, recomputed here from step_seed."""
    from sdmem.training import step_seed

    gen = torch.Generator().manual_seed(step_seed(step_seed(seed, 0, step), micro, 1))
    return torch.rand(BATCH, generator=gen) < p


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def checkpoint_tensors(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}.safetensors"))


@pytest.fixture(scope="module")
def dropped(assets, tmp_path_factory):
    """A LoRA run of 20 steps with p = 0.3 (160 draws) and what its UNet was fed."""
    tmp = tmp_path_factory.mktemp("dropout")
    path = write_config(tmp, "p03", assets, steps=20, empty_prompt_prob=0.3)
    return {"path": path, "run": tmp / "p03", "fed": train_capturing(path), "tmp": tmp}


def test_the_seeded_draw_is_per_image_and_counted_in_the_log(dropped):
    from sdmem.data.subset import load_subset
    from sdmem.training import batch_indices

    run, fed = dropped["run"], dropped["fed"]
    prompts, emb = prompt_embeddings(run)
    labels = torch.tensor(load_subset(run).labels)
    rows, total = log_rows(run), 0
    assert len(fed) == 20 * ACCUM and [r["step"] for r in rows] == list(range(1, 21))
    for step, row in enumerate(rows):
        count = 0
        for micro in range(ACCUM):
            mask = documented_mask(3, step, micro, 0.3)
            idx = torch.from_numpy(batch_indices(step * ACCUM + micro, BATCH, 8, 3))
            want = torch.where(mask, len(prompts), labels[idx])  # each image: its class prompt or ""
            assert torch.equal(fed[step * ACCUM + micro], emb[want]), (step, micro)
            count += int(mask.sum())
        total += count
        assert (row["empty_prompts"], row["empty_prompts_seen"]) == (count, total), row
    n = 20 * ACCUM * BATCH
    assert abs(total - 0.3 * n) <= 4 * (n * 0.3 * 0.7) ** 0.5 and 0 < total < n  # a binomial 4-sigma band


def test_p1_trains_every_image_on_the_empty_prompt_as_diffusers_encodes_it(assets, dropped):
    from sdmem.sd.components import load_components, make_pipeline

    path = write_config(dropped["tmp"], "p1", assets, steps=2, empty_prompt_prob=1.0)
    fed = train_capturing(path)
    run = dropped["tmp"] / "p1"
    _, emb = prompt_embeddings(run)
    assert len(fed) == 2 * ACCUM and all(torch.equal(text, emb[-1].expand_as(text)) for text in fed)
    assert [r["empty_prompts"] for r in log_rows(run)] == [BATCH * ACCUM] * 2
    comps = load_components(str(assets["model"]))
    _, negative = make_pipeline(comps, comps.unet).encode_prompt("a picture", "cpu", 1, True, negative_prompt="")
    torch.testing.assert_close(emb[-1:], negative, rtol=0, atol=1e-6)  # the pipeline's unconditional embedding


def test_p0_trains_bit_for_bit_as_before_the_key(assets, tmp_path, monkeypatch):
    import sdmem.sd.train as sd_train
    from sdmem.config import fingerprint

    def never(*args):
        raise AssertionError("p = 0 must not draw")

    monkeypatch.setattr(sd_train, "empty_prompt_mask", never)
    before = write_config(tmp_path, "before", assets, steps=5)  # a config written before the key
    explicit = write_config(tmp_path, "zero", assets, steps=5, empty_prompt_prob=0.0)
    assert KEY.split(".")[1] not in yaml.safe_load(before.read_text())["train"]
    for path in (before, explicit):
        sd_train.train(load_config(path), progress=False)
    a, b = checkpoint_tensors(tmp_path / "before", 5), checkpoint_tensors(tmp_path / "zero", 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(load_config(before)) == fingerprint(load_config(explicit))
    assert all("empty_prompts" not in r for r in log_rows(tmp_path / "zero"))  # the log as before, too


def _old_fingerprint(cfg) -> str:
    """The fingerprint as sdmem computed it before the key (the key and the others added later left out)."""
    from sdmem.config import _since_defaults, flatten_config, training_keys

    later = _since_defaults(type(cfg))
    keep = training_keys(type(cfg)) - {KEY} - cfg.ignored_keys()
    flat = {k: v for k, v in flatten_config(cfg).items() if k in keep and not (k in later and later[k] == v)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_the_key_is_fingerprinted_and_old_runs_read_it_as_zero(tmp_path):
    from sdmem.config import apply_overrides, config_to_dict, fingerprint, stored_config, training_keys
    from sdmem.errors import InputError
    from sdmem.runs import RunPaths, check_reuse, config_from_mapping
    from sdmem.sd.config import SDConfig

    cfg = config_from_mapping({"kind": "sd", "out_dir": str(tmp_path / "run"),
                               "data": {"source": "imagenette", "size": 100}})
    assert KEY in training_keys(SDConfig) and cfg.train.empty_prompt_prob == 0.0
    dropping = apply_overrides(cfg, [f"{KEY}=0.1"])
    assert fingerprint(dropping) != fingerprint(cfg) != fingerprint(apply_overrides(cfg, [f"{KEY}=0.2"]))
    old_record = config_to_dict(cfg)
    del old_record["train"]["empty_prompt_prob"]  # config.json as runs made before the key wrote it
    stored = stored_config(SDConfig, old_record)
    assert stored.train.empty_prompt_prob == 0.0 and fingerprint(stored) == fingerprint(cfg) == _old_fingerprint(cfg)
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    paths.config.write_text(json.dumps(old_record))
    check_reuse(cfg, paths)  # today's default resumes an old run
    with pytest.raises(InputError, match=KEY) as exc:
        check_reuse(dropping, paths)
    assert f"--set {KEY}=0.0" in str(exc.value)


@pytest.mark.parametrize("value, problem", [("-0.1", ">= 0.0"), ("1.5", "<= 1.0"), ("x", "expected float")])
def test_out_of_range_values_are_refused_naming_the_key(tmp_path, cli, value, problem):
    from sdmem.errors import InputError

    path = write_config(tmp_path, "bad", {"data": tmp_path / "d", "model": tmp_path / "m"}, steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["train"]["empty_prompt_prob"] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=f"{KEY}: .*{problem}"):
        load_config(path)
    cli("train", path, "--dry-run").one_line_error(KEY, problem)
    path.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "empty_prompt_prob": 0.5}}))
    cli("train", path, "--dry-run", "--set", f"{KEY}={value}").one_line_error(KEY, problem)


def test_resume_with_dropout_is_bitwise_equal(dropped):
    """The p = 0.3 run's folder with its last checkpoint and outputs removed resumes from step 15 and ends where
    the uninterrupted run ended: the same weights, EMA, optimizer state and dropout counts."""
    run, copy = dropped["run"], dropped["tmp"] / "resumed"
    shutil.copytree(run, copy)
    for p in (copy / "checkpoints" / "step-0000020.safetensors", copy / "final.json",
              copy / "pytorch_lora_weights.safetensors"):
        p.unlink()
    assert len(train_capturing(dropped["path"], [f"out_dir={copy}"])) == 5 * ACCUM  # steps 16-20 only
    a, b = checkpoint_tensors(run, 20), checkpoint_tensors(copy, 20)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from sdmem import checkpoint

    extra = [checkpoint.read(r / "checkpoints" / "step-0000020.safetensors").extra for r in (run, copy)]
    assert extra[0] == extra[1] and extra[0]["empty_prompts_seen"] == log_rows(run)[-1]["empty_prompts_seen"]
    drop = ("sec",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_rows(copy)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in log_rows(run)]
