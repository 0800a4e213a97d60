"""EDM's DDPM++/NCSN++ U-Nets, skip mask, preconditioning (Table 1) and losses against their formulas."""

import math

import pytest
import torch

from sdmem.edm.loss import LOSSES, EDMLoss, VELoss, VPLoss
from sdmem.edm.networks import NETWORKS, FourierEmbedding, PositionalEmbedding, SongUNet, build_network
from sdmem.edm.precond import PRECONDS, EDMPrecond, VEPrecond, VPPrecond
from sdmem.errors import InputError

SMALL = dict(model_channels=16, num_blocks=1)  # fast nets for behaviour tests


# Tiny nets gain nothing from threads, and spinning OpenMP threads stall badly on a shared, busy CPU.
pytestmark = pytest.mark.usefixtures("one_thread_module")


def n_params(arch, **kw):
    with torch.device("meta"):  # counting only: no memory, no init cost
        net = build_network(arch, img_resolution=32, **kw)
    return sum(p.numel() for p in net.parameters())


def formula_params(C, blocks, ncsn=False, mult=(2, 2, 2), attn_res=(16,), res=32, label_dim=0, augment_dim=0):
    """Independent count of EDM's SongUNet from its layer list (3 → 3 channels)."""
    E, N = 4 * C, C * (2 if ncsn else 1)
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731

    def block(i, o, attn=False, resample=False):
        n = 2 * i + conv(i, o, 3) + lin(E, o) + 2 * o + conv(o, o, 3)
        n += conv(i, o, 1) if (i != o or resample) else 0
        return n + ((2 * o + conv(o, 3 * o, 1) + conv(o, o, 1)) if attn else 0)

    total = lin(N, E) + lin(E, E) + (lin(label_dim, N) if label_dim else 0) + augment_dim * N
    skips, c, caux = [C], C, 3
    total += conv(3, C, 3)
    for level, m in enumerate(mult):
        r = res >> level
        if level:
            total += block(c, c, resample=True)
            skips.append(c)
            if ncsn:
                total += conv(caux, c, 3)
                caux = c
        for _ in range(blocks):
            total += block(c, C * m, attn=r in attn_res)
            c = C * m
            skips.append(c)
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        total += block(c, c, attn=True) + block(c, c) if level == len(mult) - 1 else block(c, c, resample=True)
        for idx in range(blocks + 1):
            total += block(c + skips.pop(), C * m, attn=idx == blocks and r in attn_res)
            c = C * m
    return total + 2 * c + conv(c, 3, 3)


@pytest.mark.parametrize("arch,kw,exact,approx", [
    ("ddpmpp", {}, 35_125_251, 35.1e6),                                   # the paper's basic model
    ("ddpmpp", dict(num_blocks=4), 55_732_739, 55.7e6),                   # EDM's CIFAR DDPM++
    ("ddpmpp", dict(num_blocks=4, augment_dim=9), 55_733_891, 55.7e6),    # ... with EDM's augment input
    ("ddpmpp", dict(num_blocks=12), 138_162_691, 138.2e6),                # paper Sec. 4.1 depth 12
    ("ddpmpp", dict(model_channels=320), 219_294_723, 219.3e6),           # paper Sec. 4.1 width 320
    ("ncsnpp", dict(num_blocks=4), 56_395_523, 56.4e6),                   # EDM's CIFAR NCSN++
])
def test_parameter_counts(arch, kw, exact, approx):
    n = n_params(arch, **kw)
    assert n == exact
    assert abs(n - approx) < 0.1e6
    assert n == formula_params(kw.get("model_channels", 128), kw.get("num_blocks", 2), ncsn=arch == "ncsnpp",
                               augment_dim=kw.get("augment_dim", 0))


def test_label_layer_count_and_presence():
    assert n_params("ddpmpp", label_dim=10) - n_params("ddpmpp") == 10 * 128 + 128
    assert build_network("ddpmpp", img_resolution=8, **SMALL).map_label is None
    cond = build_network("ddpmpp", img_resolution=8, label_dim=10, **SMALL)
    assert tuple(cond.map_label.weight.shape) == (16, 10)


