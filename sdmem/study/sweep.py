"""`sdmem sweep SPEC.yaml`: one spec file -> a grid of runs (EDM or SD), each trained, generated and audited,
collected into ``results.csv`` / ``results.md``. Resumable, shardable over machines, safe for concurrent workers.

A spec::

    out_dir: runs/fig2a              # the sweep folder (relative to the working directory)
    base: ../edm/cifar10.yaml        # a config path, relative to the spec, or an inline mapping
    overrides: {train.epochs: 40000} # fixed dotted keys
    axes: {data.size: [1000, 2000, 5000]}             # a product over these lists
    zip: [{data.resolution: [32, 16], model.attn_resolutions: [[16], [8]]}]  # values that move together
                                     # (a group's optional `name` list labels its entries in folder names)
    generate: {num: 10000}           # images generated and audited per point
    report: best                     # best: the snapshot with the highest tracked ratio (the paper); final

A point lives in ``OUT_DIR/<name>/`` (``name`` from its swept values): ``point.json`` (its values and the
fingerprint of its config), ``run/`` (the trainer's run folder; an interrupted point resumes through the trainer's
own resume), ``generated/`` and ``audit/`` (the reported images' audit, with per-sample flags), ``result.json``
(its row, written last: the point is finished). A worker claims a point by creating ``claim.json`` exclusively;
a claim whose worker died (its process is gone on this host, or its heartbeat is older than CLAIM_STALE_S) is
taken over by renaming it away first, which only one worker can do.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import (config_to_dict, diff_configs, fingerprint, flatten_config, keys_added_since,
                      read_yaml_mapping, stored_config)
from .. import kinds
from ..errors import InputError
from ..records import CLAIM, POINT, RESULT, SWEEP, check, read_record
from ..runs import KINDS, config_from_mapping
from ..utils import NAME_RULE, atomic_write_text, safe_name, staged_folder

SPEC_KEYS = ("out_dir", "base", "overrides", "axes", "zip", "generate", "report", "kind")
GENERATE_KEYS = {"num": int, "batch": int, "steps": int, "seed": int}
CLAIM_STALE_S = 600.0  # a claim not refreshed for this long is a dead worker's (other hosts)
HEARTBEAT_S = 30.0
RESULT_COLUMNS = ("num_params", "size", "memorization_ratio", "memorization_ratio_low", "memorization_ratio_high",
                  "knn_distance", "fid", "epoch", "step", "images_seen", "num_generated", "wall_time_s", "point")


@dataclass
class Spec:
    """A parsed sweep spec (see the module docstring)."""

    path: Path
    out_dir: Path
    base: dict
    overrides: dict
    axes: dict[str, list]
    zips: list[dict[str, list]]
    generate: dict
    report: str
    swept: list[str] = field(default_factory=list)  # the swept dotted keys, in column order


def _err(spec: Path, key: str, problem: str) -> InputError:
    return InputError(f"{spec}: {key}", problem)


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a sweep spec; every problem is an InputError naming the spec file and the key."""
    path = Path(path)
    return parse_spec(read_yaml_mapping(path), path)


