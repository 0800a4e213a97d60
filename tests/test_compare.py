"""`sdmem compare` on constructed sweep and run folders: no training."""

import argparse
import csv
import json

import pytest

from sdmem.errors import InputError
from sdmem.study.compare import Result, add_parser, cell_text, layout, load_runs, load_sweep

RESULT = ["num_params", "size", "memorization_ratio", "memorization_ratio_low", "memorization_ratio_high",
          "knn_distance", "epoch", "step", "images_seen", "num_generated", "wall_time_s", "point"]
PNG = b"\x89PNG\r\n\x1a\n"


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", *map(str, argv)])
    return args.func(args)


def point_record(kind, config=None, values=None):
    """A whole point.json (sdmem.records.POINT), as `sdmem sweep` writes it."""
    return {"values": values or {}, "kind": kind, "fingerprint": "0" * 16, "config": config or {},
            "generate": {"num": 1000}, "report": "best"}


def _write_sweep(folder, swept, rows, kind):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=swept + RESULT, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        (folder / r["point"]).mkdir(exist_ok=True)
        (folder / r["point"] / "point.json").write_text(json.dumps(point_record(kind)))
    return folder


def _metrics(ratio, knn, point, size):
    return {"size": size, "memorization_ratio": ratio, "memorization_ratio_low": max(0.0, round(ratio - 0.0099, 6)),
            "memorization_ratio_high": min(1.0, round(ratio + 0.0099, 6)), "knn_distance": knn, "point": point,
            "num_generated": 1000}


TABLE3 = {("lora", "16"): (0.0, 0.0), ("lora", "256"): (0.0008, 0.0522), ("full", ""): (0.2195, 0.4689)}


@pytest.fixture
def sd_sweep(tmp_path):
    rows = []
    for (method, rank), (plain, klass) in reversed(TABLE3.items()):  # written out of order on purpose
        for prompt, ratio in (("class", klass), ("plain", plain)):
            for size in (2000, 500):
                r = ratio if size == 500 else ratio / 10
                rows.append({"model.method": method, "model.rank": rank, "data.prompt": prompt, "data.size": size,
                             **_metrics(r, 10.5 if size == 500 else 20.25, f"{method}{rank}-{prompt}-{size}", size)})
    return _write_sweep(tmp_path / "sd", ["model.method", "model.rank", "data.prompt", "data.size"], rows, "sd")


def test_table3_layout_from_an_sd_sweep(sd_sweep, capsys):
    assert _cli([sd_sweep]) == 0
    md = (sd_sweep / "compare.md").read_text().splitlines()
    assert md[0] == ("| model.method | model.rank | data.prompt=plain, size=500 | data.prompt=plain, size=2000 | "
                     "data.prompt=class, size=500 | data.prompt=class, size=2000 |")
    assert [line.split(" | ")[:2] for line in md[2:]] == [["| lora", "16"], ["| lora", "256"], ["| full", ""]]
    full = md[4].split(" | ")
    assert full[4] == "46.89% [45.90–47.88] / 10.50"  # class, |D| = 500
    assert full[2] == "21.95% [20.96–22.94] / 10.50"  # plain, |D| = 500
    assert "46.89% [45.90–47.88] / 10.50" in capsys.readouterr().out
    with open(sd_sweep / "compare.csv", newline="") as f:
        long = list(csv.DictReader(f))
    assert len(long) == 12 and list(long[0])[:4] == ["model.method", "model.rank", "data.prompt", "size"]
    assert [(r["model.method"], r["model.rank"], r["data.prompt"], r["size"]) for r in long[:4]] == [
        ("lora", "16", "plain", "500"), ("lora", "16", "plain", "2000"), ("lora", "16", "class", "500"),
        ("lora", "16", "class", "2000")]
    last = long[-1]
    assert [last[c] for c in ("model.method", "model.rank", "data.prompt", "size")] == ["full", "", "class", "2000"]
    assert float(last["memorization_ratio"]) == pytest.approx(0.04689)
    assert float(last["knn_distance"]) == 20.25 and last["source"] == "full-class-2000"
    assert (sd_sweep / "compare.png").read_bytes()[:8] == PNG


def test_full_fine_tuning_rank_is_blanked(tmp_path):
    rows = [{"model.method": m, "model.rank": "16", **_metrics(0.1 * k, 1.0, f"p{k}", 100)}
            for k, m in enumerate(["full", "lora"])]
    results = load_sweep(_write_sweep(tmp_path / "s", ["model.method", "model.rank"], rows, "sd"))
    assert [r.values["model.rank"] for r in results] == ["", "16"]


