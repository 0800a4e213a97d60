"""A sweep's numbers beside the paper's: eval/paper_reference.csv (Gu et al., "On Memorization in Diffusion Models",
TMLR 2025: every cell of Tables 1-4, Tables 5-6's FIDs, Tables 7-8's KNN distances, and the memorization ratios
and EMMs stated in the text) against SWEEP_DIR/results.csv (`sdmem sweep`) and SWEEP_DIR/emm.csv (`sdmem emm`, when
present).

    python eval/beside_paper.py runs/paper/table1_batch_size                    # spec: the folder's name
    python eval/beside_paper.py runs/sd/table3 --out table3_vs_paper.md
    python eval/beside_paper.py some/folder --spec table4_labels

The spec's reference rows are each matched to the results rows whose identifying columns agree (the reference's
non-empty cells; numbers compared numerically, 2e-4 == 0.0002; JSON lists element-wise; other text
case-insensitively; a reference `null` matches an empty cell, a swept null such as fig2a's 32x32 resolution).
EMM rows match emm.csv's rows on the same columns. The table shows the paper's value (a reference note starting
with "~ " is approximate, "> " a lower bound, "< " an upper bound), ours with its 95% interval, and ours minus the
paper's (percentage points for ratios, |D| for EMMs, the paper's units for KNN distances, FID points for FIDs); a
bound is also marked met or not met (inclusive). A ratio is shown as a percent; an FID (results.csv's `fid` column,
empty when the sweep ran without the Inception weights) and a KNN distance as plain numbers. Reference rows with no
matching row are listed as "not run", matched ones whose cell is empty as "no value" (counted apart). Standard
library only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().with_name("paper_reference.csv")
FIXED = ("source", "spec", "metric", "value", "note")  # the reference's other columns identify the point
SPECS = Path(__file__).resolve().parents[1] / "train_configs" / "paper"  # the specs; table3: train_configs/sd/
RELATIONS = {"~": "~ ", ">": "> ", "<": "< "}  # a note's first character, then a space


class Failure(Exception):
    """A one-line error for stderr (exit 2)."""


def relation(note: str) -> str:
    """'~', '>' or '<' from a reference note's prefix, '=' when the value is exact."""
    note = note or ""
    return note[0] if len(note) > 1 and note[0] in RELATIONS and note[1] == " " else "="


