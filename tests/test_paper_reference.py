"""eval/paper_reference.csv (the numbers Gu et al., "On Memorization in Diffusion Models", TMLR 2025, report) and
eval/beside_paper.py (a sweep's results beside them). No training: the CSV is checked against the tables' text as
extracted from the paper's PDF (quoted below), against the sweep specs' points, and the script is run on sweep
folders written here."""

import csv
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from sdmem.study.sweep import load_spec, points

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "eval" / "paper_reference.csv"
SCRIPT = ROOT / "eval" / "beside_paper.py"
PAPER_SPECS = ROOT / "train_configs" / "paper"
HEADER = ["source", "spec", "metric", "value", "size", "train.batch_size", "train.lr", "train.weight_decay",
          "train.ema_rate", "data.labels", "data.random_label_classes", "data.num_classes", "data.resolution",
          "model.channels", "model.num_blocks", "model.skip_mask", "model.method", "model.rank", "data.prompt", "note"]
IDS = HEADER[4:-1]
METRICS = {"memorization_ratio", "emm", "knn_distance", "fid"}

# The tables as the PDF's text extraction gives them (minus signs and "x" lost: "1 10 5" is 1e-5).
TABLE1 = ("|D| =1k 89.52 90.87 91.52 92.09 91.40 92.05 92.77 "
          "|D| =2k 56.67 60.36 60.31 60.93 62.61 63.33 61.95")  # p. 8
TABLE2 = ("Weight decay Rmem(%) |D| =1k |D| =2k 0 92.09 60.93 1 10 5 91.67 61.63 1 10 4 92.47 61.03 1 10 3 92.11 "
          "58.39 1 10 2 89.07 35.88 5 10 2 13.79 0.03 1 10 1 1.33 0.00 EMA Rmem(%) |D| =1k |D| =2k 0.99929 92.09 "
          "60.93 0.999 91.72 61.38 0.99 91.45 59.27 0.9 90.16 58.31 0.5 90.42 57.80 0.1 90.78 58.00 0.0 90.19 59.20")
TABLE3 = ("Lo RA r =16 plain 0.00 0.00 0.00 0.00 0.00 class 0.00 0.00 0.00 0.00 0.00 Lo RA r =256 plain 0.08 0.01 "
          "0.00 0.00 0.00 class 5.22 0.25 0.00 0.00 0.00 Lo RA r =1024 plain 0.76 0.20 0.00 0.00 0.00 class 8.77 2.07 "
          "0.04 0.00 0.00 Full fine-tuning plain 21.95 20.63 7.30 2.85 0.06 class 46.89 38.79 20.46 10.67 "
          "0.21")  # p. 10
TABLE4 = ("Unconditional 92.09 60.93 34.60 17.12 9.00 Conditional (true labels) 96.59 79.46 55.62 37.59 23.00 "
          "Conditional (unique labels) 100.00 99.88 99.89 99.57 99.66")  # p. 25
TABLE7 = ("|D| =1k 7.35 6.73 6.51 6.35 6.51 6.40 6.30 "
          "|D| =2k 15.43 14.92 14.88 14.77 14.53 14.12 14.57")  # p. 30
TABLE8 = ("Weight decay KNN distance |D| =1k |D| =2k 0 6.35 14.77 1 10 5 6.45 14.63 1 10 4 6.42 15.29 1 10 3 7.32 "
          "16.99 1 10 2 9.99 23.40 5 10 2 26.69 38.73 1 10 1 34.44 39.51 EMA KNN distance |D| =1k |D| =2k 0.99929 "
          "6.35 14.77 0.999 6.44 14.58 0.99 6.51 15.21 0.9 7.02 15.39 0.5 7.11 15.04 0.1 6.90 15.08 0.0 7.08 14.59")
TABLE5 = ("|D| =1k 8.89 8.60 8.14 7.99 8.25 7.98 7.85 "
          "|D| =2k 17.56 15.57 15.23 14.41 14.83 14.56 14.85")  # p. 27 (FIDs; the extraction labels the rows Rmem(%))
