"""EMM estimation (paper Definition 2.1) on constructed curves: no training."""

import argparse
import csv

import numpy as np
import pytest

from sdmem.errors import InputError
from sdmem.study.emm import OUT_COLUMNS, add_parser, estimate_emm, format_table, run_emm, write_emm

FIELDS = ["size", "labels", "memorization_ratio", "memorization_ratio_low", "memorization_ratio_high",
          "knn_distance", "point"]


def _rows(sizes, ratios, labels="0", width=0.02):
    return [{"size": str(s), "labels": labels, "memorization_ratio": str(r),
             "memorization_ratio_low": str(max(0.0, r - width)), "memorization_ratio_high": str(min(1.0, r + width)),
             "knn_distance": "1.0", "point": f"labels={labels}_size={s}"} for s, r in zip(sizes, ratios)]


def _write_csv(path, rows, fields=FIELDS):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_flags(base, row, n):
    k = round(float(row["memorization_ratio"]) * n)
    audit = base / row["point"] / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    _write_csv(audit / "per_sample.csv", [{"index": i, "replica": "true" if i < k else "false"} for i in range(n)],
               ["index", "replica"])


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["emm", *argv])
    return args.func(args)


def _log_cross(sa, sb, ra, rb, t=0.9):
    """The crossing of t on the straight segment from (log sa, ra) to (log sb, rb), by hand."""
    return float(np.exp(np.log(sa) + (ra - t) / (ra - rb) * (np.log(sb) - np.log(sa))))


def test_default_interpolation_is_linear_in_log_size():
    rows = _rows([1000, 2000], [0.95, 0.85])
    (res,) = estimate_emm(rows, zeta=0.1)
    # half-way in ratio between 1000 and 2000 is half-way in log |D|: the geometric mean
    assert res["emm"] == pytest.approx(1000 * 2 ** 0.5) == pytest.approx(1414.2136)
    assert res["interpolation"] == "log" and res["status"] == "interpolated"
    (lin,) = estimate_emm(rows, zeta=0.1, interpolation="linear")
    assert lin["emm"] == pytest.approx(1500) and lin["interpolation"] == "linear"
    with pytest.raises(InputError, match="--interpolation.*log, linear"):
        estimate_emm(rows, zeta=0.1, interpolation="cubic")


def test_interpolation_exact_value_and_ratio_interval():
    (res,) = estimate_emm(_rows([100, 200, 500], [0.98, 0.95, 0.5]), zeta=0.1)
    assert res["status"] == "interpolated" and res["monotone"] is True
    assert res["emm"] == pytest.approx(200 * 2.5 ** ((0.95 - 0.9) / (0.95 - 0.5)))
    assert res["emm"] == pytest.approx(_log_cross(200, 500, 0.95, 0.5))
    # lows 0.93/0.48 and highs 0.97/0.52 bracket the crossing: the interval comes from them, in log |D| too
    assert res["emm_low"] == pytest.approx(200 * 2.5 ** (0.03 / 0.45))
    assert res["emm_high"] == pytest.approx(200 * 2.5 ** (0.07 / 0.45))
    assert "interval: from ratio intervals" in res["note"]
    (lin,) = estimate_emm(_rows([100, 200, 500], [0.98, 0.95, 0.5]), zeta=0.1, interpolation="linear")
    assert lin["emm"] == pytest.approx(200 + (0.95 - 0.9) / (0.95 - 0.5) * 300)
    assert lin["emm_low"] == pytest.approx(200 + 0.03 / 0.45 * 300)
    assert lin["emm_high"] == pytest.approx(200 + 0.07 / 0.45 * 300)


def test_above_all_and_below_all():
    (above,) = estimate_emm(_rows([100, 200, 500], [1.0, 0.97, 0.92]), zeta=0.1)
    assert above["status"] == "above_all" and above["emm"] == 500 and above["emm_low"] == 500
    assert above["emm_high"] is None
    (below,) = estimate_emm(_rows([100, 200, 500], [0.8, 0.5, 0.1]), zeta=0.1)
    assert below["status"] == "below_all" and below["emm"] == 100 and below["emm_high"] == 100
    assert below["emm_low"] is None


