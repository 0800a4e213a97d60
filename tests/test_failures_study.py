"""The check-list of study failures (`sdmem emm`, `compare`, `curves`, `enough`): each category ends in exit 2, one
line naming the file (and row, line or field) and the problem, no traceback, and nothing half-written. Inputs are
built by hand (a results.csv, fake run folders): no training. (Sweep failures: test_failures_sweep.py.)"""

import csv
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

RESULT_FIELDS = ["data.size", "num_params", "size", "memorization_ratio", "memorization_ratio_low",
                 "memorization_ratio_high", "knn_distance", "fid", "epoch", "step", "images_seen", "num_generated",
                 "wall_time_s", "point"]


# Builders: whole, valid records as sdmem writes them (sdmem.records' schemas), then damaged one at a time.

def _write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _summary(ratio):  # audit/summary.json (AUDIT_SUMMARY)
    return {"memorization_ratio": ratio, "memorization_ratio_ci95": [max(0.0, ratio - 0.05), min(1.0, ratio + 0.05)],
            "knn_distance": 4.0, "num_generated": 20, "num_replicas": round(20 * ratio)}


def _tracked(i, ratio):  # a tracking.jsonl row and best.json (TRACKED)
    return {"epoch": 4 * (i + 1), "step": 8 * (i + 1), "nimg": 128 * (i + 1), **_summary(ratio), "time": 1.0}


def _flags(path, ratio, n=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "ratio", "replica"])
        w.writerows([i, f"{i:06d}.png", 0.5, int(i < round(n * ratio))] for i in range(n))


