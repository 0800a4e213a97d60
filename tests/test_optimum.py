"""EDM sampler pieces and the closed-form optimal denoiser (paper Eq. 2 / 32 / 61) against brute force."""

import json
import math

import numpy as np
import pytest
import torch

from sdmem.data.base import ArraySource
from sdmem.edm.optimum import OptimalDenoiser, sample_optimum
from sdmem.edm.sampler import (edm_sigma_steps, from_uint8, heun_sampler, seeded_class_labels, seeded_latents,
                               to_uint8)
from sdmem.errors import InputError


def rand_images(n, res=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def reference(x, train_u8, sigma, labels=None, class_labels=None):
    """Eq. 32 (Eq. 61 with labels) in float64 from direct differences: [B, D]."""
    xs = from_uint8(train_u8).reshape(len(train_u8), -1).double()
    q = x.reshape(x.shape[0], -1).double()
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(q.shape[0], 1)
    logits = -((q[:, None, :] - xs[None]) ** 2).sum(-1) / (2 * sig**2)
    if labels is not None:
        mask = torch.as_tensor(labels)[None, :] != torch.as_tensor(class_labels)[:, None]
        logits = logits.masked_fill(mask, -math.inf)
    return torch.softmax(logits, 1) @ xs


def test_sigma_steps_formula():
    for n in (18, 5, 2):
        t = edm_sigma_steps(n)
        assert t.dtype == torch.float64 and len(t) == n + 1 and t[-1] == 0
        want = [(80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)]
        assert torch.allclose(t[:-1], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
        assert t[0] == pytest.approx(80) and t[-2] == pytest.approx(0.002) and bool((t[:-1] > t[1:]).all())
    assert torch.allclose(edm_sigma_steps(4, 0.01, 10, 3)[:-1], torch.tensor(
        [(10 ** (1 / 3) + i / 3 * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3 for i in range(4)], dtype=torch.float64))


def test_latents_and_labels_depend_only_on_their_seed():
    a = seeded_latents([3, 7, 11], (3, 8, 8))
    b = seeded_latents([11, 5, 3, 9], (3, 8, 8), dtype=torch.float64)
    assert a.shape == (3, 3, 8, 8) and a.dtype == torch.float32 and b.dtype == torch.float64
    assert torch.equal(a[0], b[2].float()) and torch.equal(a[2], b[0].float())
    assert torch.equal(a[1], seeded_latents([7], (3, 8, 8))[0])
    assert torch.equal(a[1], torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a[0], a[1])
    la, lb = seeded_class_labels(range(1000), 10), seeded_class_labels([999, 0, 500], 10)
    assert la.dtype == torch.int64 and int(la.min()) >= 0 and int(la.max()) <= 9
    assert lb.tolist() == [la[999].item(), la[0].item(), la[500].item()]
    assert np.bincount(la.numpy(), minlength=10).min() > 60  # roughly uniform


def test_uint8_round_trip_and_edm_rule():
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, axis=3)
    x = from_uint8(u)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and float(x.min()) == -1 and float(x.max()) == 1
    assert np.array_equal(to_uint8(x), u)
    y = torch.tensor([-2.0, -1.0, 0.0, 1 / 255, 1.0, 3.0]).reshape(1, 1, 2, 3).expand(1, 3, 2, 3)
    assert to_uint8(y)[0, :, :, 0].ravel().tolist() == [0, 0, 128, 128, 255, 255]


def test_heun_on_gaussian_converges_to_the_flow_map():
    s, smin, smax = 0.5, 0.002, 80.0
    mu = torch.linspace(-0.8, 0.8, 48, dtype=torch.float64).reshape(3, 4, 4)
    calls = []

    def gaussian_denoiser(x, sigma, class_labels=None):
        # Data N(mu, s² I): D(x; σ) = (s² x + σ² mu) / (s² + σ²).
        calls.append(1)
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (s**2 * x + sig**2 * mu) / (s**2 + sig**2)

    z = seeded_latents(range(6), (3, 4, 4))
    # PF-ODE dx/dσ = σ (x − mu) / (s² + σ²): x − mu scales as sqrt(s² + σ²); then the last Euler step to 0.
    x_min = mu + (smax * z.double() - mu) * math.sqrt(s**2 + smin**2) / math.sqrt(s**2 + smax**2)
    want = gaussian_denoiser(x_min, smin)
    errors = []
    for steps in (16, 32, 64, 128):
        calls.clear()
        out = heun_sampler(gaussian_denoiser, z, num_steps=steps)
        assert out.dtype == torch.float32 and out.shape == z.shape and len(calls) == 2 * steps - 1
        errors.append(float((out.double() - want).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.0 < r < 5.5 for r in ratios), (errors, ratios)  # 2nd order: ~4x per doubling
    assert errors[-1] < 2e-3
    calls.clear()
    heun_sampler(gaussian_denoiser, z)
    assert len(calls) == 35


@pytest.mark.parametrize("block_size", [5, 16, None])
def test_optimum_matches_float64_softmax(block_size):
    train = rand_images(37)
    xs = from_uint8(train)
    den = OptimalDenoiser(train, block_size=block_size)
    gen = torch.Generator().manual_seed(1)
    for sigma in (0.002, 0.03, 0.3, 1.5, 5.0, 80.0):
        x = xs[torch.randint(0, 37, (9,), generator=gen)] + sigma * torch.randn(9, 3, 4, 4, generator=gen)
        out = den(x.double(), sigma)
        assert out.dtype == torch.float32 and out.shape == x.shape
        err = float((out.reshape(9, -1).double() - reference(x, train, sigma)).abs().max())
        assert err < 2e-6, (sigma, err)
    sig = torch.tensor([0.002, 0.1, 0.7, 3.0, 80.0])  # one σ per row
    x = xs[:5] + sig.reshape(-1, 1, 1, 1) * torch.randn(5, 3, 4, 4, generator=gen)
    assert float((den(x, sig).reshape(5, -1).double() - reference(x, train, sig)).abs().max()) < 2e-6


def test_near_duplicates_3072_dims_are_weighed_exactly():
    # Pairs of training images 1-3 uint8 levels apart in 1-3 pixels: fp32 GEMM distances alone mis-weigh them.
    rng = np.random.default_rng(1)
    train = rand_images(64, res=32, seed=2)
    for i in range(0, 64, 2):
        train[i + 1] = train[i]
        for _ in range(rng.integers(1, 4)):
            h, w, c = rng.integers(0, 32, 2).tolist() + [int(rng.integers(0, 3))]
            train[i + 1, h, w, c] = np.clip(int(train[i, h, w, c]) + rng.choice([-3, -2, -1, 1, 2, 3]), 0, 255)
    xs = from_uint8(train)
    den = OptimalDenoiser(train, block_size=24)
    for sigma in (0.002, 0.005, 0.02, 0.3):
        x = xs[torch.as_tensor(rng.integers(0, 64, 16))] + sigma * torch.randn(16, 3, 32, 32)
        err = float((den(x, sigma).reshape(16, -1).double() - reference(x, train, sigma)).abs().max())
        assert err < 3e-7, (sigma, err)  # a few fp32 ulps of [-1, 1]


def test_small_sigma_gives_exactly_the_nearest_training_image():
    train = rand_images(300, res=32, seed=3)
    data = from_uint8(train).reshape(300, -1)
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 300, (20,), generator=gen)
    near = data[idx] + 0.002 * torch.randn(20, 3072, generator=gen)  # at the sampler's last step
    far = torch.rand(20, 3072, generator=gen) * 2 - 1  # anywhere: still one-hot at σ = 0.002
    for block_size in (64, None):
        den = OptimalDenoiser(train, block_size=block_size)
        for x in (near, far):
            want = data[((x.double()[:, None] - data.double()[None]) ** 2).sum(-1).argmin(1)]
            assert torch.equal(den(x.reshape(20, 3, 32, 32), 0.002).reshape(20, -1), want)


def test_class_conditional_only_mixes_its_class():
    train, labels = rand_images(40, seed=5), np.arange(40) % 3 + 4  # classes 4, 5, 6
    xs = from_uint8(train)
    den = OptimalDenoiser(train, labels, block_size=7)
    assert den.classes == [4, 5, 6]
    gen = torch.Generator().manual_seed(6)
    cls = torch.tensor([4, 5, 6, 4, 5, 6])
    for sigma in (0.002, 0.5, 3.0, 80.0):
        x = xs[torch.randint(0, 40, (6,), generator=gen)] + sigma * torch.randn(6, 3, 4, 4, generator=gen)
        out = den(x, sigma, cls).reshape(6, -1).double()
        assert float((out - reference(x, train, sigma, labels, cls)).abs().max()) < 2e-6
    # Exactly on an image of class 4 but asking for class 5: the nearest class-5 image, never the class-4 one.
    x = xs[:1]
    out = den(x, 0.002, torch.tensor([5])).reshape(-1)
    d = ((xs.reshape(40, -1) - x.reshape(1, -1)) ** 2).sum(1).masked_fill(torch.as_tensor(labels) != 5, math.inf)
    assert torch.equal(out, xs.reshape(40, -1)[d.argmin()])
    with pytest.raises(InputError, match="class 9"):
        den(x, 1.0, torch.tensor([9]))
    with pytest.raises(ValueError):
        den(x, 1.0)


def replica_fraction(samples, train):
    """Brute-force paper rule: d1 / d2 < 1/3 with d1, d2 the two nearest l2 distances in D."""
    g = samples.reshape(len(samples), -1).astype(np.float64)
    t = train.reshape(len(train), -1).astype(np.float64)
    d = np.sqrt(((g[:, None, :] - t[None]) ** 2).sum(-1))
    d.sort(axis=1)
    return float((d[:, 0] < d[:, 1] / 3).mean())


def read_pngs(paths):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in paths])


