"""EDM memorization tracking goes through the one generation core: each tracked snapshot keeps its images (PNGs and
manifest, on the fixed seed grid) and their audit; `sdmem generate` of that snapshot makes the same images and
extends the folder; report: best reads the tracked audit (and images) of the new and of the old layout."""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import raises, write_tiny_edm
from sdmem.config import fingerprint
from sdmem.edm.run import EDMPaths
from sdmem.runs import load_config, read_run_config

SEEDS = list(range(3, 23))  # track.seed 3 (not a multiple of track.batch 16): grid blocks [0, 16) and [16, 32)
EPOCHS = (4, 8)

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(autouse=True)
def no_inception_weights(tmp_path, monkeypatch):
    """No FID unless a test puts weights in place (a private cache: nothing from the machine's)."""
    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDMEM_INCEPTION_WEIGHTS", raising=False)


def _config(tmp, name="run"):
    return load_config(write_tiny_edm(tmp, name, labels="true", track=len(SEEDS)), [f"track.seed={SEEDS[0]}"])


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread_module) -> Path:
    """A conditional tiny EDM run (2 classes, 32 digits), 8 epochs, 20 images tracked at epochs 4 and 8."""
    from sdmem.edm.train import train

    cfg = _config(tmp_path_factory.mktemp("tracked"))
    train(cfg, progress=False)
    return Path(cfg.out_dir)


def _pixels(folder: Path, seeds) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{s:06d}.png").convert("RGB")) for s in seeds])


def _copy_run(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "run")
    return tmp / "run"


