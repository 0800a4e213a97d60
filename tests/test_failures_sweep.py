"""The check-list of failures above one run, for sweeps and the demo: every category ends in exit 2 and one line
naming the file, key or option, with nothing of the user's touched and nothing written outside the output folder.
(emm, compare, curves and enough: test_failures_study.py; foreign weights: test_failures_foreign.py.)"""

import json
import os
import socket
import time

import pytest
import yaml

from sdmem.errors import InputError
from sdmem.study.sweep import (Claim, _point_record, load_spec, open_sweep_folder, points, run_sweep)
from helpers import write_spec


def tree(folder):
    """{relative path: bytes} of every file under folder (what must stay untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def started(tmp_path, **over):
    """A spec whose sweep folder is made (sweep.json) without training: what a first command leaves."""
    path = write_spec(tmp_path, **over)
    spec = load_spec(path)
    open_sweep_folder(spec, points(spec))
    return path, spec


# 1. A user's files are never deleted: point names stay inside, foreign folders are refused.

@pytest.mark.parametrize("label", ["..", ".", ".hidden", "a/b", "", "x" * 300])
def test_a_zip_label_that_climbs_out_is_refused(cli, tmp_path, label):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    spec = write_spec(tmp_path, axes={}, zip=[{"data.size": [16, 32], "name": ["ok", label]}])
    cli("sweep", spec).one_line_error("zip[0].name")
    assert not (tmp_path / "sweep").exists() and tree(mine) == {"keep.txt": b"user data"}


def test_a_value_whose_text_is_unsafe_still_gives_a_folder_inside(tmp_path):
    spec = load_spec(write_spec(tmp_path, axes={"data.source": ["../../x", "builtin:digits"]}, zip=[]))
    for p in points(spec):
        assert p.dir.parent == spec.out_dir and p.dir.resolve().parent == spec.out_dir.resolve()


def test_a_foreign_out_dir_is_refused_and_left_as_it_is(cli, tmp_path):
    out = tmp_path / "sweep"
    (out / "size-16").mkdir(parents=True)
    (out / "thesis.tex").write_text("mine")
    (out / "size-16" / "notes.txt").write_text("mine too")
    before = tree(out)
    cli("sweep", write_spec(tmp_path)).one_line_error(str(out), "thesis.tex")
    assert tree(out) == before


def test_another_workers_record_in_flight_is_not_foreign(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    spec.out_dir.mkdir()
    (spec.out_dir / f".sweep.json.tmp-{2**22 + 7}").write_text("{")  # a worker between writing and linking it
    assert open_sweep_folder(spec, points(spec)) == [] and (spec.out_dir / "sweep.json").is_file()


def test_a_point_folder_the_user_made_is_refused(cli, tmp_path):
    path, spec = started(tmp_path)
    folder = points(spec)[0].dir
    folder.mkdir()
    (folder / "audit").mkdir()
    (folder / "audit" / "mine.csv").write_text("1,2")
    cli("sweep", path).one_line_error(folder.name, "no point.json")
    assert (folder / "audit" / "mine.csv").read_text() == "1,2"


@pytest.mark.parametrize("extra", [["--quick"], []])
def test_the_demo_refuses_a_folder_it_did_not_make(cli, tmp_path, extra):
    out = tmp_path / "photos"
    (out / "replicas").mkdir(parents=True)
    (out / "replicas" / "holiday.png").write_bytes(b"\x89PNG mine")
    (out / "results.csv").write_text("my,own\n")
    before = tree(out)
    cli("demo", "--out", out, "--quiet", *extra).one_line_error(str(out), "not an sdmem demo folder")
    assert tree(out) == before


# 2. Results are never mixed: a folder knows what made it.

def test_a_spec_with_other_axes_in_another_sweeps_folder_is_refused(cli, tmp_path):
    path, spec = started(tmp_path)
    (spec.out_dir / "results.csv").write_text("theirs\n")
    other = write_spec(tmp_path, name="other.yaml", axes={"data.size": [8, 24]})
    cli("sweep", other).one_line_error("sweep.json", "other points", "size-8")
    assert (spec.out_dir / "results.csv").read_text() == "theirs\n"
    assert not any(p.name.startswith("size-8") for p in spec.out_dir.iterdir())


@pytest.mark.parametrize("key,value", [("train.epochs", 4), ("train.log_every_steps", 4), ("track.batch", 8),
                                       ("train.lr", 1e-3), ("data.seed", 9)])
def test_any_changed_key_of_a_started_point_is_refused_by_name(cli, tmp_path, key, value):
    path, spec = started(tmp_path)
    changed = write_spec(tmp_path, name="changed.yaml", overrides={key: value})
    cli("sweep", changed).one_line_error(key, "differ")


@pytest.mark.parametrize("over,what", [({"generate": {"num": 4}}, "generate"), ({"report": "final"}, "report")])
def test_other_generate_or_report_settings_are_refused(cli, tmp_path, over, what):
    started(tmp_path)
    cli("sweep", write_spec(tmp_path, name="changed.yaml", **over)).one_line_error("sweep.json", what)


def test_equal_settings_resume_and_a_grown_epochs_trains_on_and_reports_again(tmp_path, one_thread):
    path = write_spec(tmp_path, axes={"data.size": [16]}, zip=[], overrides={"train.epochs": 4})
    first = run_sweep(load_spec(path), progress=False, log=lambda *_: None)
    again = run_sweep(load_spec(path), progress=False, log=lambda *_: None)
    assert again == first and first[0]["epoch"] == 4
    log = []
    longer = write_spec(tmp_path, name="longer.yaml", axes={"data.size": [16]}, zip=[], overrides={"train.epochs": 8})
    grown = run_sweep(load_spec(longer), progress=False, log=log.append)
    assert any("running" in line for line in log)
    tracked = [json.loads(x) for x in (load_spec(longer).out_dir / "size-16" / "run" / "tracking.jsonl")
               .read_text().splitlines()]
    assert [r["epoch"] for r in tracked] == [4, 8]  # trained on from epoch 4, not again from scratch
    best = max(tracked, key=lambda r: (r["memorization_ratio"], -r["step"]))
    assert grown[0]["epoch"] == best["epoch"] and grown[0]["memorization_ratio"] == best["memorization_ratio"]
    record = json.loads((load_spec(longer).out_dir / "size-16" / "point.json").read_text())
    assert record["config"]["train"]["epochs"] == 8
    # Shrinking it back is not a continuation: refused.
    with pytest.raises(InputError, match="train.epochs"):
        run_sweep(load_spec(path), progress=False, log=lambda *_: None)


def test_the_full_demo_in_the_quick_demos_folder_is_refused(cli, tmp_path):
    from sdmem.demo import SETTINGS, open_demo_folder

    out = tmp_path / "demo"
    q = SETTINGS["quick"]
    open_demo_folder(out, {"quick": True, "seed": 0, "sizes": list(q["sizes"]), "steps": q["steps"], "num": q["num"]})
    before = tree(out)
    cli("demo", "--out", out, "--quiet").one_line_error(str(out), "quick", "other settings")
    cli("demo", "--out", out, "--quiet", "--quick", "--seed", "1").one_line_error("seed")
    assert tree(out) == before


@pytest.mark.parametrize("over,where,words", [
    ({"axes": {"data.size": [16, 16]}}, "axes.data.size", "16 is listed twice"),
    ({"zip": [{"data.labels": ["none", "none"], "model.channels": [8, 8]}]}, "zip[0]", "listed twice"),
    ({"axes": {"data.size": [None, 32]}}, "data.size", "train the same config"),
    ({"axes": {"data.source": ["builtin:digits", "builtin/digits"]}}, "data.source", "same folder name"),
])
def test_duplicate_points_are_refused_naming_the_axis_and_value(tmp_path, over, where, words):
    with pytest.raises(InputError) as exc:
        load_spec(write_spec(tmp_path, **over))
    assert where in str(exc.value) and words in str(exc.value)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_folder_of_an_earlier_sdmem_is_adopted_only_for_its_own_spec(cli, tmp_path):
    path = write_spec(tmp_path)
    spec = load_spec(path)
    p = points(spec)[0]
    _point_folder(spec, p, _point_record(spec, p))  # what an earlier sdmem left: point.json, results.csv
    (spec.out_dir / "results.csv").write_text("old\n")
    other = write_spec(tmp_path, name="other.yaml", axes={"data.size": [8, 24]})
    cli("sweep", other).one_line_error(str(spec.out_dir), p.name)  # another spec's points: foreign
    assert not (spec.out_dir / "sweep.json").exists()
    assert open_sweep_folder(spec, points(spec)) == [] and (spec.out_dir / "sweep.json").is_file()


def test_a_demo_folder_of_an_earlier_sdmem_is_adopted_with_its_own_settings(tmp_path):
    from sdmem.demo import SETTINGS, open_demo_folder

    out = tmp_path / "demo_out"
    (out / "points").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"quick": True, "seed": 0, "models": []}))
    q = SETTINGS["quick"]
    quick = {"quick": True, "seed": 0, "sizes": list(q["sizes"]), "steps": q["steps"], "num": q["num"]}
    with pytest.raises(InputError, match="quick"):
        open_demo_folder(out, {**quick, "quick": False})
    assert not (out / "demo.json").exists()
    open_demo_folder(out, quick)
    assert json.loads((out / "demo.json").read_text())["settings"] == quick


# 3. Damaged records are refused in one line (or, for a claim, taken as a dead worker's).

def _point_folder(spec, p, record):
    p.dir.mkdir(parents=True, exist_ok=True)
    (p.dir / "point.json").write_text(record if isinstance(record, str) else json.dumps(record))


@pytest.mark.parametrize("damage,field", [("[1, 2]", "expected a JSON object"), ("{", "unreadable"),
                                          ({"kind": "edm"}, "values"), ("report=7", "report")])
def test_a_damaged_point_record_is_one_line(cli, tmp_path, damage, field):
    path, spec = started(tmp_path)
    p = points(spec)[0]
    if damage == "report=7":
        damage = {**_point_record(spec, p), "report": 7}
    _point_folder(spec, p, damage)
    cli("sweep", path).one_line_error("point.json", field)


@pytest.mark.parametrize("damage,field", [({}, "size"), ({"size": 16}, "num_params"),
                                          ("[]", "expected a JSON object"), ("null", "expected a JSON object"),
                                          ("ratio=7.5", "memorization_ratio"), ("interval", "low end is above")])
def test_a_damaged_result_is_refused_never_a_blank_row(cli, tmp_path, damage, field):
    path, spec = started(tmp_path)
    p = points(spec)[0]
    _point_folder(spec, p, _point_record(spec, p))
    good = {"num_params": 10, "size": 16, "memorization_ratio": 0.5, "memorization_ratio_low": 0.4,
            "memorization_ratio_high": 0.6, "knn_distance": 3.0, "fid": None, "epoch": 8, "step": 16,
            "images_seen": 256, "num_generated": 8, "wall_time_s": 1.0}
    if damage == "ratio=7.5":
        damage = {**good, "memorization_ratio": 7.5}
    elif damage == "interval":
        damage = {**good, "memorization_ratio_low": 0.7}
    (p.dir / "result.json").write_text(damage if isinstance(damage, str) else json.dumps(damage))
    cli("sweep", path).one_line_error("result.json", field)
    assert not (spec.out_dir / "results.csv").exists()


@pytest.mark.parametrize("content", ["", "{", "[]", '{"host": 3}', '{"host": "h", "pid": "x", "heartbeat": 1}'])
def test_a_damaged_claim_is_a_live_one_while_fresh_and_a_dead_one_when_stale(tmp_path, content):
    folder = tmp_path / "point"
    folder.mkdir()
    (folder / "claim.json").write_text(content)
    assert not Claim(folder).acquire()  # fresh: perhaps a worker between creating and writing it
    old = time.time() - 3600
    os.utime(folder / "claim.json", (old, old))
    claim = Claim(folder)
    assert claim.acquire()  # stale: a dead worker's, taken over
    assert json.loads((folder / "claim.json").read_text())["pid"] == os.getpid()
    claim.release()


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    folder = tmp_path / "point"
    folder.mkdir()
    (folder / "claim.json").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345,
                                                   "heartbeat": time.time()}))
    claim = Claim(folder)
    assert claim.acquire()
    claim.release()


@pytest.mark.parametrize("damage", ["{", "[]", '{"format": "sdmem-sweep/1"}', '{"format": "other", "generate": {}, '
                                                                               '"report": "best", "points": {}}'])
def test_a_damaged_sweep_record_is_one_line(cli, tmp_path, damage):
    path, spec = started(tmp_path)
    (spec.out_dir / "sweep.json").write_text(damage)
    cli("sweep", path).one_line_error("sweep.json")


@pytest.mark.parametrize("bad,field", [({"epoch": 8}, "step"), ({"memorization_ratio": "high"}, "memorization_ratio"),
                                       ({"memorization_ratio_ci95": [0.9, 0.1]}, "memorization_ratio_ci95")])
def test_a_damaged_tracking_row_is_refused_when_the_best_snapshot_is_chosen(tmp_path, bad, field):
    from sdmem.edm.train import update_best
    from sdmem.edm.run import EDMPaths

    good = {"epoch": 4, "step": 8, "nimg": 128, "memorization_ratio": 0.5, "memorization_ratio_ci95": [0.4, 0.6],
            "knn_distance": 3.0, "num_generated": 8}
    paths = EDMPaths(tmp_path)
    with pytest.raises(InputError) as exc:
        update_best(paths, [good, {**good, **bad} if "epoch" not in bad else {k: v for k, v in good.items()
                                                                              if k != "step"}])
    assert "tracking.jsonl row 2" in str(exc.value) and field in str(exc.value)
    assert not paths.best.exists()
    assert update_best(paths, [good])["memorization_ratio"] == 0.5 and paths.best.exists()


# 4. Whole outputs or none; staging of a killed process is removed by the next run.

def test_the_collection_writes_both_tables_or_neither(tmp_path, monkeypatch):
    import sdmem.study.sweep as sweep

    spec = load_spec(write_spec(tmp_path))
    spec.out_dir.mkdir()
    (spec.out_dir / "results.csv").write_text("old\n")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sweep, "markdown_table", fail)
    with pytest.raises(OSError):
        sweep.write_results(spec, [])
    assert (spec.out_dir / "results.csv").read_text() == "old\n" and not (spec.out_dir / "results.md").exists()
    assert [p.name for p in spec.out_dir.iterdir()] == ["results.csv"]


def test_staging_left_by_a_killed_demo_is_removed_by_the_next_run(tmp_path):
    from sdmem.utils import staged_folder

    out = tmp_path / "demo"
    dead = out / f".staging-{socket.gethostname()}-{2**22 + 4321}"
    old_style = out / f".staging-{2**22 + 4322}"
    alive = out / f".staging-{socket.gethostname()}-{os.getppid()}"
    other_host = out / ".staging-elsewhere-12"
    for d in (dead, old_style, alive, other_host):
        (d / "replicas").mkdir(parents=True)
    with staged_folder(out) as stage:
        (stage / "summary.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == sorted([alive.name, other_host.name, "summary.json"])


# 5. Values a study must refuse.

@pytest.mark.parametrize("over,key", [({"out_dir": None}, "out_dir"), ({"out_dir": ["a"]}, "out_dir"),
                                      ({"out_dir": ""}, "out_dir"), ({"overrides": []}, "overrides"),
                                      ({"axes": [1]}, "axes"), ({"zip": {"a": 1}}, "zip"), ({"kind": 3}, "kind"),
                                      ({"generate": None}, "generate")])
def test_spec_fields_of_the_wrong_type_are_refused(cli, tmp_path, over, key):
    cli("sweep", write_spec(tmp_path, **over)).one_line_error("spec.yaml", key)
    assert not (tmp_path / "None").exists() and not (tmp_path / "sweep").exists()
    assert not os.path.exists("None")


@pytest.mark.parametrize("text", ["", " ", "1/0", "2", "1/2/3"])
def test_shard_must_be_i_of_n(cli, tmp_path, text):
    cli("sweep", write_spec(tmp_path), "--shard", text).one_line_error("--shard")
    assert not (tmp_path / "sweep").exists()


def test_the_spec_file_is_unchanged_by_every_refusal(cli, tmp_path):
    path = write_spec(tmp_path, axes={"data.size": [16, 16]})
    text = path.read_text()
    cli("sweep", path).one_line_error("axes.data.size")
    assert path.read_text() == text and yaml.safe_load(text)["axes"]["data.size"] == [16, 16]
