"""The typed-config engine: frozen dataclass sections read from YAML mappings, strict keys and types (an
InputError names the dotted key), --set overrides, diffs and fingerprints. It knows no schema: each kind's
config lives beside its trainer (sdmem.edm.config, sdmem.sd.config) and sdmem.runs maps ``kind`` to it."""

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
from dataclasses import field
from typing import Any, ClassVar, Literal, Mapping, Sequence, Union

import yaml

from .errors import InputError

_MISSING = dataclasses.MISSING
_EXP_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 2e-4: a str to YAML 1.1; taken as a number
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default: Any = _MISSING, *, training: bool = True, aliases: dict | None = None, factory=None,
            since_default: bool = False, before: Any = _MISSING, **bounds):
    """A config field with bounds (ge/gt/le/lt, on each element of a list); ``training=False``: not hashed.

    A training key added later says how runs made before it existed trained: ``since_default`` (as its
    default) or ``before=VALUE`` (as VALUE, when the default is a new behaviour). The key is left out of the
    fingerprint at that value, so those runs keep their fingerprint, and their stored config reads it as that
    value (:func:`stored_config`): resuming one with a config that differs there is refused, naming the key."""
    if since_default and before is _MISSING:
        before = default
    meta = {"training": training, "aliases": aliases or {}, "bounds": bounds, "before": before}
    return field(default=default, default_factory=factory or _MISSING, metadata=meta)


def need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise InputError(key, problem)


