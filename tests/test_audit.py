"""The audit API end to end: planted replicas, duplicates, outputs, against a numpy brute force."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from sdmem.audit import audit
from sdmem.errors import InputError


def brute_force(gen, train):
    """Exact squared distances [Q, N] in int64."""
    g = gen.reshape(len(gen), -1).astype(np.int64)
    t = train.reshape(len(train), -1).astype(np.int64)
    return (g**2).sum(1)[:, None] + (t**2).sum(1)[None] - 2 * g @ t.T


@pytest.fixture
def planted():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    exact = train[[3, 50, 299]]
    noisy = np.clip(train[[7, 120, 200]].astype(int) + rng.integers(-6, 7, (3, 8, 8, 3)), 0, 255).astype(np.uint8)
    novel = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    gen = np.concatenate([exact, noisy, novel])
    return train, gen


def test_planted_replicas_flagged_and_novel_not(planted, tmp_path):
    train, gen = planted
    report = audit(train, gen, out=tmp_path / "a", progress=False)
    assert report.replica.tolist() == [True] * 6 + [False] * 6
    assert report.nn1_index[:6].tolist() == [3, 50, 299, 7, 120, 200]
    d = brute_force(gen, train)
    order = np.argsort(d, axis=1, kind="stable")[:, :2]
    sq = np.take_along_axis(d, order, 1)
    assert report.nn1_index.tolist() == order[:, 0].tolist()
    assert report.nn2_index.tolist() == order[:, 1].tolist()
    np.testing.assert_allclose(report.nn1_distance, np.sqrt(sq[:, 0] / 192), rtol=1e-12)
    np.testing.assert_allclose(report.nn2_distance, np.sqrt(sq[:, 1] / 192), rtol=1e-12)
    assert report.memorization_ratio == 0.5
    assert report.knn_distance == pytest.approx(np.mean(np.sqrt(sq[:, 0] / 192)))


def test_outputs_written(planted, tmp_path):
    train, gen = planted
    out = tmp_path / "report"
    report = audit(train, gen, out=out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("memorization_ratio", "knn_distance", "num_generated", "num_train", "num_replicas", "threshold",
                "backend", "device", "memorization_ratio_ci95"):
        assert key in summary
    assert summary["num_generated"] == 12 and summary["num_train"] == 300 and summary["num_replicas"] == 6
    assert summary["threshold"] == pytest.approx(1 / 3)
    lo, hi = summary["memorization_ratio_ci95"]
    assert lo <= 0.5 <= hi
    rows = list(csv.DictReader(open(out / "per_sample.csv")))
    assert list(rows[0]) == ["index", "file", "nn1_index", "nn1_distance", "nn2_index", "nn2_distance", "ratio",
                             "replica"]
    assert [int(r["index"]) for r in rows] == list(range(12))
    assert [int(r["replica"]) for r in rows] == [1] * 6 + [0] * 6
    assert float(rows[0]["ratio"]) == 0.0
    grid = np.asarray(Image.open(out / "replicas.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3
    # 8x8 images are enlarged 8x: the first pair shows generated image 0 above training image 3, identical.
    top = grid[2:66, 2:66]
    bottom = grid[68:132, 2:66]
    assert np.array_equal(top, bottom)
    assert np.array_equal(top[::8, ::8], gen[0])
    assert Image.open(out / "ratio_hist.png").size[0] > 100
    assert report.summary()["num_replicas"] == 6


def test_duplicates_do_not_hide_replicas(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    train[10] = train[25]  # image 25 is also at 10 (10 comes first)
    gen = train[[25, 4]]
    report = audit(train, gen, progress=False)
    assert report.replica.tolist() == [True, True]
    assert report.nn1_index.tolist() == [10, 4]
    assert report.num_duplicates == 1 and report.num_distinct_train == 39
    assert report.nn2_index[0] not in (10, 25)
    kept = audit(train, gen, dedup=False, progress=False)
    assert kept.replica.tolist() == [False, True]
    assert kept.nn1_distance[0] == kept.nn2_distance[0] == 0


def test_resolution_makes_sizes_comparable(tmp_path):
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    gen = np.stack([np.asarray(Image.fromarray(t).resize((24, 24), Image.LANCZOS)) for t in train[:3]])
    with pytest.raises(InputError, match="--resolution"):
        audit(train, gen, progress=False)
    report = audit(train, gen, resolution=8, progress=False)
    assert report.train.shape == (8, 8, 3)
    assert report.nn1_index.tolist() == [0, 1, 2]


def test_bad_threshold_writes_nothing(planted, tmp_path):
    train, gen = planted
    for bad in ("0", "1.01"):
        with pytest.raises(InputError, match="threshold"):
            audit(train, gen, out=tmp_path / "x", threshold=bad, progress=False)
    assert not (tmp_path / "x").exists()


def test_threshold_one_flags_everything_but_ties(planted):
    train, gen = planted
    report = audit(train, gen, threshold=1, progress=False)
    assert report.replica.all()


def test_backends_agree_on_report(planted):
    train, gen = planted
    reports = [audit(train, gen, backend=b, progress=False) for b in ("int8", "torch")]
    try:
        import faiss  # noqa: F401
        reports.append(audit(train, gen, backend="faiss", progress=False))
    except ImportError:
        pass
    for r in reports[1:]:
        assert r.replica.tolist() == reports[0].replica.tolist()
        assert r.nn1_index.tolist() == reports[0].nn1_index.tolist()
        np.testing.assert_array_equal(r.nn1_distance, reports[0].nn1_distance)
