"""Typed records: the one reader for every JSON and JSON-lines record sdmem reads back.

Each record has a small declared :class:`Schema` (field types, required keys, value ranges: ratios in [0, 1],
ordered intervals, finite numbers). A record that does not fit is an :class:`~sdmem.errors.InputError` naming the
file (and line, for JSON lines) and the field: the CLI turns it into one line and exit 2, never a traceback and
never a blank row. Keys a schema does not name are kept as they are (records grow new keys over time).

The same schemas check rows of a results table (``results.csv``): ``check(schema, row, where, text=True)`` reads
each cell as the CSV writer wrote it (a blank cell is null, numbers as text).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InputError


class Field:
    """One field: ``required`` (must be present), ``null`` (may be JSON null / a blank cell)."""

    kind = "a value"

    def __init__(self, *, required: bool = True, null: bool = False):
        self.required, self.null = required, null

    def expected(self) -> str:
        return self.kind + (" or null" if self.null else "")

    def parse_text(self, text: str):
        return text

    def problem(self, value) -> str | None:  # None: fits
        return None


class Num(Field):
    """A finite number (an int or a float, not a bool) in [lo, hi]."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, **kw):
        super().__init__(**kw)
        self.lo, self.hi = lo, hi

    @property
    def kind(self) -> str:
        bounds = "" if (self.lo, self.hi) == (-math.inf, math.inf) else f" in [{self.lo:g}, {self.hi:g}]"
        return f"a finite number{bounds}"

    def parse_text(self, text: str):
        try:
            return float(text)
        except ValueError:
            return text

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ""
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            return ""
        return None


class Int(Num):
    """An integer in [lo, hi] (a float with an integer value is accepted: JSON and CSV write 3.0 sometimes)."""

    @property
    def kind(self) -> str:
        if self.hi == math.inf:
            return "an integer" + ("" if self.lo == -math.inf else f" >= {self.lo:g}")
        return f"an integer in [{self.lo:g}, {self.hi:g}]"

    def problem(self, value) -> str | None:
        if super().problem(value) is not None or value != int(value):
            return ""
        return None


class Str(Field):
    """A string, non-empty unless ``empty``; one of ``choices`` when given."""

    def __init__(self, choices: tuple[str, ...] | None = None, *, empty: bool = False, **kw):
        super().__init__(**kw)
        self.choices, self.empty = choices, empty

    @property
    def kind(self) -> str:
        return f"one of {', '.join(self.choices)}" if self.choices else "a string" if self.empty else \
            "a non-empty string"

    def problem(self, value) -> str | None:
        if not isinstance(value, str) or (not self.empty and not value):
            return ""
        if self.choices and value not in self.choices:
            return ""
        return None


class Interval(Field):
    """``[low, high]``: two finite numbers in [lo, hi] with low <= high."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, **kw):
        super().__init__(**kw)
        self.item = Num(lo, hi)

    @property
    def kind(self) -> str:
        return f"[low, high] with low <= high, each {self.item.kind}"

    def problem(self, value) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return ""
        if any(self.item.problem(v) is not None for v in value) or value[0] > value[1]:
            return ""
        return None


class Obj(Field):
    """A JSON object; with ``schema`` its fields are checked too (errors name ``key.field``)."""

    def __init__(self, schema: "Schema | None" = None, **kw):
        super().__init__(**kw)
        self.schema = schema

    kind = "a JSON object"


@dataclass(frozen=True)
class Schema:
    """What a record is (``what``, for messages), its fields, and checks across fields (``(fields, test,
    message)``: ``test(record)`` is False for a record that does not fit)."""

    what: str
    fields: Mapping[str, Field]
    across: tuple[tuple[tuple[str, ...], Callable[[dict], bool], str], ...] = field(default=())
    renamed: Mapping[str, str] = field(default_factory=dict)  # an earlier name -> the field's name (read as it)


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(schema: Schema, record, where: str | os.PathLike, *, text: bool = False, prefix: str = "") -> dict:
    """``record`` when it fits ``schema``; else an InputError at ``where`` naming the field. With ``text`` (a CSV
    row) cells are parsed first: blank is null, numbers from their text; the returned dict holds parsed values."""
    if not isinstance(record, dict):
        kind = {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(record), "a number")
        raise InputError(where, f"expected a JSON object ({schema.what}), got {kind}")
    for old, new in schema.renamed.items():  # a record written before the field got its name
        if old in record and new not in record:
            record = {(new if k == old else k): v for k, v in record.items()}
    out = dict(record)
    for name, spec in schema.fields.items():
        key = prefix + name
        if name not in record:
            if spec.required:
                raise InputError(where, f"{key}: required field is missing ({schema.what}: expected "
                                        f"{spec.expected()})")
            continue
        value = record[name]
        if text and isinstance(value, str):
            value = None if value.strip() == "" else spec.parse_text(value.strip())
            out[name] = value
        if value is None:
            if not spec.null:
                raise InputError(where, f"{key}: expected {spec.expected()}, got "
                                        f"{'a blank cell' if text else 'null'}")
            continue
        if isinstance(spec, Obj):
            if not isinstance(value, dict):
                raise InputError(where, f"{key}: expected {spec.expected()}, got {_shown(value)}")
            if spec.schema is not None:
                out[name] = check(spec.schema, value, where, text=text, prefix=f"{key}.")
            continue
        if spec.problem(value) is not None:
            raise InputError(where, f"{key}: expected {spec.expected()}, got {_shown(value)}")
    for names, test, message in schema.across:
        if all(out.get(n) is not None for n in names) and not test(out):
            raise InputError(where, f"{', '.join(prefix + n for n in names)}: {message}")
    return out


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The parsed content of a JSON file; missing, unreadable, not UTF-8 or not JSON is an InputError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(path, f"no such {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"unreadable {what} ({exc.__class__.__name__}: {exc})") from None


def read_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON file that must hold an object (a config, an index): anything else is an InputError naming it."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object ({what})")
    return data


def read_record(path: str | os.PathLike, schema: Schema) -> dict:
    """A JSON record checked against ``schema`` (see :func:`check`)."""
    return check(schema, read_json(path, schema.what), path)


def read_rows(path: str | os.PathLike, schema: Schema) -> list[dict]:
    """The rows of a JSON-lines record, each checked against ``schema``. A torn last line (a kill mid-write) is
    skipped, as the writer's resume trims it; a damaged line before it is an InputError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable {schema.what} ({exc.__class__.__name__}: {exc})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):
                continue
            raise InputError(f"{path} line {n}", f"not JSON ({schema.what})") from None
        rows.append(check(schema, row, f"{path} line {n}"))
    return rows


