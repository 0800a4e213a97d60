"""`sdmem compare`: the memorization ratio (95% interval) and KNN distance of several runs, or of one sweep, side by
side in a pivot table (for SD, by default the layout of the paper's Table 3): compare.md, compare.csv, compare.png.

A sweep folder gives its results.csv rows. A run folder gives the audit next to it: ``<point>/audit/summary.json``
for a sweep point's run (``<point>/run``), else ``RUN/audit/summary.json``, else (EDM) ``RUN/best.json``; its axis
values are its config.json's dotted keys that differ between the runs given (plus ``size``, |D|).

Every record read is checked (sdmem.records): results.csv rows as results rows (a ratio outside [0, 1], an interval
with low > high, a negative KNN distance are refused naming the file, row and column), point.json, summary.json,
best.json and subset.json against their schemas, config.json as a JSON object. The three outputs are built in a
staging folder inside the output folder and moved into place together: a failure leaves the old ones untouched.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import kinds
from ..errors import InputError
from ..records import AUDIT_SUMMARY, POINT, RESULT_ROW, SUBSET_INFO, TRACKED, check, ci_interval, read_record
from ..utils import atomic_write, atomic_write_text, one_component, staged_folder
from .emm import finite_number as _num

METRICS = ("memorization_ratio", "memorization_ratio_low", "memorization_ratio_high", "knn_distance")
_ORDER = {"model.method": {"lora": 0, "full": 1}, "data.prompt": {"plain": 0, "class": 1}}
_RESULT = {"num_params", "size", "epoch", "step", "images_seen", "num_generated", "wall_time_s", "point", "fid",
           *METRICS}
_NOT_AXES = (_RESULT - {"size"}) | {"out_dir"}


@dataclass
class Result:
    """One compared result: where it came from, its kind, its axis values (text) and its numbers."""

    source: str
    kind: str
    values: dict
    ratio: float
    low: float | None
    high: float | None
    knn: float | None


def _cell(value) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def flatten(mapping: dict, prefix: str = "") -> dict:
    """A nested config mapping as ``{dotted.key: text}`` (lists as JSON)."""
    out = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: _cell(v)})
    return out


def _full_rank(values: dict) -> dict:
    """Full fine-tuning has no LoRA rank: its rank is blank (its own row in Table 3)."""
    if values.get("model.method") == "full" and "model.rank" in values:
        values["model.rank"] = ""
    return values


# Loading: a sweep's results.csv, or run folders with their audits.

def _point_config(point: Path) -> dict | None:
    """The point's point.json (checked: sdmem.records.POINT), None when the point folder has none."""
    path = point / "point.json"
    return read_record(path, POINT) if path.is_file() else None


def load_sweep(folder) -> list[Result]:
    """The finished points of a sweep folder (its results.csv), SD rows completed with Table 3's keys."""
    from .emm import load_results

    rows, path = load_results(folder)
    base = path.parent
    axes = [c for c in rows[0] if c not in _NOT_AXES]
    for n, r in enumerate(rows, 1):  # a point is a folder inside the sweep, never a path out of it
        if r.get("point") and not one_component(str(r["point"])):
            raise InputError(f"{path} row {n}", "point: expected a point folder name (one path component inside "
                                                f"the sweep folder), got {str(r['point'])[:80]!r}")
    records = [_point_config(base / r["point"]) if r.get("point") else None for r in rows]
    found = {rec.get("kind") for rec in records if rec}
    kind = found.pop() if len(found) == 1 else None  # no point records: no kind, the generic layout
    flats = [flatten(rec.get("config") or {}) if rec else None for rec in records]
    # The kind's layout keys that were not swept (SD: Table 3's), from each point's config when every point has it
    extra = [k for k in _layout_keys(kind) if k not in axes and all(f and k in f for f in flats)]
    out = []
    for n, (r, flat) in enumerate(zip(rows, flats), 1):
        num = check(RESULT_ROW, r, f"{path} row {n}", text=True)  # the numbers, checked (load_results did too)
        if num["memorization_ratio"] is None:  # an unfinished or failed point
            continue
        values = _full_rank({**{c: r.get(c, "") for c in axes}, **{k: flat[k] for k in extra}})
        out.append(Result(r.get("point") or "?", kind, values, float(num["memorization_ratio"]),
                          *(None if num.get(k) is None else float(num[k]) for k in METRICS[1:])))
    if not out:
        raise InputError(path, "no finished point has a memorization ratio yet; run `sdmem sweep` first")
    return out