def parse_spec(raw: dict, path: Path) -> Spec:
    """Check a spec mapping (``path`` names it in errors; a base path is relative to its folder)."""
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise _err(path, str(unknown[0]), f"unknown key; expected one of {', '.join(SPEC_KEYS)}")
    for key in ("out_dir", "base"):
        if key not in raw:
            raise _err(path, key, "required key is missing")
    base = raw["base"]
    if isinstance(base, str):
        base = read_yaml_mapping(path.parent / base)
    elif not isinstance(base, dict):
        raise _err(path, "base", f"expected a config path (relative to the spec) or a mapping, got {base!r}")
    base = dict(base)
    out_dir = raw["out_dir"]
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise _err(path, "out_dir", f"expected a folder path (a non-empty string), got {out_dir!r}")
    if "kind" in raw:
        if not isinstance(raw["kind"], str):
            raise _err(path, "kind", f"expected a model kind (a string), got {raw['kind']!r}")
        base["kind"] = raw["kind"]
    overrides = _typed(raw, "overrides", dict, path, "a mapping of dotted keys to values")
    axes = _typed(raw, "axes", dict, path, "a mapping of dotted keys to lists of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise _err(path, f"axes.{key}", "expected a non-empty list of values")
        _no_repeats(path, f"axes.{key}", [[v] for v in values], [key])
    zips = _typed(raw, "zip", list, path, "a list of groups, each mapping dotted keys to lists of equal length")
    for g, group in enumerate(zips):
        if isinstance(group, dict) and "name" in group:
            labels = group["name"]
            if not isinstance(labels, list) or len(set(map(str, labels))) != len(labels):
                raise _err(path, f"zip[{g}].name", "expected a list of distinct labels, one per entry")
            bad = next((x for x in labels if not safe_name(str(x))), None)
            if bad is not None:
                raise _err(path, f"zip[{g}].name", f"label {str(bad)!r} is not a safe folder name ({NAME_RULE})")
        if not isinstance(group, dict) or not group:
            raise _err(path, f"zip[{g}]", "expected a mapping of dotted keys to lists of equal length")
        lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
        if min(lengths.values()) < 1 or len(set(lengths.values())) != 1:
            raise _err(path, f"zip[{g}]", "expected non-empty lists of one length, got lengths "
                                          + ", ".join(f"{k}: {n if n >= 0 else 'not a list'}" for k, n in lengths.items()))
        keys = [k for k in group if k != "name"]
        _no_repeats(path, f"zip[{g}]", [[group[k][i] for k in keys] for i in range(lengths[keys[0]])], keys)
    swept = list(axes) + [k for group in zips for k in group if k != "name"]
    twice = sorted({k for k in swept if swept.count(k) > 1} | (set(swept) & set(overrides)))
    if twice:
        raise _err(path, twice[0], "is set more than once (axes, zip groups and overrides must not overlap)")
    generate = raw.get("generate")
    if not isinstance(generate, dict) or "num" not in generate:
        raise _err(path, "generate", "expected a mapping with at least num (images generated and audited per point)")
    for key, value in generate.items():
        if key not in GENERATE_KEYS:
            raise _err(path, f"generate.{key}", f"unknown key; expected one of {', '.join(GENERATE_KEYS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise _err(path, f"generate.{key}", f"expected {'an integer >= 0' if key == 'seed' else 'a positive integer'}, "
                                                f"got {value!r}")
    report = raw.get("report", "best")
    if report not in ("best", "final"):
        raise _err(path, "report", f"expected best or final, got {report!r}")
    spec = Spec(path, Path(out_dir), base, dict(overrides), dict(axes), list(zips), dict(generate), report,
                swept)
    points(spec)  # every point's config is checked now, before anything runs
    return spec


def _typed(raw: dict, key: str, kind: type, path: Path, expected: str):
    """``raw[key]`` (absent or null: empty) when it is of ``kind``; anything else is refused naming the key."""
    value = raw.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise _err(path, key, f"expected {expected}, got {type(value).__name__} {value!r}"[:200])
    return value


def _no_repeats(path: Path, where: str, entries: list[list], keys: list[str]) -> None:
    """Refuse an axis (or zip group) that lists one value (entry) twice: it would give two identical points."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        text = json.dumps(entry, sort_keys=True)
        if text in seen:
            shown = ", ".join(f"{k} = {json.dumps(v)}" for k, v in zip(keys, entry))
            raise _err(path, where, f"{shown} is listed twice (entries {seen[text] + 1} and {i + 1}): "
                                    "each point must be distinct")
        seen[text] = i


@dataclass
class Point:
    """One combination of swept values, its config and its folder."""

    name: str
    values: dict[str, Any]
    config: Any
    dir: Path

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def trained_config(self) -> dict:
        """The point's config as a dict, less ``out_dir`` (its folder): what two points or two records compare."""
        return {k: v for k, v in config_to_dict(self.config).items() if k != "out_dir"}


def _slug(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text.replace(",", "+")) or "x"


def point_name(values: dict[str, Any], labels: Sequence[str] = ()) -> str:
    """A folder name from the swept values: ``size-1000_channels-64`` (the last part of each dotted key), with the
    labels of named zip groups in place of their values."""
    parts = [f"{k.rsplit('.', 1)[-1]}-{_slug(v)}" for k, v in values.items() if v is not None]
    return "_".join(parts + [_slug(x) for x in labels]) or "base"


def _combinations(spec: Spec) -> list[tuple[dict[str, Any], list[str]]]:
    """(swept values, labels of named zip groups) of every point."""
    lists = [[({k: v}, None) for v in vals] for k, vals in spec.axes.items()]
    for group in spec.zips:
        keys = [k for k in group if k != "name"]
        n = len(group[keys[0]])
        lists.append([({k: group[k][i] for k in keys}, group["name"][i] if "name" in group else None)
                      for i in range(n)])
    return [({k: v for part, _ in combo for k, v in part.items()}, [str(x) for _, x in combo if x is not None])
            for combo in itertools.product(*lists)]


def point_config(spec: Spec, values: dict[str, Any], run_dir: Path):
    """The run config of one point: base, then overrides, then its values (null: the base's), out_dir its folder."""
    sets = {**spec.overrides, **{k: v for k, v in values.items() if v is not None}}
    kind = spec.base.get("kind")
    if kind in kinds.names():  # settings the kind adds (EDM, report: best: tracking judges generate.num images)
        sets = {**kinds.get(kind).sweep_settings(spec.report, spec.generate), **sets}
    items = list(sets.items()) + [("out_dir", str(run_dir))]  # typed values, not --set text
    try:
        return config_from_mapping(spec.base, items, str(spec.path))
    except InputError as exc:
        where = exc.where.replace("--set ", "")
        raise InputError(f"{spec.path}: {where}" if not where.startswith(str(spec.path)) else where,
                         exc.problem) from None


def points(spec: Spec) -> list[Point]:
    """Every point of the spec, in a deterministic order (by name); names are unique."""
    out: dict[str, Point] = {}
    named = {k for group in spec.zips if "name" in group for k in group if k != "name"}
    combos = _combinations(spec)
    short = [point_name({k: v for k, v in values.items() if k not in named}, labels) for values, labels in combos]
    for (values, labels), name in zip(combos, short):
        if short.count(name) > 1:  # two values with the same short form: the full dotted keys tell them apart
            name = "_".join([f"{k}-{_slug(v)}" for k, v in values.items()] + [_slug(x) for x in labels])
        if not safe_name(name):
            raise _err(spec.path, ", ".join(values) or "base", f"the point folder name {name!r} is not a safe "
                                                               f"folder name ({NAME_RULE})")
        if name in out:
            raise _err(spec.path, ", ".join(k for k in values if values[k] != out[name].values.get(k)) or "axes",
                       f"two points get the same folder name {name!r} ({_shown(out[name].values)} and "
                       f"{_shown(values)}): give the values distinct text, or label a zip group with name")
        folder = spec.out_dir / name
        out[name] = Point(name, values, point_config(spec, values, folder / "run"), folder)
    by_config: dict[str, Point] = {}
    for p in out.values():  # e.g. an axis value null (the base's) beside the base's own value
        text = json.dumps(p.trained_config(), sort_keys=True)
        if text in by_config:
            q = by_config[text]
            raise _err(spec.path, ", ".join(k for k in p.values if p.values[k] != q.values.get(k)) or "axes",
                       f"points {q.name} and {p.name} train the same config ({_shown(q.values)} and "
                       f"{_shown(p.values)}): each point must be distinct")
        by_config[text] = p
    return [out[k] for k in sorted(out)]


def _shown(values: dict) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) or "no values"


