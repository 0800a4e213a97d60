"""The sharded audit: the exact merge, global duplicates, and 2-process gloo runs equal to one process."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, free_port, run_sharded, tricky_set
from sdmem.audit import audit, knn
from sdmem.audit import dedup as dedup_module
from sdmem.audit.engines import int8 as int8_engine
from sdmem.audit.knn import search_top2
from sdmem.audit.shard import SOLO, merge_top2, shard_range
from sdmem.data.base import ArraySource
from sdmem.errors import InputError, SdmemError

try:
    import faiss
except ImportError:
    faiss = None
HAVE_FAISS = faiss is not None


def brute_sq(queries, train):
    g = queries.reshape(len(queries), -1).astype(np.int64)
    t = train.reshape(len(train), -1).astype(np.int64)
    return np.stack([((t - row) ** 2).sum(1) for row in g])


def first_copies(train):
    """Each row's lowest-index identical row."""
    flat = train.reshape(len(train), -1)
    first = {}
    return np.array([first.setdefault(r.tobytes(), i) for i, r in enumerate(flat)], dtype=np.int64)


def top2_of(d, allowed):
    """Exact top-2 (distance, index) over the allowed columns, ties to the lower index; (inf, -1) padding."""
    cols = np.flatnonzero(allowed)
    sub = d[:, cols]
    order = np.argsort(sub, axis=1, kind="stable")[:, :2]
    sq = np.take_along_axis(sub, order, 1).astype(np.float64)
    idx = cols[order]
    if sq.shape[1] < 2:
        pad = 2 - sq.shape[1]
        sq = np.concatenate([sq, np.full((len(d), pad), np.inf)], 1)
        idx = np.concatenate([idx, np.full((len(d), pad), -1)], 1)
    return sq, idx


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dedup", [True, False])
def test_merge_matches_numpy_brute_force(world, dedup):
    """Per-shard top-2 (shard-local dedup only, as in the search's first pass), merged with the global
    duplicates, equals the brute-force top-2 over the whole (deduplicated) set, ties included."""
    rng = np.random.default_rng(world)
    n = 40
    train = rng.integers(0, 3, (n, 4), dtype=np.uint8)  # tiny range: many ties and many exact duplicates
    queries = rng.integers(0, 3, (25, 4), dtype=np.uint8)
    d = brute_sq(queries, train)
    dups = first_copies(train)
    parts = []
    for r in range(world):
        lo, hi = shard_range(n, r, world)
        local = np.zeros(n, bool)
        if dedup:
            local[lo:hi] = first_copies(train[lo:hi]) == np.arange(hi - lo)
        else:
            local[lo:hi] = True
        parts.append(top2_of(d, local))
    sq, idx = merge_top2(parts, dups if dedup else None)
    want_sq, want_idx = top2_of(d, dups == np.arange(n) if dedup else np.ones(n, bool))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(sq, want_sq)


def test_merge_ties_and_missing_candidates():
    parts = [(np.array([[4.0, 9.0]]), np.array([[7, 8]])),
             (np.array([[4.0, np.inf]]), np.array([[3, -1]])),  # a shard with one row
             (np.array([[np.inf, np.inf]]), np.array([[-1, -1]]))]  # an empty shard
    sq, idx = merge_top2(parts)
    assert idx.tolist() == [[3, 7]] and sq.tolist() == [[4.0, 4.0]]
    dups = np.arange(10)
    dups[3] = 1  # 3 is a copy of 1 (whose own candidate list lost it): dropped
    sq, idx = merge_top2(parts, dups)
    assert idx.tolist() == [[7, 8]] and sq.tolist() == [[4.0, 9.0]]


def test_shard_range_covers_in_order():
    for n in (0, 1, 5, 200, 201):
        for world in (1, 2, 3, 7):
            edges = [shard_range(n, r, world) for r in range(world)]
            assert edges[0][0] == 0 and edges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(edges[:-1], edges[1:]))
            assert max(hi - lo for lo, hi in edges) - min(hi - lo for lo, hi in edges) <= 1