class Section:
    """Shared by the config dataclasses: type and bounds checks on construction (then ``_check``), to_dict.

    A top-level config may override ``ignored_keys`` (training keys it does not use, left out of its fingerprint).
    """

    _prefix: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._prefix}.{f.name}" if self._prefix else f.name
            value = _convert(getattr(self, f.name), hints[f.name], key, f.metadata["aliases"])
            object.__setattr__(self, f.name, value)
            values, many = (value, True) if isinstance(value, tuple) else (() if value is None else (value,), False)
            for (test, sym), bound in ((_BOUNDS[name], bound) for name, bound in f.metadata["bounds"].items()):
                need(all(test(v, bound) for v in values), key,
                      f"expected {'values ' * many}{sym} {bound}, got {list(value) if many else value}")
        self._check()

    def _check(self) -> None:  # cross-field rules of a section (InputError naming the dotted key)
        pass

    def ignored_keys(self) -> set[str]:
        """Training keys this config does not use (e.g. LoRA keys of a full fine-tune): not fingerprinted."""
        return set()

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (tuples as lists): ``json.dumps(cfg.to_dict())`` is the JSON form."""
        return config_to_dict(self)


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
    need(tp is int or math.isfinite(value), key, f"expected a finite float, got {value}")
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
        need(isinstance(key, str), at(dotted), f"keys must be strings, got {_show(key)}")
        if key not in known:  # (the did-you-mean message only when needed: it is the slow part of loading)
            raise InputError(at(dotted), _unknown(str(key), list(known)))
        kwargs[key] = config_from_dict(hints[key], value, where) if dataclasses.is_dataclass(hints[key]) else value
    for name, f in known.items():
        need(name in kwargs or f.default is not _MISSING or f.default_factory is not _MISSING,
              at(f"{path}.{name}" if path else name), "required key is missing")
    try:
        return cls(**kwargs)
    except InputError as exc:
        raise InputError(at(exc.where), exc.problem) from None


def _parse_override(item) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE read as YAML, as ``--set`` gives it) or an already typed ``(KEY, VALUE)`` pair."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0].strip(), item[1]
    key, sep, text = str(item).partition("=")
    need(bool(sep and key.strip()), "--set", f"expected KEY=VALUE (e.g. data.size=1000), got {item!r}")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"--set {key.strip()}", f"VALUE is not valid YAML ({str(exc).splitlines()[0]})") from None


def _override_dict(cls: type, data: Mapping, overrides: Sequence) -> dict:
    """A copy of the raw config ``data`` with each KEY=VALUE set at its dotted path, checked against ``cls``."""
    data = dict(data)  # copied on write along each path: the caller's mapping is left as it was
    for item in overrides:
        dotted, value = _parse_override(item)
        target, sub, parts = data, cls, dotted.split(".")
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(sub)}
            if part not in fields:
                raise InputError(f"--set {dotted}", _unknown(part, list(fields)) if part else "empty key segment")
            tp, last = typing.get_type_hints(sub)[part], depth == len(parts) - 1
            need(dataclasses.is_dataclass(tp) != last, f"--set {dotted}", f"{'.'.join(parts[:depth + 1])} is "
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


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file that must hold a mapping; unreadable, invalid or other content is an InputError naming it."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(name, "no such config file" if isinstance(exc, FileNotFoundError) else
                         f"cannot read the config ({exc.__class__.__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(name, f"not valid YAML ({' '.join(str(exc).split())})") from None
    need(isinstance(data, dict), name, f"expected a YAML mapping (kind: ..., out_dir: ...), got {_show(data)}")
    return data


def load_config(path: str | os.PathLike, overrides: Sequence[str], kinds: Mapping[str, type]):
    """Read a YAML run config, pick its class by ``kind`` from ``kinds``, apply ``--set`` overrides, check it."""
    return config_from_mapping(read_yaml_mapping(path), overrides, kinds, os.fspath(path))


def config_from_mapping(data: Mapping, overrides: Sequence[str], kinds: Mapping[str, type], where: str = ""):
    """A raw config mapping with ``--set`` overrides as the config class its ``kind`` names in ``kinds``."""
    kind = ([v for k, v in map(_parse_override, overrides) if k == "kind"] or [data.get("kind")])[-1]
    kind = None if kind is None else str(kind)
    need(kind in kinds, f"{where}: kind" if where else "kind", ("required key is missing" if kind is None else
                                                                f"unknown kind {kind!r}") + f"; expected {' or '.join(kinds)}")
    cls = kinds[kind]
    return config_from_dict(cls, _override_dict(cls, data, overrides), where)


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


def fingerprint(cfg) -> str:
    """sha256 (hex) of the keys that change what is learnt, less the ones this config ignores (not out_dir,
    epochs, logging, tracking): two configs with the same fingerprint train the same model."""
    keep = training_keys(type(cfg)) - cfg.ignored_keys()
    later = _since_defaults(type(cfg))
    flat = {k: v for k, v in flatten_config(cfg).items() if k in keep and not (k in later and later[k] == v)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _since_defaults(cls: type, prefix: str = "") -> dict:
    """{dotted key: value before the key existed} of the training keys added later."""
    out, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_since_defaults(hints[f.name], dotted))
        elif f.metadata.get("before", _MISSING) is not _MISSING:
            out[dotted] = f.metadata["before"]
    return out


def stored_config(cls: type, data: Mapping, where: str = ""):
    """The config a run folder recorded (its config.json): keys added after it was written read as the value
    runs had before them (``setting(before=...)``), not as today's default."""
    def fill(tp, raw):
        if not isinstance(raw, Mapping):
            return raw
        out, hints = dict(raw), typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            if dataclasses.is_dataclass(hints[f.name]):
                if f.name in out:
                    out[f.name] = fill(hints[f.name], out[f.name])
            elif f.name not in out and f.metadata.get("before", _MISSING) is not _MISSING:
                out[f.name] = f.metadata["before"]
        return out

    return config_from_dict(cls, fill(cls, data), where)


def keys_added_since(cls: type, data: Mapping, keys: Sequence[str]) -> dict:
    """{dotted key: value} of those of ``keys`` that were added later and that a stored record ``data`` lacks (the
    run was made before them), in the order of ``keys``, each at the value such runs trained with."""
    present, later = flatten_config(data), _since_defaults(cls)
    return {k: later[k] for k in keys if k in later and k not in present}


def changed_training_keys(old, new) -> list[str]:
    """Dotted keys that differ between two configs of one kind and alter training (ignored by neither)."""
    keys = training_keys(type(new)) - (old.ignored_keys() & new.ignored_keys())
    return [k for k in diff_configs(old, new) if k in keys]


def diff_configs(a, b) -> list[str]:
    """Dotted keys whose values differ between two configs (objects or their to_dict() forms)."""
    fa, fb = flatten_config(a), flatten_config(b)
    return [k for k in [*fa, *(k for k in fb if k not in fa)] if k not in fa or k not in fb or fa[k] != fb[k]]
