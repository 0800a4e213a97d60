"""The paper's sweep specs (train_configs/paper/): every spec loads (every point's config is checked), has the
number of points its figure or table needs, and carries the values the paper states (Gu et al., "On Memorization in
Diffusion Models", TMLR 2025; sections cited at each check). No data and no training: only configs are built."""

import functools
import math
import re
from pathlib import Path

import pytest

from sdmem.config import fingerprint
from sdmem.study.sweep import load_spec, points

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "train_configs" / "paper"
SPECS = sorted(p.name for p in PAPER.glob("*.yaml"))

# Points per spec: the figure's grid (each spec's header derives it).
COUNTS = {
    "fig1c_edm_4k_epochs.yaml": 5,  # |D| in {2k, 5k, 10k, 20k, 50k}
    "fig1d_edm_40k_epochs.yaml": 3,  # |D| in {1k, 2k, 5k}
    "fig2a_data_dimension.yaml": 18,  # 6 sizes x 3 resolutions
    "fig2b_num_classes.yaml": 12,  # 3 sizes x C in {1, 2, 5, 10}
    "fig2c_intra_diversity.yaml": 15,  # 3 sizes x 5 alphas
    "fig3a_width.yaml": 24,  # 6 sizes x 4 widths
    "fig3b_depth.yaml": 36,  # 6 sizes x 6 depths
    "fig3c_time_embedding.yaml": 12,  # 3 sizes x 2 embeddings x 2 depths
    "fig4ab_skip_ddpmpp.yaml": 22,  # full + 3 resolutions x 7 kept subsets
    "fig4cd_skip_ncsnpp.yaml": 22,
    "fig5a_labels.yaml": 15,  # 5 sizes x none/true/random
    "fig5b_random_classes.yaml": 9,  # C in {1 ... 1000}
    "fig5c_unique_50k.yaml": 2,  # none / unique at 50k
    "fig7_width_depth_2k.yaml": 20,  # 14 (a) + 10 (b) - 4 shared
    "fig8a_skip_count.yaml": 26,  # 5 m x 5 combinations + full
    "fig8b_skip_delete.yaml": 21,  # 3 resolutions x 7 deleted subsets
    "fig11a_ffhq_dimension.yaml": 18,  # 6 sizes x 3 resolutions
    "fig11b_ffhq_time_embedding.yaml": 6,  # 3 sizes x 2 embeddings
    "fig11c_ffhq_random_classes.yaml": 7,  # C in {1, 10, 50, 100, 200, 400, 2000}
    "fig11d_ffhq_unique.yaml": 12,  # 6 sizes x none/unique
    "table1_batch_size.yaml": 14,  # 7 (batch, lr) x 2 sizes
    "table2_weight_decay_ema.yaml": 26,  # 13 (weight decay, EMA) x 2 sizes
    "table4_labels.yaml": 15,  # 5 sizes x none/true/unique
}
VE_SPECS = {"fig4cd_skip_ncsnpp.yaml"}
TABLE2_WD = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 5e-2, 1e-1)  # Table 2 (left)
TABLE2_EMA = (0.99929, 0.999, 0.99, 0.9, 0.5, 0.1, 0.0)  # Table 2 (right)


@functools.lru_cache(maxsize=None)
def load(name: str):
    spec = load_spec(PAPER / name)
    return spec, points(spec)


def configs(name: str) -> list:
    return [p.config for p in load(name)[1]]


def point(name: str, **values):
    """The one point whose swept values include ``values`` (dotted keys spelt with __ for the dot)."""
    want = {k.replace("__", "."): v for k, v in values.items()}
    found = [p for p in load(name)[1] if all(p.values.get(k) == v for k, v in want.items())]
    assert len(found) == 1, f"{name}: {len(found)} points match {want}"
    return found[0]


def grid(name: str, *keys: str) -> set:
    """The set of (value, ...) tuples of these dotted config keys over the spec's points."""
    def get(cfg, dotted):
        for part in dotted.split("."):
            cfg = getattr(cfg, part)
        return cfg
    return {tuple(get(c, k) for k in keys) for c in configs(name)}


def test_every_spec_has_an_expected_count():
    assert set(SPECS) == set(COUNTS), "a spec was added or removed: update COUNTS (and the README index)"


@pytest.mark.parametrize("name", SPECS)
def test_spec_loads_with_the_figure_point_count(name):
    spec, pts = load(name)
    assert len(pts) == COUNTS[name]
    assert len({p.name for p in pts}) == len(pts)
    assert spec.out_dir == Path("runs/paper") / Path(name).stem
    assert spec.generate == {"num": 10000} and spec.report == "best"  # 10k images, highest ratio (Appendix B)


