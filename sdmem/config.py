"""Typed, frozen run configs from YAML, shared by the EDM and (later) SD trainers; unknown keys and wrong types
are InputErrors naming the dotted key. Defaults: the paper's basic CIFAR-10 setup (Appendix B)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import operator
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import yaml

from .errors import InputError

_MISSING = dataclasses.MISSING
_EXP_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 2e-4: a str to YAML 1.1; taken as a number
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _f(default: Any = _MISSING, *, training: bool = True, aliases: dict | None = None, factory=None, **bounds):
    """A config field with bounds (ge/gt/le/lt, on each element of a list); ``training=False``: not hashed."""
    meta = {"training": training, "aliases": aliases or {}, "bounds": bounds}
    return field(default=default, default_factory=factory or _MISSING, metadata=meta)


def _need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise InputError(key, problem)


class _Section:
    """Shared by the config dataclasses: type and bounds checks on construction (then ``_check``), to_dict."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._prefix}.{f.name}" if self._prefix else f.name
            value = _convert(getattr(self, f.name), hints[f.name], key, f.metadata["aliases"])
            object.__setattr__(self, f.name, value)
            values, many = (value, True) if isinstance(value, tuple) else (() if value is None else (value,), False)
            for (test, sym), bound in ((_BOUNDS[name], bound) for name, bound in f.metadata["bounds"].items()):
                _need(all(test(v, bound) for v in values), key,
                      f"expected {'values ' * many}{sym} {bound}, got {list(value) if many else value}")
        self._check()

    def _check(self) -> None:  # cross-field rules of a section (InputError naming the dotted key)
        pass

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (tuples as lists): ``json.dumps(cfg.to_dict())`` is the JSON form."""
        return config_to_dict(self)


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """The training set D: source, |D|, classes, label mode, resolution, blending."""
    _prefix: ClassVar[str] = "data"
    source: str = _f()  # any open_source SRC, or builtin:digits / builtin:lfw
    size: int = _f(ge=2)  # |D|
    split: Optional[str] = _f(None)
    num_classes: Optional[int] = _f(None, ge=1)  # C: the first C classes (null: all classes of a labelled source)
    classes: Optional[tuple[int, ...]] = _f(None, ge=0)  # explicit class ids instead (e.g. [5]: CIFAR-10's dog)
    labels: Literal["none", "true", "random", "unique"] = _f("none", aliases={"false": "none"})
    random_label_classes: int = _f(10, ge=1)  # C' for labels: random
    resolution: Optional[int] = _f(None, ge=1)  # Lanczos resize (centre crop first); null: the source's own
    blend_source: Optional[str] = _f(None)  # Sec. 3.2: same-class images from a second, labelled source
    blend_ratio: float = _f(0.0, ge=0.0, le=1.0)  # α: the fraction of each class taken from blend_source
    seed: int = _f(0, ge=0)  # the subset draw (and random labels)

    def _check(self):
        _need(self.classes is None or len(set(self.classes)) == len(self.classes) > 0, "data.classes",
              f"expected distinct class ids, got {list(self.classes or ())}")
        _need(self.classes is None or self.num_classes is None, "data.num_classes", "give data.num_classes "
              "(the first C classes) or data.classes (these class ids), not both")
        _need(self.blend_ratio == 0 or self.blend_source is not None, "data.blend_source",
              f"data.blend_ratio is {self.blend_ratio}, so a blend source is needed")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """The denoiser: EDM preconditioning around a DDPM++ / NCSN++ SongUNet."""
    _prefix: ClassVar[str] = "model"
    arch: Literal["ddpmpp", "ncsnpp"] = _f("ddpmpp")
    precond: Literal["vp", "ve", "edm"] = _f("vp")
    channels: int = _f(128, ge=1)
    channel_mult: tuple[int, ...] = _f((2, 2, 2), ge=1)
    num_blocks: int = _f(2, ge=0)  # residual blocks per resolution (the paper's depth)
    attn_resolutions: tuple[int, ...] = _f((16,), ge=1)
    dropout: float = _f(0.13, ge=0.0, lt=1.0)
    embedding: Optional[Literal["positional", "fourier"]] = _f(None)  # null: the arch preset's
    skip_mask: Optional[tuple[bool, ...]] = _f(None)  # len(channel_mult)·(num_blocks + 1) switches; null: all on

    def _check(self):
        _need(len(self.channel_mult) >= 1, "model.channel_mult", "expected a non-empty list of multipliers")
        n = len(self.channel_mult) * (self.num_blocks + 1)
        _need(self.skip_mask is None or len(self.skip_mask) == n, "model.skip_mask",
              f"expected {n} switches (len(channel_mult) {len(self.channel_mult)} × (num_blocks {self.num_blocks}"
              f" + 1)), got {len(self.skip_mask or ())}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """The optimisation: Adam, epoch-wise warm-up, EMA, precision, snapshot cadence."""
    _prefix: ClassVar[str] = "train"
    epochs: int = _f(40000, ge=1, training=False)  # may grow on resume: the schedule is flat after warm-up
    batch_size: int = _f(512, ge=1)
    batch_gpu: Optional[int] = _f(None, ge=1, training=False)  # per-pass batch: gradient accumulation
    lr: float = _f(2e-4, gt=0.0)
    weight_decay: float = _f(0.0, ge=0.0)  # L2 penalty (Sec. 5)
    warmup_epochs: int = _f(200, ge=0)  # linear LR and EMA ramp, epoch-wise (Appendix B)
    ema_rate: float = _f(0.99929, ge=0.0, lt=1.0)  # per optimizer step of 512 images (EDM's 500 kimg half-life)
    precision: Literal["fp32", "tf32", "bf16"] = _f("fp32")
    snapshot_epochs: int = _f(1000, ge=1, training=False)  # EMA snapshot (+ memorization tracking)
    checkpoint_epochs: int = _f(500, ge=1, training=False)  # full resumable state
    log_every_steps: int = _f(100, ge=1, training=False)

    def _check(self):
        _need(self.batch_gpu is None or self.batch_size % self.batch_gpu == 0, "train.batch_gpu",
              f"expected a divisor of train.batch_size {self.batch_size}, got {self.batch_gpu}")


@dataclass(frozen=True, kw_only=True)
class TrackConfig(_Section):
    """Memorization tracking at each snapshot: M generated images audited against D."""
    _prefix: ClassVar[str] = "track"
    num_images: int = _f(10000, ge=0, training=False)  # M generated per snapshot (0: no tracking)
    seed: int = _f(0, ge=0, training=False)  # images use seeds seed .. seed + M - 1
    backend: Literal["auto", "int8", "faiss", "torch"] = _f("auto", training=False)  # the 2-NN search
    batch: int = _f(500, ge=1, training=False)  # images per sampler batch
    steps: int = _f(18, ge=1, training=False)  # EDM Heun steps


@dataclass(frozen=True, kw_only=True)
class EDMConfig(_Section):
    """One EDM training run (kind: edm)."""
    kind: Literal["edm"] = _f("edm")
    out_dir: str = _f(training=False)
    seed: int = _f(0, ge=0)  # network init, noise, minibatch order
    data: DataConfig = _f()
    model: ModelConfig = _f(factory=ModelConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    track: TrackConfig = _f(factory=TrackConfig)

    def _check(self):
        levels, res = len(self.model.channel_mult), self.data.resolution
        _need(res is None or res % 2 ** (levels - 1) == 0, "data.resolution",
              f"expected a multiple of {2 ** (levels - 1)} (the U-Net halves it len(model.channel_mult) - 1 = "
              f"{levels - 1} times), got {res}")


CONFIG_KINDS: dict[str, type] = {"edm": EDMConfig}  # kind: sd resolves lazily (config_class): no diffusers import


def config_class(kind: str) -> type:
    """The config class of a ``kind``: edm, or sd (sdmem.sd.config.SDConfig, imported on first use)."""
    if kind == "sd" and "sd" not in CONFIG_KINDS:
        from .sd.config import SDConfig
        CONFIG_KINDS["sd"] = SDConfig
    return CONFIG_KINDS[kind]


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin in (Literal, tuple):
        return "one of " + ", ".join(map(str, args)) if origin is Literal else f"a list of {_type_name(args[0])}"
    return "a mapping" if dataclasses.is_dataclass(tp) else \
        {int: "int", float: "float (e.g. 2e-4)", bool: "bool (true/false)", str: "str"}[tp]


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _convert(value, tp, key: str, aliases: Mapping = {}):
    """``value`` checked against (and normalised to) the annotation ``tp``; InputError(key, ...) otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = InputError(key, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin in (Union, types.UnionType):  # Optional[X]
        try:
            return None if value is None else _convert(value, next(a for a in args if a is not type(None)), key,
                                                       aliases)
        except InputError as exc:
            raise (bad if exc.where == key else exc) from None
    if origin is Literal:
        word = ("true" if value else "false") if isinstance(value, bool) else "none" if value is None else value
        word = aliases.get(word, word) if isinstance(word, str) else word
        if isinstance(word, str) and word in args:
            return word
        close = difflib.get_close_matches(str(word), [str(a) for a in args], n=1)
        raise InputError(key, bad.problem + (f" (did you mean {close[0]!r}?)" if close else ""))
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise bad
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp) or tp in (bool, str):
        if isinstance(value, Mapping) and dataclasses.is_dataclass(tp):
            return config_from_dict(tp, value)
        if isinstance(value, tp):
            return value
        raise bad
    if isinstance(value, str) and _EXP_NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (tp is int and isinstance(value, float) and not value.is_integer()):
        raise bad
    _need(tp is int or math.isfinite(value), key, f"expected a finite float, got {value}")
    return tp(value)


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; expected one of {', '.join(known)}"


