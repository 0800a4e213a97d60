"""NVlabs' published EDM network pickles (``edm-*.pkl``), loaded without running any code they carry.

Such a pickle is what EDM's training loop writes with ``pickle.dump``: a dict ``{'ema': net, 'loss_fn': ...,
'augment_pipe': ..., 'dataset_kwargs': {...}}``. ``net`` is a *persistent* object (EDM's
``torch_utils/persistence.py``, internal version 6): every persistent object pickles as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class', version=6,
module_src=<the full source of the defining module>, class_name=..., state=<the object's __dict__>)``; the
constructor arguments are not in ``meta`` but in the state, as ``_init_args`` / ``_init_kwargs``. Unpickling
with plain ``pickle`` would ``exec`` ``module_src``. The file is read by `sdmem.safe_pickle` instead, whose
allow-list turns each persistent object into an inert `PersistentRecord`, ``torch.nn.ModuleDict`` into a
`ModuleRecord` and tensors into plain CPU tensors, and refuses any other global.

``module_src`` is never executed, yet it must be one of NVlabs' published versions of ``training/networks.py``,
recognised by the SHA-256 of its text (line endings normalised to LF) alone (`KNOWN_SOURCES`): a copy edited in
any way, comments and whitespace included, is refused. The network is then rebuilt from sdmem's own classes
(`sdmem.edm.precond`, `sdmem.edm.networks`), its settings read from the pickled ``_init_kwargs`` and, for
arguments left at their defaults, from sdmem's table of ``SongUNet.__init__``'s parameters in each published
version (`SONGUNET_SIGNATURES`); the source text itself is not read further. The tensors are loaded by name,
and missing, unexpected, misshapen or non-finite (NaN/inf) tensors are refused, as are scalar settings
(GroupNorm eps, skip scale, ...) that differ between the pickled modules and the rebuilt ones.

Supported: VP/VE/EDM preconditioning around a SongUNet (DDPM++ / NCSN++), i.e. ``edm-cifar10-*``,
``edm-ffhq-*``, ``edm-afhqv2-*`` and the VP/VE baselines. Not supported (refused with an InputError): ADM
(``DhariwalUNet``, e.g. ``edm-imagenet-64x64-cond-adm.pkl``) and iDDPM preconditioning.

Only the ``'ema'`` entry is checked and used. The other entries (the loss, the augmentation pipe, whose
sources are ``training/loss.py`` / ``training/augment.py``) are parsed by the same restricted unpickler and
then dropped unread; nothing of theirs is executed either.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..safe_pickle import ModuleRecord, PersistentRecord, read_pickle
from .networks import SongUNet
from .precond import PRECONDS

__all__ = ["KNOWN_SOURCES", "REQUIRED", "SONGUNET_SIGNATURES", "ModuleRecord", "PersistentRecord",
           "load_edm_pickle", "read_edm_pickle", "recognise_source"]

_NETWORKS_PY = "NVlabs/edm training/networks.py"
_V_2022_10 = f"{_NETWORKS_PY} as first published (Oct 2022; stored at commit 0a2ff34f0b80)"
_V_2022_11 = (f"{_NETWORKS_PY} with the fused-upsampling padding fix (Nov 2022, NVlabs/edm issue #2; "
              "stored at commit b2a26c921c57)")

# Hashes of NVlabs' published source texts (read from the public repository's history; only the hashes are
# kept here). The published pickles date from Oct 2022, i.e. the first version; the Nov 2022 fix changed only
# Conv2d's fused *up*sampling, which SongUNet never uses.
KNOWN_SOURCES: dict[str, str] = {
    # SHA-256 of the UTF-8 text, line endings normalised to LF (35,791 and 35,832 characters).
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef": _V_2022_10,
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284": _V_2022_11,
}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a parameter without a default in SONGUNET_SIGNATURES

# SongUNet.__init__'s parameters, in order, with their defaults (REQUIRED: none), in each published version of
# networks.py: sdmem's record of facts read from NVlabs' two texts. The Nov 2022 fix left SongUNet untouched,
# so both versions have the same signature.
_SONGUNET_2022: tuple[tuple[str, Any], ...] = (
    ("img_resolution", REQUIRED), ("in_channels", REQUIRED), ("out_channels", REQUIRED),
    ("label_dim", 0), ("augment_dim", 0), ("model_channels", 128), ("channel_mult", [1, 2, 2, 2]),
    ("channel_mult_emb", 4), ("num_blocks", 4), ("attn_resolutions", [16]), ("dropout", 0.10),
    ("label_dropout", 0), ("embedding_type", "positional"), ("channel_mult_noise", 1),
    ("encoder_type", "standard"), ("decoder_type", "standard"), ("resample_filter", [1, 1]),
)
SONGUNET_SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {_V_2022_10: _SONGUNET_2022,
                                                                _V_2022_11: _SONGUNET_2022}

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of the EDM code base

_PRECOND_KINDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}
_NETWORK_CLASSES = {"SongUNet", "UNetBlock", "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding",
                    "FourierEmbedding"}
# Scalar settings that do not show in tensor shapes, compared between the pickled modules and the rebuilt ones.
_CHECKED_ATTRS = {
    "SongUNet": ("label_dropout",),
    "UNetBlock": ("in_channels", "out_channels", "num_heads", "skip_scale", "adaptive_scale"),
    "Conv2d": ("up", "down", "fused_resample"),
    "Linear": ("in_features", "out_features"),
    "GroupNorm": ("num_groups", "eps"),
    "PositionalEmbedding": ("num_channels", "max_positions", "endpoint"),
    # VP's sigma_min/max are derived (EDM computes them in float32, sdmem in float64): not compared.
    "VPPrecond": ("img_resolution", "img_channels", "label_dim", "beta_d", "beta_min", "M", "epsilon_t"),
    "VEPrecond": ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"),
    "EDMPrecond": ("img_resolution", "img_channels", "label_dim", "sigma_data", "sigma_min", "sigma_max"),
}
_SONGUNET_FIXED = ("img_resolution", "in_channels", "out_channels", "label_dim")
_PRECOND_SETTINGS = {"vp": ("beta_d", "beta_min", "M", "epsilon_t"), "ve": ("sigma_min", "sigma_max"),
                     "edm": ("sigma_data", "sigma_min", "sigma_max")}


# --------------------------------------------------------------------------------------------------------------
# Recognising the embedded source, reading the file.

def _normalise(src: str) -> str:
    return src.replace("\r\n", "\n").replace("\r", "\n")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def recognise_source(src: Any) -> tuple[str, str, str] | None:
    """(version label, 'text', text SHA-256) of a published source (`KNOWN_SOURCES`), else None.

    The SHA-256 is of the text with LF line endings; nothing else about the text counts, so any edit (a
    comment, a space) makes it unknown. The middle item, how it matched, is always 'text'.
    """
    if not isinstance(src, str):
        return None
    digest = _sha256(_normalise(src))
    if digest in KNOWN_SOURCES:
        return KNOWN_SOURCES[digest], "text", digest
    return None


def read_edm_pickle(path: str | os.PathLike) -> Any:
    """The pickle's content with persistent objects as `PersistentRecord`s; nothing in it is executed."""
    return read_pickle(path, what="EDM network pickle")


