"""NVlabs' published EDM network pickles (``edm-*.pkl``), loaded without running any code they carry.

Such a pickle is what EDM's training loop writes with ``pickle.dump``: a dict ``{'ema': net, 'loss_fn': ...,
'augment_pipe': ..., 'dataset_kwargs': {...}}``. ``net`` is a *persistent* object (EDM's
``torch_utils/persistence.py``, internal version 6): every persistent object pickles as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class', version=6,
module_src=<the full source of the defining module>, class_name=..., state=<the object's __dict__>)``; the
constructor arguments are not in ``meta`` but in the state, as ``_init_args`` / ``_init_kwargs``. Unpickling
with plain ``pickle`` would ``exec`` ``module_src``. Here a restricted unpickler (`find_class` allow-list)
turns each persistent object into an inert `PersistentRecord`, ``torch.nn.ModuleDict`` into a `ModuleRecord`,
and tensors into plain CPU tensors (a storage's bytes, a ``torch.save`` stream, are read by
``torch.load(weights_only=True)``). Any other global (``os.system``, ``builtins.eval``, ...) is refused.

``module_src`` is never executed, yet it must be one of NVlabs' published versions of ``training/networks.py``
(`KNOWN_SOURCES`: SHA-256 of the text with LF line endings; `KNOWN_SOURCE_TREES`: SHA-256 of its syntax tree,
which ignores comments and layout). The network is then rebuilt from sdmem's own classes (`sdmem.edm.precond`,
`sdmem.edm.networks`), its settings read from the pickled ``_init_kwargs`` and, for arguments left at their
defaults, from the signature of ``SongUNet.__init__`` in the recognised source (read with `ast`, not run); the
tensors are loaded by name, and missing, unexpected, misshapen or non-finite (NaN/inf) tensors are refused, as
are scalar settings (GroupNorm eps, skip scale, ...) that differ between the pickled modules and the rebuilt ones.

Supported: VP/VE/EDM preconditioning around a SongUNet (DDPM++ / NCSN++), i.e. ``edm-cifar10-*``,
``edm-ffhq-*``, ``edm-afhqv2-*`` and the VP/VE baselines. Not supported (refused with an InputError): ADM
(``DhariwalUNet``, e.g. ``edm-imagenet-64x64-cond-adm.pkl``) and iDDPM preconditioning.

Only the ``'ema'`` entry is checked and used. The other entries (the loss, the augmentation pipe, whose
sources are ``training/loss.py`` / ``training/augment.py``) are parsed by the same restricted unpickler and
then dropped unread; nothing of theirs is executed either.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import io
import math
import os
import pickle
import re
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .networks import SongUNet
from .precond import PRECONDS

__all__ = ["KNOWN_SOURCES", "KNOWN_SOURCE_TREES", "ModuleRecord", "PersistentRecord", "load_edm_pickle",
           "read_edm_pickle", "recognise_source"]

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
KNOWN_SOURCE_TREES: dict[str, str] = {
    # SHA-256 of `_syntax_fingerprint` of the same two texts: equal for any copy that differs only in comments,
    # blank lines, indentation inside brackets or line endings.
    "61f80a58893741424172583290d635f8fcc28c4a86663affb6ccda4ac70aea68": _V_2022_10,
    "deb4fac67f7ae1917e219a487f007433de8dbab62cdad0d13b9e08fa88c28df7": _V_2022_11,
}

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of the EDM code base
_MAX_SOURCE_CHARS = 2_000_000  # a source longer than this is not parsed for its syntax tree

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


# --------------------------------------------------------------------------------------------------------------
# Recognising the embedded source.

def _normalise(src: str) -> str:
    return src.replace("\r\n", "\n").replace("\r", "\n")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _syntax_fingerprint(src: str) -> str | None:
    """SHA-256 of a canonical dump of the module's syntax tree (comments and layout ignored); None if unparsable.

    The dump leaves out fields that are empty, None, or vary between Python versions without meaning (``ctx``,
    ``kind``, ``type_comment``, ``type_params``), so the same text gives the same fingerprint on 3.10-3.13.
    """
    if len(src) > _MAX_SOURCE_CHARS:
        return None
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, ast.AST):
            out.append("(" + type(node).__name__)
            for name, value in ast.iter_fields(node):
                if name in ("ctx", "kind", "type_comment", "type_params") or value is None or value == []:
                    continue
                out.append(f" {name}=")
                walk(value)
            out.append(")")
        elif isinstance(node, list):
            out.append("[")
            for item in node:
                walk(item)
                out.append(",")
            out.append("]")
        else:
            out.append(f"{type(node).__name__}:{node!r}")

    try:
        walk(tree)
    except RecursionError:
        return None
    return hashlib.sha256("".join(out).encode("utf-8", "surrogatepass")).hexdigest()


def recognise_source(src: Any) -> tuple[str, str, str] | None:
    """(version label, how it matched: 'text' | 'syntax tree', text SHA-256) of a known source, else None."""
    if not isinstance(src, str):
        return None
    text = _normalise(src)
    digest = _sha256(text)
    if digest in KNOWN_SOURCES:
        return KNOWN_SOURCES[digest], "text", digest
    tree = _syntax_fingerprint(text)
    if tree is not None and tree in KNOWN_SOURCE_TREES:
        return KNOWN_SOURCE_TREES[tree], "syntax tree", digest
    return None


# --------------------------------------------------------------------------------------------------------------
# Inert stand-ins for what the pickle builds.

class PersistentRecord:
    """A persistent object as pickled: its class name, its module's source (never run) and its state."""

    __slots__ = ("class_name", "module_src", "state", "version")

    def __init__(self, class_name: str, module_src: str, state: dict, version: int):
        self.class_name, self.module_src, self.state, self.version = class_name, module_src, state, version

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a persistent object's state is given twice")

    def __repr__(self) -> str:
        return f"<PersistentRecord {self.class_name}>"