@pytest.mark.parametrize("name", SPECS)
def test_edm_points_use_the_paper_code_ema_snapshots_and_sampler_floor(name):
    for cfg in configs(name):
        assert cfg.kind == "edm"
        assert cfg.train.ema_rule == "per_step" and cfg.train.ema_rate in (0.99929, *TABLE2_EMA)
        assert cfg.train.snapshot_kimg == 2500  # a snapshot every 2.5M images
        assert cfg.track.num_images == 10000
        assert cfg.track.sigma_min == (0.02 if cfg.model.precond == "ve" else 0.002)
        assert (cfg.model.precond == "ve") == (name in VE_SPECS)
        assert cfg.train.warmup_epochs == 200  # Appendix B: LR and EMA warm-up over the first 200 epochs


# Sec. 2, Fig. 1 (the paper code's run_fig1_cd.sh / run_fig5_edm.sh: EDM's own CIFAR-10 recipe).

@pytest.mark.parametrize("name,epochs,sizes", [("fig1c_edm_4k_epochs.yaml", 4000, {2000, 5000, 10000, 20000, 50000}),
                                               ("fig1d_edm_40k_epochs.yaml", 40000, {1000, 2000, 5000}),
                                               ("fig5c_unique_50k.yaml", 12000, {50000})])
def test_edm_recipe_specs(name, epochs, sizes):
    assert grid(name, "model.precond", "model.num_blocks", "train.lr", "train.epochs", "model.arch") == \
        {("edm", 4, 1e-3, epochs, "ddpmpp")}
    assert {s for (s,) in grid(name, "data.size")} == sizes


# Sec. 3.1, Fig. 2(a): 32x32, 16x16, 8x8 with the attention moved along; App. D.1, Fig. 11(a): 64, 32, 16 on FFHQ.

def test_fig2a_resolutions_move_attention_and_sweep_sizes():
    name = "fig2a_data_dimension.yaml"
    assert grid(name, "data.resolution", "model.attn_resolutions") == {(None, (16,)), (16, (8,)), (8, (4,))}
    assert {s for (s,) in grid(name, "data.size")} == {500, 1000, 2000, 4000, 8000, 16000}
    assert point(name, data__size=16000, data__resolution=8).config.model.channel_mult == (2, 2, 2)


def test_fig11a_ffhq_resolutions_move_attention():
    name = "fig11a_ffhq_dimension.yaml"
    assert grid(name, "data.resolution", "model.attn_resolutions") == {(64, (16,)), (32, (8,)), (16, (4,))}
    assert {s for (s,) in grid(name, "data.size")} == {500, 1000, 2000, 4000, 8000, 12000}
    # App. D.2, Fig. 11(b): positional vs Fourier in DDPM++ on FFHQ.
    assert grid("fig11b_ffhq_time_embedding.yaml", "model.embedding", "model.arch", "data.size") == \
        {(e, "ddpmpp", s) for e in ("positional", "fourier") for s in (500, 1000, 2000)}


@pytest.mark.parametrize("name", [n for n in SPECS if n.startswith("fig11")])
def test_ffhq_specs_keep_the_ffhq_network_and_batch(name):
    # Appendix B: 128 channels at 64x64, 256 below; batch 256.
    assert grid(name, "model.channels", "model.channel_mult", "train.batch_size", "data.source") == \
        {(128, (1, 2, 2, 2), 256, "ffhq")}


# Sec. 3.2, Fig. 2(b, c).

def test_fig2b_classes_and_fig2c_blending():
    assert grid("fig2b_num_classes.yaml", "data.num_classes", "data.labels") == {(c, "none") for c in (1, 2, 5, 10)}
    name = "fig2c_intra_diversity.yaml"
    assert grid(name, "data.classes", "data.num_classes") == {((5,), None)}  # CIFAR-10's dog class only
    assert {a for (a,) in grid(name, "data.blend_ratio")} == {0.0, 0.2, 0.5, 0.8, 1.0}
    assert {s for (s,) in grid(name, "data.size")} == {500, 1000, 2000}


# Sec. 4.1, Figs. 3(a, b) and 7; Sec. 4.2, Fig. 3(c).