# ---------------------------------------------------------------------------------------------- in-process shards


# run_sharded (each rank a thread) and tricky_set: helpers.py

BACKENDS = ["int8", "torch"] + (["faiss"] if HAVE_FAISS else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3, 7])
@pytest.mark.parametrize("dedup", [True, False])
def test_sharded_search_equals_one_process(backend, world, dedup, one_thread):
    queries, train = tricky_set()
    kw = dict(backend=backend, device="cpu", dedup=dedup, block_size=4, query_chunk=4)
    solo = search_top2(queries, train, **kw)
    want = top2_of(brute_sq(queries, train), first_copies(train) == np.arange(len(train)) if dedup else
                   np.ones(len(train), bool))
    np.testing.assert_array_equal(solo.index, want[1])
    np.testing.assert_array_equal(solo.sqdist, want[0])
    for res in run_sharded(world, lambda comm: search_top2(queries, ArraySource("t", train), comm=comm, **kw)):
        assert not isinstance(res, BaseException), res
        np.testing.assert_array_equal(res.index, solo.index)
        np.testing.assert_array_equal(res.sqdist, solo.sqdist)
        np.testing.assert_array_equal(res.duplicates, solo.duplicates)
        assert (res.num_train, res.num_distinct) == (solo.num_train, solo.num_distinct) == (60, 55)


def test_more_processes_than_training_images(one_thread):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    train[4] = train[1]
    queries = np.concatenate([train, rng.integers(0, 256, (3, 6), dtype=np.uint8)])
    solo = search_top2(queries, train)
    for res in run_sharded(7, lambda comm: search_top2(queries, train, comm=comm)):  # two empty shards
        np.testing.assert_array_equal(res.index, solo.index)
        np.testing.assert_array_equal(res.sqdist, solo.sqdist)
        assert res.num_distinct == 4 and res.duplicates.tolist() == [0, 1, 2, 3, 1]
    same = np.repeat(train[:1], 4, 0)
    for res in run_sharded(3, lambda comm: search_top2(queries, same, comm=comm)):
        assert isinstance(res, InputError) and "found 1" in str(res)  # every rank, not just one


@pytest.mark.parametrize("backend", ["int8", "torch"])
def test_fingerprint_collisions_are_resolved_by_the_bytes(backend, monkeypatch, one_thread):
    """Every fingerprint equal: the device sketch (int8) all zeros, or SHA-256 digests equal in their first 8 bytes
    (float backends): only exact copies are merged, in one process and across shards."""
    real = dedup_module._digests

    def colliding(buf, width, a, b):
        return [b"\0" * 8 + dg[8:] for dg in real(buf, width, a, b)]

    monkeypatch.setattr(dedup_module, "_digests", colliding)
    monkeypatch.setattr(int8_engine, "_sketch", lambda proj: np.zeros((proj.shape[0], 8), dtype=np.int64))
    queries, train = tricky_set(seed=2)
    want = top2_of(brute_sq(queries, train), first_copies(train) == np.arange(len(train)))
    solo = search_top2(queries, train, block_size=4, backend=backend)
    np.testing.assert_array_equal(solo.index, want[1])
    np.testing.assert_array_equal(solo.duplicates, first_copies(train))
    for res in run_sharded(3, lambda comm: search_top2(queries, ArraySource("t", train), comm=comm, block_size=4,
                                                       backend=backend)):
        np.testing.assert_array_equal(res.index, solo.index)
        np.testing.assert_array_equal(res.duplicates, first_copies(train))
        assert res.num_distinct == 55