def config_from_dict(cls: type, data: Mapping, where: str = ""):
    """The config dataclass ``cls`` from a plain mapping; ``where`` (a file name) prefixes every error key."""
    path, at = getattr(cls, "_prefix", ""), (lambda key: f"{where}: {key}" if where else key)
    if not isinstance(data, Mapping):
        raise InputError(at(path or "(top level)"), f"expected a mapping, got {_show(data)}")
    known, hints, kwargs = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls), {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        _need(isinstance(key, str), at(dotted), f"keys must be strings, got {_show(key)}")
        _need(key in known, at(dotted), _unknown(str(key), list(known)))
        kwargs[key] = config_from_dict(hints[key], value, where) if dataclasses.is_dataclass(hints[key]) else value
    for name, f in known.items():
        _need(name in kwargs or f.default is not _MISSING or f.default_factory is not _MISSING,
              at(f"{path}.{name}" if path else name), "required key is missing")
    try:
        return cls(**kwargs)
    except InputError as exc:
        raise InputError(at(exc.where), exc.problem) from None


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = str(item).partition("=")
    _need(bool(sep and key.strip()), "--set", f"expected KEY=VALUE (e.g. data.size=1000), got {item!r}")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"--set {key.strip()}", f"VALUE is not valid YAML ({str(exc).splitlines()[0]})") from None


