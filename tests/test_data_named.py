"""Datasets by name (sdmem.data.named): download from a loopback HTTP server, resume, verify, safe extraction, the
cache, the offline error and every refusal; `sdmem data fetch|list`; named sources in configs."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.server
import io
import json
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, free_port, raises, write_cifar_folder
from sdmem.data import describe, named, open_source

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WNIDS = ["n01440764", "n03888605"]


# ----------------------------------------------------------------------------------------------- the loopback server

class ArchiveServer:
    """http.server on 127.0.0.1 in a thread: serves ``files`` (path -> bytes) with single Range requests (206);
    ``drops`` requests cut their body at half (headers announce the whole length); ``ranges`` False answers every
    request 200 with the whole file. ``hits`` records (path, Range header) of every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.hits: list[tuple[str, str | None]] = []
        self.drops, self.ranges = 0, True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.hits.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and server.ranges:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops:
                    server.drops -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # the socket closes mid-body
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ArchiveServer()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server) -> Path:
    """SDMEM_CACHE in tmp, URLs pointed at the loopback server, no proxies, no waits between attempts."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SDMEM_CACHE", str(root))
    monkeypatch.setenv(named.URL_BASE_ENV, server.base)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(named, "RETRY_WAIT_S", 0.0)
    return root


def serve(monkeypatch, server, name: str, data: bytes, **changes) -> named.Named:
    """Serve ``data`` as NAME's archive; the registry entry's checksum and size become the data's."""
    entry = dataclasses.replace(named.REGISTRY[name], md5=hashlib.md5(data).hexdigest(), size=len(data), **changes)
    monkeypatch.setitem(named.REGISTRY, name, entry)
    server.files["/" + entry.filename] = data
    return entry


def files_in(root: Path) -> list[str]:
    """Every file under root (relative, sorted): what the cache holds."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ------------------------------------------------------------------------------------------------------- archives

@pytest.fixture(scope="module")
def cifar_tgz(tmp_path_factory) -> tuple[bytes, dict]:
    """A tiny cifar-10-python.tar.gz with the official layout (10 images per train batch, every class)."""
    root = tmp_path_factory.mktemp("cifar")
    images = write_cifar_folder(root, np.random.default_rng(1), CLASSES, n_train=10, n_test=4)
    return (root / "cifar-10-python.tar.gz").read_bytes(), images


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def tgz(members: list[tuple[tarfile.TarInfo | str, bytes | None]]) -> bytes:
    """A tar.gz of (name or TarInfo, file bytes; None: a folder) members, written as given (no name clean-up)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            if isinstance(info, str):
                info = tarfile.TarInfo(info)
                info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = len(data) if data is not None and info.isfile() else 0
            tf.addfile(info, io.BytesIO(data) if data is not None and info.isfile() else None)
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenette_tgz() -> bytes:
    """A tiny imagenette2-320.tgz: imagenette2-320/{train: 2, val: 1}/<wnid>/*.JPEG for two wnids."""
    members = [("imagenette2-320", None)]
    for split, n in (("train", 2), ("val", 1)):
        for w in WNIDS:
            members.append((f"imagenette2-320/{split}/{w}", None))
            members += [(f"imagenette2-320/{split}/{w}/{w}_{i}.JPEG", _jpeg(i)) for i in range(n)]
    return tgz(members)


def cifar_members(cifar: bytes) -> list:
    """The members of the tiny CIFAR archive, as (TarInfo, bytes) pairs, to build variants from."""
    with tarfile.open(fileobj=io.BytesIO(cifar)) as tf:
        return [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]


# ---------------------------------------------------------------------------------------------- download and cache

