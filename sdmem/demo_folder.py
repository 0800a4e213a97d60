"""What the demo's two parts (sdmem.demo, sdmem.demo_sd) share: the folder rule (demo.json records the settings; a
folder of other settings, or holding anything the demo did not write, is refused and never cleaned), the results
CSV and the terminal table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import InputError
from .records import DEMO, read_json, read_record
from .utils import atomic_write_text

DEMO_FORMAT = "sdmem-demo/1"
# What the demo writes into its folder (and an earlier sdmem, before demo.json, wrote).
DEMO_ENTRIES = {"demo.json", "points", "results.csv", "emm.csv", "emm.png", "replicas", "summary.json",
                "optimum_samples", "audit_optimum", "audit_heldout", "sd"}


def open_demo_folder(out: Path, settings: dict, *, entries: set[str] = DEMO_ENTRIES) -> None:
    """Make ``out`` this demo's folder (demo.json: its settings), or check that it is one. Other settings (the
    full demo in the quick demo's folder, another seed) are refused, naming them; a folder that holds anything the
    demo did not write is refused, never cleaned. A demo folder of an earlier sdmem (no demo.json, but the demo's
    summary.json) is adopted when it holds only the demo's files and its recorded settings agree."""
    record = {"format": DEMO_FORMAT, "settings": settings}
    path = out / "demo.json"
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if path.exists():
        old = read_record(path, DEMO)["settings"]
    elif out.is_dir() and any(out.iterdir()):
        foreign = sorted(e.name for e in out.iterdir() if e.name not in entries
                         and not e.name.startswith(".staging-"))
        if foreign or entries is not DEMO_ENTRIES or not (out / "summary.json").is_file():
            shown = ", ".join(map(repr, foreign[:3])) or ("no demo summary.json" if entries is DEMO_ENTRIES
                                                          else "no demo.json")
            raise InputError(out, f"is not an sdmem demo folder ({shown}): the demo writes only into an empty "
                                  "folder or its own; refusing to touch it (use another --out)")
        summary = read_json(out / "summary.json", "demo summary")
        old = {k: summary.get(k) for k in ("quick", "seed")} if isinstance(summary, dict) else {}
        old.update({k: v for k, v in settings.items() if k not in old})  # an earlier demo recorded only these
    else:
        old = settings
    differ = [k for k in dict.fromkeys([*settings, *old]) if settings.get(k) != old.get(k)]
    if differ:
        raise InputError(out, "holds a demo run with other settings (" + ", ".join(
            f"{k} = {json.dumps(old.get(k))}, this call {json.dumps(settings.get(k))}" for k in differ)
            + "): re-run it as it was made, or use another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise InputError(out, f"cannot write the demo folder ({exc.strerror or exc})") from None


def write_rows_csv(path: Path, rows: list[dict], columns) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def ratio_cells(r: dict) -> tuple[str, str, str]:
    """A row's memorization ratio, its 95% interval and its KNN distance, as the tables show them."""
    return (f"{100 * r['memorization_ratio']:.1f}%",
            f"{100 * r['memorization_ratio_low']:.1f}-{100 * r['memorization_ratio_high']:.1f}%",
            f"{r['knn_distance']:.2f}")


def text_table(title: str, head: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    """``title``, then the header, a rule and the lines, in left-aligned columns."""
    lines = [head, *lines]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    text = [title]
    for k, line in enumerate(lines):
        text.append("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)
