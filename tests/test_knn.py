"""Exact two-nearest-neighbour search: every backend against a numpy brute force (int64, exact)."""

import math
import tracemalloc

import numpy as np
import pytest
import torch

from sdmem.audit import knn
from sdmem.audit.engines import int8 as int8_engine
from sdmem.audit.gemm import sqdist
from sdmem.audit.knn import Top2, search_top2
from sdmem.data.base import ArraySource
from sdmem.errors import InputError, SdmemError

try:
    import faiss  # noqa: F401
    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

CUDA = torch.cuda.is_available()
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")

BACKENDS = [
    pytest.param(("int8", "cpu"), id="int8-cpu"),
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("faiss", "cpu"), id="faiss-cpu", marks=needs_faiss),
    pytest.param(("int8", "cuda"), id="int8-cuda", marks=[needs_cuda, pytest.mark.gpu]),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=[needs_cuda, pytest.mark.gpu]),
]


def brute_force_top2(queries, train):
    """Exact (sqdist float64 [Q, 2], index int64 [Q, 2]) without dedup; ties to the lower index."""
    if queries.dtype == np.uint8 and train.dtype == np.uint8:
        g = queries.reshape(len(queries), -1).astype(np.int64)
        t = train.reshape(len(train), -1).astype(np.int64)
    else:
        g = queries.reshape(len(queries), -1).astype(np.float64)
        t = train.reshape(len(train), -1).astype(np.float64)
    d = np.stack([((t - row) ** 2).sum(1) for row in g])  # direct differences: exact for ints
    order = np.argsort(d, axis=1, kind="stable")[:, :2]
    return np.take_along_axis(d, order, 1).astype(np.float64), order.astype(np.int64)


def check(res: Top2, queries, train):
    sq, idx = brute_force_top2(queries, train)
    assert res.sqdist.dtype == np.float64 and res.index.dtype == np.int64
    assert res.sqdist.shape == (len(queries), 2) and res.index.shape == (len(queries), 2)
    np.testing.assert_array_equal(res.index, idx)
    np.testing.assert_array_equal(res.sqdist, sq)


def near_copies(rng, base, n, max_delta):
    """n noisy copies of base images (uint8), so the top-2 are well inside the data, not random."""
    src = base[rng.integers(0, len(base), n)].astype(np.int64)
    return np.clip(src + rng.integers(-max_delta, max_delta + 1, src.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (101, 5, 5, 3), dtype=np.uint8)  # D = 75: not a multiple of 8
    queries = np.concatenate([near_copies(rng, train, 9, 20), rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)])
    return queries, train  # Q = 13 < 17


@pytest.mark.parametrize("cfg", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 17, 1])
def test_matches_brute_force(cfg, block_size, data):
    backend, device = cfg
    queries, train = data
    res = search_top2(queries, train, backend=backend, device=device, block_size=block_size, dedup=False)
    check(res, queries, train)
    assert res.backend == backend and res.device == device
    assert res.num_train == 101 and res.num_distinct == 101
    np.testing.assert_array_equal(res.duplicates, np.arange(101))


@pytest.mark.parametrize("cfg", BACKENDS)
def test_flat_queries_and_larger_dim(cfg):
    backend, device = cfg
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    queries = near_copies(rng, train, 40, 30).reshape(40, -1)  # [Q, D] queries against [N, H, W, 3]
    res = search_top2(queries, train, backend=backend, device=device, block_size=64)
    check(res, queries, train)


@pytest.mark.parametrize("cfg", BACKENDS)
def test_ties_go_to_the_lower_index(cfg):
    backend, device = cfg
    rng = np.random.default_rng(2)
    d = 21
    q = rng.integers(10, 240, (3, d), dtype=np.uint8)
    train = rng.integers(0, 256, (40, d), dtype=np.uint8)
    # query 0: four images at squared distance 1 (indices 5, 12, 30, 31), spread over blocks
    for i, p in zip([31, 12, 30, 5], [0, 1, 2, 3]):
        train[i] = q[0]
        train[i, p] = int(q[0, p]) + (1 if i % 2 else -1)
    # query 1: nearest at 4 (index 20), then three at 9 (indices 33, 8, 17): the second is 8
    train[20] = q[1]
    train[20, 0] = int(q[1, 0]) + 2
    for i, p in zip([33, 8, 17], [1, 2, 3]):
        train[i] = q[1]
        train[i, p] = int(q[1, p]) - 3
    res = search_top2(q, train, backend=backend, device=device, block_size=7)
    check(res, q, train)
    assert res.index[0].tolist() == [5, 12] and res.sqdist[0].tolist() == [1, 1]
    assert res.index[1].tolist() == [20, 8] and res.sqdist[1].tolist() == [4, 9]


