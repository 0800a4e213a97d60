"""Training curves and sample-size checks.

``sdmem curves``: the memorization ratio and KNN distance that EDM training tracked (``tracking.jsonl``) against
epochs and images seen, several runs overlaid, each run's highest ratio starred (the paper's Fig. 1(c), Fig. 4).
``sdmem enough``: how many generated images are enough (the paper's Fig. 6): one audit's per-sample replica flags
subsampled without replacement at growing sizes; the spread of the ratio across draws shrinks with the size.

Records are read through sdmem.records (tracking.jsonl rows as TRACKED, summary.json as AUDIT_SUMMARY; config.json
must be a JSON object): a damaged one is refused in one line naming the file, line and field. Both commands check
every input first, then build their two outputs in a staging folder inside the output folder and move them into
place together: a failure (while plotting, say) leaves no new file and the old outputs untouched.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .. import kinds
from ..errors import InputError
from ..runs import find_runs as runs_find
from ..records import AUDIT_SUMMARY, TRACKED, ci_interval, read_record, read_rows
from ..utils import atomic_write, atomic_write_text, staged_folder
from .emm import read_flags

CURVE_COLUMNS = ["run", "epoch", "step", "images_seen", "memorization_ratio", "memorization_ratio_low",
                 "memorization_ratio_high", "knn_distance", "best"]
ENOUGH_COLUMNS = ["num_generated", "reps", "memorization_ratio_mean", "memorization_ratio_low",
                  "memorization_ratio_high", "memorization_ratio_std", "full_ratio"]


def _fmt(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _out_dir(out) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    return out


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without pyplot, as in audit/report.py
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig


# curves: which runs, their tracked rows, the 2x2 figure.

def find_runs(paths) -> list[tuple[str, Path]]:
    """(label, run folder) of each input: a run folder, a sweep point folder, or a sweep folder (all its points)."""
    return [(ref.label, ref.run) for ref in runs_find(paths)]


def tracked_rows(run: Path) -> list[dict]:
    """The rows of a run's tracking.jsonl (each checked: sdmem.records.TRACKED): epoch, step, images_seen, ratio
    with its interval, knn_distance."""
    from ..runs import RunPaths, read_json

    paths = RunPaths(run)
    if not paths.config.is_file():
        raise InputError(run, "is not an sdmem run folder (no config.json) nor a sweep folder")
    cfg = read_json(paths.config, "run config")
    if not isinstance(cfg, dict):
        kind = {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(cfg), "a number")
        raise InputError(paths.config, f"expected a JSON object (run config), got {kind}")
    kind = cfg.get("kind")
    if kind not in kinds.names():
        raise InputError(paths.config, f"kind: holds a run of kind {kind!r}; expected one of {', '.join(kinds.names())}")
    if not kinds.get(kind).tracks_memorization:
        raise InputError(run, f"is a run of kind {kind}: its training tracks no memorization (no tracking.jsonl); "
                              "compare its audits with `sdmem compare`")
    rows = []
    for r in read_rows(kinds.get(kind).tracking_log(run), TRACKED):
        lo, hi = ci_interval(r)
        knn = r["knn_distance"]
        rows.append({"epoch": int(r["epoch"]), "step": int(r["step"]), "images_seen": int(r["images_seen"]),
                     "memorization_ratio": float(r["memorization_ratio"]), "memorization_ratio_low": float(lo),
                     "memorization_ratio_high": float(hi), "knn_distance": None if knn is None else float(knn)})
    if not rows:
        raise InputError(run, "has no tracked memorization (no tracking.jsonl rows): EDM training tracks it at "
                              "each snapshot when track.num_images > 0")
    return rows


def best_index(rows: list[dict]) -> int:
    """The row with the highest ratio, the first of equals (as best.json chooses)."""
    return max(range(len(rows)), key=lambda i: (rows[i]["memorization_ratio"], -(rows[i]["step"] or 0)))


def _plot_curves(path: Path, curves: list[tuple[str, list[dict]]]) -> None:
    fig = _figure((10.0, 7.0))
    axes = fig.subplots(2, 2)
    panels = [("memorization_ratio", "epoch"), ("memorization_ratio", "images_seen"),
              ("knn_distance", "epoch"), ("knn_distance", "images_seen")]
    for (ykey, xkey), ax in zip(panels, axes.flat):
        scale = 100.0 if ykey == "memorization_ratio" else 1.0
        for k, (label, rows) in enumerate(curves):
            color = f"C{k % 10}"
            pts = sorted((r for r in rows if r[xkey] is not None and r[ykey] is not None), key=lambda r: r[xkey])
            x, y = np.array([r[xkey] for r in pts], float), scale * np.array([r[ykey] for r in pts], float)
            ax.plot(x, y, marker="o", ms=3, lw=1.4, color=color, label=label)
            if ykey == "memorization_ratio" and all(r["memorization_ratio_low"] is not None and
                                                    r["memorization_ratio_high"] is not None for r in pts):
                ax.fill_between(x, [scale * r["memorization_ratio_low"] for r in pts],
                                [scale * r["memorization_ratio_high"] for r in pts], color=color, alpha=0.15, lw=0)
            b = rows[best_index(rows)]  # the highest ratio (the snapshot the paper reports), starred
            if b[xkey] is not None and b[ykey] is not None:
                ax.plot([b[xkey]], [scale * b[ykey]], ls="none", marker="*", ms=13, color=color, mec="black",
                        mew=0.6, zorder=5)
        ax.set_xlabel("training epochs" if xkey == "epoch" else "images seen")
        ax.set_ylabel("ratio of memorization (%)" if scale == 100.0 else "KNN distance")
        if scale == 100.0:
            ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle("tracked during training (star: the highest ratio of each run)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_curves(out_dir, curves: list[tuple[str, list[dict]]]) -> list[Path]:
    """Write curves.csv (every tracked row, best marked) and curves.png straight into out_dir; their paths."""
    out = _out_dir(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for label, rows in curves:
        best = best_index(rows)
        for i, r in enumerate(rows):
            writer.writerow([label] + [_fmt(r[c]) for c in CURVE_COLUMNS[1:-1]] + [int(i == best)])
    atomic_write_text(out / "curves.csv", buf.getvalue())
    _plot_curves(out / "curves.png", curves)
    return [out / "curves.csv", out / "curves.png"]


# enough: subsampling one audit's flags.

def audit_folder(path) -> Path:
    """The audit folder of AUDIT_DIR: itself when it holds per_sample.csv, else its audit/ (a sweep point)."""
    path = Path(path)
    for folder in (path, path / "audit"):
        if (folder / "per_sample.csv").is_file():
            return folder
    raise InputError(path, "holds no per_sample.csv (nor audit/per_sample.csv); expected an audit folder "
                           "(`sdmem audit --out DIR`) or a sweep point folder")


def default_sizes(n: int) -> list[int]:
    """A log-spaced 1-2-5 ladder from 100 below n, then n (all flags)."""
    ladder = [m * 10 ** e for e in range(2, 13) for m in (1, 2, 5)]
    return [s for s in ladder if s < n] + [n]


def parse_sizes(text: str, n: int, where: str = "--sizes") -> list[int]:
    """Comma-separated sample sizes, each in [1, n]; sorted, without repeats."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(where, f"expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError(where, f"expected comma-separated positive integers, got {text!r}")
    if max(sizes) > n:
        raise InputError(where, f"{max(sizes)} is more than the {n} generated images the audit flagged; "
                                f"sizes go up to {n}")
    return sorted(set(sizes))