TABLE6 = ("Weight decay FID |D| =1k |D| =2k 0 7.99 14.41 1 10 5 8.17 15.73 1 10 4 8.08 14.36 1 10 3 9.37 12.75 "
          "1 10 2 13.47 17.02 5 10 2 41.08 51.70 1 10 1 63.78 48.21 EMA FID |D| =1k |D| =2k 0.99929 7.99 14.41 "
          "0.999 8.11 15.75 0.99 8.55 17.11 0.9 9.83 18.04 0.5 10.32 21.28 0.1 12.38 23.12 0.0 11.77 22.39")  # p. 27
BATCH_LR = [(128, 0.5e-4), (256, 1.0e-4), (384, 1.5e-4), (512, 2.0e-4), (640, 2.5e-4), (768, 3.0e-4), (896, 3.5e-4)]

# Cells per table: Table 1 (p. 8) 7 (batch, lr) columns x 2 |D| rows = 14; Table 2 (p. 8) 7 weight decays x 2 |D|
# (left) + 7 EMA rates x 2 |D| (right) = 28 (the basic setup, weight decay 0 = EMA 0.99929, is printed in both
# halves); Table 3 (p. 10) 4 fine-tunings x 2 conditionings x 5 |D| = 40; Table 4 (p. 25) 3 conditionings x 5 |D| =
# 15; Tables 5 and 6 (p. 27): Tables 1 and 2's layout with FIDs, 14 and 28; Tables 7 and 8 (p. 30): the same with
# KNN distances, 14 and 28.
CELLS = {"table1": 14, "table2": 28, "table3": 40, "table4": 15, "table5": 14, "table6": 28, "table7": 14,
         "table8": 28}


