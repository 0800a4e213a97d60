"""Failures of the sharded audit that rank 0 alone meets (it alone writes --out): an --out it cannot write,
checked before the search, and a failure while it writes the report; every rank exits 2 with the same one line."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, CliResult, free_port, run_sharded, tricky_set
from sdmem.audit import api
from sdmem.audit.report import write_outputs
from sdmem.errors import InputError

# Rank 0 runs out of disk space while it writes the report (summary.json); the other rank never writes.
DISK_FULL = """
import errno, os, sys
import sdmem.audit.report as report

def full(path, obj):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

report.write_json = full
from sdmem.cli import main
sys.exit(main(sys.argv[1:]))
"""


def unwritable(tmp: Path, how: str) -> Path:
    """An --out that cannot be created: under a regular file, or in a read-only folder."""
    if how == "under-a-file":
        (tmp / "a-file").write_text("mine")
        return tmp / "a-file" / "audit"
    if os.geteuid() == 0:
        pytest.skip("running as root: a read-only folder does not stop writes")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    return tmp / "ro" / "audit"


@pytest.fixture
def sets(tmp_path):
    queries, train = tricky_set()
    np.savez(tmp_path / "T.npz", images=train)
    np.savez(tmp_path / "G.npz", images=queries)
    yield tmp_path
    if (tmp_path / "ro").exists():
        (tmp_path / "ro").chmod(0o700)


def sharded(sets, out, **kw):
    return lambda comm: api._audit_sharded(str(sets / "T.npz"), str(sets / "G.npz"), comm, out=out, progress=False,
                                           extractor=None, backend="auto", device="cpu", threshold="1/3",
                                           resolution=None, dedup=True, bootstrap_seed=0, **kw)


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
def test_unwritable_out_fails_every_rank_before_the_search(sets, monkeypatch, one_thread, how):
    out = unwritable(sets, how)
    monkeypatch.setattr(api, "search_top2", lambda *a, **k: pytest.fail("searched before refusing --out"))
    res = run_sharded(3, sharded(sets, out))
    assert all(isinstance(r, InputError) and r.where == str(out) for r in res), res
    assert len({str(r) for r in res}) == 1 and not out.exists()
    if how == "under-a-file":
        assert (sets / "a-file").read_text() == "mine"


def test_a_failed_report_write_fails_every_rank(sets, monkeypatch, one_thread):
    out = sets / "audit"

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(api.rep, "write_json", full)
    res = run_sharded(2, sharded(sets, out))
    assert all(isinstance(r, InputError) and r.where == str(out) and "No space left" in r.problem for r in res), res
    assert not out.exists()
    monkeypatch.undo()
    res = run_sharded(2, sharded(sets, out))
    assert res[1] is None and res[0].num_replicas >= 0 and (out / "summary.json").is_file()


def test_the_out_probe_leaves_nothing(tmp_path):
    api.check_out(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    (tmp_path / "c").mkdir()
    api.check_out(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        api.check_out(tmp_path / "f")
    with pytest.raises(InputError) as info:
        write_outputs(tmp_path / "f" / "g", {})
    with pytest.raises(InputError) as probe:
        api.check_out(tmp_path / "f" / "g")
    assert str(probe.value) == str(info.value)


# ---------------------------------------------------------------------------------------------- 2 processes


def two_ranks(sets, out, script=None) -> list[CliResult]:
    """``sdmem audit`` (or ``python SCRIPT audit``) as ranks 0 and 1 of a 2-process gloo launch, each with its
    own stdout and stderr (the environment a launcher gives each process)."""
    port = free_port()
    entry = [str(script)] if script else ["-m", "sdmem"]
    args = ["audit", "--train", str(sets / "T.npz"), "--generated", str(sets / "G.npz"), "--out", str(out),
            "--quiet", "--device", "cpu"]
    procs = []
    try:
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                       PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen([sys.executable, *entry, *args], env=env, cwd=sets, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        results = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            results.append(CliResult(p.returncode, stdout, stderr))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_refuse_an_unwritable_out(sets):
    out = unwritable(sets, "under-a-file")
    for rank, r in enumerate(two_ranks(sets, out)):
        r.one_line_error("sdmem audit: error:", str(out), "cannot write")
        assert not r.out.strip(), (rank, r.out)
    assert not out.exists() and (sets / "a-file").read_text() == "mine"


def test_two_processes_share_a_failed_report_write(sets):
    script = sets / "disk_full.py"
    script.write_text(DISK_FULL)
    out = sets / "audit"
    for rank, r in enumerate(two_ranks(sets, out, script)):
        r.one_line_error("sdmem audit: error:", str(out), "No space left on device")
        assert not r.out.strip(), (rank, r.out)  # rank 0 prints no summary line
    assert not out.exists()