def test_fig3_width_depth_embedding_grids():
    assert {w for (w,) in grid("fig3a_width.yaml", "model.channels")} == {128, 192, 256, 320}
    assert grid("fig3a_width.yaml", "model.num_blocks") == {(2,)}
    assert {d for (d,) in grid("fig3b_depth.yaml", "model.num_blocks")} == {2, 4, 6, 8, 10, 12}
    assert grid("fig3b_depth.yaml", "model.channels") == {(128,)}
    assert grid("fig3c_time_embedding.yaml", "model.embedding", "model.num_blocks", "model.arch") == \
        {(e, d, "ddpmpp") for e in ("positional", "fourier") for d in (2, 4)}


def test_fig3_model_sizes_match_the_paper():
    # Sec. 4.1: width 320 has "roughly 219M" parameters, 12 blocks "approximately 138M" (width 128 is 35.1M).
    from sdmem.edm.config import num_params

    wide = point("fig3a_width.yaml", data__size=5000, model__channels=320).config
    deep = point("fig3b_depth.yaml", data__size=1000, model__num_blocks=12).config
    assert round(num_params(wide, 32) / 1e6) == 219
    assert round(num_params(deep, 32) / 1e6) == 138


def test_fig7_pairs():
    widths = {(w, d) for w in (64, 96, 128, 160, 192, 224, 256) for d in (2, 4)}  # App. C.1, Fig. 7(a)
    depths = {(w, d) for w in (128, 256) for d in (2, 4, 6, 8, 10)}  # Fig. 7(b)
    assert grid("fig7_width_depth_2k.yaml", "model.channels", "model.num_blocks") == widths | depths
    assert grid("fig7_width_depth_2k.yaml", "data.size") == {(2000,)}


# Sec. 4.3, Fig. 4; App. C.2, Fig. 8. Skips 1-3 at 32x32, 4-6 at 16x16, 7-9 at 8x8 (encoder order).

def _masks(name):
    return {p.name: p.config.model.skip_mask for p in load(name)[1]}


@pytest.mark.parametrize("name,arch,precond,embedding", [("fig4ab_skip_ddpmpp.yaml", "ddpmpp", "vp", "positional"),
                                                         ("fig4cd_skip_ncsnpp.yaml", "ncsnpp", "ve", "fourier")])
def test_fig4_keeps_skips_at_one_resolution(name, arch, precond, embedding):
    assert grid(name, "model.arch", "model.precond", "model.embedding", "data.size", "model.num_blocks") == \
        {(arch, precond, embedding, 1000, 2)}  # |D| = 1k, n = 2: 9 skips
    masks = _masks(name)
    assert masks.pop("full") is None  # all nine on
    assert len(set(masks.values())) == 21
    for label, mask in masks.items():
        res, kept, bits = re.fullmatch(r"r(32|16|8)-keep([123])-([01]{9})", label).groups()
        assert "".join("1" if m else "0" for m in mask) == bits and bits.count("1") == int(kept)
        lo = {"32": 0, "16": 3, "8": 6}[res]
        assert set(i for i, m in enumerate(mask) if m) <= set(range(lo, lo + 3))
    singles = [m for m in masks.values() if sum(m) == 1]  # Fig. 4(b)/(d): one skip at each of the 9 locations
    assert sorted(m.index(True) for m in singles) == list(range(9))


def test_fig8_skip_counts_and_deletions():
    counts = {}
    for label, mask in _masks("fig8a_skip_count.yaml").items():
        m = int(re.fullmatch(r"m([1-9])-.*", label).group(1))
        counts.setdefault(m, set()).add(mask)
        assert (mask is None and m == 9) or sum(mask) == m
    assert {m: len(v) for m, v in counts.items()} == {1: 5, 3: 5, 5: 5, 7: 5, 8: 5, 9: 1}
    for label, mask in _masks("fig8b_skip_delete.yaml").items():
        res, deleted, bits = re.fullmatch(r"r(32|16|8)-del([123])-([01]{9})", label).groups()
        lo = {"32": 0, "16": 3, "8": 6}[res]
        assert "".join("1" if m else "0" for m in mask) == bits and bits.count("0") == int(deleted)
        assert set(i for i, m in enumerate(mask) if not m) <= set(range(lo, lo + 3))


# Sec. 5, Tables 1 and 2.

def test_table1_scales_lr_linearly_with_batch():
    pairs = grid("table1_batch_size.yaml", "train.batch_size", "train.lr")
    assert {b for b, _ in pairs} == {128, 256, 384, 512, 640, 768, 896}
    assert all(math.isclose(lr / b, 2e-4 / 512) for b, lr in pairs)  # "ratio of learning rate to batch size 2e-4/512"
    assert grid("table1_batch_size.yaml", "data.size") == {(1000,), (2000,)}