def read_csv(path: Path, what: str) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
            return list(reader.fieldnames or []), rows
    except FileNotFoundError:
        raise Failure(f"{path}: no {what} (missing file)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Failure(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None


def load_reference(path: Path = REFERENCE) -> tuple[list[str], list[dict]]:
    """(identifying columns, rows) of the reference CSV."""
    columns, rows = read_csv(path, "reference table")
    missing = [c for c in FIXED if c not in columns]
    if missing:
        raise Failure(f"{path}: not a reference table (missing column(s) {', '.join(missing)})")
    return [c for c in columns if c not in FIXED], rows


# Matching.

def _number(text: str) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _canonical(value):
    """Lists/dicts from JSON, compared element-wise: numbers as floats, text lower-case."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k).lower(): _canonical(v) for k, v in value.items()}
    return value


def same(ref: str, ours: str) -> bool:
    """Whether a results cell agrees with a (non-empty) reference cell."""
    ref, ours = ref.strip(), (ours or "").strip()
    if ref.lower() == "null":
        return ours == "" or ours.lower() == "null"
    if ours == "":
        return False
    a, b = _number(ref), _number(ours)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if ref[:1] in "[{" and ours[:1] in "[{":
        try:
            return _canonical(json.loads(ref)) == _canonical(json.loads(ours))
        except ValueError:
            pass
    return ref.lower() == ours.lower()


def _cell(row: dict, column: str) -> str | None:
    """A results row's cell; `size` falls back to `data.size`; None when the table has no such column."""
    if column == "size" and not row.get("size") and "data.size" in row:
        return row.get("data.size", "")
    return row.get(column)


def matches(ref: dict, rows: list[dict], ids: list[str]) -> tuple[list[dict], list[str]]:
    """The rows agreeing with every non-empty identifying cell of ``ref``; the columns no row has."""
    want = {c: ref[c] for c in ids if ref.get(c, "") != ""}
    absent = [c for c in want if rows and all(_cell(r, c) is None for r in rows)]
    if absent:
        return [], absent
    return [r for r in rows if all(_cell(r, c) is not None and same(v, _cell(r, c)) for c, v in want.items())], []


# Formatting.

def _fmt_value(metric: str, x: float | None) -> str:
    if x is None:
        return ""
    if metric == "memorization_ratio":
        return f"{100 * x:.2f}%"
    if metric == "emm":
        return f"{x:.0f}"
    return f"{x:.2f}"


def _interval(metric: str, lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return ""
    if metric == "memorization_ratio":
        return f" [{100 * lo:.2f}, {100 * hi:.2f}]"
    return f" [{lo:.0f}, {hi:.0f}]" if metric == "emm" else f" [{lo:.2f}, {hi:.2f}]"


def _diff(metric: str, ours: float, paper: float) -> str:
    d = ours - paper
    if metric == "memorization_ratio":
        return f"{100 * d:+.2f} pp"
    return f"{d:+.0f}" if metric == "emm" else f"{d:+.2f}"


def _ours(metric: str, row: dict) -> tuple[float | None, str]:
    """(our value, its cell text with the 95% interval) from a results.csv or emm.csv row."""
    if metric == "emm":
        x = _number(row.get("emm", ""))
        if x is None:
            return None, "no value"
        bound = {"above_all": "> ", "below_all": "< "}.get(row.get("status", ""), "")
        return x, bound + _fmt_value(metric, x) + _interval(metric, _number(row.get("emm_low", "")),
                                                             _number(row.get("emm_high", "")))
    x = _number(row.get(metric, ""))
    if x is None:
        if metric not in row:
            return None, f"no value (no {metric} column)"
        if metric == "fid":
            return None, "no value (empty fid: no Inception weights when the sweep ran)"
        return None, "no value"
    text = _fmt_value(metric, x)
    if metric == "memorization_ratio":
        text += _interval(metric, _number(row.get("memorization_ratio_low", "")),
                          _number(row.get("memorization_ratio_high", "")))
    return x, text


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def compare(sweep_dir, spec: str | None = None, reference: Path = REFERENCE) -> tuple[str, dict]:
    """The markdown table of the spec's reference rows beside SWEEP_DIR's results, and counts."""
    sweep = Path(sweep_dir)
    if sweep.name == "results.csv" and sweep.is_file():  # the table itself: its folder
        sweep = sweep.parent
    ids, ref_rows = load_reference(Path(reference))
    name = spec or sweep.resolve().name
    name = Path(name).name.removesuffix(".yaml")
    known = sorted({r["spec"] for r in ref_rows})
    mine = [r for r in ref_rows if r.get("spec") == name]
    if not mine:
        if (SPECS / f"{name}.yaml").is_file():
            raise Failure(f"spec {name!r}: the paper states no number for it, only a plot "
                          f"(specs with numbers: {', '.join(known)})")
        raise Failure(f"unknown spec {name!r} (specs with numbers: {', '.join(known)}); pass --spec NAME")
    results_path = sweep / "results.csv"
    if not results_path.is_file():
        raise Failure(f"{results_path}: no results.csv (run `sdmem sweep` for {name} first, or pass its output folder)")
    _, results = read_csv(results_path, "results table")
    emm_path = sweep / "emm.csv"
    emm_rows = read_csv(emm_path, "EMM table")[1] if emm_path.is_file() else None

    used = [c for c in ids if any(r.get(c, "") != "" for r in mine)]
    head = ["source", *used, "metric", "paper", "ours [95% CI]", "ours - paper", "point"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    counts = {"reference": len(mine), "compared": 0, "not_run": 0, "no_value": 0}
    absent_all: set[str] = set()
    for ref in mine:
        metric, rel = ref["metric"], relation(ref.get("note", ""))
        paper = _number(ref["value"])
        paper_text = ("" if rel == "=" else RELATIONS[rel]) + _fmt_value(metric, paper)
        lead = [ref["source"], *(ref.get(c, "") for c in used), metric, paper_text]
        if metric == "emm" and emm_rows is None:
            found, why = [], "not run (no emm.csv: run `sdmem emm SWEEP_DIR`)"
        else:
            found, absent = matches(ref, emm_rows if metric == "emm" else results, ids)
            absent_all.update(absent)
            why = "not run" + (f" (no column {', '.join(absent)})" if absent else "")
        if not found:
            counts["not_run"] += 1
            lines.append("| " + " | ".join(_escape(x) for x in lead + [why, "", ""]) + " |")
            continue
        valued = [_ours(metric, row) for row in found]
        if all(ours is None for ours, _ in valued):
            counts["no_value"] += 1  # matched, but the cell is empty (e.g. a sweep run without FID weights)
        else:
            counts["compared"] += 1
        for row, (ours, text) in zip(found, valued):
            diff = "" if ours is None or paper is None else _diff(metric, ours, paper)
            if diff and metric == "emm" and row.get("status") in ("above_all", "below_all"):
                diff += " (ours: a bound, the crossing is outside the swept sizes)"
            if diff and rel in "<>":
                met = ours >= paper if rel == ">" else ours <= paper
                diff += " (bound met)" if met else " (bound not met)"
            point = row.get("point", "") if metric != "emm" else ""
            lines.append("| " + " | ".join(_escape(x) for x in lead + [text, diff, point]) + " |")
    summary = (f"{name}: {counts['reference']} reference number(s); {counts['compared']} compared, "
               f"{counts['not_run']} not run" + (f", {counts['no_value']} run without a value" if counts["no_value"]
                                                  else "") + ".")
    if absent_all:
        summary += f" The sweep's tables lack column(s) {', '.join(sorted(absent_all))}."
    return "\n".join(lines) + "\n\n" + summary + "\n", counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="A sweep's memorization ratios, EMMs, KNN distances and FIDs beside the paper's numbers.")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep folder (results.csv, optional emm.csv)")
    p.add_argument("--spec", help="the spec's name (default: SWEEP_DIR's name), e.g. table1_batch_size or table3")
    p.add_argument("--out", metavar="FILE.md", help="also write the table here")
    p.add_argument("--reference", default=str(REFERENCE), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        text, _ = compare(args.sweep_dir, args.spec, Path(args.reference))
        if args.out:
            try:
                Path(args.out).write_text(text, encoding="utf-8")
            except OSError as exc:
                raise Failure(f"{args.out}: cannot write ({exc.strerror or exc})") from None
    except Failure as exc:
        print(f"beside_paper: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