def test_fetch_downloads_verifies_extracts_then_reads_the_cache(cache, server, monkeypatch, cifar_tgz, cli):
    data, images = cifar_tgz
    serve(monkeypatch, server, "cifar10", data)
    res = cli("data", "fetch", "cifar10")
    assert res.code == 0, res.err
    folder = cache / "data" / "cifar10" / "cifar-10-batches-py"
    assert res.out.strip() == f"cifar10: {folder}"
    assert server.hits == [("/cifar-10-python.tar.gz", None)]
    # Only the extracted folder stays: no archive, no part file, no staging folder.
    assert files_in(cache) == sorted(f"data/cifar10/cifar-10-batches-py/{m}" for m in named._CIFAR_FILES)
    # The name opens the 10-class CIFAR source from the cache, with no further request.
    src = open_source("cifar10")
    assert describe(src) == "cifar10 train: 50 images 32x32, 10 classes" and src.class_names == CLASSES
    np.testing.assert_array_equal(src.load(), np.concatenate([images[f"data_batch_{i}"][0] for i in range(1, 6)]))
    test = open_source("cifar10", split="test")
    np.testing.assert_array_equal(test.labels, images["test_batch"][1])
    assert cli("data", "fetch", "cifar10").code == 0
    assert len(server.hits) == 1


def test_imagenette_320_by_name_fetches_itself(cache, server, monkeypatch, imagenette_tgz):
    serve(monkeypatch, server, "imagenette-320", imagenette_tgz)
    src = open_source("imagenette-320")  # not cached: fetched on first use
    assert describe(src) == "imagenette train: 4 images 8x8, 2 classes" and src.class_names == ["tench", "parachute"]
    assert src.files[0] == "train/n01440764/n01440764_0.JPEG"
    assert describe(open_source("imagenette-320", split="val")) == "imagenette val: 2 images 8x8, 2 classes"
    assert len(server.hits) == 1 and files_in(cache)[0].startswith("data/imagenette-320/imagenette2-320/")


def test_registry_url_replaced_without_the_url_base(cache, server, monkeypatch, imagenette_tgz):
    monkeypatch.delenv(named.URL_BASE_ENV)
    serve(monkeypatch, server, "imagenette", imagenette_tgz, url=f"{server.base}/x/imagenette2.tgz",
          folder="imagenette2-320")
    server.files["/x/imagenette2.tgz"] = imagenette_tgz
    assert len(open_source("imagenette")) == 4
    assert server.hits == [("/x/imagenette2.tgz", None)]


def test_resume_after_a_dropped_connection(cache, server, monkeypatch, cifar_tgz):
    data, _ = cifar_tgz
    serve(monkeypatch, server, "cifar10", data)
    server.drops = 1  # the first response stops at half its body
    path = named.fetch(named.REGISTRY["cifar10"])
    assert [r for _, r in server.hits] == [None, f"bytes={len(data) // 2}-"]
    assert len(open_source(path)) == 50


def test_an_interrupted_download_is_resumed_by_the_next_call(cache, server, monkeypatch, cifar_tgz, cli):
    data, _ = cifar_tgz
    serve(monkeypatch, server, "cifar10", data)
    monkeypatch.setattr(named, "ATTEMPTS", 2)
    server.drops = 2
    res = cli("data", "fetch", "cifar10")
    res.one_line_error("cifar10", "stopped after", "again to resume")
    part = cache / "data" / "cifar10" / "cifar-10-python.tar.gz.part"
    have = part.stat().st_size
    assert have == len(data) // 2 + (len(data) - len(data) // 2) // 2  # what two half-bodies brought
    assert files_in(cache) == ["data/cifar10/cifar-10-python.tar.gz.part"]
    assert "partial download" in cli("data", "list").out
    assert cli("data", "fetch", "cifar10").code == 0
    assert server.hits[-1][1] == f"bytes={have}-" and len(open_source("cifar10")) == 50


def test_a_server_without_ranges_restarts_from_zero(cache, server, monkeypatch, cifar_tgz):
    data, _ = cifar_tgz
    serve(monkeypatch, server, "cifar10", data)
    server.ranges, server.drops = False, 1
    assert len(open_source("cifar10")) == 50
    assert [r for _, r in server.hits] == [None, f"bytes={len(data) // 2}-"]  # asked to resume, got the whole file