# --------------------------------------------------------------------------------------------------------------
# Walking the records.

def _children(record) -> list[tuple[str, Any]]:
    modules = record.state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise ValueError("_modules is not a mapping")
    return [(name, child) for name, child in modules.items() if child is not None]


def _walk(record, prefix: str = ""):
    """(path, record) for `record` and every submodule record below it, parents first."""
    yield prefix, record
    for name, child in _children(record):
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _tensors(root, where) -> dict[str, torch.Tensor]:
    """The state_dict-style flat {name: tensor} of a record tree (parameters, then persistent buffers)."""
    out: dict[str, torch.Tensor] = {}
    for path, record in _walk(root):
        state = record.state
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                raise InputError(where, f"module {path or '(root)'} has a malformed {group}")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor) or not isinstance(name, str):
                    raise InputError(where, f"module {path or '(root)'}: {group[1:-1]} {name!r} is not a tensor")
                out[f"{path}.{name}" if path else name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Settings.

def _network_kwargs(model: PersistentRecord, version: str, where) -> dict:
    """SongUNet's constructor arguments: the pickled _init_args/_init_kwargs over the published defaults."""
    sig = SONGUNET_SIGNATURES.get(version)
    if sig is None:
        raise InputError(where, f"sdmem knows no SongUNet defaults for its network source ({version})")
    args, kwargs = model.state.get("_init_args"), model.state.get("_init_kwargs")
    if kwargs is None or not isinstance(kwargs, dict) or not isinstance(args, (tuple, list)):
        raise InputError(where, "its SongUNet records no constructor arguments (_init_args / _init_kwargs)")
    names = [n for n, _ in sig]
    if len(args) > len(names):
        raise InputError(where, f"SongUNet was given {len(args)} positional arguments; its source takes "
                                f"{len(names)}")
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise InputError(where, f"SongUNet was given {key!r}, which its source does not take")
        if key in given:
            raise InputError(where, f"SongUNet was given {key!r} twice")
        given[key] = value
    out = {}
    for name, default in sig:
        value = given[name] if name in given else copy.deepcopy(default)
        if value is REQUIRED:
            raise InputError(where, f"SongUNet's {name!r} is not recorded and has no default in its source")
        out[name] = value
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and isinstance(a, (bool, int)) and isinstance(b, (bool, int))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isinf(a) or math.isinf(b):
            return a == b
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _arch_name(kw: dict) -> str | None:
    """'ddpmpp' / 'ncsnpp' where the embedding, encoder and filter are those presets' (sdmem's `NETWORKS`)."""
    sig = (kw["embedding_type"], kw["channel_mult_noise"], kw["encoder_type"], kw["decoder_type"],
           tuple(kw["resample_filter"]))
    return {("positional", 1, "standard", "standard", (1, 1)): "ddpmpp",
            ("fourier", 2, "residual", "standard", (1, 3, 3, 1)): "ncsnpp"}.get(sig)


@dataclass
class _Settings:
    """What stage 3 reads: the preconditioning's settings and SongUNet's constructor arguments."""

    res: Any
    channels: Any
    label_dim: Any
    use_fp16: bool
    precond_kwargs: dict
    net_kw: dict  # all of SongUNet's arguments
    fixed: dict  # those the preconditioning determines
    options: dict  # the others


# --------------------------------------------------------------------------------------------------------------
# The stages of load_edm_pickle.

def _ema_root(data, path) -> tuple[PersistentRecord, list[str]]:
    """The pickled network (the 'ema' entry, or a bare network) and the pickle's top-level keys."""
    if isinstance(data, dict) and "ema" in data:
        root, keys = data["ema"], sorted(str(k) for k in data)
    elif isinstance(data, PersistentRecord):
        root, keys = data, []
    else:
        raise InputError(path, "not an EDM network pickle: expected a dict with an 'ema' network")
    if not isinstance(root, PersistentRecord):
        raise InputError(path, f"its 'ema' entry is a {type(root).__name__}, not a pickled EDM network")
    return root, keys


def _recognised(record: PersistentRecord, path) -> tuple[str, str, str]:
    found = recognise_source(record.module_src)
    if found is None:
        raise InputError(path, f"its embedded network source (class {record.class_name}, SHA-256 "
                               f"{_sha256(_normalise(record.module_src))[:16]}...) is not one of NVlabs' "
                               "published versions of training/networks.py; refusing to load (it was not run)")
    return found


def _check_sources(root: PersistentRecord, path) -> tuple[list, tuple[str, str, str]]:
    """Stage 1: every persistent object in the network comes from one published networks.py.

    Returns the (path, record) list of the module tree and (version, match, SHA-256) of the root's source.
    """
    try:
        records = list(_walk(root))
    except (ValueError, AttributeError, RecursionError):
        raise InputError(path, "its network's module tree is malformed") from None
    recognised: dict[str, tuple[str, str, str]] = {}
    for sub, record in records:
        if isinstance(record, ModuleRecord):
            if not isinstance(record.state, dict):
                raise InputError(path, f"module {sub}: ModuleDict without state")
            continue
        if not isinstance(record, PersistentRecord):
            raise InputError(path, f"module {sub or '(root)'} is a {type(record).__name__}, not a network module")
        if record.module_src not in recognised:
            recognised[record.module_src] = _recognised(record, path)
        if record.version != PERSISTENCE_VERSION:
            raise InputError(path, f"persistent object {record.class_name} has persistence version "
                                   f"{record.version!r}, expected {PERSISTENCE_VERSION}")
    if len({v for v, _, _ in recognised.values()}) != 1:
        raise InputError(path, "its modules embed different versions of networks.py")
    return records, recognised[root.module_src]


def _check_network_type(root: PersistentRecord, records: list, path) -> tuple[str, PersistentRecord]:
    """Stage 2: VP/VE/EDM preconditioning around a SongUNet made of SongUNet's modules; (kind, model)."""
    kind = _PRECOND_KINDS.get(root.class_name)
    if kind is None:
        raise InputError(path, f"its network is a {root.class_name}; sdmem rebuilds only VPPrecond, VEPrecond "
                               "and EDMPrecond networks")
    model = dict(_children(root)).get("model")
    if not isinstance(model, PersistentRecord):
        raise InputError(path, f"its {root.class_name} has no pickled 'model' network")
    if model.class_name == "DhariwalUNet":
        raise InputError(path, "its network is an ADM U-Net (DhariwalUNet, e.g. edm-imagenet-64x64-cond-adm); "
                               "sdmem has only SongUNet (DDPM++ / NCSN++) networks, so it cannot rebuild it")
    if model.class_name != "SongUNet":
        raise InputError(path, f"its network is a {model.class_name}; sdmem rebuilds only SongUNet "
                               "(DDPM++ / NCSN++) networks")
    for sub, record in records[1:]:
        if record.class_name not in _NETWORK_CLASSES | {"ModuleDict"}:
            raise InputError(path, f"module {sub} is a {record.class_name}, which SongUNet does not contain")
    return kind, model


def _read_settings(root: PersistentRecord, model: PersistentRecord, kind: str, version: str, path) -> _Settings:
    """Stage 3: the preconditioning's settings from its state, SongUNet's from its recorded arguments."""
    st = root.state
    need = _PRECOND_SETTINGS[kind]
    missing = [k for k in ("img_resolution", "img_channels", "label_dim", *need) if k not in st]
    if missing:
        raise InputError(path, f"its {root.class_name} lacks {', '.join(missing)}")
    res, channels, label_dim = st["img_resolution"], st["img_channels"], st["label_dim"]
    net_kw = _network_kwargs(model, version, path)
    fixed = dict(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim)
    for key, value in fixed.items():
        if not _same(net_kw[key], value):
            raise InputError(path, f"SongUNet's {key} {net_kw[key]!r} differs from its {root.class_name}'s "
                                   f"{value!r}")
    return _Settings(res=res, channels=channels, label_dim=label_dim, use_fp16=bool(st.get("use_fp16", False)),
                     precond_kwargs={k: st[k] for k in need}, net_kw=net_kw, fixed=fixed,
                     options={k: v for k, v in net_kw.items() if k not in _SONGUNET_FIXED})


def _build_modules(kind: str, s: _Settings, path) -> torch.nn.Module:
    """sdmem's denoiser for the settings, built on the meta device (no initialisation)."""
    try:
        with torch.device("meta"):
            net = SongUNet(**s.fixed, **s.options)
        return PRECONDS[kind](s.res, s.channels, s.label_dim, model=net, use_fp16=s.use_fp16, **s.precond_kwargs)
    except InputError as exc:
        raise InputError(path, f"its network settings cannot be rebuilt in sdmem ({exc})") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"its network settings cannot be rebuilt in sdmem ({exc.__class__.__name__}: "
                               f"{exc})") from None