def test_device_sketch_is_exact_integer_arithmetic():
    """Identical rows give identical fingerprints wherever they sit in a block; one changed pixel changes them."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (300, 3 * 17 * 17), dtype=np.uint8)
    x[250] = x[7]
    eng = knn._Int8Engine(4, x.shape[1], lambda a, b: x[a:b], knn.torch.device("cpu"), None)
    sk = eng.sketch(knn.torch.from_numpy(x))
    assert sk.shape == (300, 8) and sk.dtype == np.int64
    np.testing.assert_array_equal(sk[250], sk[7])
    w = knn._sketch_matrix(x.shape[1], knn.torch.device("cpu")).numpy().astype(np.int64)
    np.testing.assert_array_equal(sk, (x.astype(np.int64) - 128) @ w.T)  # the exact integer projection
    y = x[:2].copy()
    y[1, 100] ^= 1
    assert (eng.sketch(knn.torch.from_numpy(y))[1] != sk[1]).any()
    assert len({r.tobytes() for r in sk}) == 299


def test_a_failing_rank_fails_every_rank(one_thread):
    queries, train = tricky_set()

    class Broken(ArraySource):
        def read_range(self, start, stop):
            if start >= 30:
                raise InputError("broken", "cannot read this shard")
            return super().read_range(start, stop)

    res = run_sharded(2, lambda comm: search_top2(queries, Broken("t", train), comm=comm, block_size=8))
    assert isinstance(res[1], InputError) and "cannot read" in str(res[1])
    assert isinstance(res[0], SdmemError) and "process 1 of 2 failed" in str(res[0])


def test_a_source_missing_on_one_process_fails_every_process(tmp_path, one_thread):
    from sdmem.audit.api import _audit

    queries, train = tricky_set()
    np.savez(tmp_path / "T.npz", images=train)

    def run(comm):
        src = tmp_path / ("T.npz" if comm.rank == 0 else "missing.npz")
        return _audit(str(src), queries, backend="auto", device="cpu", threshold="1/3", resolution=None, dedup=True,
                      progress=False, bootstrap_seed=0, comm=comm)

    res = run_sharded(2, run)
    assert isinstance(res[1], InputError) and "missing.npz" in str(res[1])
    assert isinstance(res[0], SdmemError) and "process 1 of 2 failed" in str(res[0])


@pytest.mark.parametrize("differ", ["train_size", "train_pixels", "generated", "threshold"])
def test_processes_given_different_inputs_are_refused_on_every_process(differ, one_thread):
    from sdmem.audit.api import _audit

    queries, train = tricky_set()
    other_train = train[:-1] if differ == "train_size" else train.copy()
    if differ == "train_pixels":
        other_train[-1] ^= 1  # a stale copy: same count and shape, one image differs
    other_queries = queries.copy()
    if differ == "generated":
        other_queries[0] ^= 1

    def run(comm):
        one = comm.rank == 0
        return _audit(train if one else other_train, queries if one else other_queries, backend="auto",
                      device="cpu", threshold="1/3" if one or differ != "threshold" else "1/2", resolution=None,
                      dedup=True, progress=False, bootstrap_seed=0, comm=comm)

    for res in run_sharded(2, run):
        assert isinstance(res, InputError) and "different inputs" in str(res), res
    assert all(not isinstance(r, BaseException) for r in run_sharded(2, lambda comm: _audit(
        train, queries, backend="auto", device="cpu", threshold="1/3", resolution=None, dedup=True,
        progress=False, bootstrap_seed=0, comm=comm)))


def test_generated_source_streams_in_chunks(one_thread):
    queries, train = tricky_set()
    reads = []

    class Spy(ArraySource):
        def read_range(self, start, stop):
            reads.append((start, stop))
            return super().read_range(start, stop)

    res = search_top2(Spy("g", queries), train, query_chunk=6, block_size=7)
    np.testing.assert_array_equal(res.index, search_top2(queries, train).index)
    assert max(b - a for a, b in reads) <= 6 and sorted(reads)[0][0] == 0 and max(b for _, b in reads) == 15


def test_solo_comm_is_the_default():
    queries, train = tricky_set()
    a, b = search_top2(queries, train), search_top2(queries, train, comm=SOLO)
    np.testing.assert_array_equal(a.index, b.index)


# ---------------------------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def planted_npz(tmp_path_factory):
    """200 training images (shards [0, 100) and [100, 200)): planted replicas, copies across the boundary,
    ties across shards; 24 generated images."""
    rng = np.random.default_rng(11)
    train = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
    train[100] = train[99]  # straddles the boundary
    train[130] = train[40]
    train[120] = train[180] = train[10]
    train[160] = train[161]  # inside shard 1
    q = rng.integers(20, 230, (3, 8, 8, 3), dtype=np.uint8)
    train[20], train[170] = q[0], q[0]  # query q0: distance 1 in each shard -> (20, 170)
    train[20, 0, 0, 0] += 1
    train[170, 0, 0, 1] += 1
    train[190] = q[1]  # q1: nearest 190, then 60 and 140 at the same distance -> (190, 60)
    train[60], train[140] = q[1], q[1]
    train[60, 1, 1, 0] -= 2
    train[140, 2, 2, 2] += 2
    train[75] = train[175] = q[2]  # q2: an exact copy in each shard, but they are copies: (75, other)
    noisy = np.clip(train[[7, 120, 150]].astype(int) + rng.integers(-5, 6, (3, 8, 8, 3)), 0, 255).astype(np.uint8)
    gen = np.concatenate([train[[130, 100, 180, 161, 5, 199]], q, noisy,
                          rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)])
    tmp = tmp_path_factory.mktemp("shard")
    np.savez(tmp / "T.npz", images=train)
    np.savez(tmp / "G.npz", images=gen)
    single = tmp / "single"
    report = audit(str(tmp / "T.npz"), str(tmp / "G.npz"), out=single, progress=False)
    assert report.nn1_index[:9].tolist() == [40, 99, 10, 160, 5, 199, 20, 190, 75]
    assert report.nn2_index[6:8].tolist() == [170, 60]
    assert report.num_duplicates == 6 and 175 not in report.nn2_index
    return tmp


def launch(cmd, tmp, out_name):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--train", str(tmp / "T.npz"), "--generated", str(tmp / "G.npz"), "--out", str(tmp / out_name), "--quiet"]
    proc = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def assert_same_report(tmp, out_name, proc):
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memorization ratio"), proc.stdout
    assert (tmp / out_name / "per_sample.csv").read_text() == (tmp / "single" / "per_sample.csv").read_text()
    got = json.loads((tmp / out_name / "summary.json").read_text())
    want = json.loads((tmp / "single" / "summary.json").read_text())
    got.pop("seconds"), want.pop("seconds")
    assert got == want
    rows = list(csv.DictReader(open(tmp / out_name / "per_sample.csv")))
    assert [int(r["nn1_index"]) for r in rows[:9]] == [40, 99, 10, 160, 5, 199, 20, 190, 75]
    assert sorted(p.name for p in (tmp / out_name).iterdir()) == \
        sorted(p.name for p in (tmp / "single").iterdir())


def accelerate_cmd():
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def test_accelerate_two_processes_equal_one(planted_npz):
    proc = launch(accelerate_cmd() + ["-m", "sdmem", "audit"], planted_npz, "acc")
    assert_same_report(planted_npz, "acc", proc)


def test_torchrun_two_processes_equal_one(planted_npz):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "sdmem", "audit"]
    proc = launch(cmd, planted_npz, "torchrun")
    assert_same_report(planted_npz, "torchrun", proc)


def test_audit_command_without_launcher_is_a_plain_audit(planted_npz, capsys, monkeypatch):
    from sdmem.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tmp = planted_npz
    assert main(["audit", "--train", str(tmp / "T.npz"), "--generated", str(tmp / "G.npz"), "--out",
                 str(tmp / "plain"), "--quiet"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert (tmp / "plain" / "per_sample.csv").read_text() == (tmp / "single" / "per_sample.csv").read_text()