def test_presets_follow_edm():
    assert NETWORKS["ddpmpp"]["encoder_type"] == "standard" and NETWORKS["ddpmpp"]["decoder_type"] == "standard"
    assert NETWORKS["ncsnpp"]["encoder_type"] == "residual" and NETWORKS["ncsnpp"]["decoder_type"] == "standard"
    assert NETWORKS["ddpmpp"]["resample_filter"] == (1, 1) and NETWORKS["ncsnpp"]["resample_filter"] == (1, 3, 3, 1)
    assert NETWORKS["ddpmpp"]["dropout"] == 0.13 and NETWORKS["ddpmpp"]["num_blocks"] == 2
    net = build_network("ncsnpp", img_resolution=32, **SMALL)
    assert isinstance(net.map_noise, FourierEmbedding) and net.map_noise.freqs.numel() == 16  # 2·C / 2
    assert isinstance(build_network("ddpmpp", img_resolution=32, **SMALL).map_noise, PositionalEmbedding)


def test_init_matches_edm_scales():
    torch.manual_seed(0)
    net = build_network("ddpmpp", img_resolution=16, model_channels=32, num_blocks=1)
    blk = net.enc["16x16_block0"]
    xavier = lambda w: math.sqrt(6 / ((w.shape[0] + w.shape[1]) * w[0, 0].numel()))  # noqa: E731
    for w, gain in [(blk.conv0.weight, 1), (blk.conv1.weight, 1e-5), (net.dec["16x16_aux_conv"].weight, 1e-5),
                    (net.map_layer0.weight, 1)]:
        assert w.abs().max() <= gain * xavier(w) and w.abs().max() > 0.9 * gain * xavier(w)
    qkv = blk.qkv.weight  # attention at 16×16: qkv scaled by √0.2
    assert math.sqrt(0.2) * 0.9 * xavier(qkv) < qkv.abs().max() <= math.sqrt(0.2) * xavier(qkv)
    assert not hasattr(net.enc["8x8_block0"], "qkv")
    assert all(not b.detach().any() for n, b in net.named_parameters() if n.endswith("bias") and "norm" not in n)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("res", [32, 16, 8])
def test_forward_shapes(arch, res):
    net = build_network(arch, img_resolution=res, **SMALL).eval()
    out = net(torch.randn(2, 3, res, res), torch.tensor([0.3, -1.0]))
    assert out.shape == (2, 3, res, res) and out.dtype == torch.float32 and torch.isfinite(out).all()