def _override_dict(cls: type, data: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of the raw config ``data`` with each KEY=VALUE set at its dotted path, checked against ``cls``."""
    data = dict(data)  # copied on write along each path: the caller's mapping is left as it was
    for item in overrides:
        dotted, value = _parse_override(item)
        target, sub, parts = data, cls, dotted.split(".")
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(sub)}
            _need(part in fields, f"--set {dotted}", _unknown(part, list(fields)) if part else "empty key segment")
            tp, last = typing.get_type_hints(sub)[part], depth == len(parts) - 1
            _need(dataclasses.is_dataclass(tp) != last, f"--set {dotted}", f"{'.'.join(parts[:depth + 1])} is "
                  + ("a section: set its keys one by one" if last else "not a section"))
            if last:
                target[part] = _convert(value, tp, f"--set {dotted}", fields[part].metadata["aliases"])
            else:
                target[part] = dict(target[part]) if isinstance(target.get(part), dict) else {}
                target, sub = target[part], tp
    return data


def apply_overrides(cfg, overrides: Sequence[str]):
    """A new config: ``cfg`` with each ``KEY=VALUE`` (VALUE read as YAML) set at its dotted path."""
    return config_from_dict(type(cfg), _override_dict(type(cfg), config_to_dict(cfg), overrides), "--set")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()):
    """Read a YAML run config (``kind: edm`` or ``sd``), apply ``--set`` overrides, check it: a frozen config object."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(name, "no such config file" if isinstance(exc, FileNotFoundError) else
                         f"cannot read the config ({exc.__class__.__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(name, f"not valid YAML ({' '.join(str(exc).split())})") from None
    _need(isinstance(data, dict), name, f"expected a YAML mapping (kind: edm, out_dir: ...), got {_show(data)}")
    kind = ([v for k, v in map(_parse_override, overrides) if k == "kind"] or [data.get("kind")])[-1]
    kind = None if kind is None else str(kind)
    _need(kind in CONFIG_KINDS or kind == "sd", f"{name}: kind", ("required key is missing" if kind is None else
                                                                  f"unknown kind {kind!r}") + "; expected edm or sd")
    cls = config_class(kind)
    return config_from_dict(cls, _override_dict(cls, data, overrides), name)


def config_to_dict(cfg) -> dict:
    """A config object as a plain, JSON-ready dict (sections nested, tuples as lists)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {k: config_to_dict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
            for k, v in values.items()}


def flatten_config(obj, prefix: str = "") -> dict:
    """{dotted key: value} of a config object or a nested dict."""
    out = {}
    for key, value in (config_to_dict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten_config(value, dotted) if isinstance(value, Mapping) else {dotted: value})
    return out


def training_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys of the config class ``cls`` that change what is learnt (the ones config_hash covers)."""
    keys, hints = set(), typing.get_type_hints(cls)
    for f in (f for f in dataclasses.fields(cls) if f.metadata["training"]):
        dotted, tp = f"{prefix}.{f.name}" if prefix else f.name, hints[f.name]
        keys |= training_keys(tp, dotted) if dataclasses.is_dataclass(tp) else {dotted}
    return keys


def config_hash(cfg) -> str:
    """sha256 (hex) of the fields that change what is learnt (not out_dir, epochs, logging, tracking)."""
    keep = training_keys(type(cfg))
    flat = {k: v for k, v in flatten_config(cfg).items() if k in keep}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def diff_configs(a, b) -> list[str]:
    """Dotted keys whose values differ between two configs (objects or their to_dict() forms)."""
    fa, fb = flatten_config(a), flatten_config(b)
    return [k for k in [*fa, *(k for k in fb if k not in fa)] if k not in fa or k not in fb or fa[k] != fb[k]]


def network_kwargs(model: ModelConfig | EDMConfig) -> dict:
    """The SongUNet overrides (build_network's ``**overrides``) that the model section asks for."""
    m = model.model if isinstance(model, EDMConfig) else model
    kw = dict(model_channels=m.channels, channel_mult=m.channel_mult, num_blocks=m.num_blocks,
              attn_resolutions=m.attn_resolutions, dropout=m.dropout, skip_mask=m.skip_mask)
    return kw if m.embedding is None else dict(kw, embedding_type=m.embedding)


def num_params(cfg: ModelConfig | EDMConfig, img_resolution: int, label_dim: int = 0) -> int:
    """Trainable parameters of the configured network, counted on the meta device (no memory, no init)."""
    import torch

    from .edm.networks import build_network

    m = cfg.model if isinstance(cfg, EDMConfig) else cfg
    with torch.device("meta"):
        net = build_network(m.arch, img_resolution=img_resolution, label_dim=label_dim, **network_kwargs(m))
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