# The records sdmem writes and reads back. Ratios are fractions in [0, 1]; distances are RMS 0-255 units.

RATIO = dict(lo=0.0, hi=1.0)
_ORDERED = ((("memorization_ratio_low", "memorization_ratio_high"),
             lambda r: r["memorization_ratio_low"] <= r["memorization_ratio_high"], "the interval's low end is above "
             "its high end"),)

AUDIT_SUMMARY = Schema("audit summary", {
    "memorization_ratio": Num(**RATIO), "memorization_ratio_ci95": Interval(**RATIO),
    "knn_distance": Num(0.0, null=True), "num_generated": Int(1), "fid": Num(0.0, required=False, null=True)})

TRACKED = Schema("tracked snapshot", {
    "epoch": Int(0), "step": Int(0), "images_seen": Int(0), "memorization_ratio": Num(**RATIO),
    "memorization_ratio_ci95": Interval(**RATIO), "knn_distance": Num(0.0, null=True), "num_generated": Int(1)},
    renamed={"nimg": "images_seen"})  # rows written before images_seen was the one name

FINAL = Schema("final weights record", {"step": Int(0), "images_seen": Int(0), "method": Str(),
                                        "weights": Str(("ema", "last"))})

SUBSET_INFO = Schema("subset record", {"size": Int(1), "resolution": Int(1), "label_dim": Int(0)})

CLAIM = Schema("point claim", {"host": Str(), "pid": Int(0), "heartbeat": Num(0.0)})

POINT = Schema("sweep point record", {"values": Obj(), "kind": Str(), "fingerprint": Str(), "config": Obj(),
                                      "generate": Obj(), "report": Str(("best", "final"))})

RESULT = Schema("point result", {
    "num_params": Int(0, null=True), "size": Int(1), "memorization_ratio": Num(**RATIO),
    "memorization_ratio_low": Num(**RATIO), "memorization_ratio_high": Num(**RATIO),
    "knn_distance": Num(0.0, null=True), "fid": Num(0.0, required=False, null=True),
    "epoch": Int(0, required=False, null=True), "step": Int(0, null=True), "images_seen": Int(0, null=True),
    "num_generated": Int(1), "wall_time_s": Num(0.0, required=False, null=True)}, _ORDERED)

# A row of a results table (results.csv): the result's numbers, blank where unknown (unfinished points).
RESULT_ROW = Schema("results row", {
    "size": Int(1, null=True), "memorization_ratio": Num(**RATIO, null=True),
    "memorization_ratio_low": Num(**RATIO, required=False, null=True),
    "memorization_ratio_high": Num(**RATIO, required=False, null=True),
    "knn_distance": Num(0.0, required=False, null=True), "fid": Num(0.0, required=False, null=True)}, _ORDERED)

SWEEP = Schema("sweep record", {"format": Str(("sdmem-sweep/1",)), "generate": Obj(), "report": Str(),
                                "points": Obj()})

DEMO = Schema("demo record", {"format": Str(("sdmem-demo/1",)), "settings": Obj()})


def ci_interval(record: dict) -> tuple[Any, Any]:
    """(low, high) of a record's ``memorization_ratio_ci95``."""
    lo, hi = record["memorization_ratio_ci95"]
    return lo, hi