def _fitting_tensors(root: PersistentRecord, expected: dict, path) -> dict[str, torch.Tensor]:
    """The pickled tensors, checked against the rebuilt network's state_dict, as copies of its dtypes."""
    tensors = _tensors(root, path)
    lacking = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if lacking or extra:
        raise InputError(path, f"its tensors do not fit the rebuilt network (missing {len(lacking)}: "
                               f"{lacking[:3]}; unexpected {len(extra)}: {extra[:3]})")
    converted = {}
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise InputError(path, f"tensor {key} has shape {tuple(t.shape)}, the rebuilt network expects "
                                   f"{tuple(ref.shape)}")
        if not t.is_floating_point():
            raise InputError(path, f"tensor {key} is {t.dtype}, expected floating point")
        if t.numel() and not bool(torch.isfinite(t).all()):  # one check per tensor, no copy
            nan = int(torch.isnan(t).sum())
            raise InputError(path, f"tensor {key} holds non-finite values ({nan} NaN and "
                                   f"{int((~torch.isfinite(t)).sum()) - nan} inf of {t.numel()} values); NaN or inf "
                                   "weights give black or noise images")
        converted[key] = t.detach().to(ref.dtype).clone()  # own, contiguous memory
    return converted


def _rebuild(root: PersistentRecord, kind: str, s: _Settings, path) -> torch.nn.Module:
    """Stage 4: sdmem's modules built (no init), then the pickled tensors assigned to them by name."""
    denoiser = _build_modules(kind, s, path)
    denoiser.load_state_dict(_fitting_tensors(root, denoiser.state_dict(), path), strict=True, assign=True)
    return denoiser


