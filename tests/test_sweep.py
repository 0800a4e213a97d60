"""`sdmem sweep`: spec checks, points, resume, refusal of a changed spec, claims and concurrent shards, results."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from sdmem.errors import InputError
from helpers import write_spec
from sdmem.study.sweep import Claim, load_spec, parse_shard, points, run_sweep, select

def test_points_are_the_product_of_axes_and_zipped_groups(tmp_path):
    pts = points(load_spec(write_spec(tmp_path)))
    assert [p.name for p in pts] == ["size-16_labels-none_channels-8", "size-16_labels-true_channels-16",
                                     "size-32_labels-none_channels-8", "size-32_labels-true_channels-16"]


def test_a_points_config_takes_its_values_and_lives_in_its_folder(tmp_path):
    pts = points(load_spec(write_spec(tmp_path)))
    assert pts[1].config.model.channels == 16 and pts[1].config.data.labels == "true"
    assert pts[0].config.track.num_images == 8  # report: best is judged on generate.num images
    assert str(pts[0].config.out_dir).endswith("size-16_labels-none_channels-8/run")


def test_only_and_shard_select_points(tmp_path):
    pts = points(load_spec(write_spec(tmp_path)))
    assert [p.name for p in select(pts, ["data.size=32"])] == [pts[2].name, pts[3].name]
    shards = [select(pts, shard=(i, 3)) for i in (1, 2, 3)]
    assert sorted(p.name for s in shards for p in s) == sorted(p.name for p in pts)  # a partition


@pytest.mark.parametrize("over,where", [
    ({"axis": {}}, "axis"),
    ({"axes": {"data.size": []}}, "axes.data.size"),
    ({"axes": {"data.sizee": [1]}}, "data.sizee"),
    ({"zip": [{"data.labels": ["none", "true"], "model.channels": [8]}]}, "zip[0]"),
    ({"generate": {"num": 0}}, "generate.num"),
    ({"report": "worst"}, "report"),
    ({"overrides": {"data.size": 8}}, "data.size"),
])
def test_bad_specs_are_refused_by_key(tmp_path, over, where):
    with pytest.raises(InputError) as exc:
        load_spec(write_spec(tmp_path, **over))
    assert where in exc.value.where and "spec.yaml" in exc.value.where
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b"])
def test_bad_shards_are_refused(text):
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)


def test_the_cli_refuses_a_bad_spec_in_one_line(tmp_path, cli):
    cli("sweep", write_spec(tmp_path, zip=[{"data.labels": ["none"], "model.channels": [8, 16]}])) \
        .one_line_error("zip[0]", "one length")
    cli("sweep", write_spec(tmp_path), "--shard", "3/2").one_line_error("--shard")
    assert not (tmp_path / "sweep").exists()


def test_dry_run_lists_points_and_writes_nothing(tmp_path, cli):
    r = cli("sweep", write_spec(tmp_path), "--dry-run")
    assert r.code == 0 and "4 points; nothing was written" in r.out and "size-32_labels-true_channels-16" in r.out
    assert not (tmp_path / "sweep").exists()


@pytest.fixture
def finished(tmp_path, one_thread):
    path = write_spec(tmp_path, axes={"data.size": [16, 32]}, zip=[])
    spec = load_spec(path)
    rows = run_sweep(spec, progress=False, log=lambda *_: None)
    return path, spec, rows


def test_the_table_agrees_with_each_points_own_records(finished):
    path, spec, rows = finished
    with open(spec.out_dir / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["size-16", "size-32"] and [r["size"] for r in table] == ["16", "32"]
    for r in table:
        best = json.loads((spec.out_dir / r["point"] / "run" / "best.json").read_text())
        audit = json.loads((spec.out_dir / r["point"] / "audit" / "summary.json").read_text())
        assert float(r["memorization_ratio"]) == best["memorization_ratio"] == audit["memorization_ratio"]
        assert float(r["knn_distance"]) == pytest.approx(best["knn_distance"])
        assert int(r["epoch"]) == best["epoch"] and int(r["num_params"]) > 0
    md = (spec.out_dir / "results.md").read_text()
    assert md.count("\n") == 4 and "size-32" in md


def test_a_finished_sweep_resumes_without_training_again(finished):
    path, spec, rows = finished
    log = []
    again = run_sweep(load_spec(path), progress=False, log=log.append)
    assert again == rows and all("finished" in line for line in log)
    # An interrupted point (no result.json) is completed, through the trainer's own resume.
    (spec.out_dir / "size-16" / "result.json").unlink()
    log.clear()
    assert run_sweep(load_spec(path), progress=False, log=log.append)[0]["memorization_ratio"] == \
        rows[0]["memorization_ratio"]
    assert sum("running" in line for line in log) == 1


def test_a_changed_spec_that_alters_a_finished_point_is_refused(finished, tmp_path):
    path, spec, rows = finished
    raw = yaml.safe_load(path.read_text())
    raw["overrides"] = {"train.lr": 1e-3}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="train.lr"):
        run_sweep(load_spec(path), progress=False, log=lambda *_: None)
    raw["overrides"], raw["generate"] = {}, {"num": 9}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="generate"):
        run_sweep(load_spec(path), progress=False, log=lambda *_: None)


def test_a_point_made_before_a_later_key_is_refused_with_the_override_that_finishes_it(tmp_path):
    from sdmem.config import fingerprint, stored_config
    from sdmem.edm.config import EDMConfig
    from sdmem.study.sweep import _point_record, check_point

    spec = load_spec(write_spec(tmp_path))
    p = points(spec)[0]
    record = _point_record(spec, p)
    del record["config"]["train"]["fused_adam"]  # point.json as sweeps made before the key wrote it
    record["fingerprint"] = fingerprint(stored_config(EDMConfig, record["config"]))
    p.dir.mkdir(parents=True)
    (p.dir / "point.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="made before train.fused_adam existed: add train.fused_adam: false to the "
                                         "spec's overrides"):
        check_point(spec, p)
    raw = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    raw["overrides"] = {"train.fused_adam": False}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "spec.yaml")
    check_point(spec, points(spec)[0])  # the old setting finishes it


def test_a_live_claim_is_respected_and_a_dead_one_taken_over(tmp_path):
    folder = tmp_path / "p"
    mine = Claim(folder)
    assert mine.acquire()
    assert not Claim(folder).acquire()  # held by a live process (this one)
    mine.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "claim.json").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout),
                                                   "heartbeat": 0}))
    other = Claim(folder)
    assert other.acquire() and json.loads((folder / "claim.json").read_text())["pid"] == os.getpid()
    other.release()
    assert not (folder / "claim.json").exists()


def _worker(spec, *extra):
    return subprocess.Popen([sys.executable, "-m", "sdmem", "sweep", str(spec), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("shards", [("1/2", "2/2"), (None, None)])
def test_two_concurrent_workers_never_run_a_point_twice(tmp_path, shards):
    path = write_spec(tmp_path)
    procs = [_worker(path, *(["--shard", s] if s else [])) for s in shards]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out)
    ran = [line.split("]")[1].split(":")[0].strip() for out in outs for line in out.splitlines()
           if line.endswith(": running")]
    assert sorted(ran) == sorted(p.name for p in points(load_spec(path)))  # each point exactly once
    with open(tmp_path / "sweep" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # the last worker to finish collects every point


def test_a_sweep_under_accelerate_launch_trains_each_point_with_two_processes(tmp_path):
    path = write_spec(tmp_path, axes={"data.size": [16, 32]}, zip=[])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(29700 + os.getpid() % 200), "-m", "sdmem", "sweep", str(path), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished points in") == 1 and proc.stdout.count(": running") == 2, proc.stdout
    with open(tmp_path / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["size"] for r in rows] == ["16", "32"] and not list((tmp_path / "sweep").rglob("claim.json"))
