"""FID's Inception-v3: where its weights file is, loading torch-fidelity's module without its package
``__init__``, reading the weights without unpickling anything, checking them key by key, and the extractor."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache_dir import cache_root
from ..errors import InputError, SdmemError

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME
FEATURE_DIM = 2048
TORCH_FIDELITY = "torch-fidelity==0.4.0"


def default_weights_path() -> Path:
    """Where the Inception weights are looked for without ``--weights``."""
    env = os.environ.get("SDMEM_INCEPTION_WEIGHTS")
    return Path(env).expanduser() if env else cache_root() / WEIGHTS_NAME


def weights_available(weights: str | os.PathLike | None = None) -> bool:
    """True when the weights file (given, or at the default location) exists (it is not checked here)."""
    return Path(weights if weights is not None else default_weights_path()).is_file()


# The network: torch-fidelity's Inception-v3 module, without its package __init__.

def _inception_module():
    """torch_fidelity.feature_extractor_inceptionv3.

    torch-fidelity's package ``__init__`` imports its CLIP, VGG and DINOv2 extractors, which import torchvision;
    torchvision cannot be installed beside torch 2.13 (CPU) here, and sdmem needs only the Inception module, which
    itself needs torch and three small torch-fidelity modules. So when ``import torch_fidelity`` fails, a bare
    package module pointing at the installed folder stands in for it, and the submodule is imported through it.
    """
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 (torchvision missing or broken: ImportError, RuntimeError, ...)
        pass
    spec = importlib.util.find_spec("torch_fidelity") if "torch_fidelity" not in sys.modules else \
        getattr(sys.modules["torch_fidelity"], "__spec__", None)
    if spec is None or not spec.submodule_search_locations:
        raise SdmemError(f"FID needs {TORCH_FIDELITY} (its Inception-v3 module); install it with "
                         f"`pip install --no-deps {TORCH_FIDELITY}` (scripts/setup.sh does)")
    for key in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
        del sys.modules[key]  # half-imported leftovers of the failed import
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = "torch_fidelity"
    pkg.__spec__ = spec
    sys.modules["torch_fidelity"] = pkg
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        sys.modules.pop("torch_fidelity", None)
        raise SdmemError(f"cannot load torch-fidelity's Inception-v3 module ({exc.__class__.__name__}: {exc}); "
                         f"reinstall it with `pip install --no-deps {TORCH_FIDELITY}`") from None


def _torch_save_bytes(obj) -> io.BytesIO:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _skeleton_class():
    cls = _inception_module().FeatureExtractorInceptionV3

    class _Skeleton(cls):  # the constructor's weight loading made a no-op: the layers only, on the meta device
        def load_state_dict(self, *args, **kwargs):
            return None

    return _Skeleton


_EXPECTED: dict[str, tuple[int, ...]] | None = None


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The network's state-dict keys and shapes (built on the meta device: no memory, no weights)."""
    global _EXPECTED
    if _EXPECTED is None:
        import torch

        with torch.device("meta"):
            net = _skeleton_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=_torch_save_bytes({}))
        _EXPECTED = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return _EXPECTED


def _optional(key: str) -> bool:
    # BatchNorm's counter: not a weight, and absent from state dicts saved without it (filled in with 0).
    return key.endswith("num_batches_tracked")


def _read_state_dict(path: Path) -> dict:
    """A state dict from a .safetensors file or a torch file, never unpickling anything but tensors."""
    import torch

    where = str(path)
    if not path.is_file():
        raise InputError(where, "no such file" if not path.exists() else "is not a file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(where, f"not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (UnpicklingError for anything but tensors, zip and EOF errors, ...)
        why = " ".join(str(exc).split())
        if len(why) > 300:
            why = why[:300] + " ..."
        raise InputError(where, f"not loadable as plain tensors (torch.load with weights_only=True refused it: "
                                f"{exc.__class__.__name__}: {why}); sdmem never unpickles other objects") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise InputError(where, f"is not Inception-v3 FID weights: expected a state dict of tensors, got "
                                f"{type(obj).__name__}")
    return obj


def check_state_dict(state: dict, where: str) -> dict:
    """The state dict if it is exactly the network's (keys and shapes), else an InputError naming ``where``."""
    import torch

    expected = expected_shapes()
    missing = [k for k in expected if k not in state and not _optional(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} tensors of the wrong shape, e.g. {k} is {list(state[k].shape)}, expected "
                        f"{list(expected[k])}")
    if problems:
        raise InputError(where, f"is not Inception-v3 FID weights ({WEIGHTS_NAME}): " + "; ".join(problems))
    bad = [k for k in expected if k in state and not _optional(k)
           and (not state[k].is_floating_point() or not bool(torch.isfinite(state[k]).all()))]
    if bad:
        raise InputError(where, f"is not usable Inception-v3 weights: {bad[0]} is not finite floating point")
    out = {}
    for k in expected:
        out[k] = state[k] if k in state else torch.zeros((), dtype=torch.long)
    return out


def state_digest(state: dict) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes (the same weights in .pth or .safetensors agree)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_weights(weights: str | os.PathLike | None, option: str = "--weights") -> Path:
    """The weights file to use; a missing one is an InputError saying where to put it."""
    path = Path(weights).expanduser() if weights is not None else default_weights_path()
    if path.is_file():
        return path
    if weights is not None:
        raise InputError(path, "no such file" if not path.exists() else "is not a file")
    raise InputError(path, f"Inception-v3 weights for FID not found (nothing is downloaded here): fetch "
                           f"{WEIGHTS_URL} and put it there, set SDMEM_INCEPTION_WEIGHTS=FILE, or pass {option} FILE")


@dataclass
class Extractor:
    """Inception-v3 pool3 features of uint8 images; ``calls`` counts batches run (for tests and progress)."""

    net: object
    device: str
    weights: Path
    digest: str
    calls: int = field(default=0)

    def to(self, device: str) -> "Extractor":
        from ..utils import resolve_device

        self.device = resolve_device(device)
        self.net = self.net.to(self.device)
        return self

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> float64 [n, 2048]."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.inference_mode():
            (feat,) = self.net(x)
        self.calls += 1
        return feat.double().cpu().numpy()


def load_extractor(weights: str | os.PathLike | None = None, *, device: str = "auto",
                   option: str = "--weights") -> Extractor:
    """The Inception-v3 feature extractor with checked local weights (see the module docstring)."""
    from ..utils import resolve_device

    path = resolve_weights(weights, option)
    state = check_state_dict(_read_state_dict(path), str(path))
    digest = state_digest(state)
    cls = _inception_module().FeatureExtractorInceptionV3
    # The constructor unpickles whatever it is given (torch.load with weights_only=False), so it gets our own
    # bytes of the state dict just checked, never the user's file.
    net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=_torch_save_bytes(state))
    dev = resolve_device(device)
    return Extractor(net.to(dev), dev, path, digest)


