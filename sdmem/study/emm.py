"""Effective model memorization (EMM, paper Definition 2.1) from a sweep's results table: emm.csv and emm.png.

Definition 2.1: EMM = the largest |D| whose expected ratio of memorization is >= 1 - zeta. Per curve (rows sharing
the --by columns), sorted by |D|, the EMM lies between the consecutive sizes D_i, D_i+1 with R(D_i) >= 1 - zeta >
R(D_i+1) (Sec. 2). A curve that is not monotone may cross 1 - zeta several times: the LAST such crossing from small
sizes is used (the largest |D| that still memorizes), the curve is flagged not monotone and the note names the other
crossings; a curve that is back above 1 - zeta at its largest size is ``above_all`` (the EMM is beyond it).
Between D_i and D_i+1 the crossing is interpolated linearly in log |D| by default (the paper's sizes are log-spaced
and its EMMs are read off log-axis plots: a straight segment on a log axis): EMM = D_i * (D_i+1 / D_i) ** f with
f = (R_i - (1 - zeta)) / (R_i - R_i+1); ``interpolation="linear"`` (``--interpolation linear``) reads it linearly
in |D|, EMM = D_i + f * (D_i+1 - D_i). emm.csv records which (``interpolation``), and emm.png draws a log x axis
for log interpolation and a linear one for linear interpolation, so each EMM marker sits on its drawn crossing.
Interval (same interpolation): the two bracketing points' per-sample replica flags are bootstrapped (a resample of
n flags with replacement has Binomial(n, k/n) replicas, drawn directly); a resampled pair that no longer brackets
gives the endpoint it points to (both ratios >= 1 - zeta: the larger size; both below: the smaller; inverted: the
endpoint nearer the point estimate), so the interval stays inside the bracket and ignores noise at the other sizes.
Without flags the interval interpolates the bracketing points' ratio lows (EMM low) and highs (EMM high): the
interpolated crossing grows with both ratios. Every row is checked as a results row (sdmem.records.RESULT_ROW):
a ratio outside [0, 1], an interval with low > high or a negative distance is refused, naming the row and column.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..records import RESULT_ROW, check
from ..utils import atomic_write, atomic_write_text, one_component, staged_folder

OUT_COLUMNS = ["emm", "emm_low", "emm_high", "status", "monotone", "note", "interpolation"]
INTERPOLATIONS = ("log", "linear")  # the crossing: linear in log |D| (default, as read off the paper's plots), in |D|
_BOOKKEEPING = {"size", "point", "status", "num_params", "epoch", "epochs", "step", "steps", "images_seen", "kimg",
                "wall_time", "seconds", "elapsed", "error", "note", "num_generated", "fid"}
_BOOKKEEPING_PREFIXES = ("memorization_ratio", "knn_distance", "wall_time", "images_seen")
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


def load_results(src) -> tuple[list[dict], Path]:
    """The rows of a results.csv (SRC: a sweep folder or the CSV itself) and the CSV's path."""
    path = Path(src)
    if path.is_dir():
        path = path / "results.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{k: "" if v is None else v for k, v in r.items() if k is not None} for r in reader]
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the results table ({getattr(exc, 'strerror', None) or exc})") from None
    if not columns or not rows:
        raise InputError(path, "empty results table (no header or no data rows)")
    missing = [c for c in ("size", "memorization_ratio") if c not in columns]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}; it has {', '.join(columns)}")
    checked_rows(rows, path)
    return rows, path


def checked_rows(rows, path) -> list[dict]:
    """Each row of the results table at ``path`` checked as a results row (RESULT_ROW: ratios and their interval in
    [0, 1] with low <= high, distances >= 0, a positive integer size; blank cells are null): the parsed rows. A row
    that does not fit is an InputError naming ``PATH row N`` (N counts the data rows from 1) and the column; so is a
    ``point`` that is not one folder name inside the sweep (its flags are read from there)."""
    return [_point_inside(check(RESULT_ROW, r, f"{path} row {n}", text=True), f"{path} row {n}")
            for n, r in enumerate(rows, 1)]


