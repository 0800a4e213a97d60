"""The paper's datasets by name (``cifar10``, ``imagenette``, ``imagenette-320``, ``ffhq``): a registry of the official
archives and their published checksums, a resumable download into the cache, verification, and a safe extraction
through a staging folder. ``sdmem data fetch NAME`` / ``sdmem data list`` are the CLI side.

Cache layout: ``<cache>/data/NAME/`` (``<cache>`` is $SDMEM_CACHE, else $XDG_CACHE_HOME/sdmem, else ~/.cache/sdmem)
holds the archive while it downloads (``FILE.part``) and, once verified and extracted, only the archive's folder
(e.g. ``cifar10/cifar-10-batches-py/``); the archive itself is then removed. An archive placed there by hand is
verified the same way. $SDMEM_DATA_URL_BASE replaces every URL's folder (a mirror, or the tests' loopback server).
"""

from __future__ import annotations

import difflib
import errno
import http.client
import os
import re
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..cache_dir import cache_root
from ..errors import InputError
from ..utils import file_digest, staged_folder

URL_BASE_ENV = "SDMEM_DATA_URL_BASE"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
ATTEMPTS = 5  # download attempts in one call, while each one brings new bytes
RETRY_WAIT_S = 1.0  # before a resumed attempt (tests set 0)
MAX_MEMBERS = 200_000
_BARE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

EDM_FFHQ = ("python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip "
            "--resolution=64x64")


@dataclass(frozen=True)
class Named:
    """One dataset by name: its official archive and what it must extract to."""

    name: str
    url: str | None  # None: no direct official download; ``how`` says how to obtain it
    md5: str | None  # the archive's published MD5
    size: int | None  # the archive's bytes (shown by `data list`, the progress bar's total; not a check)
    folder: str  # the archive's top-level folder (or, without a url, the file to place by hand)
    required: tuple[str, ...] = ()  # paths inside ``folder`` that a good extraction has
    max_bytes: int = 0  # cap on the extracted bytes (the members' sizes summed)
    about: str = ""
    how: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.url else self.folder


_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_MiB, _GiB = 1 << 20, 1 << 30

# Checksums. CIFAR-10: the MD5 published on https://www.cs.toronto.edu/~kriz/cifar.html (torchvision's
# datasets/cifar.py, CIFAR10.tgz_md5, has the same). Imagenette: fast.ai publishes no checksums; these MD5s are the
# ones torchvision records for the same URLs (pytorch/vision torchvision/datasets/imagenette.py,
# Imagenette._ARCHIVES "full" and "320px", identical at commits 051ba34 and f955c2d). Sizes: the archives' byte
# counts as download logs show them (170,498,071 CIFAR-10; 1,557,161,267 imagenette2; 341,663,724 imagenette2-320).
REGISTRY: dict[str, Named] = {
    "cifar10": Named(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        170_498_071, "cifar-10-batches-py", _CIFAR_FILES, 400 * _MiB,
        "CIFAR-10, python version (60k 32x32, 10 classes)"),
    "imagenette": Named(
        "imagenette", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz", "fe2fc210e6bb7c5664d602c3cd71e612",
        1_557_161_267, "imagenette2", ("train", "val"), 4 * _GiB, "Imagenette, full size (fast.ai; 13,394 JPEGs)"),
    "imagenette-320": Named(
        "imagenette-320", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
        "3df6f0d01a2c9592104656642f5e78a3", 341_663_724, "imagenette2-320", ("train", "val"), 1 * _GiB,
        "Imagenette, shortest side 320 px (fast.ai)"),
    "ffhq": Named(
        "ffhq", None, None, None, "ffhq-64x64.zip", about="FFHQ at 64x64 as an EDM dataset zip (placed by hand)",
        how="FFHQ has no direct download: get the 1024x1024 images with NVlabs' download_ffhq.py "
            "(github.com/NVlabs/ffhq-dataset), make the 64x64 zip with EDM's dataset_tool (github.com/NVlabs/edm: "
            f"{EDM_FFHQ}), then place ffhq-64x64.zip in {{dir}}/ or point data.source at it (or at a folder of "
            "FFHQ images)"),
}


class CacheWriteError(InputError):
    """The cache could not be written (disk full, not writable): a verified archive is kept."""


class _Busy(InputError):
    """Another process is downloading the same file (its part file is left alone)."""


class _Interrupted(Exception):
    """The transfer stopped before the end (resumable)."""


# ------------------------------------------------------------------------------------------------ names and folders