def select(pts: list[Point], only: Sequence[str] = (), shard: tuple[int, int] | None = None) -> list[Point]:
    """The points matching every ``KEY=VALUE`` of ``only`` (VALUE read as YAML), then shard I of N (1-based)."""
    import yaml

    for item in only:
        key, sep, text = item.partition("=")
        if not sep:
            raise InputError("--only", f"expected KEY=VALUE, got {item!r}")
        if pts and key not in pts[0].values:
            raise InputError("--only", f"{key} is not a swept key; swept: {', '.join(pts[0].values) or 'none'}")
        want = yaml.safe_load(text)
        pts = [p for p in pts if p.values.get(key) == want or str(p.values.get(key)) == text]
    if shard is not None:
        i, n = shard
        pts = [p for k, p in enumerate(pts) if k % n == i - 1]
    return pts


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 1 <= I <= N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError("--shard", f"expected I/N (e.g. 2/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise InputError("--shard", f"expected 1 <= I <= N, got {text!r}")
    return i, n


# Claims: one worker per point, a dead worker's claim taken over.

def _alive(claim: dict) -> bool:
    """Whether the worker of a (checked) claim is alive: its process on this host, else its heartbeat's age."""
    if claim["host"] == socket.gethostname():
        try:
            os.kill(int(claim["pid"]), 0)
            return True
        except (ProcessLookupError, ValueError, OverflowError):
            return False
        except PermissionError:
            return True
    return time.time() - float(claim["heartbeat"]) < CLAIM_STALE_S


class Claim:
    """An exclusive claim on a point folder, refreshed by a heartbeat thread while held."""

    def __init__(self, folder: Path):
        self.path, self._stop = folder / "claim.json", threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})

    def _held(self) -> dict:
        """The claim on file. A damaged one (unreadable, not JSON, or not the claim record: a worker killed while
        writing it, or a foreign file) counts as a dead worker's once its file time is CLAIM_STALE_S old, and as a
        live one before that (it may be a worker between creating and writing it)."""
        try:
            return check(CLAIM, json.loads(self.path.read_text(encoding="utf-8")), self.path)
        except (OSError, ValueError, InputError):
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                mtime = 0.0
            return {"host": "", "pid": -1, "heartbeat": mtime}

    def acquire(self) -> bool:
        """True when this worker now holds the point (a dead worker's claim is taken over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _alive(self._held()):
                    return False
                try:  # only one worker can rename the dead claim away; it then retries the exclusive create
                    os.rename(self.path, self.path.with_name(f".claim.dead-{os.getpid()}"))
                except FileNotFoundError:
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._body())
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                atomic_write_text(self.path, self._body())
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)
        for dead in self.path.parent.glob(".claim.dead-*"):
            dead.unlink(missing_ok=True)


# Running a point: train (the trainer resumes), generate, audit, then result.json.

def _point_record(spec: Spec, p: Point) -> dict:
    return {"values": p.values, "kind": p.config.kind, "fingerprint": fingerprint(p.config),
            "config": config_to_dict(p.config), "generate": spec.generate, "report": spec.report}


# Growing these keys continues a point's run (the trainer resumes into the longer schedule): the point is trained
# on and reported again, never reported from the shorter run.
CONTINUED = ("train.epochs",)


def point_changes(kind: str, old_config: dict, new_config, where: str) -> tuple[list[str], bool]:
    """(dotted keys whose values differ between a point's recorded config and its config now, whether the change
    only continues training: CONTINUED keys grown, the same fingerprint). ``out_dir`` (the folder) is not compared."""
    cls = KINDS.get(kind)
    if cls is None:
        raise InputError(where, f"records a point of kind {kind!r}; expected one of {', '.join(KINDS)}")
    stored = stored_config(cls, old_config, where)
    keys = [k for k in diff_configs(stored, new_config) if k != "out_dir"]
    before, now = flatten_config(stored), flatten_config(new_config)
    grown = bool(keys) and all(k in CONTINUED and isinstance(before.get(k), int) and now.get(k, 0) > before[k]
                               for k in keys) and fingerprint(stored) == fingerprint(new_config)
    return keys, grown


def _refusal(where, kind: str, old_config: dict, keys: list[str], what: str) -> InputError:
    older = keys_added_since(KINDS[kind], old_config, keys)
    hint = (f" (it was made before {', '.join(older)} existed: add "
            + ", ".join(f"{k}: {json.dumps(v)}" for k, v in older.items()) + " to the spec's overrides)"
            ) if older else ""
    return InputError(where, f"{what} with other settings ({', '.join(keys)} differ): the spec changed a started or "
                             f"finished point; restore it or use another out_dir{hint}")


def check_point(spec: Spec, p: Point) -> bool:
    """Refuse a point folder made by another spec (naming what differs): its results would not be this spec's.
    True when the spec only grows the point's training (CONTINUED keys): the caller re-opens the point."""
    path = p.dir / "point.json"
    if not path.exists():
        if p.dir.is_dir() and any(e.name not in ("claim.json",) and not e.name.startswith(".claim.dead-")
                                  for e in p.dir.iterdir()):
            raise InputError(p.dir, "holds files but no point.json: sdmem did not make this point folder; "
                                    "refusing to write into it (move it away or use another out_dir)")
        return False
    old = read_record(path, POINT)
    if old["kind"] != p.config.kind:
        raise InputError(path, f"holds a point of kind {old['kind']!r}, the spec's is {p.config.kind}: use another "
                               "out_dir")
    keys, grown = point_changes(old["kind"], old["config"], p.config, str(path))
    if keys and not grown:
        raise _refusal(p.dir, old["kind"], old["config"], keys, "was made")
    new = _point_record(spec, p)
    for key in ("generate", "report"):
        if old[key] != new[key]:
            raise InputError(p.dir, f"was made with {key} = {json.dumps(old[key])}, the spec now says "
                                    f"{json.dumps(new[key])}: restore it or use another out_dir")
    if (p.dir / "result.json").exists() and not grown:
        read_result(p)
    return grown


