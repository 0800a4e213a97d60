"""Run configs (sdmem.config): YAML loading, strict keys and types, --set overrides, cross-field rules, hashing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from sdmem.config import apply_overrides, config_from_dict, config_to_dict, diff_configs, fingerprint, training_keys
from sdmem.edm.config import DataConfig, EDMConfig, ModelConfig, network_kwargs, num_params
from sdmem.runs import load_config
from helpers import raises

BASIC = """\
kind: edm
out_dir: runs/cifar_1k
data:
  source: builtin:digits
  size: 1000
  num_classes: 10
  labels: true
model:
  arch: ddpmpp
train:
  lr: 2e-4
  epochs: 4e4
"""


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(**data) -> dict:
    return {"kind": "edm", "out_dir": "out", "data": {"source": "builtin:digits", "size": 100, **data}}


def test_load_yaml_with_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASIC))
    assert isinstance(cfg, EDMConfig)
    assert (cfg.data.source, cfg.data.size, cfg.data.num_classes, cfg.data.labels) == ("builtin:digits", 1000, 10,
                                                                                       "true")
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 2e-4 as a string
    assert cfg.train.epochs == 40000 and isinstance(cfg.train.epochs, int)
    m, t = cfg.model, cfg.train  # Appendix B: VP, DDPM++, 128 × (2, 2, 2), 2 blocks, dropout 0.13, batch 512
    assert (m.precond, m.channels, m.channel_mult, m.num_blocks, m.attn_resolutions, m.dropout) == \
        ("vp", 128, (2, 2, 2), 2, (16,), 0.13)
    assert (t.batch_size, t.warmup_epochs, t.ema_rate, t.weight_decay, t.precision) == (512, 200, 0.99929, 0.0, "fp32")
    assert cfg.seed == 0 and cfg.data.seed == 0 and cfg.data.labels == "true"


def test_contract_keys_exist():
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.setdefault(f"{prefix}{k}", v)

    walk(config_from_dict(EDMConfig, minimal()).to_dict())
    for key in ("kind", "out_dir", "seed", "data.source", "data.split", "data.size", "data.num_classes", "data.labels",
                "data.random_label_classes", "data.resolution", "data.blend_source", "data.blend_ratio", "data.seed",
                "model.arch", "model.precond", "model.channels", "model.channel_mult", "model.num_blocks",
                "model.attn_resolutions", "model.dropout", "model.embedding", "model.skip_mask", "train.epochs",
                "train.batch_size", "train.batch_gpu", "train.lr", "train.weight_decay", "train.warmup_epochs",
                "train.ema_rate", "train.precision", "train.snapshot_epochs", "train.checkpoint_epochs",
                "train.log_every_steps", "track.num_images", "track.seed", "track.backend", "track.batch"):
        assert key in flat, key
    json.dumps(flat)  # the JSON form


def test_unknown_key_suggests(tmp_path):
    err = raises(lambda: load_config(write(tmp_path, BASIC.replace("  size:", "  sizee:"))), "data.sizee",
                 "unknown key", "did you mean 'size'")
    assert str(err).startswith(str(tmp_path / "run.yaml"))
    raises(lambda: load_config(write(tmp_path, BASIC + "trian:\n  lr: 1\n")), "trian", "did you mean 'train'")


@pytest.mark.parametrize("key, value, expected", [
    ("data.size", '"abc"', "expected int"), ("data.size", "12.5", "expected int"),
    ("data.size", "true", "expected int"),
    ("train.lr", "[1, 2]", "expected float"), ("train.lr", '"fast"', "expected float"),
    ("model.channel_mult", "3", "expected a list of int"), ("model.skip_mask", "[1, 0, 1]", "expected bool"),
    ("data.labels", "rnadom", "did you mean 'random'"), ("model.arch", "unet", "one of ddpmpp, ncsnpp"),
    ("data.source", "5", "expected str"), ("train.lr", ".inf", "finite"),
])
def test_wrong_types_name_key_and_type(tmp_path, key, value, expected):
    section, name = key.split(".")
    data = yaml.safe_load(BASIC)
    data.setdefault(section, {})[name] = yaml.safe_load(value)
    raises(lambda: load_config(write(tmp_path, yaml.safe_dump(data))), f"run.yaml: {key}", expected)


def test_missing_and_bad_files(tmp_path):
    raises(lambda: load_config(tmp_path / "nope.yaml"), "nope.yaml", "no such config file")
    raises(lambda: load_config(write(tmp_path, "- a\n- b\n")), "run.yaml", "expected a YAML mapping")
    raises(lambda: load_config(write(tmp_path, "kind: edm\n  bad: [\n")), "run.yaml", "not valid YAML")
    # An EDM body under kind: sd is checked against the SD schema (it has no data.num_classes).
    raises(lambda: load_config(write(tmp_path, BASIC.replace("kind: edm", "kind: sd"))), "data.num_classes",
           "unknown key")
    raises(lambda: load_config(write(tmp_path, BASIC.replace("kind: edm", "kind: gan"))), "kind", "edm or sd")
    raises(lambda: load_config(write(tmp_path, BASIC.replace("kind: edm\n", ""))), "kind", "required")
    raises(lambda: load_config(write(tmp_path, BASIC.replace("out_dir: runs/cifar_1k\n", ""))), "out_dir", "required")
    raises(lambda: load_config(write(tmp_path, "kind: edm\nout_dir: o\n")), "data", "required")


def test_set_overrides_nested_keys(tmp_path):
    path = write(tmp_path, BASIC)
    mask = [True, False, True] * 3
    cfg = load_config(path, ["data.size=2000", "train.lr=2e-4", "train.ema_rate=0.999", "data.resolution=16",
                             f"model.skip_mask={json.dumps(mask)}", "model.channel_mult=[1, 2, 2]",
                             "data.labels=random", "seed=3", "track.num_images=0"])
    assert cfg.data.size == 2000 and cfg.train.lr == 2e-4 and cfg.train.ema_rate == 0.999
    assert cfg.model.skip_mask == tuple(mask) and cfg.model.channel_mult == (1, 2, 2)
    assert (cfg.data.resolution, cfg.data.labels, cfg.seed, cfg.track.num_images) == (16, "random", 3, 0)
    assert load_config(path, ["data.num_classes=null"]).data.num_classes is None
    base = load_config(path)
    again = apply_overrides(base, ["model.num_blocks=4", "model.skip_mask=null"])
    assert again.model.num_blocks == 4 and base.model.num_blocks == 2  # a new object; the old one is unchanged
    assert diff_configs(base, again) == ["model.num_blocks"]


def test_set_errors(tmp_path):
    path = write(tmp_path, BASIC)
    raises(lambda: load_config(path, ["data.sizee=3"]), "--set data.sizee", "did you mean 'size'")
    raises(lambda: load_config(path, ["modle.channels=3"]), "--set modle.channels", "did you mean 'model'")
    raises(lambda: load_config(path, ["data.size.x=3"]), "--set data.size.x", "not a section")
    raises(lambda: load_config(path, ["data=5"]), "--set data", "section")
    raises(lambda: load_config(path, ["data.size"]), "--set", "KEY=VALUE")
    raises(lambda: load_config(path, ["data.size=abc"]), "--set data.size", "expected int", "str 'abc'")
    raises(lambda: load_config(path, ["train.lr=[1]"]), "--set train.lr", "expected float")
    raises(lambda: load_config(path, ["kind=sd"]), "data.num_classes", "unknown key")


@pytest.mark.parametrize("overrides, key, problem", [
    (["model.skip_mask=[true, false]"], "model.skip_mask", "expected 9 switches"),
    (["model.num_blocks=4", "model.skip_mask=[true, true, true, true, true, true, true, true, true]"],
     "model.skip_mask", "expected 15"),
    (["model.channel_mult=[]"], "model.channel_mult", "non-empty"),
    (["model.channel_mult=[2, 0]"], "model.channel_mult", ">= 1"),
    (["data.resolution=30"], "data.resolution", "multiple of 4"),
    (["data.size=1"], "data.size", ">= 2"),
    (["train.batch_gpu=100"], "train.batch_gpu", "divisor"),
    (["data.labels=random", "data.random_label_classes=0"], "data.random_label_classes", ">= 1"),
    (["data.blend_ratio=1.5", "data.blend_source=x.npz"], "data.blend_ratio", "<= 1"),
    (["data.blend_ratio=0.5"], "data.blend_source", "blend source"),
    (["model.dropout=1.0"], "model.dropout", "< 1"),
    (["train.ema_rate=1"], "train.ema_rate", "< 1"),
    (["data.classes=[1, 1]", "data.num_classes=null"], "data.classes", "distinct"),
    (["data.classes=[5]"], "data.num_classes", "not both"),
])
def test_cross_field_rules(tmp_path, overrides, key, problem):
    raises(lambda: load_config(write(tmp_path, BASIC), overrides), key, problem)


def test_frozen_and_direct_construction():
    cfg = config_from_dict(EDMConfig, minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.size = 5
    m = ModelConfig(channel_mult=[1, 2], num_blocks=1, skip_mask=[1 == 1] * 4)  # lists become tuples
    assert m.channel_mult == (1, 2) and hash(m)
    raises(lambda: DataConfig(source="x", size="many"), "data.size", "expected int")
    raises(lambda: config_from_dict(EDMConfig, minimal(extra=1)), "data.extra", "unknown key")


def test_diff_and_hash():
    a = config_from_dict(EDMConfig, minimal())
    b = apply_overrides(a, ["out_dir=elsewhere", "train.epochs=100", "track.num_images=5", "train.batch_gpu=64"])
    assert diff_configs(a, b) == ["out_dir", "train.epochs", "train.batch_gpu", "track.num_images"]
    assert fingerprint(a) == fingerprint(b)  # none of these changes what is learnt
    c = apply_overrides(a, ["train.lr=1e-4"])
    assert fingerprint(c) != fingerprint(a) and diff_configs(a, c.to_dict()) == ["train.lr"]
    assert fingerprint(a) == fingerprint(config_from_dict(EDMConfig, json.loads(json.dumps(a.to_dict()))))
    assert "train.lr" in training_keys(EDMConfig) and "out_dir" not in training_keys(EDMConfig)


def test_num_params_and_network_kwargs():
    cfg = config_from_dict(EDMConfig, minimal())
    assert num_params(cfg, 32) == 35_125_251  # DDPM++ 128 ch, (2, 2, 2), 2 blocks, 32×32, unconditional
    assert num_params(cfg, 32, label_dim=10) == 35_125_251 + 10 * 128 + 128  # map_label: Linear(10, 128)
    kw = network_kwargs(apply_overrides(cfg, ["model.embedding=fourier"]))
    assert kw["embedding_type"] == "fourier" and kw["model_channels"] == 128 and "embedding_type" not in \
        network_kwargs(cfg)


def test_track_backends_match_the_audit():
    from typing import get_args, get_type_hints

    from sdmem.audit.knn import BACKENDS
    from sdmem.edm.config import TrackConfig
    assert set(get_args(get_type_hints(TrackConfig)["backend"])) == set(BACKENDS)
    assert config_to_dict(TrackConfig())["backend"] == "auto"


def test_a_training_key_added_later_keeps_old_fingerprints_at_its_default(tmp_path):
    import hashlib

    from sdmem.config import flatten_config

    cfg = load_config(write(tmp_path, BASIC))
    keep = training_keys(EDMConfig) - {"train.ema_rule"}
    flat = {k: v for k, v in flatten_config(cfg).items() if k in keep}
    before = hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert cfg.train.ema_rule == "batch_scaled" and fingerprint(cfg) == before  # as runs made before the key
    assert fingerprint(apply_overrides(cfg, ["train.ema_rule=per_step"])) != before


LATER_KEYS = {"edm": {"train.fused_adam": False},  # keys whose default is a new behaviour: their value before
              "sd": {"train.fused_adam": False, "model.lora_forward": "separate"}}


@pytest.mark.parametrize("kind,key", [(k, key) for k, keys in LATER_KEYS.items() for key in keys])
def test_a_key_whose_default_is_a_new_behaviour_reads_old_runs_as_they_trained(tmp_path, kind, key):
    """train.fused_adam (default on) and model.lora_forward (default auto) were added later: a run folder recorded
    without them trained with torch's default Adam and peft's separate LoRA matmuls, so it keeps its fingerprint,
    reads back with the old values, and resuming it with today's default is refused naming the key, while the old
    setting resumes it."""
    import hashlib

    from sdmem.config import flatten_config, stored_config
    from sdmem.errors import InputError
    from sdmem.runs import KINDS, RunPaths, check_reuse, config_from_mapping

    raw = yaml.safe_load(BASIC) if kind == "edm" else {
        "kind": "sd", "out_dir": "x", "data": {"source": "imagenette", "size": 100}, "model": {"rank": 256}}
    raw["out_dir"] = str(tmp_path / "run")
    cfg = config_from_mapping(raw)
    section, name = key.split(".")
    old_value = LATER_KEYS[kind][key]
    assert getattr(getattr(cfg, section), name) != old_value
    old_record = config_to_dict(cfg)
    for later in LATER_KEYS[kind]:  # config.json as runs made before the keys wrote it
        del old_record[later.split(".")[0]][later.split(".")[1]]
    # (ema_rule: an older key added later, at its old value here)
    keep = training_keys(KINDS[kind]) - set(LATER_KEYS[kind]) - {"train.ema_rule", "train.empty_prompt_prob"} \
        - cfg.ignored_keys()
    flat = {k: v for k, v in flatten_config(cfg).items() if k in keep}
    old_fingerprint = hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    stored = stored_config(KINDS[kind], old_record)
    assert getattr(getattr(stored, section), name) == old_value and fingerprint(stored) == old_fingerprint
    assert fingerprint(cfg) != old_fingerprint
    user = config_from_dict(KINDS[kind], old_record)  # a user's config: today's defaults
    assert getattr(getattr(user, section), name) == getattr(getattr(cfg, section), name)

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    paths.config.write_text(json.dumps(old_record))
    old_settings = [f"{k}={str(v).lower()}" for k, v in LATER_KEYS[kind].items()]
    others = [s for s in old_settings if not s.startswith(key + "=")]
    with pytest.raises(InputError, match=key) as exc:  # every other later key at its old value: this one is named
        check_reuse(apply_overrides(cfg, others), paths)
    assert f"made before {key} existed: finish it with --set {key}={str(old_value).lower()}" in str(exc.value)
    check_reuse(apply_overrides(cfg, old_settings), paths)  # the old settings resume it