def subsample(flags: np.ndarray, sizes, reps: int = 200, seed: int = 0) -> list[dict]:
    """Per size: the mean ratio over ``reps`` draws without replacement, their 2.5/97.5 percentiles and std."""
    n, sizes = len(flags), [int(s) for s in sizes]
    if reps < 1:
        raise InputError("--reps", f"expected a positive integer, got {reps}")
    rng = np.random.default_rng(seed)
    # The first s items of a random permutation are a uniform draw of s without replacement, for every s at once
    counts = np.empty((reps, len(sizes)), np.int64)
    for i in range(reps):
        counts[i] = np.cumsum(flags[rng.permutation(n)])[np.array(sizes) - 1]
    full = int(flags.sum()) / n
    out = []
    for j, s in enumerate(sizes):
        ratios = counts[:, j] / s
        lo, hi = np.percentile(ratios, [2.5, 97.5])
        mean = int(counts[:, j].sum()) / (reps * s)  # integer total, one division: exact k/n at s = n
        out.append({"num_generated": s, "reps": reps, "memorization_ratio_mean": mean,
                    "memorization_ratio_low": float(lo), "memorization_ratio_high": float(hi),
                    "memorization_ratio_std": float(ratios.std()), "full_ratio": full})
    return out


def write_enough(out_dir, table: list[dict], title: str = "") -> list[Path]:
    """Write enough.csv and enough.png (ratio and band against the number of generated images, log x) straight
    into out_dir; their paths."""
    out = _out_dir(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ENOUGH_COLUMNS)
    for r in table:
        writer.writerow([_fmt(r[c]) for c in ENOUGH_COLUMNS])
    atomic_write_text(out / "enough.csv", buf.getvalue())
    # The figure: mean and 95% band of the subsampled ratio, the full-set ratio dashed
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    x = np.array([r["num_generated"] for r in table], float)
    ax.fill_between(x, [100 * r["memorization_ratio_low"] for r in table],
                    [100 * r["memorization_ratio_high"] for r in table], color="C0", alpha=0.25, lw=0,
                    label="2.5-97.5 percentiles of the draws")
    ax.plot(x, [100 * r["memorization_ratio_mean"] for r in table], marker="o", ms=4, color="C0", label="mean")
    ax.axhline(100 * table[-1]["full_ratio"], ls="--", color="gray", lw=1.2,
               label=f"all flags: {100 * table[-1]['full_ratio']:.2f}%")
    ax.set_xscale("log")
    if len(x) <= 12:  # the sizes drawn as ticks, labelled like the paper's Fig. 6 (5k, 10k, ...)
        ax.set_xticks(x, [f"{s / 1000:g}k" if s >= 1000 else f"{s:g}" for s in x], fontsize=8)
        ax.minorticks_off()
    ax.set_xlabel("generated images audited")
    ax.set_ylabel("ratio of memorization (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "enough.png", lambda p: fig.savefig(p, format="png"))
    return [out / "enough.csv", out / "enough.png"]


def format_enough(table: list[dict]) -> str:
    """The subsampling table, aligned, ratios in %."""
    head = ["images", "mean", "95% of draws", "std", "all flags"]
    body = [[str(r["num_generated"]), f"{100 * r['memorization_ratio_mean']:.2f}%",
             f"[{100 * r['memorization_ratio_low']:.2f}, {100 * r['memorization_ratio_high']:.2f}]",
             f"{100 * r['memorization_ratio_std']:.2f}", f"{100 * r['full_ratio']:.2f}%"] for r in table]
    widths = [max(len(row[j]) for row in [head] + body) for j in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [head] + body)


def add_parser(sub) -> None:
    """Register `sdmem curves RUN... [--out DIR]` and `sdmem enough AUDIT_DIR [--out] [--sizes] [--reps]`."""
    p = sub.add_parser("curves", help="memorization ratio and KNN distance tracked during EDM training, overlaid",
                       description="Plots each run's tracking.jsonl against epochs and images seen (2x2 panels), "
                                   "the highest ratio of each run starred; writes curves.png and curves.csv.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="EDM run folders, sweep point folders or sweep folders")
    p.add_argument("--out", metavar="DIR", default="curves", help="output folder (default: ./curves)")
    p.set_defaults(func=run_curves)
    p = sub.add_parser("enough", help="how many generated images are enough: subsample one audit's flags",
                       description="Draws --reps subsets of each size without replacement from an audit's "
                                   "per-sample replica flags (seeded); writes enough.csv and enough.png.")
    p.add_argument("audit", metavar="AUDIT_DIR", help="an audit folder (per_sample.csv) or a sweep point folder")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the audit folder)")
    p.add_argument("--sizes", metavar="N,N,...", help="sample sizes (default: 100, 200, 500, ... up to all flags)")
    p.add_argument("--reps", type=int, default=200, help="draws per size (default 200)")
    p.set_defaults(func=run_enough)


def run_curves(args) -> int:
    """`sdmem curves`: read (and check) every run's tracked rows, then write curves.csv and curves.png together."""
    curves = [(label, tracked_rows(run)) for label, run in find_runs(args.runs)]
    out = Path(getattr(args, "out", None) or "curves")
    with staged_folder(out) as stage:
        paths = [out / p.name for p in write_curves(stage, curves)]
    for label, rows in curves:
        b = rows[best_index(rows)]
        print(f"{label}: {len(rows)} snapshots, highest ratio {100 * b['memorization_ratio']:.2f}% at epoch "
              f"{b['epoch']} ({b['images_seen']} images seen)")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_enough(args) -> int:
    """`sdmem enough`: subsample the flags, print the table, write enough.csv and enough.png (both or neither)."""
    folder = audit_folder(args.audit)
    flags = read_flags(folder / "per_sample.csv")
    summary = folder / "summary.json"  # the flags should reproduce the audit's own ratio (checked before writing)
    ratio = read_record(summary, AUDIT_SUMMARY)["memorization_ratio"] if summary.is_file() else None
    text = getattr(args, "sizes", None)
    sizes = default_sizes(len(flags)) if text is None else parse_sizes(text, len(flags))
    reps = getattr(args, "reps", 200)
    table = subsample(flags, sizes, reps)
    title = f"{folder}: {len(flags)} flags, {reps} draws per size without replacement"
    out = Path(getattr(args, "out", None) or folder)
    with staged_folder(out) as stage:
        paths = [out / p.name for p in write_enough(stage, table, title)]
    print(format_enough(table))
    if ratio is not None and abs(ratio - table[-1]["full_ratio"]) > 1e-9:
        print(f"note: summary.json reports {100 * ratio:.2f}%, the flags give {100 * table[-1]['full_ratio']:.2f}%")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
