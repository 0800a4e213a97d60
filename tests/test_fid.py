"""FID (Appendix E): the Fréchet distance against scipy, EDM's statistics files, the Inception feature pipeline on a
randomly initialised network of the right shape, the reference cache, and the refusals of bad weights files."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from helpers import random_state_dict
from sdmem import fid
from sdmem.data import ArraySource
from sdmem.errors import InputError


# One torch thread: on a shared 2-core machine two threads of Inception ran 4-5x slower than one.
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no weights from the environment."""
    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDMEM_INCEPTION_WEIGHTS", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random state dict saved as .safetensors (read through the same checks as the real file)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "inception-random.safetensors"
    save_file(random_state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def extractor(weights):
    return fid.load_extractor(weights, device="cpu")


def images(seed: int, n: int = 6, size: int = 16) -> np.ndarray:
    """Smooth random colour images (blurred noise), uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, size // 4, size // 4, 3)).astype(np.float64)
    return np.clip(small.repeat(4, 1).repeat(4, 2), 0, 255).astype(np.uint8)


def save_images(path, arr) -> str:
    np.savez(path, images=arr)
    return str(path)


# The distance.

def scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("dim,n", [(4, 40), (16, 100), (64, 300)])
def test_frechet_distance_agrees_with_scipy_sqrtm_on_known_features(dim, n):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.3, 1.5, size=(n, dim)) @ rng.normal(size=(dim, dim))
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    assert ours == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_of_diagonal_covariances_has_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    d1, d2 = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_singular_covariances_is_finite_and_zero_on_itself():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 64))  # fewer samples than dimensions, as with a few images in 2048-d
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9 * np.trace(s))
    value = fid.frechet_distance(mu, s, mu + 1, s)
    assert value == pytest.approx(64, rel=1e-6)  # only the means differ


def test_streamed_moments_equal_numpy_mean_and_covariance():
    rng = np.random.default_rng(3)
    x = rng.normal(5, 2, size=(23, 7))
    acc = fid._Moments(7)
    for start in range(0, 23, 5):
        acc.add(x[start:start + 5])
    stats = acc.stats("x")
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


# Statistics files (EDM's format).

def test_edm_reference_statistics_are_read(tmp_path):
    rng = np.random.default_rng(4)
    mu = rng.normal(size=2048)
    a = rng.normal(size=(2048, 8))
    sigma = a @ a.T
    path = tmp_path / "cifar10-32x32.npz"
    np.savez(path, mu=mu, sigma=sigma)  # what EDM's fid.py writes
    stats = fid.read_stats(path)
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, sigma)
    assert stats.num is None
    assert isinstance(fid.open_reference(path), fid.Stats)


@pytest.mark.parametrize("arrays,words", [
    ({"mu": np.zeros(2048)}, ["no sigma"]),
    ({"mu": np.zeros(2048), "sigma": np.eye(1024)}, ["sigma", "shape", "[1024, 1024]"]),
    ({"mu": np.zeros(1000), "sigma": np.eye(2048)}, ["mu", "shape"]),
    ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, ["mu", "non-finite"]),
    ({"mu": np.zeros(2048), "sigma": np.where(np.eye(2048) > 0, np.inf, 0)}, ["sigma", "non-finite"]),
])
def test_bad_statistics_files_are_refused_in_one_line_naming_the_file(tmp_path, cli, arrays, words):
    bad = tmp_path / "ref.npz"
    np.savez(bad, **arrays)
    gen = save_images(tmp_path / "gen.npz", images(0))
    r = cli("fid", "--generated", gen, "--ref", bad, "--out", tmp_path / "fid.json", "--quiet")
    r.one_line_error(str(bad), *words)
    assert not (tmp_path / "fid.json").exists()


def test_an_npz_of_images_is_a_reference_image_set(tmp_path):
    path = save_images(tmp_path / "train.npz", images(0))
    ref = fid.open_reference(path)
    assert not isinstance(ref, fid.Stats) and len(ref) == 6


# The feature pipeline, on a random network of the right shape.

def test_features_are_2048_dimensional_and_batches_agree(extractor):
    x = images(0)
    f = extractor.features(x)
    assert f.shape == (6, 2048) and f.dtype == np.float64 and np.all(np.isfinite(f))
    assert f.std(axis=0).max() > 0  # the images are told apart
    split = np.concatenate([extractor.features(x[:2]), extractor.features(x[2:])])
    np.testing.assert_allclose(split, f, rtol=1e-4, atol=1e-5 * np.abs(f).max())


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shifted_set_is_not(extractor, tmp_path):
    x = images(1)
    same = fid.compute_fid(ArraySource("a", x), ArraySource("b", x.copy()), extractor=extractor, cache=False)
    shifted = np.clip(x.astype(int) + 80, 0, 255).astype(np.uint8)
    other = fid.compute_fid(ArraySource("s", shifted), ArraySource("b", x), extractor=extractor, cache=False)
    assert same.fid == pytest.approx(0, abs=1e-6 * max(other.fid, 1e-12))
    assert other.fid > 0 and other.num_generated == 6 and other.num_reference == 6
    # batch independence (not bitwise: other batch shapes may take other kernels)
    batched = fid.compute_fid(ArraySource("s", shifted), ArraySource("b", x), extractor=extractor, cache=False,
                              batch=4)
    assert batched.fid == pytest.approx(other.fid, rel=1e-3)


def test_reference_statistics_are_cached_per_training_set(extractor, tmp_path, private_cache):
    train = save_images(tmp_path / "train.npz", images(2))
    gen = ArraySource("gen", images(3))
    before = extractor.calls
    first = fid.compute_fid(gen, train, extractor=extractor, batch=4)
    calls_first = extractor.calls - before
    assert calls_first == 4  # two batches of reference images, two of generated ones
    cached = list((private_cache / "fid-ref").glob("*.npz"))
    assert len(cached) == 1 and first.reference_stats == str(cached[0])
    stats = fid.read_stats(cached[0])  # EDM's format: mu and sigma (plus the number of images)
    assert stats.num == 6
    before = extractor.calls
    second = fid.compute_fid(gen, train, extractor=extractor, batch=4)
    assert extractor.calls - before == 2  # only the generated images: the reference came from the cache
    assert second.fid == pytest.approx(first.fid, rel=1e-12)
    # the cache file works as a --ref statistics file, and another training set gets its own entry
    via_file = fid.compute_fid(gen, cached[0], extractor=extractor, batch=4)
    assert via_file.fid == pytest.approx(first.fid, rel=1e-12)
    fid.compute_fid(gen, save_images(tmp_path / "train2.npz", images(4)), extractor=extractor, batch=4)
    assert len(list((private_cache / "fid-ref").glob("*.npz"))) == 2


# The command and its refusals.

def test_sdmem_fid_prints_one_line_and_writes_json(weights, tmp_path, cli):
    gen = save_images(tmp_path / "gen.npz", images(5))
    ref = save_images(tmp_path / "ref.npz", images(6))
    r = cli("fid", "--generated", gen, "--ref", ref, "--weights", weights, "--out", tmp_path / "fid.json",
            "--quiet", "--device", "cpu")
    assert r.code == 0, r.err
    assert r.out.startswith("FID ") and "(6 generated vs 6 reference images)" in r.out
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["fid"] > 0 and result["num_generated"] == 6 and result["weights"] == str(weights)


def _broken(weights_path, tmp_path, change) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights_path))
    change(state)
    path = tmp_path / "not-inception.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("change,words", [
    (lambda s: s.__setitem__("Mixed_9z.conv.weight", s.pop("Mixed_7c.branch_pool.conv.weight")),
     ["is not Inception-v3 FID weights", "missing 1 keys", "Mixed_7c.branch_pool.conv.weight", "unexpected"]),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(10, 2048)), ["wrong shape", "fc.weight", "[10, 2048]"]),
])
def test_weights_of_another_network_are_refused_and_nothing_is_written(weights, tmp_path, cli, private_cache,
                                                                        change, words):
    bad = _broken(weights, tmp_path, change)
    gen = save_images(tmp_path / "gen.npz", images(0))
    r = cli("fid", "--generated", gen, "--ref", gen, "--weights", bad, "--out", tmp_path / "fid.json", "--quiet")
    r.one_line_error(str(bad), *words)
    assert not (tmp_path / "fid.json").exists() and not private_cache.exists()


def test_missing_weights_name_the_default_path_and_the_download(tmp_path, cli, private_cache):
    gen = save_images(tmp_path / "gen.npz", images(0))
    r = cli("fid", "--generated", gen, "--ref", gen, "--quiet")
    r.one_line_error(str(private_cache / fid.WEIGHTS_NAME), fid.WEIGHTS_URL, "--weights")
    r = cli("audit", "--train", gen, "--generated", gen, "--fid", "--out", tmp_path / "audit", "--quiet")
    r.one_line_error(str(private_cache / fid.WEIGHTS_NAME), "--fid-weights")
    assert not (tmp_path / "audit").exists()


def test_a_plain_state_dict_saved_with_torch_save_loads(weights, tmp_path, extractor):
    from safetensors.torch import load_file

    path = tmp_path / fid.WEIGHTS_NAME
    torch.save(load_file(str(weights)), path)
    ext = fid.load_extractor(path, device="cpu")
    assert ext.digest == extractor.digest  # the same weights whatever the file format
    x = images(7, n=2)
    np.testing.assert_allclose(ext.features(x), extractor.features(x), rtol=1e-6, atol=1e-7)


class _Planted:
    """Unpickling this creates a marker file (what a malicious checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_in_it_is_refused_without_running_it(tmp_path, cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": _Planted(marker)}, evil)
    gen = save_images(tmp_path / "gen.npz", images(0))
    r = cli("fid", "--generated", gen, "--ref", gen, "--weights", evil, "--quiet")
    r.one_line_error(str(evil), "weights_only")
    assert not marker.exists()
    with pytest.raises(InputError):
        fid.load_extractor(evil, device="cpu")
    assert not marker.exists()


def test_audit_with_fid_adds_it_to_the_summary(weights, tmp_path, cli):
    train = save_images(tmp_path / "train.npz", images(8))
    gen = save_images(tmp_path / "gen.npz", images(9))
    r = cli("audit", "--train", train, "--generated", gen, "--fid", "--fid-weights", weights, "--out",
            tmp_path / "audit", "--quiet", "--device", "cpu")
    assert r.code == 0, r.err
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["fid"] > 0 and ", FID " in r.out
    r = cli("audit", "--train", train, "--generated", gen, "--out", tmp_path / "plain", "--quiet")
    assert "fid" not in json.loads((tmp_path / "plain" / "summary.json").read_text()) and "FID" not in r.out
    r = cli("audit", "--train", train, "--generated", gen, "--fid-weights", weights, "--quiet")
    r.one_line_error("--fid-weights", "only with --fid")


def test_a_sweep_fills_the_fid_column_when_the_weights_are_in_place(weights, tmp_path, monkeypatch, private_cache):
    import csv

    from sdmem.study.sweep import RESULT_COLUMNS, load_spec, run_sweep
    from helpers import write_spec  # the sweep tests' tiny EDM spec

    path = write_spec(tmp_path, axes={"seed": [3]}, zip=[], generate={"num": 4, "steps": 3, "batch": 4},
                      report="final", overrides={"data.size": 16, "train.epochs": 4, "train.warmup_epochs": 1,
                                                 "train.checkpoint_epochs": 4, "track.num_images": 0})
    monkeypatch.setenv("SDMEM_INCEPTION_WEIGHTS", str(weights))
    assert "fid" in RESULT_COLUMNS
    run_sweep(load_spec(path), progress=False, log=lambda *_: None)
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    summary = json.loads((tmp_path / "sweep" / "seed-3" / "audit" / "summary.json").read_text())
    assert float(row["fid"]) == pytest.approx(summary["fid"]) and summary["fid"] > 0
    assert len(list((private_cache / "fid-ref").glob("*.npz"))) == 1  # the run's training set, cached


def test_a_report_best_point_gets_the_fid_of_its_best_snapshots_images(weights, tmp_path, monkeypatch, private_cache):
    import csv

    from sdmem.fid import compute_fid
    from sdmem.study.sweep import load_spec, run_sweep
    from helpers import write_spec

    path = write_spec(tmp_path, axes={"seed": [3]}, zip=[], generate={"num": 4}, report="best",
                      overrides={"data.size": 16, "train.epochs": 8, "train.warmup_epochs": 1,
                                 "train.checkpoint_epochs": 4, "track.batch": 4, "track.steps": 3})
    monkeypatch.setenv("SDMEM_INCEPTION_WEIGHTS", str(weights))
    run_sweep(load_spec(path), progress=False, log=lambda *_: None)
    point = tmp_path / "sweep" / "seed-3"
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    best = json.loads((point / "run" / "best.json").read_text())
    # The FID is that of the tracked images of the best snapshot (kept by tracking, not generated again).
    tracked = point / "run" / "tracking" / f"epoch-{best['epoch']:07d}" / "generated"
    manifest = json.loads((tracked / "manifest.json").read_text())
    assert int(row["epoch"]) == best["epoch"] and manifest["settings"]["snapshot"] == f"epoch {best['epoch']}"
    assert sorted(p.name for p in tracked.glob("*.png")) == [f"{s:06d}.png" for s in range(4)]
    assert not (point / "generated").exists()
    expected = compute_fid(tracked, point / "run", weights=weights).fid
    assert float(row["fid"]) == pytest.approx(expected) and expected > 0