def read_result(p: Point) -> dict:
    """A finished point's result.json, checked; a damaged one is refused (delete it and the point is redone)."""
    path = p.dir / "result.json"
    try:
        return read_record(path, RESULT)
    except InputError as exc:
        raise InputError(exc.where, f"{exc.problem}; delete it and re-run to redo the point") from None


def reopen_point(p: Point) -> None:
    """A point whose training grows: its report (result.json, generated/, audit/) goes; its run is trained on."""
    for name in ("result.json", "generated", "audit"):
        target = p.dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


# The sweep folder's own record: what made it (the points and their configs, generate, report).

SWEEP_FORMAT = "sdmem-sweep/1"
# Names sdmem writes into a sweep folder besides the point folders (collect, emm, compare, curves, enough).
SWEEP_FILES = {"sweep.json", "results.csv", "results.md", "emm.csv", "emm.png", "compare.md", "compare.csv",
               "compare.png", "curves.csv", "curves.png", "enough.csv", "enough.png"}


def sweep_record(spec: Spec, pts: list[Point]) -> dict:
    return {"format": SWEEP_FORMAT, "spec": str(spec.path), "generate": spec.generate, "report": spec.report,
            "points": {p.name: {"values": p.values, "kind": p.config.kind, "fingerprint": fingerprint(p.config),
                                "config": p.trained_config()}
                       for p in pts}}