def _run_numbers(run: Path, point: Path | None, kind: str) -> dict:
    """The audit record that holds the run's numbers: summary.json (AUDIT_SUMMARY) or best.json (TRACKED)."""
    candidates = ([point / "audit" / "summary.json"] if point else []) + [run / "audit" / "summary.json"]
    tracked = [run / name for name in kinds.get(kind).numbers]  # e.g. EDM's best.json (a tracked snapshot)
    for path in candidates + tracked:
        if path.is_file():
            return read_record(path, TRACKED if path in tracked else AUDIT_SUMMARY)
    missing = ", ".join(["no audit/summary.json"] + [f"no {p.name}" for p in tracked])
    raise InputError(run, f"has no memorization numbers ({missing}); make them with `sdmem generate {run} "
                          f"--num 10000 --out {run}/generated` then `sdmem audit --train {run} --generated "
                          f"{run}/generated --out {run}/audit`")


def load_runs(paths) -> list[Result]:
    """One result per run folder (or sweep point folder); axis values: the config keys that differ, and size."""
    from ..runs import KINDS, find_runs, read_json

    found = []
    for ref in find_runs(paths, sweeps=False):
        given, run, point = ref.given, ref.run, ref.point
        if not (run / "config.json").is_file():
            raise InputError(given, "is neither a run folder (no config.json) nor a sweep folder (no results.csv)")
        if point is not None:  # a sweep point: its record must be whole too
            read_record(point / "point.json", POINT)
        cfg = read_json(run / "config.json", "run config")
        if not isinstance(cfg, dict):
            raise InputError(run / "config.json", f"expected a JSON object (run config), got {_json_kind(cfg)}")
        kind = cfg.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            raise InputError(run / "config.json", f"kind: holds a run of kind {kind!r}; expected one of "
                                                  f"{', '.join(KINDS)}")
        flat = flatten(cfg)
        info = read_record(run / "subset.json", SUBSET_INFO) if (run / "subset.json").is_file() else {}
        flat["size"] = _cell(int(info["size"]) if info else flat.get("data.size"))
        found.append((given, point, run, kind, flat, _run_numbers(run, point, kind)))
    # Columns: the keys that differ between the runs, size, and (SD) Table 3's keys
    keys = list(dict.fromkeys(k for *_, flat, _ in found for k in flat))
    differ = [k for k in keys if len({f.get(k, "") for *_, f, _ in found}) > 1 and k not in ("out_dir", "data.size")]
    laid = [k for kind in dict.fromkeys(x[3] for x in found) for k in _layout_keys(kind) if k in keys]
    columns = list(dict.fromkeys(differ + laid + ["size"]))
    names = [p.name if p else g.name for g, p, *_ in found]
    out = []
    for (given, point, run, kind, flat, nums), name in zip(found, names):
        lo, hi = ci_interval(nums)  # the schemas made these finite: ratio and interval in [0, 1], low <= high
        knn = nums.get("knn_distance")
        out.append(Result(name if names.count(name) == 1 else str(given), kind,
                          _full_rank({c: flat.get(c, "") for c in columns}), float(nums["memorization_ratio"]),
                          float(lo), float(hi), None if knn is None else float(knn)))
    return out