def is_bare_name(text: str) -> bool:
    """A dataset-like name: letters, digits, ``-`` and ``_``, no path separator and no suffix."""
    return bool(_BARE.fullmatch(text))


def unknown_problem(name: str, lead: str = "unknown dataset name") -> str:
    """``lead``, the known names and a did-you-mean when one is close."""
    close = difflib.get_close_matches(name.lower(), list(REGISTRY), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{lead} (known names: {', '.join(sorted(REGISTRY))}){hint}"


def lookup(name: str) -> Named:
    """The registry entry of ``name``; InputError with a did-you-mean otherwise."""
    if name not in REGISTRY:
        raise InputError(name, unknown_problem(name))
    return REGISTRY[name]


def data_root() -> Path:
    return cache_root() / "data"


def entry_dir(entry: Named) -> Path:
    """Where ``entry`` is cached, and where its archive may be placed by hand."""
    return data_root() / entry.name


def source_url(entry: Named) -> str:
    """The entry's URL, its folder replaced by $SDMEM_DATA_URL_BASE when set."""
    base = os.environ.get(URL_BASE_ENV)
    return f"{base.rstrip('/')}/{entry.filename}" if base else entry.url


def cached_path(entry: Named) -> Path | None:
    """The usable cached folder (or the placed file, for entries without a URL), or None."""
    path = entry_dir(entry) / entry.folder
    ok = path.is_file() if entry.url is None else path.is_dir()
    return path if ok else None


def resolve(name: str, *, progress: bool | None = None) -> Path:
    """The local path of a named dataset: cached, or fetched now. InputError for unknown names."""
    if name not in REGISTRY:
        raise InputError(name, unknown_problem(name, "no such file or directory, nor a dataset name"))
    return fetch(REGISTRY[name], progress=progress)


# -------------------------------------------------------------------------------------------------------- fetching

def fetch(entry: Named, *, progress: bool | None = None) -> Path:
    """Download (or take the hand-placed archive), verify and extract ``entry``; its cached path."""
    done = cached_path(entry)
    if done is not None:
        return done
    if entry.url is None:
        raise InputError(entry.name, entry.how.format(dir=entry_dir(entry)))
    folder = _writable_dir(entry_dir(entry))
    archive = folder / entry.filename
    try:
        if not archive.is_file():
            _download(entry, archive, progress)
        _verify(entry, archive)
        try:
            _extract(entry, archive, folder)
        except CacheWriteError:
            raise  # the verified archive stays for the next try (so it does when interrupted)
        except InputError:
            archive.unlink(missing_ok=True)  # verified, yet unusable: nothing but what is usable stays
            raise
        archive.unlink(missing_ok=True)
    finally:
        _tidy(folder)
    return folder / entry.folder


def _writable_dir(folder: Path) -> Path:
    """``folder``, created, after a probe file was written in it; CacheWriteError otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _tidy(folder)
        raise CacheWriteError(folder, f"the cache folder is not writable ({_why(exc)}); set $SDMEM_CACHE to a "
                                      "writable folder") from None
    return folder


def _tidy(folder: Path) -> None:
    """Remove ``folder`` and the data folder above it when they are empty (nothing half-written stays)."""
    for path in (folder, folder.parent):
        try:
            path.rmdir()
        except OSError:
            return


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    text = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


def _download(entry: Named, archive: Path, progress: bool | None) -> None:
    """Fetch the archive into ``FILE.part`` (resumed with a Range request), then rename it to ``FILE``."""
    url, part = source_url(entry), archive.with_name(archive.name + ".part")
    cap = 2 * entry.size if entry.size else 64 * _GiB
    from tqdm import tqdm

    with tqdm(total=entry.size, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name, leave=False,
              disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for attempt in range(ATTEMPTS):
            before = _size(part)
            try:
                _attempt(url, part, bar, cap)
                break
            except InputError as exc:
                if not isinstance(exc, _Busy):
                    part.unlink(missing_ok=True)
                raise
            except (_Interrupted, OSError, http.client.HTTPException) as exc:
                why = str(exc) if isinstance(exc, _Interrupted) else _why(exc)
                if _size(part) <= before or attempt == ATTEMPTS - 1:
                    _give_up(entry, url, part, why)
                time.sleep(RETRY_WAIT_S)
    os.replace(part, archive)


def _give_up(entry: Named, url: str, part: Path, why: str) -> None:
    """The one-line error for a download that cannot go on: offline, or interrupted (the part is kept)."""
    got = _size(part)
    place = f"place {entry.filename} in {entry_dir(entry)}/ by hand (it is verified there)"
    if got == 0:
        part.unlink(missing_ok=True)
        raise InputError(entry.name, f"not cached, and {url} cannot be reached ({why}); download it elsewhere and "
                                     f"{place}")
    raise InputError(entry.name, f"the download of {url} stopped after {got:,} bytes ({why}); run `sdmem data "
                                 f"fetch {entry.name}` again to resume it, or {place}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _open(url: str, have: int):
    """The HTTP response for ``url`` from byte ``have`` on; None when the server says the part is whole (416)."""
    headers = {"User-Agent": "sdmem", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            return None  # nothing after byte `have`: the part is complete, or wrong (the checksum decides)
        raise InputError(url, f"the server answered HTTP {exc.code} {exc.reason}") from None


def _start(resp, have: int) -> tuple[int, int | None]:
    """(the offset the body starts at, the whole file's size or None) for a 200 or a matching 206."""
    if resp.status == 206:
        m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != have:
            raise _Interrupted(f"the server sent an unexpected range ({resp.headers.get('Content-Range')!r})")
        return have, None if m.group(3) == "*" else int(m.group(3))
    if resp.status != 200:
        raise InputError(resp.url, f"the server answered HTTP {resp.status}")
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None  # a 200 restarts from zero


def _attempt(url: str, part: Path, bar, cap: int) -> None:
    """One request: append to (206) or rewrite (200) the part; _Interrupted when the body ends early."""
    have = _size(part)
    resp = _open(url, have)
    if resp is None:
        return
    with resp:
        start, total = _start(resp, have)
        if total is not None:
            if total > cap:
                raise InputError(url, f"the server offers {total:,} bytes, more than the {cap:,} expected")
            bar.total = total
        bar.n = start
        bar.refresh()
        got = start
        try:
            f = open(part, "ab")
        except OSError as exc:
            raise _write_error(part, exc) from None
        with f:
            _lock(f, part)
            if not start:
                f.truncate(0)  # a 200: the whole file from byte 0
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(_why(exc)) from None
                if not chunk:
                    break
                got += len(chunk)
                if got > cap:
                    raise InputError(url, f"the download exceeds {cap:,} bytes, more than expected")
                _write_chunk(f, chunk, part)
                bar.update(len(chunk))
    if total is not None and got < total:
        raise _Interrupted(f"the connection closed after {got:,} of {total:,} bytes")


def _lock(f, part: Path) -> None:
    """An exclusive lock on the part file: two processes never write one download."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _Busy(part, "another process is downloading this file; wait for it to finish") from None


def _raw_write(f, data: bytes) -> None:
    f.write(data)


def _write_chunk(f, data: bytes, where: Path) -> None:
    """The one writer of downloads and extractions (through _raw_write): disk errors become CacheWriteError."""
    try:
        _raw_write(f, data)
    except OSError as exc:
        raise _write_error(where, exc) from None


def _write_error(where: Path, exc: OSError) -> CacheWriteError:
    if exc.errno == errno.ENOSPC:
        return CacheWriteError(where, f"the disk is full ({_why(exc)}); free some space or set $SDMEM_CACHE to "
                                      "another disk, then run the command again")
    return CacheWriteError(where, f"cannot write to the cache ({_why(exc)})")


# ------------------------------------------------------------------------------------------ verifying and extracting

def _verify(entry: Named, archive: Path) -> None:
    """The archive's MD5 must be the published one; a mismatching file is removed."""
    got = file_digest(archive, "md5")
    if got != entry.md5:
        size = _size(archive)
        archive.unlink(missing_ok=True)
        official = f", {entry.size:,} bytes" if entry.size else ""
        raise InputError(archive, f"checksum mismatch: MD5 {got} ({size:,} bytes), expected {entry.md5} (the "
                                  f"official archive{official}); the file was removed: fetch it again")


def _member_path(m: tarfile.TarInfo, where: Path) -> str | None:
    """The member's relative path; None for the archive's root. InputError for anything unsafe."""
    def refuse(problem: str):
        raise InputError(where, f"unsafe member {m.name!r}: {problem}; refused")

    if m.issym() or m.islnk():
        refuse(f"{'a symbolic' if m.issym() else 'a hard'} link to {m.linkname!r} (links are not extracted)")
    if not (m.isfile() or m.isdir()):
        refuse("not a regular file or folder (devices and pipes are not extracted)")
    if m.name.startswith("/") or "\\" in m.name or re.match(r"[A-Za-z]:", m.name) or "\0" in m.name:
        refuse("an absolute or non-POSIX path")
    parts = [p for p in PurePosixPath(m.name).parts if p not in ("", ".")]
    if ".." in parts:
        refuse("a '..' component, which would leave the folder")
    return "/".join(parts) or None


def _extract(entry: Named, archive: Path, folder: Path) -> None:
    """Extract ``entry.folder`` from the verified archive into a staging folder, check it, move it into place."""
    try:
        with staged_folder(folder) as stage:
            with tarfile.open(archive, "r:*") as tf:
                _extract_members(entry, tf, archive, stage)
                while tf.fileobj.read(CHUNK):  # the rest of the stream: a truncated gzip shows here (and its CRC)
                    pass
            missing = [r for r in entry.required if not (stage / entry.folder / r).exists()]
            if missing:
                raise InputError(archive, f"not the expected layout: no {entry.folder}/{missing[0]} in it")
    except OSError as exc:
        if exc.errno is not None:  # the file system (reading the archive's data fails with errno None)
            raise _write_error(folder, exc) from None
        raise InputError(archive, f"corrupt or truncated archive ({_why(exc)})") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise InputError(archive, f"corrupt or truncated archive ({_why(exc)})") from None


def _extract_members(entry: Named, tf: tarfile.TarFile, archive: Path, stage: Path) -> None:
    """Every member checked (links, absolute and '..' paths refused, the size capped); those under
    ``entry.folder`` written into ``stage``."""
    total = count = 0
    for m in tf:
        rel = _member_path(m, archive)
        count += 1
        total += m.size if m.isfile() else 0
        if count > MAX_MEMBERS or total > entry.max_bytes:
            raise InputError(archive, f"extracts to more than {entry.max_bytes:,} bytes or {MAX_MEMBERS:,} "
                                      "members, more than this dataset has; refused")
        if rel is None or rel.split("/", 1)[0] != entry.folder:
            continue
        dest = stage / rel
        try:
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = open(dest, "wb")
        except OSError as exc:
            raise _write_error(dest, exc) from None
        with out, tf.extractfile(m) as src:
            while block := src.read(CHUNK):
                _write_chunk(out, block, dest)


# ------------------------------------------------------------------------------------------------------------- CLI

def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", _GiB), ("MiB", _MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def status(entry: Named) -> str:
    """What the cache holds for ``entry``, in words."""
    done = cached_path(entry)
    if done is not None:
        return f"cached: {done}"
    folder = entry_dir(entry)
    if entry.url is None:
        return f"not placed (no direct download; `sdmem data fetch {entry.name}` says how)"
    if (folder / entry.filename).is_file():
        return f"archive placed in {folder}/, verified when first used"
    part = _size(folder / (entry.filename + ".part"))
    if part:
        return f"partial download: {_human(part)} of {_human(entry.size)} (resumed by `sdmem data fetch {entry.name}`)"
    return "not cached"


def run_list(args) -> int:
    """`sdmem data list`: every name, its archive size and what is cached."""
    print(f"cache: {data_root()}")
    width = max(len(n) for n in REGISTRY)
    for name in sorted(REGISTRY):
        e = REGISTRY[name]
        print(f"{name:<{width}}  {_human(e.size):>9}  {status(e)}")
        print(f"{'':<{width}}  {'':>9}  {e.about}; {source_url(e) if e.url else 'no direct download'}")
    return 0


def run_fetch(args) -> int:
    """`sdmem data fetch NAME...`: download, verify and extract each (all names are checked first)."""
    entries = [lookup(n) for n in args.names]
    for e in entries:
        print(f"{e.name}: {fetch(e)}")
    return 0


def add_parser(sub) -> None:
    """Register `sdmem data fetch NAME...` and `sdmem data list`."""
    p = sub.add_parser("data", help="the paper's datasets by name: fetch them into the cache, list them",
                       description="Named datasets (cifar10, imagenette, imagenette-320, ffhq) are downloaded into "
                                   "the cache ($SDMEM_CACHE or ~/.cache/sdmem, under data/), verified against their "
                                   "published checksums and extracted; any SRC may be such a name.")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    f = actions.add_parser("fetch", help="download, verify and extract named datasets")
    f.add_argument("names", nargs="+", metavar="NAME", help=", ".join(sorted(REGISTRY)))
    f.set_defaults(func=run_fetch)
    lst = actions.add_parser("list", help="the names, their sizes and what is cached")
    lst.set_defaults(func=run_list)