def _legacy_entry(entry: Path, names: set[str]) -> bool:
    """True for what an earlier sdmem (no sweep.json yet) wrote: its files, its staging, this spec's points."""
    name = entry.name
    if name in SWEEP_FILES or name.startswith(".staging-"):
        return True
    if name.startswith(".") and ".tmp-" in name and name[1:name.index(".tmp-")] in SWEEP_FILES:
        return True  # an atomic write in flight (another worker creating sweep.json, collecting results.csv)
    return entry.is_dir() and not entry.is_symlink() and name in names


def open_sweep_folder(spec: Spec, pts: list[Point]) -> list[str]:
    """Make ``out_dir`` this spec's sweep folder, or check that it is: its sweep.json must record the same points,
    configs, generate and report. A folder that holds anything sdmem did not make is refused, never cleaned; one
    an earlier sdmem made (no sweep.json) is adopted when it holds only this spec's points and sdmem's files.
    Returns the points whose training the spec grows (CONTINUED keys), to be re-opened."""
    out, new = spec.out_dir, sweep_record(spec, pts)
    path = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; out_dir must be a folder")
    if out.is_dir() and not path.exists():
        names = {p.name for p in pts}
        foreign = sorted(e.name for e in out.iterdir() if not _legacy_entry(e, names))
        if foreign:
            raise InputError(out, f"holds files that are not this sweep's ({', '.join(map(repr, foreign[:3]))}"
                                  f"{', ...' if len(foreign) > 3 else ''}) and no sweep.json: sdmem did not make it "
                                  "for this spec; refusing to write into it (use another out_dir)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the sweep folder ({exc.strerror or exc})") from None
    if not path.exists() and _create_exclusive(path, json.dumps(new, indent=1) + "\n"):
        return []
    old = read_record(path, SWEEP)
    grown = _compare_sweeps(path, old, new, {p.name: p for p in pts})
    if grown:
        atomic_write_text(path, json.dumps(new, indent=1) + "\n")
    return grown


