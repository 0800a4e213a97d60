"""FID (the paper's Appendix E): Inception-v3 pool features, reference statistics, the Fréchet distance.

The features are the standard 2048-d pool3 features of the TensorFlow Inception-v3 used by every published FID
(EDM's included), computed by torch-fidelity's PyTorch port (``FeatureExtractorInceptionV3``, feature ``2048``:
uint8 images of any size, resized to 299 x 299 the way TF1 did). Its weights are one local file (nothing is
downloaded at run time): ``--weights FILE``, else ``$SDMEM_INCEPTION_WEIGHTS``, else
``<cache>/weights-inception-2015-12-05-6726825d.pth`` (see :func:`cache_root`). The file is loaded without
unpickling anything (safetensors, or ``torch.load(weights_only=True)``) and checked against the network's keys and
shapes before the network sees it.

Statistics are (mu [2048], sigma [2048, 2048]) in float64, accumulated in batches (memory does not grow with the
number of images). EDM's reference files (``np.savez(path, mu=mu, sigma=sigma)``, e.g. ``cifar10-32x32.npz``) are
read as they are; statistics of a reference image set are cached under ``<cache>/fid-ref/`` in the same format,
keyed by a sha256 over its pixels and shape and the weights' digest.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import sys
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, SdmemError

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME
FEATURE_DIM = 2048
STATS_VERSION = 1
TORCH_FIDELITY = "torch-fidelity==0.4.0"


def cache_root() -> Path:
    """sdmem's cache folder: ``$SDMEM_CACHE``, else ``$XDG_CACHE_HOME/sdmem``, else ``~/.cache/sdmem``."""
    if os.environ.get("SDMEM_CACHE"):
        return Path(os.environ["SDMEM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sdmem"


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
        from .utils import resolve_device

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
    from .utils import resolve_device

    path = resolve_weights(weights, option)
    state = check_state_dict(_read_state_dict(path), str(path))
    digest = state_digest(state)
    cls = _inception_module().FeatureExtractorInceptionV3
    # The constructor unpickles whatever it is given (torch.load with weights_only=False), so it gets our own
    # bytes of the state dict just checked, never the user's file.
    net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=_torch_save_bytes(state))
    dev = resolve_device(device)
    return Extractor(net.to(dev), dev, path, digest)


# Statistics.

@dataclass
class Stats:
    """Mean and covariance of the features of ``num`` images (num is None for a file that does not say)."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int | None = None
    source: str = ""


class _Moments:
    """Running mean and scatter matrix in float64, merged batch by batch (Chan et al.): numerically stable,
    memory independent of the number of images."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        m = len(x)
        if m == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        delta = mean_b - self.mean
        total = self.n + m
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def stats(self, source: str) -> Stats:
        sigma = self.scatter / (self.n - 1)
        return Stats(self.mean.copy(), (sigma + sigma.T) / 2, self.n, source)


def source_stats(source, extractor: Extractor, *, batch: int = 64, progress: bool = False) -> Stats:
    """Feature statistics of an ImageSource, streamed in batches."""
    n = len(source)
    if n < 2:
        raise InputError(source.name, f"holds {n} image(s); FID needs at least 2 (a covariance)")
    acc = _Moments(FEATURE_DIM)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"Inception features {source.name}", unit="img", leave=False)
    try:
        for start in range(0, n, batch):
            images = source.read_range(start, min(start + batch, n))
            acc.add(extractor.features(images))
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    return acc.stats(source.name)


def read_stats(path: str | os.PathLike, *, required: bool = True) -> Stats | None:
    """EDM's reference statistics (an .npz with ``mu`` [2048] and ``sigma`` [2048, 2048]); sdmem's cache files are
    the same format with extra keys. ``required=False``: None for an .npz with neither mu nor sigma (images)."""
    where = os.fspath(path)
    try:
        with np.load(where, allow_pickle=False) as z:
            keys = list(z.files)
            if "mu" not in keys and "sigma" not in keys and not required:
                return None  # not statistics (an .npz of images, say)
            if "mu" not in keys or "sigma" not in keys:
                missing = " and ".join(k for k in ("mu", "sigma") if k not in keys)
                raise InputError(where, f"not FID reference statistics: no {missing} array (keys: "
                                        f"{', '.join(keys) or 'none'}); expected mu [{FEATURE_DIM}] and sigma "
                                        f"[{FEATURE_DIM}, {FEATURE_DIM}] as EDM's fid.py writes them")
            mu, sigma = z["mu"], z["sigma"]
            num = int(z["num_images"]) if "num_images" in keys and z["num_images"].size == 1 else None
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(where, f"not a readable .npz of FID statistics ({exc.__class__.__name__}: {exc})") from None
    for name, arr, shape in (("mu", mu, (FEATURE_DIM,)), ("sigma", sigma, (FEATURE_DIM, FEATURE_DIM))):
        if arr.dtype.kind not in "fiu":
            raise InputError(where, f"{name} has dtype {arr.dtype}; expected floating point numbers")
        if arr.shape != shape:
            raise InputError(where, f"{name} has shape {list(arr.shape)}; expected {list(shape)} (Inception-v3 "
                                    "pool3 features)")
        if not np.all(np.isfinite(arr)):
            raise InputError(where, f"{name} holds non-finite values (NaN or inf)")
    return Stats(mu.astype(np.float64), sigma.astype(np.float64), num, where)


