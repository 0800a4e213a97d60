"""`sdmem demo`: the study pipeline (sweep over |D|, audit, EMM, references) on a reduced setting; the full
setting, which must show the paper's direction within 10 minutes on 2 cores, is `slow`."""

import csv
import json

import pytest

from helpers import pinned_threads
from sdmem.demo import SETTINGS, demo_spec, run_demo

TINY = {"sizes": (10, 20, 30), "steps": 12, "num": 16}


def test_the_demo_spec_trains_every_size_for_the_same_steps(tmp_path):
    spec = demo_spec(tmp_path, settings=SETTINGS["full"])
    group = spec.zips[0]
    assert group["data.size"] == [20, 100, 500] and len(set(group["data.size"])) == 3
    steps = [e * n / 32 for e, n in zip(group["train.epochs"], group["data.size"])]
    assert all(s == pytest.approx(1500, abs=1) for s in steps)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with pinned_threads():
        summary = run_demo(out, settings=TINY, progress=False, part="edm")["edm"]
    return out, summary


def test_the_demo_writes_a_study(demo):
    out, summary = demo
    assert sorted(p.name for p in out.iterdir()) == ["audit_heldout", "audit_optimum", "demo.json", "emm.csv",
                                                    "emm.png", "optimum_samples", "points", "replicas",
                                                    "results.csv", "summary.json"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["edm", "edm", "edm", "optimum (Eq. 2)", "held-out real digits"]
    assert [r["size"] for r in rows[:3]] == ["10", "20", "30"] and all(r["labels"] == "none" for r in rows)
    assert float(rows[3]["memorization_ratio"]) == 1.0 and float(rows[4]["memorization_ratio"]) == 0.0
    assert sorted(p.name for p in (out / "replicas").iterdir()) == ["size-10.png", "size-20.png", "size-30.png"]
    emm = summary["emm"][0]
    assert emm["status"] in ("interpolated", "above_all", "below_all")
    assert json.loads((out / "summary.json").read_text())["models"][0]["size"] == 10


def test_the_demo_rows_are_the_points_own_best_snapshots(demo):
    out, summary = demo
    for m in summary["models"]:
        best = json.loads((out / "points" / m["point"] / "run" / "best.json").read_text())
        assert m["memorization_ratio"] == best["memorization_ratio"] and m["epoch"] == best["epoch"]


def test_re_running_the_demo_resumes_without_training(demo, capsys):
    out, summary = demo
    again = run_demo(out, settings=TINY, progress=False, part="edm")["edm"]
    assert again["models"] == summary["models"]


@pytest.mark.slow
def test_the_full_demo_shows_the_papers_direction(tmp_path):
    summary = run_demo(tmp_path / "demo", progress=False, part="edm")["edm"]
    ratios = [m["memorization_ratio"] for m in summary["models"]]
    assert ratios[0] > 0.5 and ratios[-1] <= ratios[0] - 0.3