def test_non_monotone_curve_is_reported_and_last_crossing_used():
    # crosses 1 - zeta at 100-200 and again at 500-1000: Definition 2.1's largest |D| is the last crossing
    (res,) = estimate_emm(_rows([100, 200, 500, 1000], [0.99, 0.8, 0.95, 0.3]), zeta=0.1)
    assert res["monotone"] is False and res["status"] == "interpolated"
    assert "non-monotone" in res["note"] and "200->500" in res["note"] and "2 crossings" in res["note"]
    assert "used the last" in res["note"] and "500-1000" in res["note"] and "others at 100-200" in res["note"]
    assert res["emm"] == pytest.approx(_log_cross(500, 1000, 0.95, 0.3)) == pytest.approx(500 * 2 ** (0.05 / 0.65))
    (lin,) = estimate_emm(_rows([100, 200, 500, 1000], [0.99, 0.8, 0.95, 0.3]), zeta=0.1, interpolation="linear")
    assert lin["emm"] == pytest.approx(500 + 0.05 / 0.65 * 500)
    # the interval comes from the same (last) bracket
    assert 500 <= res["emm_low"] <= res["emm"] <= res["emm_high"] <= 1000


def test_non_monotone_curve_back_above_at_the_largest_size_is_above_all():
    (res,) = estimate_emm(_rows([100, 200, 500], [0.99, 0.8, 0.95]), zeta=0.1)
    assert res["status"] == "above_all" and res["emm"] == 500 and res["emm_low"] == 500 and res["monotone"] is False
    assert "100-200 not used" in res["note"]


