"""The check-list of run and output failures: each category ends in exit 2, one line naming the path (or option)
and the problem, no traceback, and nothing half-written. (Reader and archive failures: test_failures_data.py.)"""

import errno
import shutil

import numpy as np
import pytest


@pytest.fixture
def run_copy(tiny_edm_run, tmp_path):
    """A private copy of the tiny EDM run, free to damage."""
    return shutil.copytree(tiny_edm_run, tmp_path / "run")


def gen(cli, run, out, *extra):
    return cli("generate", run, "--num", 2, "--out", out, "--steps", 2, "--batch", 2, "--quiet", *extra)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_corrupt_run_config(cli, run_copy, tmp_path, content):
    (run_copy / "config.json").write_bytes(content)
    gen(cli, run_copy, tmp_path / "g").one_line_error("config.json")
    assert not (tmp_path / "g").exists()


def test_corrupt_snapshot(cli, run_copy, tmp_path):
    snap = sorted((run_copy / "snapshots").iterdir())[-1]
    snap.write_bytes(snap.read_bytes()[:100])
    gen(cli, run_copy, tmp_path / "g").one_line_error(snap.name)
    assert not (tmp_path / "g").exists()


def test_corrupt_checkpoint_is_refused_on_resume(cli, run_copy, tmp_path):
    from helpers import write_tiny_edm
    from sdmem.checkpoint import newest

    ckpt = newest(run_copy)
    ckpt.write_bytes(b"\x00" * 64)
    cfg = write_tiny_edm(tmp_path, "run", labels="true", epochs=12)  # the same run, trained longer
    cli("train", cfg, "--quiet").one_line_error(ckpt.name)
    assert ckpt.read_bytes() == b"\x00" * 64


@pytest.mark.parametrize("damage", ["{", "[]", '{"format": "other"}'])
def test_corrupt_manifest(cli, tiny_edm_run, tmp_path, damage):
    out = tmp_path / "g"
    assert gen(cli, tiny_edm_run, out).code == 0
    (out / "manifest.json").write_text(damage)
    gen(cli, tiny_edm_run, out).one_line_error("manifest.json")


@pytest.mark.parametrize("args,option", [(["--guidance", "inf"], "--guidance"), (["--guidance", "nan"], "--guidance"),
                                         (["--guidance", "-1"], "--guidance"), (["--steps", "0"], "--steps"),
                                         (["--batch", "100000000"], "--batch"), (["--seeds", "5-2"], "--seeds")])
def test_out_of_range_generate_options(cli, tiny_edm_run, tmp_path, args, option):
    gen(cli, tiny_edm_run, tmp_path / "g", *args).one_line_error(option)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("value", ["1000000", "0", "-3", "x"])
def test_absurd_resolution(cli, tmp_path, value):
    np.savez(tmp_path / "t.npz", images=np.zeros((3, 4, 4, 3), np.uint8))
    cli("audit", "--train", tmp_path / "t.npz", "--generated", tmp_path / "t.npz", "--resolution", value) \
        .one_line_error("--resolution")


def test_out_is_an_existing_file(cli, tiny_edm_run, tmp_path):
    (tmp_path / "g").write_text("mine")
    gen(cli, tiny_edm_run, tmp_path / "g").one_line_error(str(tmp_path / "g"))
    assert (tmp_path / "g").read_text() == "mine"


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EXDEV, "across file systems"), (errno.EACCES, "permission")])
def test_write_failures_are_one_line(cli, tiny_edm_run, tmp_path, monkeypatch, code, words):
    import sdmem.utils

    def fail(src, dst):
        raise OSError(code, "simulated", str(dst))
    monkeypatch.setattr(sdmem.utils.os, "replace", fail)
    gen(cli, tiny_edm_run, tmp_path / "g").one_line_error(words)


def test_out_of_memory_is_one_line(cli, tiny_edm_run, tmp_path, monkeypatch):
    import sdmem.edm.generate

    def fail(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(sdmem.edm.generate, "load_snapshot", fail)
    gen(cli, tiny_edm_run, tmp_path / "g").one_line_error("out of memory")


def test_a_failing_demo_leaves_no_report_and_resumes(tmp_path, monkeypatch, one_thread):
    import sdmem.demo
    from sdmem.errors import InputError

    tiny = {"sizes": (10, 20, 30), "steps": 12, "num": 16}

    def fail(*a, **k):
        raise InputError(tmp_path / "demo", "simulated failure after training")
    monkeypatch.setattr(sdmem.demo, "sample_optimum", fail)
    with pytest.raises(InputError, match="simulated"):
        sdmem.demo.run_demo(tmp_path / "demo", settings=tiny, progress=False, part="edm")
    # The trained points stay (resumable); no report file was written.
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.json", "points"]  # the record of what made it
    monkeypatch.undo()
    sdmem.demo.run_demo(tmp_path / "demo", settings=tiny, progress=False, part="edm")
    assert (tmp_path / "demo" / "results.csv").exists()
