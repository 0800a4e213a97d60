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

from ..config import (changed_training_keys, config_to_dict, fingerprint, keys_added_since, read_yaml_mapping,
                      stored_config)
from ..errors import InputError
from ..runs import KINDS, RunPaths, config_from_mapping, read_json
from ..utils import atomic_write_text

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
    if "kind" in raw:
        base["kind"] = raw["kind"]
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _err(path, "overrides", "expected a mapping of dotted keys to values")
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise _err(path, "axes", "expected a mapping of dotted keys to lists of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise _err(path, f"axes.{key}", "expected a non-empty list of values")
    zips = raw.get("zip") or []
    if not isinstance(zips, list):
        raise _err(path, "zip", "expected a list of groups, each mapping dotted keys to lists of equal length")
    for g, group in enumerate(zips):
        if isinstance(group, dict) and "name" in group:
            labels = group["name"]
            if not isinstance(labels, list) or len(set(map(str, labels))) != len(labels):
                raise _err(path, f"zip[{g}].name", "expected a list of distinct labels, one per entry")
        if not isinstance(group, dict) or not group:
            raise _err(path, f"zip[{g}]", "expected a mapping of dotted keys to lists of equal length")
        lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
        if min(lengths.values()) < 1 or len(set(lengths.values())) != 1:
            raise _err(path, f"zip[{g}]", "expected non-empty lists of one length, got lengths "
                                          + ", ".join(f"{k}: {n if n >= 0 else 'not a list'}" for k, n in lengths.items()))
    swept = list(axes) + [k for group in zips for k in group if k != "name"]
    twice = sorted({k for k in swept if swept.count(k) > 1} | (set(swept) & set(overrides)))
    if twice:
        raise _err(path, twice[0], "is set more than once (axes, zip groups and overrides must not overlap)")
    generate = raw.get("generate") or {}
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
    spec = Spec(path, Path(str(raw["out_dir"])), base, dict(overrides), dict(axes), list(zips), dict(generate), report,
                swept)
    points(spec)  # every point's config is checked now, before anything runs
    return spec


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
    if kind == "edm" and spec.report == "best" and "track.num_images" not in sets:
        sets["track.num_images"] = spec.generate["num"]  # the best snapshot is judged on generate.num images
    items = [f"{k}={json.dumps(v)}" for k, v in sets.items()] + [f"out_dir={json.dumps(str(run_dir))}"]
    try:
        return config_from_mapping(spec.base, items, str(spec.path))
    except InputError as exc:
        where = exc.where.replace("--set ", "")
        raise InputError(f"{spec.path}: {where}" if not where.startswith(str(spec.path)) else where,
                         exc.problem) from None


def points(spec: Spec) -> list[Point]:
    """Every point of the spec, in a deterministic order (by name); names are unique."""
    out = {}
    for values, labels in _combinations(spec):
        named = {k for group in spec.zips if "name" in group for k in group if k != "name"}
        name = point_name({k: v for k, v in values.items() if k not in named}, labels)
        if name in out:  # two values with the same short form: fall back to the full dotted keys
            name = "_".join(f"{k}-{_slug(v)}" for k, v in values.items())
        folder = spec.out_dir / name
        out[name] = Point(name, values, point_config(spec, values, folder / "run"), folder)
    return [out[k] for k in sorted(out)]


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
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim.get("pid", -1)), 0)
            return True
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
    return time.time() - float(claim.get("heartbeat", 0)) < CLAIM_STALE_S


class Claim:
    """An exclusive claim on a point folder, refreshed by a heartbeat thread while held."""

    def __init__(self, folder: Path):
        self.path, self._stop = folder / "claim.json", threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})

    def acquire(self) -> bool:
        """True when this worker now holds the point (a dead worker's claim is taken over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    held = {"heartbeat": self.path.stat().st_mtime if self.path.exists() else 0}
                if _alive(held):
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


def check_point(spec: Spec, p: Point) -> None:
    """Refuse a point folder made by another spec (naming what differs): its results would not be this spec's."""
    path = p.dir / "point.json"
    if not path.exists():
        return
    old = read_json(path, "sweep point record")
    if not isinstance(old, dict) or old.get("kind") != p.config.kind:
        raise InputError(p.dir, "holds a point of another kind or an unreadable point.json; use another out_dir")
    new = _point_record(spec, p)
    if old.get("fingerprint") != new["fingerprint"]:
        stored = stored_config(KINDS[p.config.kind], old["config"], str(path))
        keys = changed_training_keys(stored, p.config) or ["the training config"]
        older = keys_added_since(KINDS[p.config.kind], old["config"], keys)
        hint = (f" (it was made before {', '.join(older)} existed: add "
                + ", ".join(f"{k}: {json.dumps(v)}" for k, v in older.items()) + " to the spec's overrides)"
                ) if older else ""
        raise InputError(p.dir, f"was trained with other settings ({', '.join(keys)} differ); the spec changed a "
                                f"finished or started point: restore it or use another out_dir{hint}")
    for key in ("generate", "report"):
        if old.get(key) != new[key]:
            raise InputError(p.dir, f"was made with {key} = {json.dumps(old.get(key))}, the spec now says "
                                    f"{json.dumps(new[key])}: restore it or use another out_dir")