def test_sample_optimum_gives_replicas_and_agrees_across_batch_sizes(tmp_path):
    train = rand_images(64, res=8, seed=7)
    src = ArraySource("train.npz", train)
    paths = sample_optimum(src, 24, tmp_path / "a", seed=5, batch_size=3, progress=False)
    assert [p.name for p in paths] == [f"{s:06d}.png" for s in range(5, 29)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in paths] + ["manifest.json"]
    samples = read_pngs(paths)
    assert samples.shape == (24, 8, 8, 3) and replica_fraction(samples, train) >= 0.99
    # Another batch grid: each image from its own seed's noise, so the same images up to batched-kernel rounding.
    other = read_pngs(sample_optimum(src, 24, tmp_path / "b", seed=5, batch_size=8, progress=False))
    assert np.abs(samples.astype(int) - other.astype(int)).max() <= 1


def test_sample_optimum_class_conditional(tmp_path):
    train, labels = rand_images(64, res=8, seed=8), np.arange(64) % 4 * 10  # classes 0, 10, 20, 30
    src = ArraySource("train.npz", train, labels=labels)
    paths = sample_optimum(src, 16, tmp_path / "c", class_conditional=True, batch_size=5, progress=False)
    images = json.loads((tmp_path / "c" / "manifest.json").read_text())["images"]
    mapping = {name: v["class"] for name, v in images.items()}
    assert sorted(mapping) == [p.name for p in paths] and set(mapping.values()) <= {0, 10, 20, 30}
    flat = train.reshape(64, -1)
    for p, img in zip(paths, read_pngs(paths)):
        hits = np.nonzero((flat == img.reshape(1, -1)).all(1))[0]
        assert len(hits) == 1 and labels[hits[0]] == mapping[p.name]
    with pytest.raises(InputError, match="plain.npz"):
        sample_optimum(ArraySource("plain.npz", train), 2, tmp_path / "n", class_conditional=True, progress=False)
    assert not (tmp_path / "n").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_float64_and_cpu_samples(tmp_path):
    train = rand_images(300, res=32, seed=9)
    xs = from_uint8(train)
    den = OptimalDenoiser(train, device="cuda", block_size=128)
    gen = torch.Generator().manual_seed(10)
    for sigma in (0.002, 0.05, 0.5, 5.0, 80.0):
        x = xs[torch.randint(0, 300, (8,), generator=gen)] + sigma * torch.randn(8, 3, 32, 32, generator=gen)
        out = den(x.cuda(), sigma).cpu()
        err = float((out.reshape(8, -1).double() - reference(x, train, sigma)).abs().max())
        assert err < (3e-7 if sigma < 1 else 5e-5), (sigma, err)  # TF32 would be ~1e-3
    src = ArraySource("train.npz", rand_images(64, res=8, seed=11))
    on_cpu = sample_optimum(src, 32, tmp_path / "cpu", batch_size=16, progress=False)
    on_gpu = sample_optimum(src, 32, tmp_path / "gpu", batch_size=16, device="cuda", progress=False)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(on_cpu, on_gpu))