@pytest.mark.parametrize("cfg", BACKENDS)
def test_duplicates_are_searched_once(cfg):
    backend, device = cfg
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    train[40] = train[7]  # a copy in a later block
    train[8] = train[7]  # a copy in the same block
    train[45] = train[44]
    queries = np.stack([train[7], train[44], np.clip(train[7].astype(int) + 3, 0, 255).astype(np.uint8)])
    res = search_top2(queries, train, backend=backend, device=device, block_size=10)
    assert res.num_train == 50 and res.num_distinct == 47
    expected_dups = np.arange(50)
    expected_dups[[8, 40]] = 7
    expected_dups[45] = 44
    np.testing.assert_array_equal(res.duplicates, expected_dups)
    assert res.index[0, 0] == 7 and res.sqdist[0, 0] == 0
    assert res.index[1, 0] == 44 and res.sqdist[1, 0] == 0
    # d2 is the next distinct image: brute force over the distinct rows only
    keep = np.flatnonzero(expected_dups == np.arange(50))
    sq, idx = brute_force_top2(queries, train[keep])
    np.testing.assert_array_equal(res.index, keep[idx])
    np.testing.assert_array_equal(res.sqdist, sq)
    assert not np.isin(res.index, [8, 40, 45]).any()
    assert (res.sqdist[:2, 1] > 0).all()

    plain = search_top2(queries, train, backend=backend, device=device, block_size=10, dedup=False)
    check(plain, queries, train)
    assert plain.index[0].tolist() == [7, 8] and plain.sqdist[0].tolist() == [0, 0]  # d1 = d2
    assert plain.index[1].tolist() == [44, 45] and plain.sqdist[1].tolist() == [0, 0]
    assert plain.num_distinct == 47


@pytest.mark.parametrize("backend", ["int8", "torch", pytest.param("faiss", marks=needs_faiss)])
def test_fewer_than_two_distinct_images(backend):
    q = np.zeros((3, 2, 2, 3), np.uint8)
    same = np.full((6, 2, 2, 3), 9, np.uint8)
    with pytest.raises(InputError, match="needs at least 2 distinct training images, found 1"):
        search_top2(q, same, backend=backend, block_size=4)
    with pytest.raises(InputError, match="found 1"):
        search_top2(q, ArraySource("tiny", same[:1]), backend=backend)
    try:
        search_top2(q, ArraySource("tiny", same[:1]), backend=backend)
    except InputError as err:
        assert err.where == "tiny"
    plain = search_top2(q, same, backend=backend, dedup=False)  # without dedup: the copies, d1 = d2
    assert plain.index.tolist() == [[0, 1]] * 3 and plain.num_distinct == 1


def test_shape_mismatch_mentions_resolution():
    q = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="--resolution"):
        search_top2(q, np.zeros((5, 4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="--resolution") as err:
        search_top2(q.reshape(2, -1)[:, :100], ArraySource("train_dir", np.zeros((5, 8, 8, 1), np.uint8)))
    assert err.value.where == "train_dir"
    # the same D in another layout is fine: [Q, D] queries against grey [N, H, W] images read as RGB
    assert search_top2(q.reshape(2, -1), ArraySource("train_dir", np.arange(320, dtype=np.uint8).reshape(5, 8, 8)),
                       block_size=2).index.shape == (2, 2)


def test_bad_arguments():
    q = np.zeros((2, 12), np.uint8)
    t = np.arange(36, dtype=np.uint8).reshape(3, 12)
    with pytest.raises(SdmemError, match="unknown backend"):
        search_top2(q, t, backend="annoy")
    with pytest.raises(SdmemError, match="unknown device"):
        search_top2(q, t, device="tpu")
    with pytest.raises(SdmemError, match="int8 needs uint8"):
        search_top2(q.astype(np.float32), t, backend="int8")
    with pytest.raises(InputError):
        search_top2(np.zeros((0, 12), np.uint8), t)
    with pytest.raises(InputError, match="dtype"):
        search_top2(q.astype(np.int32), t)
    if not CUDA:
        with pytest.raises(SdmemError, match="cuda"):
            search_top2(q, t, device="cuda")


def test_auto_backend(data):
    queries, train = data
    assert search_top2(queries, train).backend == "int8"
    res = search_top2(queries.astype(np.float32), train)
    assert res.backend == ("faiss" if HAVE_FAISS else "torch")


def test_missing_faiss_message(monkeypatch, data):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("no faiss here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    queries, train = data
    with pytest.raises(SdmemError, match="pip install faiss-cpu"):
        search_top2(queries, train, backend="faiss")
    assert search_top2(queries.astype(np.float32), train).backend == "torch"


# ---------------------------------------------------------------------------------------------- int8 overflow


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])])
def test_int8_k_split_and_int64_glue(monkeypatch, device, data):
    queries, train = data
    extreme = np.zeros((4, 5, 5, 3), np.uint8)
    extreme[1, 0, 0, 0] = 1
    extreme[2:] = 255
    extreme[3, 4, 4, 2] = 250
    train = np.concatenate([train, extreme])
    queries = np.concatenate([queries, extreme[[0, 3]]])
    # int32 glue with the feature dimension split into chunks of 16 (accumulated in int32)
    monkeypatch.setattr(knn.TUNING, "k_chunk", 16)
    check(search_top2(queries, train, backend="int8", device=device, block_size=23), queries, train)
    # the int64 glue used for huge D, forced on a small one
    monkeypatch.setattr(int8_engine, "_INT32_MAX_DIM", 10)
    monkeypatch.setattr(knn.TUNING, "k_chunk", 24)
    check(search_top2(queries, train, backend="int8", device=device, block_size=23), queries, train)
    monkeypatch.setattr(knn.TUNING, "k_chunk", None)
    check(search_top2(queries, train, backend="int8", device=device, block_size=23), queries, train)