def test_table2_sweeps_weight_decay_and_ema_one_at_a_time():
    pairs = grid("table2_weight_decay_ema.yaml", "train.weight_decay", "train.ema_rate")
    assert pairs == {(wd, 0.99929) for wd in TABLE2_WD} | {(0.0, e) for e in TABLE2_EMA}
    assert point("table2_weight_decay_ema.yaml", data__size=2000, train__weight_decay=5e-2).name == "size-2000_wd-5e-2"


# Sec. 6, Fig. 5; App. C.3, Table 4; App. D.3, Fig. 11(c, d).

def test_label_modes_and_random_classes():
    assert grid("fig5a_labels.yaml", "data.labels") == {("none",), ("true",), ("random",)}
    assert point("fig5a_labels.yaml", data__size=3000, data__labels="random").config.data.random_label_classes == 10
    assert grid("table4_labels.yaml", "data.labels") == {("none",), ("true",), ("unique",)}
    for name in ("fig5a_labels.yaml", "table4_labels.yaml"):
        assert {s for (s,) in grid(name, "data.size")} == {1000, 2000, 3000, 4000, 5000}
    assert grid("fig5b_random_classes.yaml", "data.labels", "data.size") == {("random", 5000)}
    assert {c for (c,) in grid("fig5b_random_classes.yaml", "data.random_label_classes")} == \
        {1, 2, 5, 10, 20, 50, 100, 500, 1000}
    assert grid("fig5c_unique_50k.yaml", "data.labels") == {("none",), ("unique",)}
    assert grid("fig11c_ffhq_random_classes.yaml", "data.labels", "data.size") == {("random", 2000)}
    assert {c for (c,) in grid("fig11c_ffhq_random_classes.yaml", "data.random_label_classes")} == \
        {1, 10, 50, 100, 200, 400, 2000}
    assert grid("fig11d_ffhq_unique.yaml", "data.labels", "data.size") == \
        {(mode, s) for mode in ("none", "unique") for s in (500, 1000, 2000, 3000, 4000, 5000)}


# Tables 1, 2 and 4 report the same 92.09% / 60.93% basic-setup run: the specs hold everything else fixed.

@pytest.mark.parametrize("size", [1000, 2000])
def test_the_basic_setup_point_is_the_same_config_in_every_spec(size):
    same = [point("table1_batch_size.yaml", data__size=size, train__batch_size=512),
            point("table2_weight_decay_ema.yaml", data__size=size, train__weight_decay=0.0, train__ema_rate=0.99929),
            point("table4_labels.yaml", data__size=size, data__labels="none"),
            point("fig5a_labels.yaml", data__size=size, data__labels="none"),
            point("fig2a_data_dimension.yaml", data__size=size, data__resolution=None),
            point("fig2b_num_classes.yaml", data__size=size, data__num_classes=10),
            point("fig3a_width.yaml", data__size=size, model__channels=128),
            point("fig3b_depth.yaml", data__size=size, model__num_blocks=2),
            point("fig3c_time_embedding.yaml", data__size=size, model__embedding="positional", model__num_blocks=2)]
    if size == 1000:  # Sec. 4.3's full-skip reference
        same += [point("fig4ab_skip_ddpmpp.yaml", model__skip_mask=None),
                 point("fig8a_skip_count.yaml", model__skip_mask=None)]
    else:  # App. C.1's width 128, 2 blocks at |D| = 2k
        same += [point("fig7_width_depth_2k.yaml", model__channels=128, model__num_blocks=2)]
    assert len({fingerprint(p.config) for p in same}) == 1
    cfg = same[0].config  # Appendix B
    assert (cfg.model.arch, cfg.model.precond, cfg.model.channels, cfg.model.num_blocks, cfg.train.batch_size,
            cfg.train.lr, cfg.train.epochs, cfg.data.labels) == ("ddpmpp", "vp", 128, 2, 512, 2e-4, 40000, "none")


def test_the_readme_indexes_every_spec():
    text = (PAPER / "README.md").read_text()
    for name in SPECS:
        assert f"`{name}`" in text, f"{name} is missing from train_configs/paper/README.md"
        assert re.search(rf"`{re.escape(name)}` \| {COUNTS[name]} \|", text), f"{name}: README point count"
    assert "`../sd/table3.yaml`" in text and (ROOT / "train_configs" / "sd" / "table3.yaml").exists()