def make_run(folder, size=100, channels=32, ratios=(0.3, 0.8)):
    """An EDM run folder: config.json, subset.json, tracking.jsonl, best.json, audit/{summary.json,per_sample.csv}."""
    _write_json(folder / "config.json", {"kind": "edm", "out_dir": str(folder), "data": {"size": size},
                                         "model": {"channels": channels}})
    _write_json(folder / "subset.json", {"size": size, "resolution": 8, "label_dim": 0})
    rows = [_tracked(i, r) for i, r in enumerate(ratios)]
    (folder / "tracking.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_json(folder / "best.json", max(rows, key=lambda r: r["memorization_ratio"]))
    _write_json(folder / "audit" / "summary.json", _summary(ratios[-1]))
    _flags(folder / "audit" / "per_sample.csv", ratios[-1])
    return folder


def _result_row(size, ratio):
    return {"data.size": size, "num_params": 1000, "size": size, "memorization_ratio": ratio,
            "memorization_ratio_low": max(0.0, ratio - 0.05), "memorization_ratio_high": min(1.0, ratio + 0.05),
            "knn_distance": 2.0, "epoch": 8, "step": 16, "images_seen": 256, "num_generated": 20,
            "wall_time_s": 1.0, "point": f"size-{size}"}


def write_results(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return folder / "results.csv"


def make_sweep(folder, ratios=(0.98, 0.95, 0.5)):
    """A finished sweep folder over data.size: results.csv, and per point point.json and audit/per_sample.csv."""
    rows = [_result_row(size, r) for size, r in zip((100, 200, 500), ratios)]
    write_results(folder, rows)
    for r in rows:
        _write_json(folder / r["point"] / "point.json",
                    {"values": {"data.size": r["size"]}, "kind": "edm", "fingerprint": "0" * 16,
                     "config": {"kind": "edm", "data": {"size": r["size"]}}, "generate": {"num": 20},
                     "report": "best"})
        _flags(folder / r["point"] / "audit" / "per_sample.csv", r["memorization_ratio"])
    return folder


def _edit_results(path, row, column, value):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row - 1][column] = value
    write_results(path.parent, rows)


# 1. Damaged records read by compare, curves and enough: one line naming the file and the field.

DAMAGE = {  # category: (damage of a record, the words of the error besides the file)
    "wrong JSON type": (lambda r: [r], ["expected a JSON object"]),
    "missing key": (lambda r: {k: v for k, v in r.items() if k != "memorization_ratio"},
                    ["memorization_ratio", "required field is missing"]),
    "non-numeric": (lambda r: {**r, "memorization_ratio": "0.5"}, ["memorization_ratio", "finite number"]),
    "ratio above 1": (lambda r: {**r, "memorization_ratio": 7.5}, ["memorization_ratio", "7.5"]),
    "low above high": (lambda r: {**r, "memorization_ratio_ci95": [0.6, 0.4]}, ["memorization_ratio_ci95"]),
}

READERS = {  # reader: (argv for a run folder, the record damaged, where the error points)
    "compare summary.json": (lambda run, other, out: ["compare", run, other, "--out", out], "audit/summary.json",
                             "audit/summary.json"),
    "compare best.json": (lambda run, other, out: ["compare", run, other, "--out", out], "best.json", "best.json"),
    "curves tracking.jsonl": (lambda run, other, out: ["curves", run, other, "--out", out], "tracking.jsonl",
                              "tracking.jsonl line 1"),
    "enough summary.json": (lambda run, other, out: ["enough", run / "audit", "--reps", 5, "--out", out],
                            "audit/summary.json", "audit/summary.json"),
}


@pytest.mark.parametrize("category", list(DAMAGE))
@pytest.mark.parametrize("reader", list(READERS))
def test_damaged_record_is_one_line(cli, tmp_path, reader, category):
    run, other = make_run(tmp_path / "a"), make_run(tmp_path / "b", channels=64)
    argv, record, where = READERS[reader]
    damage, words = DAMAGE[category]
    if record == "best.json":  # best.json holds a run's numbers when it has no audit of its own
        (run / "audit" / "summary.json").unlink()
    if record.endswith(".jsonl"):  # the first of two lines: a damaged line before the last is never skipped
        lines = (run / record).read_text().splitlines()
        lines[0] = json.dumps(damage(json.loads(lines[0])))
        (run / record).write_text("\n".join(lines) + "\n")
    else:
        _write_json(run / record, damage(json.loads((run / record).read_text())))
    out = tmp_path / "out"
    cli(*argv(run, other, out)).one_line_error(str(run / where), *words)
    assert not out.exists()


OTHER_RECORDS = {  # (file, content, words): the other records compare and curves read
    "compare point.json wrong type": ("compare-sweep", "size-200/point.json", "[1]", ["expected a JSON object"]),
    "compare point.json missing key": ("compare-sweep", "size-200/point.json", '{"kind": "edm"}',
                                       ["values", "required field is missing"]),
    "compare point folder point.json": ("compare-point", "size-200/point.json", '{"kind": 3}', ["point.json"]),
    "compare subset.json non-numeric": ("compare-runs", "a/subset.json",
                                        '{"size": "many", "resolution": 8, "label_dim": 0}', ["size", "integer"]),
    "compare subset.json wrong type": ("compare-runs", "a/subset.json", '"100"', ["expected a JSON object"]),
    "compare config.json wrong type": ("compare-runs", "a/config.json", "[1, 2]", ["JSON object", "run config"]),
    "compare config.json kind": ("compare-runs", "a/config.json", '{"kind": ["edm"]}', ["kind"]),
    "curves config.json wrong type": ("curves", "a/config.json", '"edm"', ["JSON object", "run config"]),
    "curves tracking.jsonl not JSON": ("curves", "a/tracking.jsonl", "{oops\n" + json.dumps(_tracked(0, 0.5)) + "\n",
                                       ["line 1", "not JSON"]),
    "curves tracking.jsonl negative step": ("curves", "a/tracking.jsonl",
                                            json.dumps({**_tracked(0, 0.5), "step": -8}) + "\n", ["line 1", "step"]),
    "curves tracking.jsonl negative knn": ("curves", "a/tracking.jsonl",
                                           json.dumps({**_tracked(0, 0.5), "knn_distance": -1.0}) + "\n",
                                           ["line 1", "knn_distance"]),
    "enough summary.json negative knn": ("enough", "a/audit/summary.json",
                                         json.dumps({**_summary(0.8), "knn_distance": -2.0}), ["knn_distance"]),
}


def _argv(how, tmp_path, out):
    if how == "compare-sweep":
        return ["compare", make_sweep(tmp_path), "--out", out]
    if how == "compare-point":
        sweep = make_sweep(tmp_path)
        make_run(sweep / "size-200" / "run", size=200)
        return ["compare", sweep / "size-200", make_run(tmp_path / "a"), "--out", out]
    run, other = make_run(tmp_path / "a"), make_run(tmp_path / "b", channels=64)
    if how == "compare-runs":
        return ["compare", run, other, "--out", out]
    if how == "curves":
        return ["curves", run, other, "--out", out]
    return ["enough", run / "audit", "--reps", 5, "--out", out]


@pytest.mark.parametrize("case", list(OTHER_RECORDS))
def test_other_damaged_records_are_one_line(cli, tmp_path, case):
    how, file, content, words = OTHER_RECORDS[case]
    out = tmp_path / "out"
    argv = _argv(how, tmp_path, out)
    (tmp_path / file).write_text(content)
    cli(*argv).one_line_error(str(tmp_path / file), *words)
    assert not out.exists()


# 2. results.csv rows: a ratio of 7.5 (which compare once showed as "750%"), low > high, a negative distance.

ROW_DAMAGE = {"ratio 7.5": ("memorization_ratio", "7.5", ["memorization_ratio", "7.5"]),
              "ratio text": ("memorization_ratio", "high", ["memorization_ratio", "'high'"]),
              "low above high": ("memorization_ratio_high", "0.5", ["memorization_ratio_low, memorization_ratio_high",
                                                                    "low end is above"]),
              "negative knn": ("knn_distance", "-1.5", ["knn_distance", "-1.5"]),
              "size not an integer": ("size", "200.5", ["size", "integer"]),
              "point out of the sweep": ("point", "../../elsewhere", ["point", "folder name", "../../elsewhere"])}


@pytest.mark.parametrize("damage", list(ROW_DAMAGE))
@pytest.mark.parametrize("command", ["compare", "emm"])
def test_damaged_results_row_is_refused(cli, tmp_path, command, damage):
    sweep = make_sweep(tmp_path / "sweep")
    column, value, words = ROW_DAMAGE[damage]
    _edit_results(sweep / "results.csv", 2, column, value)
    out = tmp_path / "out"
    result = cli(command, sweep, "--out", out)
    result.one_line_error(f"{sweep / 'results.csv'} row 2", *words)
    assert "750" not in result.out and not out.exists()


def test_emm_on_a_results_csv_given_directly(cli, tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    _edit_results(sweep / "results.csv", 3, "memorization_ratio", "7.5")
    cli("emm", sweep / "results.csv").one_line_error("results.csv row 3", "memorization_ratio", "[0, 1]")
    assert not (sweep / "emm.csv").exists() and not (sweep / "emm.png").exists()


# 3. Whole outputs or none: a failure while plotting leaves no new file, and earlier outputs as they were.

COMMANDS = ["emm", "compare-sweep", "compare-runs", "curves", "enough"]
OUTPUTS = {"emm": {"emm.csv", "emm.png"}, "compare-sweep": {"compare.md", "compare.csv", "compare.png"},
           "compare-runs": {"compare.md", "compare.csv", "compare.png"}, "curves": {"curves.csv", "curves.png"},
           "enough": {"enough.csv", "enough.png"}}


def _study(command, tmp_path):
    """(argv without --out, a change of the inputs that would change the outputs)."""
    if command in ("emm", "compare-sweep"):
        sweep = make_sweep(tmp_path / "sweep")
        return ([command.split("-")[0], sweep],
                lambda: _edit_results(sweep / "results.csv", 2, "memorization_ratio", "0.93"))
    run, other = make_run(tmp_path / "a"), make_run(tmp_path / "b", channels=64)
    if command == "compare-runs":
        return ["compare", run, other], lambda: _write_json(run / "audit" / "summary.json", _summary(0.1))
    if command == "curves":
        return ["curves", run, other], lambda: (run / "tracking.jsonl").write_text(json.dumps(_tracked(0, 0.2)) + "\n")
    return ["enough", run / "audit", "--reps", 5], lambda: _flags(run / "audit" / "per_sample.csv", 0.1)


def _failing_plots(monkeypatch):
    from matplotlib.figure import Figure

    def full(fig, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(Figure, "savefig", full)


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failing_plot_leaves_no_new_output(cli, tmp_path, monkeypatch, command):
    argv, change = _study(command, tmp_path)
    fresh = tmp_path / "fresh"
    _failing_plots(monkeypatch)
    cli(*argv, "--out", fresh).one_line_error("disk is full")
    assert not fresh.exists()  # not even the folder: the staging made it, and took it back
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("kept")
    cli(*argv, "--out", existing).one_line_error("disk is full")
    assert _contents(existing) == {"mine.txt": b"kept"}  # the table was built, but in the staging folder


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failing_plot_leaves_earlier_outputs_unchanged(cli, tmp_path, monkeypatch, command):
    argv, change = _study(command, tmp_path)
    out = tmp_path / "out"
    assert cli(*argv, "--out", out).code == 0
    before = _contents(out)
    assert set(before) == OUTPUTS[command]
    change()  # new inputs: a table that would differ from the one written
    _failing_plots(monkeypatch)
    cli(*argv, "--out", out).one_line_error("disk is full")
    assert _contents(out) == before  # every old output as it was, no staging folder left behind
    monkeypatch.undo()
    assert cli(*argv, "--out", out).code == 0  # and the next run replaces them all together
    after = _contents(out)
    assert set(after) == OUTPUTS[command] and after != before


# 4. A staging folder that a killed process left behind is removed by the next run.

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("command", COMMANDS)
def test_stale_staging_of_a_killed_process_is_removed(cli, tmp_path, command):
    argv, _ = _study(command, tmp_path)
    out = tmp_path / "out"
    stale = out / f".staging-{socket.gethostname()}-{_dead_pid()}"
    stale.mkdir(parents=True)
    (stale / sorted(OUTPUTS[command])[0]).write_text("half of a killed run's output")
    alive = out / f".staging-{socket.gethostname()}-{os.getppid()}"  # a live process's staging is left alone
    alive.mkdir()
    assert cli(*argv, "--out", out).code == 0
    assert not stale.exists() and alive.is_dir()
    assert {p.name for p in out.iterdir()} == OUTPUTS[command] | {alive.name}


def test_a_tracked_row_written_before_images_seen_reads_under_that_name():
    """tracking.jsonl rows and best.json of runs made before images_seen was the one name say nimg; both read as
    images_seen, and a row with both keeps its own images_seen."""
    from sdmem.errors import InputError
    from sdmem.records import TRACKED, check

    row = {"epoch": 4, "step": 8, "memorization_ratio": 0.5, "memorization_ratio_ci95": [0.4, 0.6],
           "knn_distance": 3.0, "num_generated": 10}
    assert check(TRACKED, {**row, "nimg": 128}, "old")["images_seen"] == 128
    assert "nimg" not in check(TRACKED, {**row, "nimg": 128}, "old")
    assert check(TRACKED, {**row, "images_seen": 64, "nimg": 128}, "both")["images_seen"] == 64
    with pytest.raises(InputError, match="images_seen"):
        check(TRACKED, {**row, "nimg": -1}, "bad")