@pytest.mark.parametrize("cfg", [pytest.param(("int8", "cpu"), id="int8-cpu"),
                                 pytest.param(("torch", "cpu"), id="torch-cpu"),
                                 pytest.param(("int8", "cuda"), id="int8-cuda", marks=[needs_cuda, pytest.mark.gpu])])
def test_stable_diffusion_size_does_not_overflow(cfg):
    """256x256x3: D·128² > 2³¹, so int32 alone would overflow (all-0 vs all-0 pixels: q·x = D·128²)."""
    backend, device = cfg
    d = 256 * 256 * 3
    assert d > knn._MAX_K_CHUNK and d > knn._INT32_MAX_DIM
    rng = np.random.default_rng(4)
    train = np.empty((5, d), np.uint8)
    train[0] = 0
    train[1] = 255
    train[2] = rng.integers(0, 256, d, dtype=np.uint8)
    train[3] = train[2]
    train[3, :7] ^= 1  # squared distance 7 from image 2
    train[4] = 1
    queries = np.stack([np.zeros(d, np.uint8), train[2], np.full(d, 255, np.uint8)])
    res = search_top2(queries, train.reshape(5, 256, 256, 3), backend=backend, device=device, block_size=2)
    check(res, queries, train)
    assert res.index.tolist() == [[0, 4], [2, 3], [1, 2]]
    assert res.sqdist[0].tolist() == [0, d] and res.sqdist[1].tolist() == [0, 7]


# ---------------------------------------------------------------------------------------------- float paths


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss), "auto"])
def test_float32_inputs(backend):
    rng = np.random.default_rng(5)
    train = rng.standard_normal((90, 37)).astype(np.float32)
    queries = (train[rng.integers(0, 90, 11)] + 0.05 * rng.standard_normal((11, 37))).astype(np.float32)
    res = search_top2(queries, train, backend=backend, block_size=32)
    sq, idx = brute_force_top2(queries, train)
    np.testing.assert_array_equal(res.index, idx)
    np.testing.assert_allclose(res.sqdist, sq, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss), "auto"])
def test_float_queries_against_uint8_training(backend, data):
    queries, train = data
    res = search_top2(queries.astype(np.float32), train, backend=backend, block_size=17, dedup=False)
    check(res, queries, train)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_rerank_fixes_fp32_order(backend):
    """Images near a bright query differ by squared distances of 1..8, far below fp32's resolution of
    ||q||² + ||x||² − 2 q·x (norms ~5e7, ulp 4): fp32 alone cannot order them, the exact re-rank does."""
    d = 3072
    rng = np.random.default_rng(6)
    q = np.full((1, d), 255, np.uint8)
    far = rng.integers(0, 256, (30, d), dtype=np.uint8)
    near_d2 = [6, 5, 8, 3, 7, 2]  # the two nearest (2, 3) come last: lower indices would win fp32 ties
    near = np.repeat(q, len(near_d2), 0)
    for row, k in zip(near, near_d2):
        row[rng.choice(d, k, replace=False)] -= 1
    train = np.concatenate([far[:20], near, far[20:]])
    exact_sq, exact_idx = brute_force_top2(q, train)
    assert exact_idx.tolist() == [[25, 23]] and exact_sq.tolist() == [[2.0, 3.0]]
    # precondition: fp32 distances (even centred) do not give the exact order
    for centre in (0.0, 128.0):
        f = sqdist(torch.tensor(q, dtype=torch.float32) - centre, torch.tensor(train, dtype=torch.float32) - centre)
        fp32_top2 = np.argsort(f.numpy(), axis=1, kind="stable")[:, :2]
        assert fp32_top2.tolist() != exact_idx.tolist()
    res = search_top2(q, train, backend=backend, block_size=8)
    np.testing.assert_array_equal(res.index, exact_idx)
    np.testing.assert_array_equal(res.sqdist, exact_sq)