def randomize(net, seed=0):
    """O(1) weights everywhere (EDM's 1e-5 output init would make every comparison tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return net.eval()


def test_skip_mask_order_and_effect():
    net = randomize(build_network("ddpmpp", img_resolution=32, model_channels=16, num_blocks=2))
    assert net.num_skips == 9 and net.skip_mask == (True,) * 9
    shapes = []
    hooks = [g.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[2:]))) for g in net.skip_gates]
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        full = net(x, t)
    for h in hooks:
        h.remove()
    assert shapes == [(32, 32)] * 3 + [(16, 16)] * 3 + [(8, 8)] * 3  # encoder order, per resolution
    net.set_skip_mask([False] * 9)
    with torch.no_grad():
        assert (net(x, t) - full).abs().max() > 1e-3 * full.abs().max()


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("index", [0, 4, 8])
def test_switched_off_skip_contributes_nothing(arch, index):
    net = randomize(build_network(arch, img_resolution=16, model_channels=16, num_blocks=2))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7])
    # Perturb only what reaches the decoder through skip `index` (the encoder path itself is untouched).
    perturb = lambda m, a: (a[0] + torch.randn_like(a[0]),)  # noqa: E731

    def outputs(mask):
        net.set_skip_mask(mask)
        with torch.no_grad():
            base = net(x, t)
            hook = net.skip_gates[index].register_forward_pre_hook(perturb)
            moved = net(x, t)
            hook.remove()
        return base, moved

    off = [i != index for i in range(9)]
    base, moved = outputs(off)
    assert torch.equal(base, moved)
    base, moved = outputs([True] * 9)
    assert (base - moved).abs().max() > 1e-4 * base.abs().max()  # fp32 noise would be ~1e-7


def test_skip_mask_errors_and_config_errors():
    with pytest.raises(InputError, match=r"model\.skip_mask: expected 9 switches .*got 8"):
        build_network("ddpmpp", img_resolution=32, model_channels=16, skip_mask=(True,) * 8)
    with pytest.raises(InputError, match=r"model\.skip_mask: expected 12 switches"):
        build_network("ddpmpp", img_resolution=32, model_channels=16, num_blocks=3, skip_mask=(True,) * 9)
    with pytest.raises(InputError, match=r"model\.skip_mask"):
        build_network("ddpmpp", img_resolution=32, model_channels=16, skip_mask=("yes",) * 9)
    for bad in (30, 2, 0):
        with pytest.raises(InputError, match=r"data\.resolution"):
            build_network("ddpmpp", img_resolution=bad, **SMALL)
    net = build_network("ddpmpp", img_resolution=16, **SMALL)
    with pytest.raises(InputError, match=r"data\.resolution"):
        net(torch.randn(1, 3, 32, 32), torch.zeros(1))
    with pytest.raises(InputError, match=r"model\.arch"):
        build_network("adm", img_resolution=32)
    with pytest.raises(InputError, match=r"model\.widht"):
        build_network("ddpmpp", img_resolution=32, widht=3)
    with pytest.raises(InputError, match=r"model\.embedding_type"):
        build_network("ddpmpp", img_resolution=32, embedding_type="learned")


def test_class_conditioning():
    net = randomize(build_network("ddpmpp", img_resolution=8, label_dim=10, **SMALL))
    x, t = torch.randn(3, 3, 8, 8), torch.zeros(3)
    a = net(x, t, torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float())
    assert (a - net(x, t, torch.nn.functional.one_hot(torch.tensor([4, 2, 3]), 10).float()))[0].abs().max() > 1e-4
    assert torch.equal(a, net(x, t, torch.tensor([1, 2, 3])))  # int labels → one-hot inside
    pre = EDMPrecond(8, 3, label_dim=10, model=net)
    sig = torch.full((3,), 0.5)
    assert torch.equal(pre(x, sig, torch.tensor([1, 2, 3])), pre(x, sig, torch.eye(10)[[1, 2, 3]]))
    with pytest.raises(InputError, match="model.label_dim"):
        pre(x, sig, torch.tensor([1, 2, 10]))


@pytest.mark.parametrize("embedding,noise_mult", [("positional", 1), ("fourier", 2)])
def test_both_time_embeddings(embedding, noise_mult):
    net = randomize(build_network("ddpmpp", img_resolution=8, embedding_type=embedding,
                                  channel_mult_noise=noise_mult, **SMALL))
    x = torch.randn(1, 3, 8, 8)
    assert net.map_layer0.in_features == 16 * noise_mult
    assert (net(x, torch.tensor([0.1])) - net(x, torch.tensor([0.9]))).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_channels_last_matches_contiguous(arch):
    net = randomize(build_network(arch, img_resolution=16, model_channels=32, num_blocks=1))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 0.5])
    with torch.no_grad():
        ref = net(x, t)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


class Probe(torch.nn.Module):
    """F(x; c_noise) = 2 everywhere; remembers what it was called with."""

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x, noise_labels, class_labels)
        return torch.full_like(x, 2.0)


def table1(kind, s):
    """(c_skip, c_out, c_in, c_noise) from Karras et al. (2022) Table 1 in float64."""
    if kind == "vp":
        t = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(1 + s * s)) - 0.1) / 19.9
        return 1.0, -s, 1 / math.sqrt(s * s + 1), 999 * t
    if kind == "ve":
        return 1.0, s, 1.0, math.log(s / 2)
    return 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25), math.log(s) / 4


@pytest.mark.parametrize("kind", ["vp", "ve", "edm"])
def test_precond_coefficients(kind):
    sigmas = [0.002, 0.1, 0.5, 1.0, 7.0, 80.0]
    probe = Probe()
    pre = PRECONDS[kind](8, 3, model=probe)
    x = torch.randn(len(sigmas), 3, 8, 8, dtype=torch.float64)
    d = pre(x, torch.tensor(sigmas, dtype=torch.float64))
    assert d.dtype == torch.float32
    for i, s in enumerate(sigmas):
        c_skip, c_out, c_in, c_noise = table1(kind, s)
        xi = x[i].float()
        assert torch.allclose(probe.seen[0][i], c_in * xi, rtol=1e-5, atol=1e-7)
        assert math.isclose(probe.seen[1][i].item(), c_noise, rel_tol=1e-5, abs_tol=1e-5)
        assert torch.allclose(d[i], c_skip * xi + 2 * c_out, rtol=1e-5, atol=1e-6)
    assert probe.seen[2] is None  # unconditional: no labels reach the network
    d1 = pre(x[:1], 0.5)  # a Python-float sigma is accepted
    assert d1.shape == (1, 3, 8, 8)


def test_precond_sigma_ranges():
    vp = VPPrecond(8, model=Probe())
    assert math.isclose(vp.sigma_max, math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel_tol=1e-9)
    assert math.isclose(vp.sigma_min, math.sqrt(math.expm1(0.5 * 19.9e-10 + 0.1e-5)), rel_tol=1e-6)
    s = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    assert torch.allclose(vp.sigma(vp.sigma_inv(s)), s)
    ve, edm = VEPrecond(8, model=Probe()), EDMPrecond(8, model=Probe())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0) and (edm.sigma_min, edm.sigma_max) == (0.0, math.inf)
    assert edm.sigma_data == 0.5 and torch.equal(edm.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))


def test_precond_builds_network_and_bf16():
    torch.manual_seed(0)
    pre = EDMPrecond(8, 3, arch="ddpmpp", **SMALL).eval()
    assert isinstance(pre.model, SongUNet)
    randomize(pre.model)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    ref = pre(x, s)
    pre.use_bf16 = True
    low = pre(x, s)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(pre(x, s, force_fp32=True), ref)


def test_precond_drives_the_heun_sampler():
    from sdmem.edm.sampler import heun_sampler, seeded_class_labels, seeded_latents
    torch.manual_seed(0)
    pre = VPPrecond(8, 3, label_dim=4, arch="ncsnpp", **SMALL).eval()
    with torch.no_grad():  # off the zero-initialised output layers, so the network (and its labels) matter
        for param in pre.parameters():
            param.add_(0.05 * torch.randn_like(param))
    seeds = [0, 1]
    latents, labels = seeded_latents(seeds, (3, 8, 8)), seeded_class_labels(seeds, 4)
    out = heun_sampler(pre, latents, labels, num_steps=2)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # Two steps by hand (Karras et al. Alg. 1, S_churn = 0): sigma 80 -> 0.002 (Heun) -> 0 (Euler).
    with torch.no_grad():
        def d(x, t):
            return (x - pre(x, torch.full((2,), t, dtype=torch.float64), labels).double()) / t
        x0 = latents.double() * 80.0
        d0 = d(x0, 80.0)
        x1 = x0 + (0.002 - 80.0) * d0
        x1 = x0 + (0.002 - 80.0) * (0.5 * d0 + 0.5 * d(x1, 0.002))
        x2 = x1 + (0.0 - 0.002) * d(x1, 0.002)
    torch.testing.assert_close(out, x2.float(), rtol=1e-6, atol=1e-6)
    # The class labels reach the network: other labels, other images.
    other = heun_sampler(pre, latents, (labels + 1) % 4, num_steps=2)
    assert not torch.allclose(out, other)


def half_net(x, sigma, labels):
    """A denoiser with a known output: D(x; σ) = x / 2."""
    half_net.seen = (sigma, labels)
    return 0.5 * x


def expected_loss(kind, images, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (images.shape[0], 1, 1, 1)
    if kind == "edm":
        sigma = (torch.randn(shape, generator=g) * 1.2 - 1.2).exp()
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    else:
        u = torch.rand(shape, generator=g)
        if kind == "vp":
            t = 1 + u * (1e-5 - 1)
            sigma = torch.expm1(0.5 * 19.9 * t ** 2 + 0.1 * t).sqrt()
        else:
            sigma = 0.02 * (100 / 0.02) ** u
        weight = 1 / sigma ** 2
    y = images + torch.randn(images.shape, generator=g) * sigma
    return weight * (0.5 * y - images) ** 2, sigma


@pytest.mark.parametrize("kind", ["vp", "ve", "edm"])
def test_losses_against_formula(kind):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4])
    loss = LOSSES[kind]()
    got = loss(half_net, images, labels, generator=torch.Generator().manual_seed(11))
    want, sigma = expected_loss(kind, images, 11)
    assert got.shape == images.shape
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(half_net.seen[0], sigma) and half_net.seen[1] is labels
    again = loss(half_net, images, labels, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got, again)  # bitwise reproducible from the generator alone


def test_loss_generator_resume_and_sigma_distribution():
    images = torch.zeros(4096, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    EDMLoss()(half_net, images, generator=g)
    state = g.get_state()
    a = EDMLoss()(half_net, images, generator=g)
    b = EDMLoss()(half_net, images, generator=torch.Generator().set_state(state))
    assert torch.equal(a, b)
    log_sigma = half_net.seen[0].log().flatten()
    assert abs(log_sigma.mean() + 1.2) < 0.06 and abs(log_sigma.std() - 1.2) < 0.06
    VELoss()(half_net, images, generator=g)
    s = half_net.seen[0]
    assert s.min() >= 0.02 and s.max() <= 100
    VPLoss()(half_net, images, generator=g)
    s = half_net.seen[0]
    vp = VPPrecond(8, model=Probe())
    assert s.min() >= vp.sigma_min * 0.99 and s.max() <= vp.sigma_max * 1.0001