def _point_inside(row: dict, where: str) -> dict:
    if row.get("point") and not one_component(str(row["point"])):  # a folder inside the sweep, never a path
        raise InputError(where, "point: expected a point folder name (one path component inside the sweep "
                                f"folder), got {str(row['point'])[:80]!r}")
    return row


def default_by(rows) -> list[str]:
    """Columns that tell curves apart: not metrics/bookkeeping, varying, and not one value per size (run ids)."""
    out = []
    for c in dict.fromkeys(k for r in rows for k in r):
        if c in _BOOKKEEPING or c.startswith(_BOOKKEEPING_PREFIXES):
            continue
        sizes: dict[str, set] = {}
        for r in rows:
            sizes.setdefault(str(r.get(c, "")), set()).add(str(r.get("size", "")))
        if len(sizes) > 1 and any(len(s) > 1 for s in sizes.values()):
            out.append(c)
    return out


def finite_number(value) -> float | None:
    """float(value) when it is a finite number, else None (blank cells, text, nan)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_flags(path: Path) -> np.ndarray:
    """The ``replica`` column of a per_sample.csv as booleans (0/1 or true/false)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "replica" not in (reader.fieldnames or []):
                raise InputError(path, "no 'replica' column")
            vals = [str(r["replica"] or "").strip().lower() for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the per-sample flags ({getattr(exc, 'strerror', None) or exc})") from None
    bad = [v for v in vals if v not in _TRUE | _FALSE][:1]
    if bad or not vals:
        raise InputError(path, f"replica must be 0/1 or true/false, got {bad[0]!r}" if bad else "no rows")
    return np.array([v in _TRUE for v in vals])


def _points(group, base) -> tuple[list[dict], int]:
    """Rows -> one point per size (rows at one size pooled: mean ratios, concatenated flag files); rows skipped."""
    by_size: dict[int, list] = {}
    skipped = 0  # rows without a ratio (failed or unfinished points)
    for i, r in group:
        where = f"results row {i + 1}"
        c = check(RESULT_ROW, {k: v.item() if isinstance(v, np.generic) else v for k, v in r.items()}, where,
                  text=True)
        ratio = c["memorization_ratio"]
        if ratio is None:
            skipped += 1
            continue
        if c["size"] is None:
            raise InputError(where, "size: expected a positive integer for a row with a memorization_ratio, got a "
                                    "blank cell")
        size, low, high = c["size"], c.get("memorization_ratio_low"), c.get("memorization_ratio_high")
        _point_inside(r, where)
        flags = Path(base, str(r["point"]), "audit", "per_sample.csv") if base is not None and r.get("point") else None
        by_size.setdefault(int(size), []).append((ratio, low, high, flags if flags and flags.is_file() else None))
    pts = []
    for size in sorted(by_size):
        rs = by_size[size]
        mean = lambda j: None if any(x[j] is None for x in rs) else float(np.mean([x[j] for x in rs]))  # noqa: E731
        pts.append({"size": size, "ratio": mean(0), "low": mean(1), "high": mean(2), "rows": len(rs),
                    "flags": None if any(x[3] is None for x in rs) else [x[3] for x in rs]})
    return pts, skipped


def _crossing(sa, sb, ra, rb, t, inverted, interpolation="log"):
    """The 1 - zeta crossing between (sa, ra) and (sb, rb), vectorized over ra, rb: the ratio linear in log |D|
    (``log``: sa * (sb / sa) ** f) or in |D| (``linear``: sa + f * (sb - sa)), f = (ra - t) / (ra - rb)."""
    ra, rb = np.broadcast_arrays(np.asarray(ra, float), np.asarray(rb, float))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        f = (ra - t) / (ra - rb)
        e = sa * (sb / sa) ** f if interpolation == "log" else sa + f * (sb - sa)
    e = np.where((ra >= t) & (rb >= t), sb, e)
    e = np.where((ra < t) & (rb < t), sa, e)
    return np.where((ra < t) & (rb >= t), inverted, e)


def _curve(group, label, t, rng, n_boot, base, interpolation) -> dict:
    pts, skipped = _points(group, base)
    s, r = [p["size"] for p in pts], [p["ratio"] for p in pts]
    if len(pts) < 2:
        raise InputError(f"group {label}", f"at least two sizes are needed to locate the EMM; found {s or 'none'}")
    notes = [f"skipped {skipped} row(s) without a ratio"] if skipped else []
    if pooled := [str(p["size"]) for p in pts if p["rows"] > 1]:
        notes.append(f"pooled several rows (mean ratio) at size {', '.join(pooled)}")
    rises = [f"{s[i]}->{s[i + 1]}" for i in range(len(s) - 1) if r[i + 1] > r[i]]
    if rises:
        notes.append(f"non-monotone: ratio rises {', '.join(rises)}")
    downs = [i for i in range(len(s) - 1) if r[i] >= t > r[i + 1]]
    span = lambda i: f"{s[i]}-{s[i + 1]}"  # noqa: E731
    if downs and r[-1] >= t:  # back above 1 - zeta at the largest size: Definition 2.1's maximum is beyond it
        notes.append(f"crossing(s) of 1-zeta at {', '.join(map(span, downs))} not used: the ratio is >= 1-zeta "
                     f"again at the largest size {s[-1]} (Definition 2.1: the largest |D|)")
        downs = []
    if not downs:  # EMM beyond the sampled sizes: the end size is a bound (above_all: lower, below_all: upper)
        end = float(s[-1] if r[-1] >= t else s[0])
        return {"emm": end, "emm_low": end if r[-1] >= t else None, "emm_high": None if r[-1] >= t else end,
                "status": "above_all" if r[-1] >= t else "below_all", "monotone": not rises,
                "note": "; ".join(notes), "interpolation": interpolation}
    if len(downs) > 1:
        notes.append(f"{len(downs)} crossings of 1-zeta; used the last from small sizes ({span(downs[-1])}: "
                     f"Definition 2.1 takes the largest |D|), others at " + ", ".join(map(span, downs[:-1])))
    a, b = pts[downs[-1]], pts[downs[-1] + 1]
    # Definition 2.1: EMM = max |D| with E[R_mem] >= 1 - zeta; between the consecutive sizes D_i, D_i+1 with
    # R(D_i) >= 1 - zeta > R(D_i+1) (the last such pair), interpolated in log |D| (or |D|).
    def cross(ra, rb, inverted):
        return _crossing(a["size"], b["size"], ra, rb, t, inverted, interpolation)

    emm = float(cross(a["ratio"], b["ratio"], math.nan))
    gap = (lambda x, y: abs(math.log(x / y))) if interpolation == "log" else (lambda x, y: abs(x - y))
    nearer = a["size"] if gap(emm, a["size"]) <= gap(b["size"], emm) else b["size"]
    if a["flags"] and b["flags"]:
        fa, fb = (np.concatenate([read_flags(f) for f in p["flags"]]) for p in (a, b))
        boot = [rng.binomial(len(f), f.mean(), n_boot) / len(f) for f in (fa, fb)]
        lo, hi = np.percentile(cross(*boot, nearer), [2.5, 97.5])
        notes.append(f"interval: bootstrap of {len(fa)}+{len(fb)} per-sample flags ({n_boot} resamples)")
        off = [p["size"] for p, f in ((a, fa), (b, fb)) if abs(f.mean() - p["ratio"]) > 1e-6]
        if off:
            notes.append(f"flag mean differs from memorization_ratio at size {', '.join(map(str, off))}")
    elif None not in (a["low"], a["high"], b["low"], b["high"]):
        lo, hi = (float(cross(a[k], b[k], nearer)) for k in ("low", "high"))
        lo, hi = min(lo, hi), max(lo, hi)
        notes.append("interval: from ratio intervals")
    else:
        lo = hi = None
        notes.append("interval: unavailable (no per-sample flags, no ratio intervals)")
    return {"emm": emm, "emm_low": None if lo is None else float(lo), "emm_high": None if hi is None else float(hi),
            "status": "interpolated", "monotone": not rises, "note": "; ".join(notes), "interpolation": interpolation}


def _key(row, by) -> tuple:
    return tuple(str(row.get(c, "")) for c in by)


def _natural(value: str):  # numbers in numeric order, before text
    return (0, float(value), "") if _num_or_none(value) is not None else (1, 0.0, value)


def _num_or_none(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_interpolation(interpolation) -> str:
    if interpolation not in INTERPOLATIONS:
        raise InputError("--interpolation", f"expected one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return interpolation


def estimate_emm(rows, *, zeta=0.1, by=None, n_boot=2000, seed=0, base=None, interpolation="log") -> list[dict]:
    """One dict per curve: its --by values, then emm, emm_low, emm_high, status, monotone, note, interpolation
    (flags under base). ``interpolation``: ``log`` (the crossing linear in log |D|, default) or ``linear``."""
    if not (isinstance(zeta, (int, float)) and math.isfinite(zeta) and 0 < zeta < 1):
        raise InputError("--zeta", f"expected a finite number in (0, 1), got {zeta!r}")
    _check_interpolation(interpolation)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    by = default_by(rows) if by is None else list(by)
    for c in by:
        if c not in columns:
            raise InputError("--by", f"unknown column {c!r}; columns: {', '.join(columns)}")
        if c == "size" or c.startswith("memorization_ratio"):
            raise InputError("--by", f"{c!r} is a plotted quantity, not a curve label")
    groups: dict[tuple, list] = {}
    for i, r in enumerate(rows):
        groups.setdefault(_key(r, by), []).append((i, r))
    rng = np.random.default_rng(seed)  # one stream, curves in sorted order: reproducible for a given seed
    return [dict(zip(by, key)) | _curve(groups[key], ", ".join(f"{c}={v}" for c, v in zip(by, key)) or "all rows",
                                        1 - zeta, rng, n_boot, base, interpolation)
            for key in sorted(groups, key=lambda k: [_natural(v) for v in k])]


def _group_columns(result) -> list[str]:
    return [k for k in result[0] if k not in OUT_COLUMNS] if result else []


def _fmt(v, digits: str = ".10g") -> str:
    return "" if v is None else format(v, digits) if isinstance(v, float) else str(v)


def write_emm(out_dir, groups_result, rows, *, zeta, interpolation="log") -> list[Path]:
    """Write emm.csv and emm.png (ratio vs |D| per curve, 1 - zeta line, EMM marks) into out_dir; their paths.
    The x axis follows ``interpolation`` (the one the estimates used): log for ``log``, linear for ``linear``, so a
    straight segment between two sizes is the interpolated curve and each EMM mark lies on its drawn crossing."""
    _check_interpolation(interpolation)
    used = {res.get("interpolation", interpolation) for res in groups_result}
    if used - {interpolation}:
        raise ValueError(f"write_emm(interpolation={interpolation!r}) for estimates made with {sorted(used)}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    by = _group_columns(groups_result)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(by + OUT_COLUMNS)
    for res in groups_result:
        writer.writerow([_fmt(res.get(c, interpolation if c == "interpolation" else None)) for c in by + OUT_COLUMNS])
    atomic_write_text(out / "emm.csv", buf.getvalue())

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without pyplot, as in audit/report.py
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    t = 100 * (1 - zeta)
    for k, res in enumerate(groups_result):
        key = tuple(str(res[c]) for c in by)
        pts, _ = _points([(i, r) for i, r in enumerate(rows) if _key(r, by) == key], None)
        x, y = np.array([p["size"] for p in pts]), 100 * np.array([p["ratio"] for p in pts])
        err = [[0.0 if p[e] is None else max(0.0, s * 100 * (p["ratio"] - p[e])) for p in pts]
               for e, s in (("low", 1), ("high", -1))]
        color = f"C{k % 10}"
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.4, color=color,
                    label=", ".join(f"{c}={v}" for c, v in zip(by, key)) or "all rows")
        marker = {"interpolated": "*", "above_all": ">", "below_all": "<"}[res["status"]]
        ax.plot([res["emm"]], [t], ls="none", marker=marker, ms=13 if marker == "*" else 8, color=color,
                mec="black", mew=0.6, zorder=5)
    ax.axhline(t, ls="--", color="gray", lw=1.2, label=f"1 - zeta = {t:g}%")
    ax.set_xscale("log" if interpolation == "log" else "linear")  # the interpolation's straight segments
    sizes = sorted({int(float(r["size"])) for r in rows if str(r.get("size", "")).strip()})
    if len(sizes) <= 12:  # the sampled sizes as ticks, labelled like the paper's Figs. 2-3 (0.5k, 1k, ...)
        ax.set_xticks(sizes, [f"{s / 1000:g}k" if sizes[-1] >= 1000 else str(s) for s in sizes])
        ax.minorticks_off()
    ax.set_ylim(0, 102)
    ax.set_xlabel("training set size |D|" + (" (log scale)" if interpolation == "log" else ""))
    ax.set_ylabel("ratio of memorization (%)")
    how = "log |D|" if interpolation == "log" else "|D|"
    ax.set_title(f"EMM (zeta = {zeta:g}): star = crossing, triangle = beyond the sampled sizes\n"
                 f"crossing interpolated linearly in {how}", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(out / "emm.png", lambda p: fig.savefig(p, format="png"))
    return [out / "emm.csv", out / "emm.png"]


def format_table(result) -> str:
    """The EMM estimates as an aligned text table for the terminal."""
    by = _group_columns(result)
    head = by + ["emm", "95% interval", "status", "monotone", "interpolation", "note"]
    body = []
    for r in result:
        emm = {"above_all": "> ", "below_all": "< "}.get(r["status"], "") + _fmt(r["emm"], ".1f")
        ival = f"[{_fmt(r['emm_low'], '.1f') or '-'}, {_fmt(r['emm_high'], '.1f') or '-'}]"
        body.append([str(r[c]) for c in by] + [emm, ival, r["status"], str(r["monotone"]),
                                                str(r.get("interpolation", "")), r["note"]])
    widths = [max(len(row[j]) for row in [head] + body) for j in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [head] + body)


def add_parser(sub) -> None:
    """Register `sdmem emm SRC [--zeta Z] [--by COLS] [--out DIR]` on an argparse subparsers object."""
    p = sub.add_parser("emm", help="effective model memorization (paper Def. 2.1) from a sweep's results.csv",
                       description="Interpolates, per curve, the training-set size |D| at which the ratio of "
                                   "memorization crosses 1 - zeta; writes emm.csv and emm.png.")
    p.add_argument("src", metavar="SRC", help="a sweep folder holding results.csv, or a results.csv")
    p.add_argument("--zeta", default="0.1", help="memorization threshold is 1 - zeta, zeta in (0, 1) (default 0.1)")
    p.add_argument("--by", metavar="COLS", help="comma-separated columns naming the curves (default: every swept "
                   "column that varies; '' for a single curve)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="log",
                   help="the crossing between two sizes: linear in log |D| (log, default: the paper's log-spaced "
                        "sizes and log-axis plots) or linear in |D| (linear)")
    p.add_argument("--out", metavar="DIR", help="where to write emm.csv and emm.png (default: the CSV's folder)")
    p.set_defaults(func=run_emm)


def run_emm(args) -> int:
    """`sdmem emm`: estimate the EMMs, print the table and write emm.csv, emm.png (both, or neither: they are built
    in a staging folder inside the output folder and moved into place together)."""
    zeta = _num_or_none(zeta_text := getattr(args, "zeta", 0.1))
    if zeta is None or not (math.isfinite(zeta) and 0 < zeta < 1):
        raise InputError("--zeta", f"expected a finite number in (0, 1), got {zeta_text!r}")
    interpolation = _check_interpolation(getattr(args, "interpolation", "log"))
    rows, path = load_results(args.src)
    by_text = getattr(args, "by", None)
    by = None if by_text is None else [c.strip() for c in by_text.split(",") if c.strip()]
    result = estimate_emm(rows, zeta=zeta, by=by, base=path.parent, interpolation=interpolation)
    out = Path(getattr(args, "out", None) or path.parent)
    with staged_folder(out) as stage:
        names = [p.name for p in write_emm(stage, result, rows, zeta=zeta, interpolation=interpolation)]
    print(format_table(result))
    print("wrote " + ", ".join(str(out / n) for n in names))
    return 0