def _create_exclusive(path: Path, text: str) -> bool:
    """Write ``path`` only if it does not exist (concurrent workers: exactly one wins); True when this call did."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise InputError(path, f"cannot write the sweep record ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _compare_sweeps(path: Path, old: dict, new: dict, pts: dict[str, Point]) -> list[str]:
    for key in ("generate", "report"):
        if old[key] != new[key]:
            raise InputError(path, f"this sweep folder was made with {key} = {json.dumps(old[key])}, the spec says "
                                   f"{json.dumps(new[key])}: restore it or use another out_dir")
    was, now = set(old["points"]), set(new["points"])
    if was != now:
        added, gone = sorted(now - was), sorted(was - now)
        parts = ([f"adds {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}"] if added else []) + \
                ([f"lacks {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}"] if gone else [])
        raise InputError(path, f"this sweep folder was made by a spec with other points (this spec "
                               f"{' and '.join(parts)}; made by {old.get('spec')!r}): use another out_dir")
    grown = []
    for name in sorted(now):
        rec, p = old["points"][name], pts[name]
        where = f"{path}: points.{name}"
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict) or not isinstance(rec.get("kind"), str):
            raise InputError(where, "expected a JSON object with kind and config (sweep record)")
        if rec["kind"] != p.config.kind:
            raise InputError(where, f"records kind {rec['kind']!r}, the spec's point is {p.config.kind}")
        keys, grows = point_changes(rec["kind"], {**rec["config"], "out_dir": str(p.run_dir)}, p.config, where)
        if keys and not grows:
            raise _refusal(p.dir, rec["kind"], rec["config"], keys, "was recorded")
        if grows:
            grown.append(name)
    return grown


def run_point(spec: Spec, p: Point, *, progress: bool = True, device: str = "auto", main: bool = True) -> dict | None:
    """Train, generate and audit one point (resuming whatever is there); returns its row (None off rank 0)."""
    t0 = time.perf_counter()
    if main:
        p.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p.dir / "point.json", json.dumps(_point_record(spec, p), indent=1) + "\n")
    kind = kinds.get(p.config.kind)
    kind.train(p.config, progress=progress)
    if not main:
        return None
    row = kind.report(p, spec.generate, spec.report, progress=progress, device=device)
    row["wall_time_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(p.dir / "result.json", json.dumps(row, indent=1) + "\n")
    return row


# Collection: results.csv and results.md from the finished points.

def collect(spec: Spec, pts: list[Point]) -> list[dict]:
    """One row per finished point: its swept values, then RESULT_COLUMNS."""
    rows = []
    for p in pts:
        path = p.dir / "result.json"
        if path.exists():
            result = read_result(p)
            rows.append({**{k: _cell(v) for k, v in p.values.items()},
                         **{c: result.get(c) for c in RESULT_COLUMNS if c != "point"}, "point": p.name})
    return rows


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else value


def write_results(spec: Spec, rows: list[dict]) -> tuple[Path, Path]:
    """results.csv and results.md (the same table) in the sweep folder, written atomically."""
    import csv
    import io

    columns = spec.swept + list(RESULT_COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    with staged_folder(spec.out_dir) as stage:  # both files or neither
        (stage / "results.csv").write_text(buf.getvalue())
        (stage / "results.md").write_text(markdown_table(rows, columns))
    return spec.out_dir / "results.csv", spec.out_dir / "results.md"


def _fmt(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if column.startswith("memorization_ratio") and isinstance(value, (int, float)):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}" if not math.isnan(value) else "nan"
    return str(value)


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(c, r.get(c)) for c in columns) + " |\n" for r in rows)


def launched() -> tuple[int, int]:
    """(rank, world size) when started by a launcher (accelerate launch, torchrun), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class _NoClaim:
    """Under a launcher the processes train each point together: no claims (use --shard across launches)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


def run_sweep(spec: Spec, *, only: Sequence[str] = (), shard: tuple[int, int] | None = None, progress: bool = True,
              device: str = "auto", log=print) -> list[dict]:
    """Run every selected point not yet finished (claiming each), then collect the table; returns the rows.

    Under ``accelerate launch`` / ``torchrun`` every process walks the same points and trains each one together;
    rank 0 alone writes the point records, generates, audits and collects (the next point's training start is the
    other ranks' barrier)."""
    rank, world = launched()
    main = rank == 0
    log = log if main else (lambda *_: None)
    if world > 1:
        from ..training import start_processes

        start_processes()
    every = points(spec)
    mine = select(every, only, shard)
    grown = set(open_sweep_folder(spec, every))  # every rank: a refusal must reach them all (same files)
    reopened = set()
    for p in mine:
        if check_point(spec, p) or p.name in grown:
            reopened.add(p.name)
            if main:
                reopen_point(p)
    for k, p in enumerate(mine, 1):
        if p.name not in reopened and (p.dir / "result.json").exists():
            log(f"[{k}/{len(mine)}] {p.name}: finished")
            continue
        claim = Claim(p.dir) if world == 1 else _NoClaim()
        if not claim.acquire():
            log(f"[{k}/{len(mine)}] {p.name}: claimed by another worker, skipped")
            continue
        try:
            if world == 1 and (p.dir / "result.json").exists():  # finished by another worker meanwhile
                continue
            log(f"[{k}/{len(mine)}] {p.name}: running")
            row = run_point(spec, p, progress=progress and main, device=device, main=main)
            if row is not None:
                log(f"[{k}/{len(mine)}] {p.name}: memorization ratio {100 * row['memorization_ratio']:.2f}%, KNN "
                    f"distance {row['knn_distance']:.3f} ({row['wall_time_s']} s)")
        finally:
            claim.release()
    if not main:
        return []
    rows = collect(spec, every)
    write_results(spec, rows)
    return rows


def dry_run(spec: Spec, *, only: Sequence[str] = (), shard: tuple[int, int] | None = None) -> list[dict]:
    """The selected points with their parameter counts (nothing is written)."""
    out = []
    for p in select(points(spec), only, shard):
        info = kinds.get(p.config.kind).dry_run(p.config)
        done = (p.dir / "result.json").exists()
        out.append({"point": p.name, **p.values, "num_params": info.get("num_params"),
                    "size": info.get("num_train"), "status": "finished" if done else "to run"})
    return out