def test_a_whole_part_file_is_verified_after_a_416(cache, server, monkeypatch, cifar_tgz):
    data, _ = cifar_tgz
    entry = serve(monkeypatch, server, "cifar10", data)
    named.entry_dir(entry).mkdir(parents=True)
    (named.entry_dir(entry) / (entry.filename + ".part")).write_bytes(data)  # killed before its rename
    assert len(open_source("cifar10")) == 50 and server.hits == [("/cifar-10-python.tar.gz", f"bytes={len(data)}-")]


def test_a_download_in_progress_elsewhere_is_left_alone(cache, server, monkeypatch, cifar_tgz, cli):
    import fcntl

    data, _ = cifar_tgz
    entry = serve(monkeypatch, server, "cifar10", data)
    named.entry_dir(entry).mkdir(parents=True)
    part = named.entry_dir(entry) / (entry.filename + ".part")
    part.write_bytes(data[:100])
    with open(part, "ab") as other:  # another process's download holds the lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        cli("data", "fetch", "cifar10").one_line_error("another process is downloading")
    assert part.read_bytes() == data[:100]


def test_a_hand_placed_archive_is_verified_and_used_offline(cache, monkeypatch, server, cifar_tgz, cli):
    data, _ = cifar_tgz
    entry = serve(monkeypatch, server, "cifar10", data)
    monkeypatch.setenv(named.URL_BASE_ENV, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    folder = named.entry_dir(entry)
    folder.mkdir(parents=True)
    (folder / entry.filename).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit off
    cli("data", "fetch", "cifar10").one_line_error("checksum mismatch", entry.md5, "removed")
    assert files_in(cache) == []
    folder.mkdir(parents=True)
    (folder / entry.filename).write_bytes(data)
    assert len(open_source("cifar10")) == 50 and server.hits == []


# -------------------------------------------------------------------------------------------------------- refusals

def test_offline_names_the_url_and_the_folder(cache, monkeypatch, server, cifar_tgz, cli):
    entry = serve(monkeypatch, server, "cifar10", cifar_tgz[0])
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(named.URL_BASE_ENV, url)
    res = cli("data", "fetch", "cifar10")
    res.one_line_error("cifar10", f"{url}/cifar-10-python.tar.gz", "Connection refused",
                       f"{cache / 'data' / 'cifar10'}/", "by hand")
    assert not (cache / "data").exists()  # nothing half-written, not even a folder
    audit = cli("audit", "--train", "cifar10", "--generated", "cifar10")
    audit.one_line_error("cifar10", "cannot be reached")
    assert named.status(entry) == "not cached" and not (cache / "data").exists()


def test_checksum_mismatch_is_refused(cache, server, monkeypatch, cifar_tgz, cli):
    serve(monkeypatch, server, "cifar10", cifar_tgz[0])
    monkeypatch.setitem(named.REGISTRY, "cifar10", dataclasses.replace(named.REGISTRY["cifar10"], md5="0" * 32))
    cli("data", "fetch", "cifar10").one_line_error("checksum mismatch", "0" * 32)
    assert files_in(cache) == []


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_truncated_or_corrupt_archive_is_refused(cache, server, monkeypatch, cifar_tgz, cli, damage):
    data = cifar_tgz[0]
    bad = data[:len(data) * 3 // 5] if damage == "truncated" else \
        data[:len(data) // 2] + bytes(b ^ 0x5A for b in data[len(data) // 2:len(data) // 2 + 64]) + \
        data[len(data) // 2 + 64:]
    serve(monkeypatch, server, "cifar10", bad)  # a registry checksum that matches: only extraction can tell
    cli("data", "fetch", "cifar10").one_line_error("cifar-10-python.tar.gz")
    assert files_in(cache) == []


def _link(kind: str, name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


UNSAFE = {
    "symlink": ([(_link(tarfile.SYMTYPE, "cifar-10-batches-py/x", "/etc/passwd"), b"")], "symbolic link"),
    "hardlink": ([(_link(tarfile.LNKTYPE, "cifar-10-batches-py/x", "cifar-10-batches-py/batches.meta"), b"")],
                 "hard link"),
    "dotdot": ([("cifar-10-batches-py/../../escaped", b"evil")], "'..'"),
    "absolute": ([("/tmp/sdmem-absolute-escape", b"evil")], "absolute"),
    "device": ([(_link(tarfile.CHRTYPE, "cifar-10-batches-py/dev", ""), b"")], "not a regular file"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_members_are_refused(cache, server, monkeypatch, cifar_tgz, cli, tmp_path, case):
    extra, words = UNSAFE[case]
    serve(monkeypatch, server, "cifar10", tgz(cifar_members(cifar_tgz[0]) + extra))
    cli("data", "fetch", "cifar10").one_line_error("unsafe member", words, "refused")
    assert files_in(cache) == [] and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/sdmem-absolute-escape").exists()


def test_the_size_cap_refuses_an_archive_that_extracts_too_much(cache, server, monkeypatch, cifar_tgz, cli):
    serve(monkeypatch, server, "cifar10", cifar_tgz[0], max_bytes=10_000)
    cli("data", "fetch", "cifar10").one_line_error("more than 10,000 bytes", "refused")
    assert files_in(cache) == []


def test_a_wrong_layout_is_refused(cache, server, monkeypatch, cifar_tgz, cli):
    members = [m for m in cifar_members(cifar_tgz[0]) if not m[0].name.endswith("test_batch")]
    serve(monkeypatch, server, "cifar10", tgz(members))
    cli("data", "fetch", "cifar10").one_line_error("not the expected layout", "test_batch")
    assert files_in(cache) == []


def _enospc(after: int):
    calls = []

    def write(f, data):
        calls.append(len(data))
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)
    return write


def test_a_full_disk_while_downloading_leaves_nothing(cache, server, monkeypatch, cifar_tgz, cli):
    serve(monkeypatch, server, "cifar10", cifar_tgz[0])
    monkeypatch.setattr(named, "_raw_write", _enospc(0))
    cli("data", "fetch", "cifar10").one_line_error("disk is full", "SDMEM_CACHE")
    assert files_in(cache) == []


def test_a_full_disk_while_extracting_keeps_only_the_verified_archive(cache, server, monkeypatch, cifar_tgz, cli):
    data, _ = cifar_tgz
    entry = serve(monkeypatch, server, "cifar10", data)
    named.entry_dir(entry).mkdir(parents=True)
    (named.entry_dir(entry) / entry.filename).write_bytes(data)  # placed by hand: all writes are the extraction's
    with monkeypatch.context() as m:
        m.setattr(named, "_raw_write", _enospc(2))
        cli("data", "fetch", "cifar10").one_line_error("disk is full")
    assert files_in(cache) == ["data/cifar10/cifar-10-python.tar.gz"]  # no staging folder, no half folder
    assert cli("data", "fetch", "cifar10").code == 0 and server.hits == []


def test_a_cache_folder_that_is_not_writable(cache, server, monkeypatch, cifar_tgz, cli, tmp_path):
    serve(monkeypatch, server, "cifar10", cifar_tgz[0])
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "a-file" / "cache"))  # a path component is a file
    cli("data", "fetch", "cifar10").one_line_error("not writable", "SDMEM_CACHE")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setenv("SDMEM_CACHE", str(cache))
    monkeypatch.setattr(named.tempfile, "mkstemp", denied)  # a folder this (root) user may not write
    cli("data", "fetch", "cifar10").one_line_error("not writable", "Permission denied")
    assert files_in(cache) == [] and not (cache / "data").exists() and server.hits == []


def test_unknown_names_get_a_did_you_mean(cache, server, cli, tmp_path, monkeypatch):
    cli("data", "fetch", "cifar").one_line_error("cifar", "unknown dataset name", "did you mean 'cifar10'?")
    raises(lambda: open_source("imagenete-320"), "imagenete-320", "no such file or directory, nor a dataset name",
           "did you mean 'imagenette-320'?")
    cli("audit", "--train", "cifar100", "--generated", "x").one_line_error("cifar100", "did you mean 'cifar10'?")
    raises(lambda: open_source("nothing.npz"), "nothing.npz", "no such file or directory")  # a file name: as before
    # A local path of that name wins over the name.
    monkeypatch.chdir(tmp_path)
    Path("cifar10").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save("cifar10/a.png")
    assert len(open_source("cifar10")) == 1 and server.hits == []


def test_ffhq_is_placed_by_hand(cache, cli):
    entry = named.REGISTRY["ffhq"]
    folder = cache / "data" / "ffhq"
    cli("data", "fetch", "ffhq").one_line_error("NVlabs/ffhq-dataset", "dataset_tool", "ffhq-64x64.zip",
                                                f"{folder}/")
    raises(lambda: open_source("ffhq"), "ffhq", "no direct download")
    folder.mkdir(parents=True)
    import zipfile

    with zipfile.ZipFile(folder / entry.folder, "w") as zf:  # an EDM dataset zip, as dataset_tool writes it
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(buf, "PNG")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    assert describe(open_source("ffhq")).endswith("3 images 64x64")
    assert f"cached: {folder / entry.folder}" in cli("data", "list").out


# ---------------------------------------------------------------------------------------------- list and configs

def test_data_list_shows_names_sizes_and_the_cache(cache, server, monkeypatch, cifar_tgz, cli):
    res = cli("data", "list")
    assert res.code == 0 and res.out.splitlines()[0] == f"cache: {cache / 'data'}"
    rows = {line.split()[0]: line for line in res.out.splitlines()[1:] if line and not line.startswith(" ")}
    assert set(rows) == {"cifar10", "imagenette", "imagenette-320", "ffhq"}
    assert "162.6 MiB" in rows["cifar10"] and "1.5 GiB" in rows["imagenette"] and "325.8 MiB" in rows["imagenette-320"]
    assert all("not" in rows[n] for n in rows)  # nothing is cached yet
    assert f"{server.base}/cifar-10-python.tar.gz" in res.out  # the URL the fetch will use
    serve(monkeypatch, server, "cifar10", cifar_tgz[0])
    named.fetch(named.REGISTRY["cifar10"])
    assert f"cached: {cache / 'data' / 'cifar10' / 'cifar-10-batches-py'}" in cli("data", "list").out


def test_a_training_config_with_a_named_source_resolves_through_the_cache(cache, server, monkeypatch, cifar_tgz, cli,
                                                                           tmp_path):
    serve(monkeypatch, server, "cifar10", cifar_tgz[0])
    cfg = ROOT / "train_configs" / "edm" / "cifar10.yaml"
    res = cli("train", cfg, "--dry-run", "--set", "data.size=10", "--set", f"out_dir={tmp_path / 'run'}")
    assert res.code == 0, res.err
    dry = json.loads(res.out[res.out.index("{"):])
    assert (dry["data"]["source"], dry["num_train"], dry["resolution"]) == ("cifar10", 10, 32)
    assert len(server.hits) == 1 and not (tmp_path / "run").exists()
    # A second reading needs no request.
    again = cli("train", cfg, "--dry-run", "--set", "data.size=20", "--set", f"out_dir={tmp_path / 'run'}")
    assert again.code == 0 and len(server.hits) == 1


def test_the_paper_configs_use_the_names():
    import yaml

    configs = ["edm/cifar10.yaml", "edm/ffhq64.yaml", "sd/imagenette_lora.yaml", "sd/imagenette_full.yaml"]
    sources = {Path(c).name: yaml.safe_load((ROOT / "train_configs" / c).read_text())["data"]["source"]
               for c in configs}
    assert sources == {"cifar10.yaml": "cifar10", "ffhq64.yaml": "ffhq", "imagenette_lora.yaml": "imagenette-320",
                       "imagenette_full.yaml": "imagenette-320"}
    assert all(s in named.REGISTRY for s in sources.values())