def test_each_tracked_snapshot_keeps_its_images_manifest_and_audit(run):
    cfg = read_run_config(run, "edm")
    rows = [json.loads(line) for line in (run / "tracking.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(EPOCHS)
    for epoch in EPOCHS:
        folder = run / "tracking" / f"epoch-{epoch:07d}"
        assert sorted(p.name for p in folder.iterdir()) == ["audit", "generated"]
        generated = folder / "generated"
        assert sorted(p.name for p in generated.glob("*.png")) == [f"{s:06d}.png" for s in SEEDS]
        manifest = json.loads((generated / "manifest.json").read_text())
        assert manifest["settings"] == {"made_by": {"kind": "edm", "fingerprint": fingerprint(cfg)},
                                        "snapshot": f"epoch {epoch}", "sampler": "edm-heun", "steps": 4,
                                        "sigma_min": cfg.track.sigma_min, "batch": 16, "size": [8, 8]}
        assert sorted(manifest["images"]) == [f"{s:06d}.png" for s in SEEDS]
        assert {c["class"] for c in manifest["images"].values()} <= {0, 1}
        summary = json.loads((folder / "audit" / "summary.json").read_text())
        assert summary["num_generated"] == len(SEEDS) and (folder / "audit" / "per_sample.csv").is_file()


def test_the_tracked_row_is_an_audit_of_the_tracked_folder_against_the_run(run):
    from sdmem.audit.api import audit

    rows = [json.loads(line) for line in (run / "tracking.jsonl").read_text().splitlines()]
    for row in rows:
        report = audit(run, run / "tracking" / f"epoch-{row['epoch']:07d}" / "generated", progress=False)
        assert len(report.replica) == row["num_generated"] == len(SEEDS)
        assert report.memorization_ratio == row["memorization_ratio"]
        assert report.knn_distance == row["knn_distance"]
        assert list(report.ci95) == row["memorization_ratio_ci95"]


def test_tracked_images_are_those_sdmem_generate_makes_and_it_extends_their_folder(run, tmp_path):
    from sdmem.edm.generate import generate_run

    tracked = run / "tracking" / f"epoch-{EPOCHS[0]:07d}" / "generated"
    out = tmp_path / "generated"
    kw = dict(snapshot=str(EPOCHS[0]), batch=16, steps=4, device="cpu", progress=False)
    assert generate_run(run, out, seeds=SEEDS, **kw) == len(SEEDS)
    assert np.array_equal(_pixels(out, SEEDS), _pixels(tracked, SEEDS))  # same grid, same batch: byte-equal
    ours, theirs = (json.loads((f / "manifest.json").read_text()) for f in (out, tracked))
    assert ours["settings"] == theirs["settings"] and ours["images"] == theirs["images"]
    # `sdmem generate` of that snapshot into the tracked folder is accepted: nothing to do, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in tracked.iterdir()}
    assert generate_run(run, tracked, seeds=SEEDS, **kw) == 0
    assert {p.name: p.stat().st_mtime_ns for p in tracked.iterdir()} == before
    # ... and a call with other settings is refused, naming the setting.
    raises(lambda: generate_run(run, tracked, seeds=SEEDS, **{**kw, "batch": 8}), str(tracked), "batch")


def test_tracking_an_epoch_again_completes_the_same_folder_and_replaces_one_of_other_settings(run, tmp_path):
    from dataclasses import replace

    from sdmem.data.subset import load_subset
    from sdmem.edm.run import load_snapshot
    from sdmem.edm.tracking import track_memorization

    copy = _copy_run(run, tmp_path)
    paths, subset = EDMPaths(copy), load_subset(copy)
    cfg = replace(read_run_config(copy, "edm"), out_dir=str(copy))
    ema = load_snapshot(paths.snapshot(EPOCHS[0]))[0]
    generated = copy / "tracking" / f"epoch-{EPOCHS[0]:07d}" / "generated"
    kept = _pixels(generated, SEEDS)
    (generated / f"{SEEDS[-1]:06d}.png").unlink()  # a kill before the last image was written
    others = {p.name: p.stat().st_mtime_ns for p in generated.glob("*.png")}
    row = track_memorization(cfg, paths, ema, subset, "cpu", epoch=EPOCHS[0], step=8, nimg=128)
    assert {p.name: p.stat().st_mtime_ns for p in generated.glob("*.png") if p.name in others} == others
    assert np.array_equal(_pixels(generated, SEEDS), kept)
    first = json.loads(run.joinpath("tracking.jsonl").read_text().splitlines()[0])
    assert (row["memorization_ratio"], row["knn_distance"]) == (first["memorization_ratio"], first["knn_distance"])
    # Other track settings (a resume may change them): the folder is made again with these, fewer seeds included.
    fewer = replace(cfg, track=replace(cfg.track, steps=3, num_images=8))
    row = track_memorization(fewer, paths, ema, subset, "cpu", epoch=EPOCHS[0], step=8, nimg=128)
    manifest = json.loads((generated / "manifest.json").read_text())
    assert manifest["settings"]["steps"] == 3 and manifest["settings"]["batch"] == 8
    assert sorted(p.name for p in generated.glob("*.png")) == [f"{s:06d}.png" for s in range(3, 11)]
    assert row["num_generated"] == 8 == json.loads((generated.parent / "audit" / "summary.json").read_text())[
        "num_generated"]


def _point(run: Path, tmp: Path):
    return types.SimpleNamespace(dir=tmp / "point", run_dir=run, config=read_run_config(run, "edm"))


def _to_old_layout(run: Path) -> None:
    """A run tracked before the images were kept: tracking/epoch-N/ holds the audit itself, no images."""
    for epoch in EPOCHS:
        folder = run / "tracking" / f"epoch-{epoch:07d}"
        for f in (folder / "audit").iterdir():
            f.rename(folder / f.name)
        (folder / "audit").rmdir()
        shutil.rmtree(folder / "generated")


@pytest.mark.parametrize("layout", ["new", "old"])
def test_report_best_copies_the_best_snapshots_audit_in_either_layout(run, tmp_path, layout):
    from sdmem.edm.kind import EDMKind

    copy = _copy_run(run, tmp_path)
    best = json.loads((copy / "best.json").read_text())
    tracked = copy / "tracking" / f"epoch-{best['epoch']:07d}" / "audit"
    expected = (tracked / "summary.json").read_text()
    if layout == "old":
        _to_old_layout(copy)
    point = _point(copy, tmp_path)
    point.dir.mkdir()
    row = EDMKind()._best(point, EDMPaths(copy), progress=False, device="cpu")
    assert (point.dir / "audit" / "summary.json").read_text() == expected
    assert sorted(p.name for p in (point.dir / "audit").iterdir()) == ["per_sample.csv", "ratio_hist.png",
                                                                       "replicas.png", "summary.json"]
    assert row["memorization_ratio"] == best["memorization_ratio"] and row["epoch"] == best["epoch"]
    assert row["fid"] is None and not (point.dir / "generated").exists()  # no weights in place: no FID


def test_report_best_fid_is_that_of_the_tracked_images_or_of_them_made_again(run, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from helpers import random_state_dict
    from sdmem.edm.kind import EDMKind
    from sdmem.fid import compute_fid

    weights = tmp_path / "inception.safetensors"
    save_file(random_state_dict(), str(weights))
    monkeypatch.setenv("SDMEM_INCEPTION_WEIGHTS", str(weights))
    copy = _copy_run(run, tmp_path)
    best = json.loads((copy / "best.json").read_text())
    tracked = copy / "tracking" / f"epoch-{best['epoch']:07d}" / "generated"
    point = _point(copy, tmp_path)
    point.dir.mkdir()
    fid = EDMKind()._best(point, EDMPaths(copy), progress=False, device="cpu")["fid"]
    assert fid == pytest.approx(compute_fid(tracked, copy, weights=weights).fid) and fid > 0
    assert not (point.dir / "generated").exists()  # computed on the tracked images themselves
    kept = _pixels(tracked, SEEDS)
    _to_old_layout(copy)
    again = EDMKind()._best(point, EDMPaths(copy), progress=False, device="cpu")["fid"]
    assert np.array_equal(_pixels(point.dir / "generated", SEEDS), kept)  # the same seed grid and batch
    assert again == pytest.approx(fid)