def write_stats(path: str | os.PathLike, stats: Stats, **meta) -> None:
    """Statistics in EDM's format (mu, sigma) plus ``num_images`` and any ``meta`` strings, written atomically."""
    from .utils import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
            np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.num or 0),
                     version=np.int64(STATS_VERSION), **{k: np.str_(v) for k, v in meta.items()})

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def pixels_key(source, extractor_digest: str, *, block: int = 1024) -> str:
    """sha256 over a source's shape, size and every pixel (streamed), and the weights' digest."""
    h = hashlib.sha256()
    h.update(f"sdmem-fid-ref v{STATS_VERSION}|{list(source.shape)}|{len(source)}|{extractor_digest}\n".encode())
    for start in range(0, len(source), block):
        h.update(np.ascontiguousarray(source.read_range(start, min(start + block, len(source)))).tobytes())
    return h.hexdigest()


def reference_stats(source, extractor: Extractor, *, batch: int = 64, progress: bool = False,
                    cache: bool = True) -> tuple[Stats, Path | None]:
    """Statistics of a reference (training) image set, cached under ``<cache>/fid-ref/``: (stats, cache file)."""
    if not cache:
        return source_stats(source, extractor, batch=batch, progress=progress), None
    path = cache_root() / "fid-ref" / f"{pixels_key(source, extractor.digest)[:32]}.npz"
    if path.is_file():
        try:
            cached = read_stats(path)
            if cached.num == len(source):
                cached.source = source.name
                return cached, path
        except InputError:
            pass  # a damaged cache file is recomputed and replaced
    stats = source_stats(source, extractor, batch=batch, progress=progress)
    try:
        write_stats(path, stats, source=source.name, weights_digest=extractor.digest)
    except OSError as exc:  # an unwritable cache is not the user's input problem: computed, just not kept
        print(f"sdmem: warning: FID statistics not cached in {path.parent} ({exc.strerror or exc})", file=sys.stderr)
        return stats, None
    return stats, path


# The distance.

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for covariance matrices S1, S2 (float64).

    Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2: no complex intermediate, no eps offset, and
    singular covariances (fewer images than dimensions) are handled exactly. The eigendecompositions run in torch
    on one thread: about 1.3 s at 2048 dimensions, where two threads on a busy 2-core machine took 20 s and more
    (and numpy's OpenBLAS pool, competing with torch's right after Inception had run, was as slow).
    """
    import torch

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    a, b = torch.from_numpy(s1), torch.from_numpy(s2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, v = torch.linalg.eigh((a + a.T) / 2)
        root = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
        m = root @ b @ root
        eig = torch.linalg.eigvalsh((m + m.T) / 2)
    finally:
        torch.set_num_threads(threads)
    tr_covmean = float(eig.clamp(min=0).sqrt().sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)  # a squared distance: only rounding can take it below 0


# The command.

@dataclass
class FidResult:
    fid: float
    num_generated: int
    num_reference: int | None
    generated: str
    reference: str
    reference_stats: str | None  # the statistics file read or written (None: not cached)
    weights: str
    weights_digest: str
    device: str

    def one_line(self) -> str:
        ref = f"{self.num_reference} reference images" if self.num_reference else "the reference statistics"
        return f"FID {self.fid:.2f} ({self.num_generated} generated vs {ref})"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def open_reference(ref, *, resolution: int | None = None):
    """``--ref``: an ImageSource, a Stats (a statistics .npz: one holding mu and sigma), or an ImageSource given."""
    from .data import ImageSource, open_source

    if isinstance(ref, (ImageSource, Stats)):
        return ref
    name = os.fspath(ref)
    if name.lower().endswith(".npz") and os.path.isfile(name):
        stats = read_stats(name, required=False)
        if stats is not None:
            return stats
    return open_source(name, resolution=resolution)


def compute_fid(generated, ref, *, weights=None, extractor: Extractor | None = None, device: str = "auto",
                batch: int = 64, resolution: int | None = None, progress: bool = False, cache: bool = True,
                option: str = "--weights") -> FidResult:
    """FID of ``generated`` (SRC or ImageSource) against ``ref`` (SRC, ImageSource, or a statistics .npz)."""
    from .data import ImageSource, open_source

    # The cheap checks first (statistics files, image headers), then the weights, then the work.
    reference = open_reference(ref, resolution=resolution)
    gen = generated if isinstance(generated, ImageSource) else open_source(generated, resolution=resolution)
    if len(gen) < 2:
        raise InputError(gen.name, f"holds {len(gen)} image(s); FID needs at least 2 (a covariance)")
    if extractor is None:
        extractor = load_extractor(weights, device=device, option=option)
    if isinstance(reference, Stats):
        ref_stats, ref_file = reference, reference.source
    else:
        ref_stats, path = reference_stats(reference, extractor, batch=batch, progress=progress, cache=cache)
        ref_file = str(path) if path is not None else None
    gen_stats = source_stats(gen, extractor, batch=batch, progress=progress)
    value = frechet_distance(gen_stats.mu, gen_stats.sigma, ref_stats.mu, ref_stats.sigma)
    return FidResult(fid=value, num_generated=gen_stats.num, num_reference=ref_stats.num, generated=gen.name,
                     reference=reference.name if isinstance(reference, ImageSource) else reference.source,
                     reference_stats=ref_file, weights=str(extractor.weights), weights_digest=extractor.digest,
                     device=extractor.device)