def _json_kind(value) -> str:
    return {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


# Layout: which columns make the table's rows and columns.

def _sort_key(column: str, value: str):
    rank = _ORDER.get(column, {}).get(value, len(_ORDER.get(column, {})))
    x = _num(value)
    return (rank, 0, x, "") if x is not None else (rank, 1 if value else 2, 0.0, value)


def layout(results: list[Result], rows=None, cols=None) -> tuple[list[str], list[str]]:
    """(row columns, column columns): given ones checked; defaults per kind (SD: Table 3; EDM: varying x size)."""
    columns = list(dict.fromkeys(c for r in results for c in r.values))
    for flag, given in (("--rows", rows), ("--cols", cols)):
        for c in given or []:
            if c not in columns:
                raise InputError(flag, f"unknown column {c!r}; columns: {', '.join(columns)}")
    if rows is not None and cols is not None and set(rows) & set(cols):
        raise InputError("--rows", f"{sorted(set(rows) & set(cols))[0]!r} is in both --rows and --cols")
    found = sorted({str(r.kind) for r in results})
    if len(found) > 1 and rows is None and cols is None:
        raise InputError("--rows/--cols", f"runs of different kinds ({', '.join(found)}) have no common layout; "
                                          "give --rows and/or --cols to group them (e.g. --rows kind --cols size)")
    varying = [c for c in columns if len({r.values.get(c, "") for r in results}) > 1
               and not (c == "data.size" and "size" in columns)]
    preset = _kind_layout(results[0].kind) if len(found) == 1 and results else None
    if preset:  # the kind's own layout (SD: the paper's Table 3)
        d_rows = [c for c in preset[0] if c in columns] + [c for c in varying if c not in preset[0] + preset[1]]
        d_cols = [c for c in preset[1] if c in columns]
    else:
        d_cols = ["size"] if "size" in columns else []
        # Rows: what tells curves apart, not what moves with the size (e.g. epochs zipped with |D|).
        d_rows = [c for c in varying if c not in d_cols and not (d_cols and _follows_size(results, c))]
    if rows is None and cols is None:
        return d_rows, d_cols
    if cols is None:
        return list(rows), [c for c in dict.fromkeys(d_cols + varying) if c not in rows]
    if rows is None:
        return [c for c in dict.fromkeys(d_rows + varying) if c not in cols], list(cols)
    return list(rows), list(cols)


def _kind_layout(kind) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    return kinds.get(kind).layout if kind in kinds.names() else None


def _layout_keys(kind) -> tuple[str, ...]:
    preset = _kind_layout(kind)
    return preset[0] + preset[1] if preset else ()


def _follows_size(results: list[Result], column: str) -> bool:
    """True when each value of ``column`` comes with one size only (it moves with |D|, like zipped epochs); never
    when every result has the same size (nothing moves with it then: runs of one |D| differ in their other keys)."""
    sizes: dict[str, set] = {}
    for r in results:
        sizes.setdefault(str(r.values.get(column, "")), set()).add(str(r.values.get("size", "")))
    return len(set().union(*sizes.values())) > 1 and all(len(s) == 1 for s in sizes.values())


def pivot(results: list[Result], rows: list[str], cols: list[str]):
    """(row keys, column keys, {(row key, column key): Result}), keys in the table's order."""
    key = lambda r, cs: tuple(r.values.get(c, "") for c in cs)  # noqa: E731
    order = lambda cs: lambda k: [_sort_key(c, v) for c, v in zip(cs, k)]  # noqa: E731
    cells: dict = {}
    for r in results:
        cells.setdefault((key(r, rows), key(r, cols)), []).append(r)
    clash = next((v for v in cells.values() if len(v) > 1), None)
    if clash:
        others = [c for c in dict.fromkeys(c for r in results for c in r.values) if c not in rows + cols
                  and len({r.values.get(c, "") for r in clash}) > 1]
        names = ", ".join(r.source for r in clash)
        raise InputError("--rows/--cols", f"{len(clash)} results fall in one cell ({names}); add "
                                          f"{', '.join(others) or 'a column that tells them apart'} to --rows "
                                          "or --cols")
    row_keys = sorted({k[0] for k in cells}, key=order(rows))
    col_keys = sorted({k[1] for k in cells}, key=order(cols))
    return row_keys, col_keys, {k: v[0] for k, v in cells.items()}


def cell_text(r: Result | None) -> str:
    """``ratio% [lo–hi] / KNN`` (percent with two decimals, as in Table 3)."""
    if r is None:
        return "—"
    ival = f" [{100 * r.low:.2f}–{100 * r.high:.2f}]" if r.low is not None and r.high is not None else ""
    return f"{100 * r.ratio:.2f}%{ival} / " + ("—" if r.knn is None else f"{r.knn:.2f}")


def _label(cs, key) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(cs, key) if v != "") or ("all" if not cs else "—")