def run_point(spec: Spec, p: Point, *, progress: bool = True, device: str = "auto", main: bool = True) -> dict | None:
    """Train, generate and audit one point (resuming whatever is there); returns its row (None off rank 0)."""
    t0 = time.perf_counter()
    if main:
        p.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p.dir / "point.json", json.dumps(_point_record(spec, p), indent=1) + "\n")
    kind = p.config.kind
    if kind == "edm":
        from ..edm.train import train
    else:
        from ..sd.train import train
    train(p.config, progress=progress)
    if not main:
        return None
    row = _report_edm(spec, p, progress, device) if kind == "edm" else _report_sd(spec, p, progress, device)
    row["wall_time_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(p.dir / "result.json", json.dumps(row, indent=1) + "\n")
    return row


def _audit_row(report, audit_dir: Path) -> dict:
    s = report.summary()
    lo, hi = s["memorization_ratio_ci95"]
    return {"memorization_ratio": s["memorization_ratio"], "memorization_ratio_low": lo, "memorization_ratio_high": hi,
            "knn_distance": s["knn_distance"], "fid": s.get("fid"), "num_generated": s["num_generated"]}


def _generate_and_audit(spec: Spec, p: Point, generate_run, progress: bool, device: str, **kw) -> dict:
    from ..audit.api import audit
    from ..fid import weights_available

    g = spec.generate
    seeds = list(range(g.get("seed", 0), g.get("seed", 0) + g["num"]))
    generate_run(p.run_dir, p.dir / "generated", seeds=seeds, device=device, progress=progress,
                 **{k: g[k] for k in ("batch", "steps") if k in g}, **kw)
    # The fid column is filled when the Inception weights are at their default place (SDMEM_INCEPTION_WEIGHTS or
    # the cache; see sdmem.fid), empty otherwise; the training set's statistics are cached once per run.
    report = audit(p.run_dir, p.dir / "generated", out=p.dir / "audit", progress=progress,
                   fid=weights_available())
    return _audit_row(report, p.dir / "audit")


def _report_edm(spec: Spec, p: Point, progress: bool, device: str) -> dict:
    from ..edm.config import num_params
    from ..edm.generate import generate_run

    paths = RunPaths(p.run_dir)
    info = read_json(paths.subset_info, "subset record")
    row = {"num_params": num_params(p.config, int(info["resolution"]), int(info["label_dim"])),
           "size": int(info["size"])}
    if spec.report == "best":
        best = read_json(paths.best, "best snapshot record")
        lo, hi = best["memorization_ratio_ci95"]
        row.update(memorization_ratio=best["memorization_ratio"], memorization_ratio_low=lo,
                   memorization_ratio_high=hi, knn_distance=best["knn_distance"], epoch=best["epoch"],
                   step=best["step"], images_seen=best["nimg"], num_generated=best["num_generated"])
        tracked = paths.tracking_audit(int(best["epoch"]))
        if tracked.is_dir():  # the best snapshot's own audit (per-sample flags) becomes the point's audit
            shutil.rmtree(p.dir / "audit", ignore_errors=True)
            shutil.copytree(tracked, p.dir / "audit")
        return row
    snaps = paths.list_snapshots()
    epoch = max(snaps)
    row.update(_generate_and_audit(spec, p, generate_run, progress, device, snapshot=str(epoch)))
    from ..edm.run import snapshot_info

    meta = snapshot_info(snaps[epoch])[1]
    row.update(epoch=epoch, step=meta["step"], images_seen=meta["nimg"])
    return row


def _report_sd(spec: Spec, p: Point, progress: bool, device: str) -> dict:
    from ..sd.components import resolve_pretrained
    from ..sd.generate import generate_run
    from ..sd.train import count_trainable

    paths = RunPaths(p.run_dir)
    final = read_json(paths.final, "final weights record")
    row = {"num_params": count_trainable(p.config, resolve_pretrained(p.config.model.pretrained,
                                                                      p.config.model.revision, download=False)),
           "size": int(read_json(paths.subset_info, "subset record")["size"])}
    row.update(_generate_and_audit(spec, p, generate_run, progress, device))
    row.update(epoch=None, step=final["step"], images_seen=final["images_seen"])
    return row


# Collection: results.csv and results.md from the finished points.

def collect(spec: Spec, pts: list[Point]) -> list[dict]:
    """One row per finished point: its swept values, then RESULT_COLUMNS."""
    rows = []
    for p in pts:
        path = p.dir / "result.json"
        if path.exists():
            result = read_json(path, "point result")
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
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = spec.out_dir / "results.csv", spec.out_dir / "results.md"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, markdown_table(rows, columns))
    return csv_path, md_path


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
    for p in mine:
        check_point(spec, p)
    for k, p in enumerate(mine, 1):
        if (p.dir / "result.json").exists():
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
        if p.config.kind == "edm":
            from ..edm.train import dry_run as edm_dry_run

            info = edm_dry_run(p.config)
        else:
            from ..sd.train import dry_run as sd_dry_run

            info = sd_dry_run(p.config)
        done = (p.dir / "result.json").exists()
        out.append({"point": p.name, **p.values, "num_params": info.get("num_params"),
                    "size": info.get("num_train"), "status": "finished" if done else "to run"})
    return out