def test_sd_sweep_over_sizes_only_takes_table3_keys_from_point_configs(tmp_path):
    rows = [{"data.size": size, **_metrics(0.2, 1.0, f"size-{size}", size)} for size in (400, 800)]
    sweep = _write_sweep(tmp_path / "s", ["data.size"], rows, "sd")
    for r in rows:
        config = {"kind": "sd", "model": {"method": "lora", "rank": 256},
                  "data": {"prompt": "class", "size": r["size"]}}
        (sweep / r["point"] / "point.json").write_text(json.dumps(point_record("sd", config)))
    results = load_sweep(sweep)
    assert results[0].values == {"data.size": "400", "size": "400", "model.method": "lora", "model.rank": "256",
                                 "data.prompt": "class"}
    assert layout(results) == (["model.method", "model.rank"], ["data.prompt", "size"])


@pytest.fixture
def edm_sweep(tmp_path):
    rows = [{"model.channels": ch, "data.size": size, **_metrics(ratio, knn, f"ch{ch}-{size}", size)}
            for ch, size, ratio, knn in [(128, 1000, 0.9, 2.0), (64, 1000, 0.5, 4.0), (128, 200, 1.0, 1.0),
                                         (64, 200, 0.95, 1.5)]]
    return _write_sweep(tmp_path / "edm", ["model.channels", "data.size"], rows, "edm")


def test_edm_sweep_with_rows_and_cols(edm_sweep, tmp_path):
    out = tmp_path / "out"
    assert _cli([edm_sweep, "--rows", "model.channels", "--cols", "size", "--out", out]) == 0
    md = (out / "compare.md").read_text().splitlines()
    assert md[0] == "| model.channels | size=200 | size=1000 |"
    assert md[2] == "| 64 | 95.00% [94.01–95.99] / 1.50 | 50.00% [49.01–50.99] / 4.00 |"
    assert md[3].startswith("| 128 | 100.00% [99.01–100.00] / 1.00 |")
    assert (out / "compare.png").read_bytes()[:8] == PNG
    assert not (edm_sweep / "compare.md").exists()
    # The default EDM layout is the same: every varying column but size as rows, size as columns
    assert layout(load_sweep(edm_sweep)) == (["model.channels"], ["size"])
    assert layout(load_sweep(edm_sweep), cols=["model.channels"]) == (["size"], ["model.channels"])


def test_unknown_column_and_uncovered_columns_refused(edm_sweep):
    with pytest.raises(InputError, match="unknown column 'nope'.*model.channels.*size"):
        _cli([edm_sweep, "--rows", "nope"])
    with pytest.raises(InputError, match="fall in one cell.*add model.channels"):
        _cli([edm_sweep, "--rows", "", "--cols", "size"])