def _check_scalars(records: list, denoiser: torch.nn.Module, path) -> None:
    """Stage 5: scalar settings that tensor shapes do not reveal agree between pickle and rebuilt network."""
    for sub, record in records:
        try:
            module = denoiser.get_submodule(sub) if sub else denoiser
        except AttributeError:
            raise InputError(path, f"module {sub} has no counterpart in the rebuilt network") from None
        if type(module).__name__ != record.class_name:
            raise InputError(path, f"module {sub or '(root)'} is a {record.class_name} in the pickle but a "
                                   f"{type(module).__name__} when rebuilt")
        for attr in _CHECKED_ATTRS.get(record.class_name, ()):
            if attr in record.state and not _same(record.state[attr], getattr(module, attr, None)):
                raise InputError(path, f"module {sub or '(root)'}: {attr} is {record.state[attr]!r} in the "
                                       f"pickle but {getattr(module, attr, None)!r} when rebuilt")


def load_edm_pickle(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(denoiser, info) from a published EDM network pickle, rebuilt as sdmem's own modules.

    The denoiser is an sdmem `VPPrecond` / `VEPrecond` / `EDMPrecond` around a `SongUNet`, in eval mode with
    gradients off, on `device`; it computes D(x; σ) as ``denoiser(x, sigma, class_labels)``. ``info`` holds
    ``class_name``, ``precond`` ('vp' | 've' | 'edm'), ``model_type``, ``arch`` ('ddpmpp' | 'ncsnpp' | None),
    ``img_resolution``, ``img_channels``, ``label_dim``, ``use_fp16``, ``sigma_min``, ``sigma_max``,
    ``network_kwargs`` (SongUNet's settings), ``precond_kwargs``, ``source_version`` (which published
    networks.py it embeds), ``source_match`` (always 'text': recognised by SHA-256), ``source_sha256`` and
    ``pickle_keys``. Every refusal (foreign globals, unknown source, unsupported network, tensors that do not
    fit) and every unreadable file is an `InputError` naming `path`.
    """
    root, keys = _ema_root(read_edm_pickle(path), path)
    records, (version, match, digest) = _check_sources(root, path)
    kind, model = _check_network_type(root, records, path)
    s = _read_settings(root, model, kind, version, path)
    denoiser = _rebuild(root, kind, s, path)
    _check_scalars(records, denoiser, path)
    info = dict(class_name=root.class_name, precond=kind, model_type=model.class_name, arch=_arch_name(s.net_kw),
                img_resolution=s.res, img_channels=s.channels, label_dim=s.label_dim, use_fp16=s.use_fp16,
                sigma_min=float(denoiser.sigma_min), sigma_max=float(denoiser.sigma_max),
                network_kwargs=s.options, precond_kwargs=s.precond_kwargs, source_version=version,
                source_match=match, source_sha256=digest, pickle_keys=keys)
    return denoiser.eval().requires_grad_(False).to(device), info