class ModuleRecord:
    """A plain torch container module (``torch.nn.ModuleDict``) as pickled: its class name and its state."""

    __slots__ = ("class_name", "state")

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise pickle.UnpicklingError("ModuleDict is rebuilt with unexpected arguments")
        self = super().__new__(cls)
        self.class_name, self.state = "ModuleDict", None
        return self

    def __setstate__(self, state):
        if self.state is not None or not isinstance(state, dict):
            raise pickle.UnpicklingError("ModuleDict state is not a dict given once")
        self.state = state

    def __repr__(self) -> str:
        return f"<ModuleRecord {self.class_name}>"


class _EasyDict(dict):
    """dnnlib.util.EasyDict as plain data (a dict; no attribute access)."""

    def __setstate__(self, state):
        if state:
            raise pickle.UnpicklingError("EasyDict with instance state")


class _Storage:
    """A tensor storage read by torch's weights-only loader; only these may back rebuilt tensors."""

    __slots__ = ("typed",)

    def __init__(self, typed):
        self.typed = typed


def _reconstruct_persistent_obj(meta):
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: records `meta`, runs nothing."""
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError("persistent object metadata is not a dict")
    if meta.get("type") != "class":
        raise pickle.UnpicklingError(f"persistent object of type {meta.get('type')!r}, expected 'class'")
    src, name, state = meta.get("module_src"), meta.get("class_name"), meta.get("state")
    if not isinstance(src, str) or not isinstance(name, str) or not (state is None or isinstance(state, dict)):
        raise pickle.UnpicklingError("persistent object metadata lacks module_src, class_name or state")
    return PersistentRecord(name, src, state if state is not None else {}, meta.get("version"))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a CPU tensor viewing a weights-only-loaded storage."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor is not backed by a storage of this file")
    size, stride = tuple(size), tuple(stride)
    if not (_is_int(storage_offset) and storage_offset >= 0 and len(size) == len(stride)
            and all(_is_int(s) and s >= 0 for s in size) and all(_is_int(s) and s >= 0 for s in stride)):
        raise pickle.UnpicklingError(f"malformed tensor geometry (offset {storage_offset!r}, size {size!r}, "
                                     f"stride {stride!r})")
    if backward_hooks or metadata:
        raise pickle.UnpicklingError("a tensor carries hooks or metadata")
    typed = storage.typed
    available = typed._untyped_storage.nbytes() // torch.empty((), dtype=typed.dtype).element_size()
    if 0 not in size:
        needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if needed > available:
            raise pickle.UnpicklingError(f"a tensor of size {size} reaches past its storage ({available} items)")
    tensor = torch.empty((0,), dtype=typed.dtype)
    return tensor.set_(typed._untyped_storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): the parameter's data as a plain tensor."""
    if not isinstance(data, torch.Tensor) or backward_hooks or state:
        raise pickle.UnpicklingError("a parameter with hooks or extra state")
    return data


_NUMPY_CODE = re.compile(r"[biufc][0-9]{1,2}")


class _NumpyDType:
    """numpy.dtype of a plain number, as the pickle spells it ('f8', '<' ...)."""

    __slots__ = ("code", "order")

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or not _NUMPY_CODE.fullmatch(code):
            raise pickle.UnpicklingError(f"numpy dtype {code!r} is not a plain number type")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("malformed numpy dtype state")
        self.order = state[1]