def _run(folder, kind, numbers=None, best=None, **config):
    folder.mkdir(parents=True)
    cfg = {"kind": kind, "out_dir": str(folder), **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    if numbers is not None:
        (folder / "audit").mkdir()
        (folder / "audit" / "summary.json").write_text(json.dumps(numbers))
    if best is not None:
        (folder / "best.json").write_text(json.dumps(best))
    return folder


def _nums(ratio, knn):
    """An audit's summary.json (sdmem.records.AUDIT_SUMMARY)."""
    return {"memorization_ratio": ratio, "memorization_ratio_ci95": [ratio - 0.01, ratio + 0.01],
            "knn_distance": knn, "num_generated": 100}


def _best(ratio, knn):
    """An EDM run's best.json (sdmem.records.TRACKED): the tracked snapshot with the highest ratio."""
    return {"epoch": 8, "step": 16, "nimg": 256, **_nums(ratio, knn)}


def test_several_run_folders(tmp_path, monkeypatch, capsys):
    a = _run(tmp_path / "a", "edm", _nums(0.5, 3.0), _best(0.1, 9.0), data={"size": 100}, model={"channels": 32})
    b = _run(tmp_path / "b", "edm", None, _best(0.25, 5.0), data={"size": 100}, model={"channels": 64})
    point = tmp_path / "sweep" / "size-200"
    _run(point / "run", "edm", _nums(0.9, 9.9), _best(0.9, 9.9), data={"size": 200}, model={"channels": 64})
    (point / "point.json").write_text(json.dumps(point_record("edm")))
    (point / "audit").mkdir()
    (point / "audit" / "summary.json").write_text(json.dumps(_nums(0.75, 1.0)))
    results = load_runs([a, b, point / "run"])
    assert [r.source for r in results] == ["a", "b", "size-200"]
    assert [r.values for r in results] == [{"model.channels": "32", "size": "100"},
                                           {"model.channels": "64", "size": "100"},
                                           {"model.channels": "64", "size": "200"}]
    # RUN/audit before best.json; a sweep point's own audit before its run's
    assert [r.ratio for r in results] == [0.5, 0.25, 0.75]
    monkeypatch.chdir(tmp_path)
    assert _cli(["a", "b", point]) == 0  # a point folder stands for its run
    md = (tmp_path / "compare" / "compare.md").read_text().splitlines()
    assert md[0] == "| model.channels | size=100 | size=200 |"
    assert md[2] == "| 32 | 50.00% [49.00–51.00] / 3.00 | — |"
    assert md[3] == "| 64 | 25.00% [24.00–26.00] / 5.00 | 75.00% [74.00–76.00] / 1.00 |"
    with open(tmp_path / "compare" / "compare.csv", newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == ["a", "b", "size-200"]


def test_run_without_numbers_says_how_to_make_them(tmp_path):
    sd = _run(tmp_path / "sd", "sd", model={"method": "lora", "rank": 16}, data={"prompt": "plain", "size": 400})
    with pytest.raises(InputError, match=r"sd: has no memorization numbers.*sdmem generate.*sdmem audit.*sd/audit"):
        _cli([sd])
    with pytest.raises(InputError, match="neither a run folder"):
        _cli([tmp_path / "missing"])


def test_mixed_kinds_need_axes(tmp_path):
    e = _run(tmp_path / "e", "edm", _nums(0.5, 3.0), data={"size": 100})
    s = _run(tmp_path / "s", "sd", _nums(0.05, 30.0), model={"method": "full", "rank": 16},
             data={"prompt": "class", "size": 100})
    with pytest.raises(InputError, match="different kinds.*--rows"):
        _cli([e, s, "--out", tmp_path / "o"])
    assert _cli([e, s, "--rows", "kind", "--out", tmp_path / "o"]) == 0
    md = (tmp_path / "o" / "compare.md").read_text().splitlines()
    assert md[0].startswith("| kind |") and [line.split(" | ")[0] for line in md[2:]] == ["| edm", "| sd"]


def test_cell_text_without_interval():
    r = Result("x", "edm", {}, 0.123, None, None, 2.0)
    assert cell_text(r) == "12.30% / 2.00" and cell_text(None) == "—"


def test_edm_default_rows_leave_out_columns_that_move_with_the_size(tmp_path):
    from sdmem.study.compare import Result, layout

    results = [Result(f"p{n}", "edm", {"size": n, "train.epochs": 48000 // n, "data.labels": lab}, 0.5, 0.4, 0.6, 1.0)
               for n in (20, 100) for lab in ("none", "true")]
    assert layout(results) == (["data.labels"], ["size"])


def test_edm_runs_of_one_size_are_told_apart_by_their_other_keys(tmp_path):
    a = _run(tmp_path / "a", "edm", _nums(0.5, 3.0), data={"size": 100}, model={"channels": 32})
    b = _run(tmp_path / "b", "edm", _nums(0.25, 5.0), data={"size": 100}, model={"channels": 64})
    results = load_runs([a, b])
    assert layout(results) == (["model.channels"], ["size"])
    assert _cli([a, b, "--out", tmp_path / "o"]) == 0
    assert (tmp_path / "o" / "compare.md").read_text().splitlines()[0] == "| model.channels | size=100 |"


def test_subset_json_gives_the_size_and_a_ratio_above_one_is_refused(tmp_path):
    a = _run(tmp_path / "a", "edm", _nums(0.5, 3.0), data={"size": 100}, model={"channels": 32})
    (a / "subset.json").write_text(json.dumps({"size": 90, "resolution": 8, "label_dim": 0}))
    assert load_runs([a])[0].values == {"size": "90"}
    (a / "audit" / "summary.json").write_text(json.dumps({**_nums(0.5, 3.0), "memorization_ratio": 7.5}))
    with pytest.raises(InputError, match="memorization_ratio: expected a finite number in \\[0, 1\\], got 7.5") as err:
        load_runs([a])
    assert err.value.where.endswith("summary.json")
