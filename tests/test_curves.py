"""`sdmem curves` and `sdmem enough` on constructed run and audit folders: no training."""

import argparse
import csv
import json

import numpy as np
import pytest

from sdmem.errors import InputError
from sdmem.study.curves import add_parser, default_sizes, subsample

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(command, argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([command, *map(str, argv)])
    return args.func(args)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(folder, ratios, kind="edm", knn0=10.0):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"kind": kind, "out_dir": str(folder)}))
    rows = [{"epoch": 4 * (i + 1), "step": 8 * (i + 1), "nimg": 128 * (i + 1), "memorization_ratio": r,
             "memorization_ratio_ci95": [max(0.0, r - 0.05), min(1.0, r + 0.05)], "knn_distance": knn0 - i,
             "num_generated": 64, "time": 0.0} for i, r in enumerate(ratios)]
    if kind == "edm":
        (folder / "tracking.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, rows


def test_two_runs_overlaid(tmp_path, capsys):
    a, rows_a = _run(tmp_path / "small", [0.1, 0.6, 0.9, 0.9, 0.7])  # ties: the first (epoch 12) is the best
    b, rows_b = _run(tmp_path / "large", [0.0, 0.05, 0.02], knn0=20.0)
    out = tmp_path / "out"
    assert _cli("curves", [a, b, "--out", out]) == 0
    got = _read(out / "curves.csv")
    assert list(got[0]) == ["run", "epoch", "step", "images_seen", "memorization_ratio", "memorization_ratio_low",
                            "memorization_ratio_high", "knn_distance", "best"]
    assert len(got) == len(rows_a) + len(rows_b)
    for g, (name, r) in zip(got, [("small", r) for r in rows_a] + [("large", r) for r in rows_b]):
        assert g["run"] == name and int(g["epoch"]) == r["epoch"] and int(g["step"]) == r["step"]
        assert int(g["images_seen"]) == r["nimg"] and float(g["memorization_ratio"]) == r["memorization_ratio"]
        assert [float(g["memorization_ratio_low"]), float(g["memorization_ratio_high"])] == r["memorization_ratio_ci95"]
        assert float(g["knn_distance"]) == r["knn_distance"]
    best = [(g["run"], g["epoch"]) for g in got if g["best"] == "1"]
    assert best == [("small", "12"), ("large", "8")]
    assert (out / "curves.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "small: 5 snapshots, highest ratio 90.00% at epoch 12" in printed


def test_sd_run_and_untracked_run_refused(tmp_path):
    sd, _ = _run(tmp_path / "sd", [], kind="sd")
    with pytest.raises(InputError, match="sd: is a run of kind sd: its training tracks no memorization"):
        _cli("curves", [sd, "--out", tmp_path / "o"])
    untracked, _ = _run(tmp_path / "untracked", [])
    with pytest.raises(InputError, match="untracked: has no tracked memorization.*track.num_images"):
        _cli("curves", [untracked, "--out", tmp_path / "o"])
    assert not (tmp_path / "o" / "curves.csv").exists()


def test_sweep_folder_accepted(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    for name, ratios in (("size-200", [0.5, 1.0]), ("size-1000", [0.1, 0.3, 0.2])):
        _run(sweep / name / "run", ratios)
        (sweep / name / "point.json").write_text(json.dumps({"kind": "edm"}))
    (sweep / "results.csv").write_text("size,memorization_ratio,point\n")
    monkeypatch.chdir(tmp_path)
    assert _cli("curves", [sweep]) == 0  # default --out: ./curves
    got = _read(tmp_path / "curves" / "curves.csv")
    assert [g["run"] for g in got] == ["size-1000"] * 3 + ["size-200"] * 2
    assert [(g["run"], g["epoch"]) for g in got if g["best"] == "1"] == [("size-1000", "8"), ("size-200", "8")]
    # a point's run folder is labelled with the point's name
    assert _cli("curves", [sweep / "size-200" / "run", "--out", tmp_path / "one"]) == 0
    assert {g["run"] for g in _read(tmp_path / "one" / "curves.csv")} == {"size-200"}


def _audit(folder, n=1000, k=137, seed=1):
    folder.mkdir(parents=True)
    flags = np.zeros(n, bool)
    flags[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    with open(folder / "per_sample.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "ratio", "replica"])
        w.writerows([i, f"{i:06d}.png", 0.5, int(x)] for i, x in enumerate(flags))
    ratio = float(np.mean(flags))
    (folder / "summary.json").write_text(json.dumps({"memorization_ratio": ratio, "num_generated": n,
                                                     "memorization_ratio_ci95": [0.0, 1.0], "knn_distance": 5.0}))
    return folder, ratio


def test_enough_full_size_band_and_percentiles(tmp_path, capsys):
    audit, ratio = _audit(tmp_path / "audit")
    assert _cli("enough", [audit, "--reps", "100"]) == 0
    rows = _read(audit / "enough.csv")
    assert [int(r["num_generated"]) for r in rows] == [100, 200, 500, 1000] == default_sizes(1000)
    full = rows[-1]
    assert float(full["memorization_ratio_mean"]) == ratio == float(full["full_ratio"])  # exactly
    assert float(full["memorization_ratio_low"]) == float(full["memorization_ratio_high"]) == ratio
    widths = [float(r["memorization_ratio_high"]) - float(r["memorization_ratio_low"]) for r in rows]
    assert widths[0] > widths[1] > widths[2] > widths[3] == 0
    stds = [float(r["memorization_ratio_std"]) for r in rows]
    assert stds == sorted(stds, reverse=True)
    for r in rows:
        assert float(r["memorization_ratio_low"]) <= float(r["memorization_ratio_mean"]) <= float(
            r["memorization_ratio_high"])
        assert int(r["reps"]) == 100
    assert (audit / "enough.png").read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "13.70%" in out and "note:" not in out


def test_enough_point_folder_sizes_and_seed(tmp_path):
    _audit(tmp_path / "point" / "audit", n=300, k=30)
    out = tmp_path / "out"
    assert _cli("enough", [tmp_path / "point", "--sizes", "250,50,50", "--reps", "20", "--out", out]) == 0
    assert [int(r["num_generated"]) for r in _read(out / "enough.csv")] == [50, 250]
    flags = np.arange(300) % 10 == 0
    assert subsample(flags, [50, 250], 20) == subsample(flags, [50, 250], 20)  # seeded: default_rng(0)
    assert default_sizes(80) == [80] and default_sizes(100) == [100]


@pytest.mark.parametrize("argv, match", [(["--sizes", "2000"], "2000 is more than the 1000"),
                                         (["--sizes", "0,100"], "positive integers"),
                                         (["--sizes", "ten"], "positive integers"),
                                         (["--reps", "0"], "--reps: expected a positive integer")])
def test_enough_bad_sizes_refused(tmp_path, argv, match):
    audit, _ = _audit(tmp_path / "audit")
    with pytest.raises(InputError, match=match):
        _cli("enough", [audit, *argv])


def test_enough_needs_flags(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no per_sample.csv"):
        _cli("enough", [tmp_path / "empty"])