def _numpy_scalar(dtype, data=None):
    """Stand-in for numpy's scalar reconstructor: a Python number (numeric dtypes only)."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of a non-numeric type")
    dt = np.dtype(dtype.code).newbyteorder(dtype.order if dtype.order != "|" else "=")
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError("numpy scalar of the wrong size")
    return np.frombuffer(data, dtype=dt)[0].item()


def _codecs_encode(text, encoding="utf-8"):
    """Stand-in for _codecs.encode, as protocol-2 pickles spell bytes: latin-1 text to bytes only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,   # numpy 1.x
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x
    ("numpy", "dtype"): _NumpyDType,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,  # protocols 2-3
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals above (and torch.storage._load_from_bytes); refuses the rest."""

    def __init__(self, file, where):
        super().__init__(file)
        self._where = where

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._load_storage
        target = _ALLOWED.get((module, name))
        if target is None:
            raise InputError(self._where, f"not a plain EDM network pickle; refusing to load: it references "
                                          f"{module}.{name}")
        return target

    def persistent_load(self, pid):
        raise InputError(self._where, "not a plain EDM network pickle; refusing to load: it uses persistent ids")

    def _load_storage(self, data):
        """A storage pickled as torch.save bytes, read by torch's weights-only (restricted) loader."""
        if not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("a storage is not given as bytes")
        try:
            typed = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure of the nested stream is a refusal
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(self._where, f"a tensor storage in it cannot be read by torch's weights-only loader; "
                                          f"refusing to load ({exc.__class__.__name__}: {first[:200]})") from None
        if not isinstance(typed, torch.storage.TypedStorage):
            raise InputError(self._where, f"a tensor storage in it holds a {type(typed).__name__}, not a storage; "
                                          "refusing to load")
        return _Storage(typed)


def read_edm_pickle(path: str | os.PathLike) -> Any:
    """The pickle's content with persistent objects as `PersistentRecord`s; nothing in it is executed."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(path, f"cannot open the network pickle ({exc.strerror or exc})") from None
    with f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt streams fail in many ways
            raise InputError(path, f"corrupt or truncated network pickle ({exc.__class__.__name__}: "
                                   f"{str(exc)[:200]})") from None


# --------------------------------------------------------------------------------------------------------------
# From records to sdmem's network.

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


def _literal(node: ast.AST):
    """The value of a default argument written as a literal (or float('inf') and the like)."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return float(node.args[0].value)
    return ast.literal_eval(node)


_NO_DEFAULT = object()
_UNREADABLE = object()