def markdown(rows, cols, row_keys, col_keys, cells) -> str:
    """The pivot table in markdown: the row columns, then one column per column key."""
    head = (rows or ["results"]) + [_label(cols, k) for k in col_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rk in row_keys:
        texts = [cell_text(cells.get((rk, ck))) for ck in col_keys]
        lines.append("| " + " | ".join(list(rk or ("all",)) + texts) + " |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows, cols, row_keys, col_keys, cells) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without pyplot, as in audit/report.py
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.4, 1.0 + 0.35 * len(row_keys) * len(col_keys)), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x, width = np.arange(len(col_keys)), 0.8 / max(1, len(row_keys))
    top = 1.0
    for i, rk in enumerate(row_keys):
        rs = [cells.get((rk, ck)) for ck in col_keys]
        y = np.array([math.nan if r is None else 100 * r.ratio for r in rs])
        err = np.array([[0.0 if r is None or r.low is None else max(0.0, 100 * (r.ratio - r.low)) for r in rs],
                        [0.0 if r is None or r.high is None else max(0.0, 100 * (r.high - r.ratio)) for r in rs]])
        top = max(top, float(np.nanmax(np.append(y + err[1], 0.0))))
        ax.bar(x - 0.4 + (i + 0.5) * width, y, width, yerr=err, capsize=2, color=f"C{i % 10}",
               label=_label(rows, rk), error_kw={"lw": 0.8})
    ax.set_xticks(x, [_label(cols, ck).replace(", ", "\n") for ck in col_keys], fontsize=7)
    ax.set_ylim(0, min(105.0, 1.15 * top))
    ax.set_ylabel("ratio of memorization (%)")
    ax.set_title("memorization ratio with 95% intervals", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_compare(out_dir, results: list[Result], rows: list[str], cols: list[str]) -> tuple[str, list[Path]]:
    """Write compare.md, compare.csv and compare.png into out_dir (straight into it: `sdmem compare` gives it a
    staging folder); returns (the markdown, the paths)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    row_keys, col_keys, cells = pivot(results, rows, cols)
    md = markdown(rows, cols, row_keys, col_keys, cells)
    atomic_write_text(out / "compare.md", md)
    # Long form: one line per result, in the table's order
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rows + cols + list(METRICS) + ["source"])
    for rk in row_keys:
        for ck in col_keys:
            if (r := cells.get((rk, ck))) is not None:
                writer.writerow(list(rk) + list(ck) + ["" if v is None else repr(v) for v in
                                                       (r.ratio, r.low, r.high, r.knn)] + [r.source])
    atomic_write_text(out / "compare.csv", buf.getvalue())
    _plot(out / "compare.png", rows, cols, row_keys, col_keys, cells)
    return md, [out / "compare.md", out / "compare.csv", out / "compare.png"]


def _columns(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def add_parser(sub) -> None:
    """Register `sdmem compare RUN... | SWEEP_DIR [--rows COLS] [--cols COLS] [--out DIR]`."""
    p = sub.add_parser("compare", help="memorization ratio (95%% interval) and KNN distance of runs side by side",
                       description="A pivot table of several runs or one sweep: each cell 'ratio% [lo-hi] / KNN'. "
                                   "SD: rows method and rank, columns prompt and |D| (the paper's Table 3); EDM: "
                                   "rows every varying column, columns |D|. Writes compare.md, compare.csv, "
                                   "compare.png.")
    p.add_argument("inputs", nargs="+", metavar="RUN",
                   help="run folders (or sweep point folders), or one sweep folder")
    p.add_argument("--rows", metavar="COLS", help="comma-separated columns making the table's rows")
    p.add_argument("--cols", metavar="COLS", help="comma-separated columns making the table's columns")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the sweep folder, or ./compare)")
    p.set_defaults(func=run_compare)


def run_compare(args) -> int:
    """`sdmem compare`: load, lay out, print the markdown table and write compare.md/.csv/.png (all three, or none:
    every input is checked first, then they are built in a staging folder and moved into place together)."""
    inputs = [Path(x) for x in args.inputs]
    sweeps = [x for x in inputs if (x / "results.csv").is_file()]
    if sweeps and len(inputs) > 1:
        raise InputError(sweeps[0], "is a sweep folder; give one sweep folder, or run folders only")
    results = load_sweep(sweeps[0]) if sweeps else load_runs(inputs)
    rows, cols = layout(results, _columns(getattr(args, "rows", None)), _columns(getattr(args, "cols", None)))
    pivot(results, rows, cols)  # a layout that puts two results in one cell is refused before anything is written
    out = Path(getattr(args, "out", None) or (sweeps[0] if sweeps else "compare"))
    with staged_folder(out) as stage:
        md, paths = write_compare(stage, results, rows, cols)
    print(md, end="")
    print("wrote " + ", ".join(str(out / p.name) for p in paths))
    return 0