def _load_script():
    spec = importlib.util.spec_from_file_location("beside_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bp = _load_script()


def read_rows(path=REF):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


COLUMNS, ROWS = read_rows()


def spec_path(name: str) -> Path:
    return ROOT / "train_configs" / "sd" / "table3.yaml" if name == "table3" else PAPER_SPECS / f"{name}.yaml"


def key(r):
    return (r["source"], r["spec"], r["metric"], bp.relation(r["note"])) + tuple(r[c] for c in IDS)


def test_csv_parses_with_the_expected_columns():
    assert COLUMNS == HEADER
    assert len(ROWS) > 150
    for r in ROWS:
        assert None not in r and all(v is not None for v in r.values()), r  # no ragged rows


def test_every_row_has_a_known_spec_metric_and_a_value_in_range():
    for r in ROWS:
        assert spec_path(r["spec"]).is_file(), r["spec"]
        assert r["metric"] in METRICS, r
        assert r["note"].strip(), r
        assert re.fullmatch(r"table[1-9](:left|:right)?|text:(sec|app)[0-9A-H.]+", r["source"]), r["source"]
        value = float(r["value"])
        if r["metric"] == "memorization_ratio":
            assert 0 <= value <= 1, r
        elif r["metric"] == "emm":
            assert value == int(value) and value > 0 and r["size"] == "", r  # an EMM is a |D|, over all sizes
        else:
            assert value > 0, r
        assert (r["metric"] == "fid") == r["source"].startswith(("table5", "table6")), r  # FIDs: Tables 5-6 only
        if r["source"].startswith("table"):
            assert bp.relation(r["note"]) == "=", r  # table cells are exact


def test_tables_have_one_row_per_cell():
    per_table = Counter(r["source"].split(":")[0] for r in ROWS if r["source"].startswith("table"))
    assert per_table == CELLS
    halves = Counter(r["source"] for r in ROWS if r["source"].startswith(("table2", "table6", "table8")))
    assert set(halves.values()) == {14}  # 7 values x 2 |D| in each half


def test_no_duplicate_keys():
    dup = [k for k, n in Counter(map(key, ROWS)).items() if n > 1]
    assert not dup, dup


def _pct(r):
    return Decimal(r["value"]) * 100


def _find(source, **ids):
    want = {k.replace("__", "."): str(v) for k, v in ids.items()}
    found = [r for r in ROWS if r["source"] == source and all(bp.same(v, r[k]) for k, v in want.items())]
    assert len(found) == 1, (source, want, len(found))
    return found[0]


def _plain(r):
    return Decimal(r["value"])


def test_tables_1_5_and_7_transcribed():
    for text, source, value in ((TABLE1, "table1", _pct), (TABLE5, "table5", _plain), (TABLE7, "table7", _plain)):
        for k, line in re.findall(r"\|D\| =(\d)k ((?:[\d.]+ ?){7})", text):
            for (batch, lr), cell in zip(BATCH_LR, line.split()):
                assert value(_find(source, size=int(k) * 1000, train__batch_size=batch, train__lr=lr)) == Decimal(cell)


def _wd(token: str) -> float:
    return 0.0 if token == "0" else int(token[0]) * 10.0 ** -int(token[-1])  # "5 10 2" -> 5e-2


@pytest.mark.parametrize("text,source,value", [(TABLE2, "table2", _pct), (TABLE6, "table6", _plain),
                                                (TABLE8, "table8", _plain)])
def test_tables_2_6_and_8_transcribed(text, source, value):
    left, right = text.split(" EMA ")
    cells = re.findall(r"(?:(?<=\|D\| =2k )|(?<=\d ))(0|\d 10 \d) ([\d.]+) ([\d.]+)", left)
    assert len(cells) == 7
    for wd, a, b in cells:
        for size, cell in ((1000, a), (2000, b)):
            r = _find(f"{source}:left", size=size, train__weight_decay=_wd(wd), train__ema_rate=0.99929)
            assert value(r) == Decimal(cell)
    cells = re.findall(r"(0\.\d+) ([\d.]+) ([\d.]+)", right)
    assert [float(e) for e, _, _ in cells] == [0.99929, 0.999, 0.99, 0.9, 0.5, 0.1, 0.0]
    for ema, a, b in cells:
        for size, cell in ((1000, a), (2000, b)):
            assert value(_find(f"{source}:right", size=size, train__weight_decay=0, train__ema_rate=ema)) == \
                Decimal(cell)


def test_table3_transcribed():
    found = re.findall(r"(?:Lo RA r =(\d+)|Full fine-tuning) plain ((?:[\d.]+ ){5})class ((?:[\d.]+ ?){5})", TABLE3)
    assert len(found) == 4
    for rank, plain, cls in found:
        for prompt, line in (("plain", plain), ("class", cls)):
            for size, cell in zip((400, 500, 800, 1000, 2000), line.split()):
                r = _find("table3", size=size, data__prompt=prompt, model__method="lora" if rank else "full",
                          model__rank=rank or "null")
                assert _pct(r) == Decimal(cell)


def test_table4_transcribed():
    found = re.findall(r"(Unconditional|Conditional \((?:true|unique) labels\)) ((?:[\d.]+ ?){5})", TABLE4)
    labels = {"Unconditional": "none", "Conditional (true labels)": "true", "Conditional (unique labels)": "unique"}
    assert len(found) == 3
    for name, line in found:
        for size, cell in zip((1000, 2000, 3000, 4000, 5000), line.split()):
            assert _pct(_find("table4", size=size, data__labels=labels[name])) == Decimal(cell)


def test_the_basic_setup_reads_the_same_in_tables_1_2_and_4():
    # Sec. 5 and App. C.3: batch 512 / lr 2e-4, weight decay 0 / EMA 0.99929 and unconditional are one run each.
    for size, pct in ((1000, Decimal("92.09")), (2000, Decimal("60.93"))):
        assert _pct(_find("table1", size=size, train__batch_size=512)) == pct
        assert _pct(_find("table2:left", size=size, train__weight_decay=0)) == pct
        assert _pct(_find("table2:right", size=size, train__ema_rate=0.99929)) == pct
        assert _pct(_find("table4", size=size, data__labels="none")) == pct
    for size, fid in ((1000, Decimal("7.99")), (2000, Decimal("14.41"))):  # the same run's FID (Tables 5 and 6)
        assert _plain(_find("table5", size=size, train__batch_size=512)) == fid
        assert _plain(_find("table6:left", size=size, train__weight_decay=0)) == fid
        assert _plain(_find("table6:right", size=size, train__ema_rate=0.99929)) == fid


def test_fid_rows_sit_beside_the_same_points_as_their_ratios():
    # Table 5 is Table 1's grid, Table 6 Table 2's: one FID per ratio cell, on the same columns
    for ratio, fid in (("table1", "table5"), ("table2:left", "table6:left"), ("table2:right", "table6:right")):
        cells = lambda source: sorted(tuple(r[c] for c in IDS) + (r["spec"],) for r in ROWS if r["source"] == source)
        assert cells(ratio) == cells(fid)
        assert all(r["metric"] == "fid" for r in ROWS if r["source"] == fid)


def _results_cell(value) -> str:  # how `sdmem sweep` writes a swept value into results.csv
    return "" if value is None else json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


@pytest.mark.parametrize("name", sorted({r["spec"] for r in ROWS}))
def test_rows_name_points_of_their_spec(name):
    """Each ratio / KNN row is exactly one point of its spec; each EMM row one curve (several sizes)."""
    spec = load_spec(spec_path(name))
    pts = points(spec)
    for r in (r for r in ROWS if r["spec"] == name):
        ids = {c: r[c] for c in IDS if r[c] != ""}
        assert set(ids) - {"size"} <= set(spec.swept), (r, spec.swept)  # columns of the sweep's results.csv
        hit = [p for p in pts if all(bp.same(v, str(p.config.data.size) if c == "size" else _results_cell(p.values[c]))
                                     for c, v in ids.items())]
        if r["metric"] == "emm":
            assert len({p.config.data.size for p in hit}) >= 2, r
            assert len({tuple(_results_cell(p.values[c]) for c in spec.swept if c != "data.size") for p in hit}) == 1
        else:
            assert len(hit) == 1, (r, [p.name for p in hit])


def test_text_numbers_cite_the_paper():
    text = [r for r in ROWS if r["source"].startswith("text:")]
    assert len(text) >= 30
    for r in text:
        assert re.search(r"\b(Sec|App)\. [0-9A-H.]+, pp?\. \d", r["note"]) and "'" in r["note"], r["note"]
    # a few anchors: Sec. 3.1's EMMs, Sec. 6's 50k unique-label run, App. B's three-seed means
    assert _find("text:sec3.1", data__resolution="null")["value"] == "1000"
    assert bp.relation(_find("text:sec6", data__labels="unique")["note"]) == ">"
    assert _find("text:appB", data__num_classes=2)["value"] == "0.9459"


def _skip_points(name):
    """{skip-mask cell as results.csv holds it: point name} of a skip spec."""
    return {_results_cell(p.values["model.skip_mask"]): p.name for p in points(load_spec(spec_path(name)))}


def _rows_by_point(name, source):
    masks = _skip_points(name)
    found = {}
    for r in ROWS:
        if r["spec"] == name and r["source"] == source:
            hit = [n for m, n in masks.items() if bp.same(r["model.skip_mask"], m)]
            assert len(hit) == 1 and hit[0] not in found, (r, hit)
            found[hit[0]] = r
    return found


@pytest.mark.parametrize("name,bound", [("fig4ab_skip_ddpmpp", "0.9"), ("fig4cd_skip_ncsnpp", "0.4")])
def test_sec4_3_single_skip_at_32x32(name, bound):
    # Sec. 4.3, p. 7: one skip at 32x32 alone gives DDPM++ over 90%, NCSN++ over 40% (Fig. 4(b), 4(d))
    found = _rows_by_point(name, "text:sec4.3")
    assert sorted(found) == ["full", "r32-keep1-001000000", "r32-keep1-010000000", "r32-keep1-100000000"]
    for point, r in found.items():
        if point != "full":
            assert (r["value"], bp.relation(r["note"]), r["size"]) == (bound, ">", "1000"), r
            assert "32x32" in r["note"] and point in r["note"]


def test_app_c2_deleting_skips():
    # App. C.2, p. 22: deleting one or two skips at any resolution keeps > 90%; only three at 32x32 falls below
    found = _rows_by_point("fig8b_skip_delete", "text:appC.2")
    assert set(found) == set(_skip_points("fig8b_skip_delete").values())  # every one of the 21 points
    for point, r in found.items():
        deleted = int(point.split("-")[1].removeprefix("del"))
        assert r["value"] == "0.9" and r["size"] == "1000", r
        assert bp.relation(r["note"]) == ("<" if point == "r32-del3-000111111" else ">"), r
        if deleted < 3:  # the rows for this statement name their point
            assert point in r["note"] and "'when deleting one or two skip connections" in r["note"], r


# beside_paper.py

RESULTS_HEAD = ("num_params,size,memorization_ratio,memorization_ratio_low,memorization_ratio_high,knn_distance,"
                "epoch,step,images_seen,num_generated,wall_time_s,point")


def run(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_matching_rules():
    assert bp.same("2e-4", "0.0002") and bp.same("0.5e-4", "5e-05") and bp.same("1000", "1000.0")
    assert bp.same("Plain", "plain") and not bp.same("plain", "class")
    assert bp.same("null", "") and not bp.same("null", "none") and bp.same("none", "None")
    assert not bp.same("0", "")  # an empty cell is a swept null, not 0
    assert bp.same("[true, false]", "[true,false]") and not bp.same("[true, false]", "[false, true]")
    assert [bp.relation(n) for n in ("~ x", "> x", "< x", "Table 1", ">x")] == ["~", ">", "<", "=", "="]


def test_table_of_a_constructed_sweep(tmp_path):
    ref = write(tmp_path / "ref.csv",
                "source,spec,metric,value,size,train.lr,data.prompt,note\n"
                "table1,mini,memorization_ratio,0.9209,1000,2e-4,plain,Table 1\n"
                "text:sec5,mini,memorization_ratio,0.9,2000,1e-4,class,\"> Sec. 5, p. 8: 'over 90%'\"\n"
                "table1,mini,memorization_ratio,0.6093,2000,2e-4,plain,Table 1\n"
                "table1,other,memorization_ratio,0.5,1000,2e-4,plain,another spec\n")
    sweep = tmp_path / "mini"
    write(sweep / "results.csv",
          "data.size,train.lr,data.prompt," + RESULTS_HEAD + "\n"
          "1000,0.0002,PLAIN,1,1000,0.9312,0.9262,0.936,6.1,,1,1,10000,1,p1\n"
          "2000,0.0001,class,1,2000,0.85,0.84,0.86,9.0,,1,1,10000,1,p2\n"
          "3000,0.0002,plain,1,3000,0.3,0.29,0.31,9.0,,1,1,10000,1,p3\n")
    out = tmp_path / "table.md"
    code, stdout, stderr = run(sweep, "--reference", ref, "--out", out)
    assert code == 0, stderr
    expected = (
        "| source | size | train.lr | data.prompt | metric | paper | ours [95% CI] | ours - paper | point |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| table1 | 1000 | 2e-4 | plain | memorization_ratio | 92.09% | 93.12% [92.62, 93.60] | +1.03 pp | p1 |\n"
        "| text:sec5 | 2000 | 1e-4 | class | memorization_ratio | > 90.00% | 85.00% [84.00, 86.00] | "
        "-5.00 pp (bound not met) | p2 |\n"
        "| table1 | 2000 | 2e-4 | plain | memorization_ratio | 60.93% | not run |  |  |\n"
        "\n"
        "mini: 3 reference number(s); 2 compared, 1 not run.\n")
    assert stdout == expected
    assert out.read_text() == expected


def test_table1_sweep_against_the_reference(tmp_path):
    sweep = tmp_path / "table1_batch_size"
    write(sweep / "results.csv",
          "data.size,train.batch_size,train.lr," + RESULTS_HEAD + "\n"
          "1000,512,0.0002,1,1000,0.9312,0.9262,0.936,6.1,,1,1,10000,1,size-1000_batch_size-512_lr-0.0002\n"
          "2000,128,5e-05,1,2000,0.55,0.54,0.56,15.9,,1,1,10000,1,size-2000_batch_size-128_lr-5e-05\n")
    code, stdout, stderr = run(sweep)
    assert code == 0, stderr
    assert "| table1 | 1000 | 512 | 2e-4 | memorization_ratio | 92.09% | 93.12% [92.62, 93.60] | +1.03 pp |" in stdout
    assert "| table1 | 2000 | 128 | 5e-5 | memorization_ratio | 56.67% | 55.00% [54.00, 56.00] | -1.67 pp |" in stdout
    assert "| table7 | 2000 | 128 | 5e-5 | knn_distance | 15.43 | 15.90 | +0.47 |" in stdout
    # 42 cells of Tables 1, 5 and 7; 6 of them at the 2 run points, of which Table 5's FIDs have no column here
    assert stdout.count("| not run |") == 36
    assert stdout.count("| no value (no fid column) |") == 2
    assert stdout.rstrip().endswith("table1_batch_size: 42 reference number(s); 4 compared, 36 not run, "
                                    "2 run without a value.")


def test_fid_rows_are_compared_with_the_fid_column(tmp_path):
    head = RESULTS_HEAD.replace("knn_distance,", "knn_distance,fid,")  # `sdmem sweep`'s own column order
    sweep = tmp_path / "table2_weight_decay_ema"
    write(sweep / "results.csv",
          "data.size,train.weight_decay,train.ema_rate," + head + "\n"
          "1000,0.0,0.99929,1,1000,0.93,0.92,0.94,6.2,8.5,,1,1,10000,1,size-1000_base\n"
          "2000,0.0,0.99929,1,2000,0.6,0.59,0.61,14.0,,,1,1,10000,1,size-2000_base\n")
    code, stdout, stderr = run(sweep)
    assert code == 0, stderr
    # a plain number, not a percent; the difference in FID points
    assert "| table6:left | 1000 | 0 | 0.99929 | fid | 7.99 | 8.50 | +0.51 | size-1000_base |" in stdout
    assert "| table6:right | 1000 | 0 | 0.99929 | fid | 7.99 | 8.50 | +0.51 | size-1000_base |" in stdout
    assert "| table2:left | 1000 | 0 | 0.99929 | memorization_ratio | 92.09% | 93.00% [92.00, 94.00] | +0.91 pp |" \
        in stdout
    assert "| table8:left | 1000 | 0 | 0.99929 | knn_distance | 6.35 | 6.20 | -0.15 |" in stdout
    assert "| table6:left | 2000 | 0 | 0.99929 | fid | 14.41 | no value" in stdout
    # an empty fid cell (a sweep without the Inception weights) is not a comparison
    assert stdout.count("| fid | 14.41 | no value (empty fid: no Inception weights when the sweep ran) |  |") == 2
    assert "%" not in "".join(line for line in stdout.splitlines() if "| fid |" in line)
    assert stdout.rstrip().endswith("table2_weight_decay_ema: 84 reference number(s); 10 compared, 72 not run, "
                                    "2 run without a value.")
    # the same through compare(), on a constructed reference
    ref = write(tmp_path / "ref.csv", "source,spec,metric,value,size,note\n"
                                      "table5,table2_weight_decay_ema,fid,9.0,1000,Table 5\n"
                                      "table5,table2_weight_decay_ema,fid,10.0,3000,Table 5\n")
    text, counts = bp.compare(sweep, reference=ref)
    assert "| table5 | 1000 | fid | 9.00 | 8.50 | -0.50 | size-1000_base |" in text
    assert counts == {"reference": 2, "compared": 1, "not_run": 1, "no_value": 0}


def test_nulls_masks_and_emm(tmp_path):
    sweep = tmp_path / "anything"
    write(sweep / "results.csv",
          "data.size,data.resolution,model.attn_resolutions," + RESULTS_HEAD + "\n"
          "16000,8,[4],1,16000,0.55,0.54,0.56,3.0,,1,1,10000,1,size-16000_resolution-8_res8\n")
    code, stdout, _ = run(sweep, "--spec", "fig2a_data_dimension")
    assert code == 0 and stdout.count("not run (no emm.csv") == 3
    assert "| > 60.00% | 55.00% [54.00, 56.00] | -5.00 pp (bound not met) |" in stdout
    write(sweep / "emm.csv", "data.resolution,model.attn_resolutions,emm,emm_low,emm_high,status,monotone,note\n"
                             ",[16],1043.2,1001,1100,interpolated,True,\n"
                             "16,[8],4500,4200,4800,interpolated,True,\n")
    code, stdout, _ = run(sweep, "--spec", "fig2a_data_dimension")
    assert "| text:sec3.1 |  | null | emm | ~ 1000 | 1043 [1001, 1100] | +43 |  |" in stdout
    assert "| 16 | emm | > 4000 | 4500 [4200, 4800] | +500 (bound met) |" in stdout
    assert "| 8 | emm | ~ 8000 | not run |" in stdout
    # fig4ab: the full-skip point has an empty (null) mask cell, the others a JSON list
    sweep = tmp_path / "fig4ab_skip_ddpmpp"
    write(sweep / "results.csv", "model.skip_mask," + RESULTS_HEAD + "\n"
                                 '"[true, false, false, false, false, false, false, false, false]",1,1000,0.2,0.19,'
                                 "0.21,9,,1,1,10000,1,r32-keep1-100000000\n"
                                 ",1,1000,0.95,0.94,0.96,6,,1,1,10000,1,full\n")
    code, stdout, _ = run(sweep)
    assert code == 0
    assert "| memorization_ratio | > 90.00% | 95.00% [94.00, 96.00] | +5.00 pp (bound met) | full |" in stdout


def test_table3_full_fine_tuning_has_no_rank(tmp_path):
    sweep = tmp_path / "table3"
    write(sweep / "results.csv",
          "data.prompt,data.size,model.method,model.rank,train.lr,train.gradient_checkpointing," + RESULTS_HEAD + "\n"
          "class,400,full,,0.0001,true,1,400,0.45,0.44,0.46,30,,1,1,10000,1,size-400_prompt-class_full\n"
          "Class,400,LoRA,1024,0.0003,false,1,400,0.09,0.085,0.095,40,,1,1,10000,1,size-400_prompt-class_lora-r1024\n")
    code, stdout, _ = run(sweep)
    assert code == 0
    assert "| table3 | 400 | full | null | class | memorization_ratio | 46.89% | 45.00% [44.00, 46.00] | -1.89 pp |" \
        in stdout
    assert "| table3 | 400 | lora | 1024 | class | memorization_ratio | 8.77% | 9.00% [8.50, 9.50] | +0.23 pp |" \
        in stdout
    assert stdout.count("| not run |") == 38


def test_one_line_errors(tmp_path):
    code, _, err = run(tmp_path / "table4_labels")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "results.csv" in err and "Traceback" not in err
    write(tmp_path / "mystery" / "results.csv", "size,memorization_ratio\n1000,0.5\n")
    code, _, err = run(tmp_path / "mystery")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown spec 'mystery'" in err
    code, _, err = run(tmp_path / "mystery", "--spec", "fig2c_intra_diversity")  # a spec the paper only plots
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no number" in err