# ---------------------------------------------------------------------------------------------- streaming


class SpySource(ArraySource):
    """An ArraySource that records the blocks it streams."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks = []

    def iter_blocks(self, block_size):
        for start, block in super().iter_blocks(block_size):
            self.blocks.append((start, len(block), block_size))
            yield start, block


@pytest.mark.parametrize("cfg", BACKENDS)
def test_image_source_streams_like_the_array(cfg, data):
    backend, device = cfg
    queries, train = data
    src = SpySource("cifar-train", train)
    res = search_top2(queries, src, backend=backend, device=device, block_size=30, dedup=False)
    check(res, queries, train)
    assert src.blocks == [(0, 30, 30), (30, 30, 30), (60, 30, 30), (90, 11, 30)]


def test_memmapped_training_set_streams_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(7)
    d = 32 * 32 * 3
    n = 3000
    path = tmp_path / "train.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for a in range(0, n, 500):
        mm[a : a + 500] = rng.integers(0, 256, (min(500, n - a), 32, 32, 3), dtype=np.uint8)
    mm.flush()
    del mm
    train = np.load(path, mmap_mode="r")
    queries = np.ascontiguousarray(train[[5, 2999, 1234]])
    file_bytes = n * d
    for backend in ["int8", "torch"]:
        src = SpySource("train.npy", train)
        search_top2(queries, src, backend=backend, block_size=64)  # warm-up (imports, allocator)
        tracemalloc.start()
        res = search_top2(queries, src, backend=backend, block_size=64)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert res.index[:, 0].tolist() == [5, 2999, 1234] and (res.sqdist[:, 0] == 0).all()
        assert all(size <= 64 and bs == 64 for _, size, bs in src.blocks)
        # a few numpy blocks of 64 rows (196 KB each: the one searched, the one read ahead, the one being read)
        # plus O(N) bookkeeping (fingerprints, duplicates; < 200 bytes a row): far below the file
        assert peak < 4 * 64 * d + 200 * n < file_bytes / 6, (backend, peak)


def test_progress_bar(data, capsys):
    queries, train = data
    res = search_top2(queries, train, block_size=40, progress=True)
    assert res.index.shape == (13, 2)
    assert "3/3" in capsys.readouterr().err


def test_query_blocks_are_balanced():
    assert knn._query_blocks(4097, 2048) == [(0, 1366), (1366, 2731), (2731, 4097)]
    assert knn._query_blocks(24, 2048) == [(0, 24)]
    blocks = knn._query_blocks(10000, 2048)
    assert blocks[0][0] == 0 and blocks[-1][1] == 10000 and max(b - a for a, b in blocks) <= 2048


@pytest.mark.parametrize("cfg", BACKENDS)
def test_many_query_blocks(cfg, monkeypatch):
    backend, device = cfg
    monkeypatch.setattr(knn.TUNING, "query_block", 33)
    rng = np.random.default_rng(8)
    train = rng.integers(0, 256, (70, 24), dtype=np.uint8)
    queries = near_copies(rng, train, 100, 40)
    res = search_top2(queries, train, backend=backend, device=device, block_size=16)
    check(res, queries, train)
    assert math.isfinite(res.sqdist.max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_tiled_top2_matches_sorting(device, dtype):
    gen = torch.Generator().manual_seed(9)
    for tile, tiles, hi in [(64, 2, 3), (8, 7, 5), (4, 16, 1000), (64, 3, 2**31 - 1)]:
        key = torch.randint(-hi, hi, (50, tile * tiles), generator=gen, dtype=torch.int64).to(dtype)
        key[0] = 7  # a row of ties
        key[1, 5:] = knn._I32_MAX  # one real value, the rest padding
        v1, c1, v2, c2 = knn._tiled_top2(key.clone().to(device), tile)
        vals, order = torch.sort(key.long(), dim=1, stable=True)  # (value, column) order
        assert torch.equal(torch.stack([c1, c2], 1).cpu(), order[:, :2])
        assert torch.equal(torch.stack([v1, v2], 1).cpu(), vals[:, :2])