def test_two_groups_by_labels(tmp_path):
    rows = _rows([100, 200, 500], [0.98, 0.95, 0.5], "0") + _rows([100, 200, 500], [0.95, 0.6, 0.2], "1")
    result = estimate_emm(rows, zeta=0.1)  # default --by: the varying swept column `labels`, not point
    assert [r["labels"] for r in result] == ["0", "1"]
    assert result[1]["emm"] == pytest.approx(_log_cross(100, 200, 0.95, 0.6))
    assert estimate_emm(rows, zeta=0.1, by=["labels"]) == result
    paths = write_emm(tmp_path, result, rows, zeta=0.1)
    assert [p.name for p in paths] == ["emm.csv", "emm.png"]
    with open(paths[0], newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["labels", *OUT_COLUMNS] == ["labels", "emm", "emm_low", "emm_high", "status", "monotone",
                                                    "note", "interpolation"]
    assert len(table) == 3 and float(table[1][1]) == pytest.approx(result[0]["emm"])
    assert [row[-1] for row in table[1:]] == ["log", "log"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_table(result)
    assert "labels" in text and "interpolated" in text


def test_bootstrap_interval_brackets_and_narrows_with_more_flags(tmp_path):
    rows = _rows([100, 200, 500], [0.98, 0.95, 0.5])
    widths = []
    for n in (40, 4000):
        base = tmp_path / f"n{n}"
        for row in rows:
            _write_flags(base, row, n)
        (res,) = estimate_emm(rows, zeta=0.1, base=base, seed=1)
        assert "bootstrap" in res["note"] and "ratio intervals" not in res["note"]
        assert 200 <= res["emm_low"] <= res["emm"] <= res["emm_high"] <= 500
        widths.append(res["emm_high"] - res["emm_low"])
    assert widths[1] < widths[0] / 3


def test_fewer_than_two_sizes_is_an_input_error():
    rows = _rows([100, 200], [0.98, 0.5], "0") + _rows([100], [0.9], "1")
    with pytest.raises(InputError, match="at least two sizes") as err:
        estimate_emm(rows, zeta=0.1, by=["labels"])
    assert "labels=1" in err.value.where


def test_cli_writes_outputs_and_rejects_bad_input(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _write_csv(sweep / "results.csv", _rows([100, 200, 500], [0.98, 0.95, 0.5]))
    assert _cli([str(sweep)]) == 0
    assert (sweep / "emm.csv").is_file() and (sweep / "emm.png").is_file()
    assert "interpolated" in capsys.readouterr().out
    with open(sweep / "emm.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert float(row["emm"]) == pytest.approx(_log_cross(200, 500, 0.95, 0.5)) and row["interpolation"] == "log"
    assert _cli([str(sweep), "--interpolation", "linear"]) == 0  # the old, linear-in-|D| reading
    with open(sweep / "emm.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert float(row["emm"]) == pytest.approx(200 + 0.05 / 0.45 * 300) and row["interpolation"] == "linear"
    assert "linear" in capsys.readouterr().out
    assert _cli([str(sweep / "results.csv"), "--by", "labels", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "emm.png").read_bytes()[:4] == b"\x89PNG"
    for bad in ("0", "1", "nan", "inf", "-0.1", "x"):
        with pytest.raises(InputError, match="--zeta"):
            _cli([str(sweep), "--zeta", bad])
    with pytest.raises(InputError, match="unknown column 'nope'.*labels"):
        _cli([str(sweep), "--by", "labels,nope"])
    _write_csv(tmp_path / "nosize.csv", [{"labels": 0, "memorization_ratio": 0.5}], ["labels", "memorization_ratio"])
    for src, problem in ((tmp_path / "nosize.csv", "missing column"), (tmp_path / "absent.csv", "cannot read"),
                         (tmp_path, "cannot read")):
        with pytest.raises(InputError, match=problem) as err:
            run_emm(argparse.Namespace(src=str(src), zeta="0.1", by=None, out=None))
        assert err.value.where.endswith(".csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty"):
        run_emm(argparse.Namespace(src=str(tmp_path / "empty.csv"), zeta="0.1", by=None, out=None))


def test_default_by_skips_bookkeeping_and_per_point_columns():
    from sdmem.study.emm import default_by

    rows = _rows([100, 200, 500], [0.98, 0.95, 0.5], "0") + _rows([100, 200, 500], [0.9, 0.6, 0.2], "1")
    for i, row in enumerate(rows):
        row.update({"wall_time_s": str(i), "run_id": f"r{i}", "seed": "3", "epoch": str(10 * i),
                    "data.size": row["size"], "num_params": str(1000 + int(row["labels"]))})  # a sweep's columns
    assert default_by(rows) == ["labels"]
    assert np.isfinite(estimate_emm(rows)[0]["emm"])
    (pooled,) = estimate_emm(rows, by=[])  # one curve: the two rows at each size are averaged, and said so
    assert "pooled" in pooled["note"] and pooled["emm"] == pytest.approx(_log_cross(100, 200, 0.94, 0.775))


def _drawn(tmp_path, monkeypatch, result, rows, interpolation):
    """write_emm's Figure, captured as it is saved."""
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), save(fig, *a, **k))[1])
    write_emm(tmp_path / interpolation, result, rows, zeta=0.1, interpolation=interpolation)
    (fig,) = saved
    return fig.axes[0]


def _marker_offset(ax, k=0):
    """Display-space distance (pixels) between curve k's EMM star and where its drawn polyline crosses 90%."""
    data = ax.containers[k].lines[0]  # the errorbar's data line: the drawn curve
    (star,) = [ln for ln in ax.lines if ln.get_marker() == "*" and ln.get_color() == data.get_color()]
    xy = ax.transData.transform(np.column_stack([data.get_xdata(), data.get_ydata()]))
    mark = ax.transData.transform([[star.get_xdata()[0], star.get_ydata()[0]]])[0]
    for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
        if min(y0, y1) <= mark[1] <= max(y0, y1) and y0 != y1:
            return abs(x0 + (mark[1] - y0) / (y1 - y0) * (x1 - x0) - mark[0])
    raise AssertionError("the drawn curve does not cross 1 - zeta")


@pytest.mark.parametrize("interpolation,scale", [("log", "log"), ("linear", "linear")])
def test_emm_marker_lies_on_the_drawn_crossing(tmp_path, monkeypatch, interpolation, scale):
    rows = _rows([500, 1000, 2000, 5000], [1.0, 0.95, 0.85, 0.2])
    result = estimate_emm(rows, zeta=0.1, interpolation=interpolation)
    expected = 1000 * 2 ** 0.5 if interpolation == "log" else 1500.0  # the crossing of the segment 1000-2000
    assert result[0]["emm"] == pytest.approx(expected)
    ax = _drawn(tmp_path, monkeypatch, result, rows, interpolation)
    assert ax.get_xscale() == scale
    assert _marker_offset(ax) < 0.01  # on the straight segment the axis draws, to a hundredth of a pixel
    # on the other axis the same marker would miss the drawn curve by many pixels: the check has teeth
    ax.set_xscale("linear" if scale == "log" else "log")
    ax.figure.canvas.draw()
    assert _marker_offset(ax) > 5


def test_write_emm_refuses_estimates_of_another_interpolation(tmp_path):
    rows = _rows([1000, 2000], [0.95, 0.85])
    with pytest.raises(ValueError, match="linear"):
        write_emm(tmp_path, estimate_emm(rows, zeta=0.1, interpolation="linear"), rows, zeta=0.1)


def test_unknown_interpolation_is_one_line(cli, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _write_csv(sweep / "results.csv", _rows([100, 200, 500], [0.98, 0.95, 0.5]))
    cli("emm", sweep, "--interpolation", "cubic").one_line_error("--interpolation", "cubic")
    assert not (sweep / "emm.csv").exists()
    result = cli("emm", sweep, "--interpolation", "linear")
    assert result.code == 0 and "linear" in result.out