def _init_signature(src: str, class_name: str) -> list[tuple[str, Any]] | None:
    """[(name, default | _NO_DEFAULT | _UNREADABLE)] of class_name.__init__ in `src`, read with ast (not run)."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    a = item.args
                    params = [p.arg for p in a.posonlyargs + a.args][1:]  # without self
                    defaults = [_NO_DEFAULT] * (len(params) - len(a.defaults)) + list(a.defaults)
                    sig = []
                    for name, d in list(zip(params, defaults)) + [
                            (p.arg, d if d is not None else _NO_DEFAULT) for p, d in zip(a.kwonlyargs, a.kw_defaults)]:
                        if d is not _NO_DEFAULT:
                            try:
                                d = _literal(d)
                            except (ValueError, TypeError, SyntaxError, RecursionError):
                                d = _UNREADABLE
                        sig.append((name, d))
                    return sig
    return None


def _network_kwargs(model: PersistentRecord, where) -> dict:
    """SongUNet's constructor arguments: the pickled _init_args/_init_kwargs over the source's defaults."""
    sig = _init_signature(model.module_src, "SongUNet")
    if sig is None:
        raise InputError(where, "its network source defines no readable SongUNet.__init__ to take defaults from")
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
        value = given.get(name, default)
        if value is _NO_DEFAULT or value is _UNREADABLE:
            raise InputError(where, f"SongUNet's {name!r} is neither recorded nor a literal default in its source")
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


def load_edm_pickle(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(denoiser, info) from a published EDM network pickle, rebuilt as sdmem's own modules.

    The denoiser is an sdmem `VPPrecond` / `VEPrecond` / `EDMPrecond` around a `SongUNet`, in eval mode with
    gradients off, on `device`; it computes D(x; σ) as ``denoiser(x, sigma, class_labels)``. ``info`` holds
    ``class_name``, ``precond`` ('vp' | 've' | 'edm'), ``model_type``, ``arch`` ('ddpmpp' | 'ncsnpp' | None),
    ``img_resolution``, ``img_channels``, ``label_dim``, ``use_fp16``, ``sigma_min``, ``sigma_max``,
    ``network_kwargs`` (SongUNet's settings), ``precond_kwargs``, ``source_version`` (which published
    networks.py it embeds), ``source_match`` ('text' | 'syntax tree'), ``source_sha256`` and ``pickle_keys``.
    Every refusal (foreign globals, unknown source, unsupported network, tensors that do not fit) and every
    unreadable file is an `InputError` naming `path`.
    """
    data = read_edm_pickle(path)
    if isinstance(data, dict) and "ema" in data:
        root, keys = data["ema"], sorted(str(k) for k in data)
    elif isinstance(data, PersistentRecord):
        root, keys = data, []
    else:
        raise InputError(path, "not an EDM network pickle: expected a dict with an 'ema' network")
    if not isinstance(root, PersistentRecord):
        raise InputError(path, f"its 'ema' entry is a {type(root).__name__}, not a pickled EDM network")

    # 1. Every persistent object in the network must come from a published networks.py.
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
        src = record.module_src
        if src not in recognised:
            found = recognise_source(src)
            if found is None:
                raise InputError(path, f"its embedded network source (class {record.class_name}, SHA-256 "
                                       f"{_sha256(_normalise(src))[:16]}...) is not one of NVlabs' published "
                                       "versions of training/networks.py; refusing to load (it was not run)")
            recognised[src] = found
        if record.version != PERSISTENCE_VERSION:
            raise InputError(path, f"persistent object {record.class_name} has persistence version "
                                   f"{record.version!r}, expected {PERSISTENCE_VERSION}")
    if len({v for v, _, _ in recognised.values()}) != 1:
        raise InputError(path, "its modules embed different versions of networks.py")
    version, match, digest = recognised[root.module_src]

    # 2. Preconditioning and network type.
    kind = _PRECOND_KINDS.get(root.class_name)
    if kind is None:
        raise InputError(path, f"its network is a {root.class_name}; sdmem rebuilds only VPPrecond, VEPrecond "
                               "and EDMPrecond networks")
    children = dict(_children(root))
    model = children.get("model")
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

    # 3. Settings: the preconditioning's from its state, SongUNet's from its recorded arguments.
    st = root.state
    need = {"vp": ("beta_d", "beta_min", "M", "epsilon_t"), "ve": ("sigma_min", "sigma_max"),
            "edm": ("sigma_data", "sigma_min", "sigma_max")}[kind]
    missing = [k for k in ("img_resolution", "img_channels", "label_dim", *need) if k not in st]
    if missing:
        raise InputError(path, f"its {root.class_name} lacks {', '.join(missing)}")
    res, channels, label_dim = st["img_resolution"], st["img_channels"], st["label_dim"]
    use_fp16 = bool(st.get("use_fp16", False))
    precond_kwargs = {k: st[k] for k in need}
    net_kw = _network_kwargs(model, path)
    fixed = dict(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim)
    for key, value in fixed.items():
        if not _same(net_kw[key], value):
            raise InputError(path, f"SongUNet's {key} {net_kw[key]!r} differs from its {root.class_name}'s "
                                   f"{value!r}")
    options = {k: v for k, v in net_kw.items() if k not in _SONGUNET_FIXED}

    # 4. sdmem's modules: the network built on the meta device (no init), then the pickled tensors assigned.
    try:
        with torch.device("meta"):
            net = SongUNet(**fixed, **options)
        denoiser = PRECONDS[kind](res, channels, label_dim, model=net, use_fp16=use_fp16, **precond_kwargs)
    except InputError as exc:
        raise InputError(path, f"its network settings cannot be rebuilt in sdmem ({exc})") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"its network settings cannot be rebuilt in sdmem ({exc.__class__.__name__}: "
                               f"{exc})") from None
    tensors = _tensors(root, path)
    expected = denoiser.state_dict()
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
    denoiser.load_state_dict(converted, strict=True, assign=True)

    # 5. Scalar settings that tensor shapes do not reveal must agree too.
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

    info = dict(class_name=root.class_name, precond=kind, model_type=model.class_name, arch=_arch_name(net_kw),
                img_resolution=res, img_channels=channels, label_dim=label_dim, use_fp16=use_fp16,
                sigma_min=float(denoiser.sigma_min), sigma_max=float(denoiser.sigma_max),
                network_kwargs=options, precond_kwargs=precond_kwargs, source_version=version,
                source_match=match, source_sha256=digest, pickle_keys=keys)
    return denoiser.eval().requires_grad_(False).to(device), info
