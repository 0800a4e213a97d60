"""Reading network pickles of NVlabs' code bases without running anything they carry.

Plain `pickle.load` calls whatever global a file names, so a pickle can run any code. The unpickler here
resolves only a fixed allow-list of globals, each to an inert stand-in of sdmem's own; any other global
(``os.system``, ``builtins.eval``, ...) and any persistent id is refused with an `InputError`.

What the allow-list admits, and what becomes of it:

* ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` (NVlabs' persistent classes, as in EDM and
  StyleGAN2-ADA): a `PersistentRecord` holding the class name, the module source (a string, never executed),
  the object's state and the persistence version;
* ``torch.nn.ModuleDict``: a `ModuleRecord` holding its state;
* ``collections.OrderedDict``, ``set``/``frozenset``, ``dnnlib.util.EasyDict`` (a plain dict here) and
  ``_codecs.encode`` (latin-1 text to bytes only, as protocol 2 writes bytes);
* torch tensors and parameters: a plain CPU tensor over a storage of the same file, whose bytes (a
  ``torch.save`` stream) are read by ``torch.load(weights_only=True)``; its geometry must fit the storage;
* numpy scalars of a plain number type (either numpy's spelling): a Python number.

API: `read_pickle(path)` reads a file; `load_pickle(file, where)` reads an open binary file; both raise only
`InputError` (naming `where`) for refusals and for unreadable, corrupt or truncated files.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import InputError

__all__ = ["ModuleRecord", "PersistentRecord", "load_pickle", "read_pickle"]


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


# --------------------------------------------------------------------------------------------------------------
# Tensors, numpy scalars, bytes.

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


# --------------------------------------------------------------------------------------------------------------
# The unpickler.

class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals above (and torch.storage._load_from_bytes); refuses the rest."""

    def __init__(self, file, where, what):
        super().__init__(file)
        self._where, self._what = where, what

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._load_storage
        target = _ALLOWED.get((module, name))
        if target is None:
            raise InputError(self._where, f"not a plain {self._what}; refusing to load: it references "
                                          f"{module}.{name}")
        return target

    def persistent_load(self, pid):
        raise InputError(self._where, f"not a plain {self._what}; refusing to load: it uses persistent ids")

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


def load_pickle(file: BinaryIO, where: str | os.PathLike, what: str = "pickle") -> Any:
    """The content of the pickle stream `file`, read by the restricted unpickler; nothing in it is executed.

    Persistent objects come back as `PersistentRecord`s, ``ModuleDict``s as `ModuleRecord`s, tensors as plain
    CPU tensors. Refusals and corrupt or truncated streams raise `InputError(where, ...)`; `what` names the
    kind of file in those messages ("not a plain {what}; refusing to load: ...").
    """
    try:
        return _RestrictedUnpickler(file, where, what).load()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt streams fail in many ways
        raise InputError(where, f"corrupt or truncated {what} ({exc.__class__.__name__}: "
                                f"{str(exc)[:200]})") from None


def read_pickle(path: str | os.PathLike, what: str = "pickle") -> Any:
    """`load_pickle` of the file at `path` (an unopenable file is an `InputError` too)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(path, f"cannot open the {what} ({exc.strerror or exc})") from None
    with f:
        return load_pickle(f, path, what)
