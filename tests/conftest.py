"""Fixtures shared by the test modules: one torch thread, the CLI run in-process, a tiny trained EDM run, and
what EDM-style network pickles need (a fake ``torch_utils.persistence``, the stand-in network source counted as
known)."""

import os
import sys
import types
from pathlib import Path

import pytest

from helpers import STANDIN_LABEL, STANDIN_SRC, CliResult, pinned_threads, text_sha256, write_tiny_edm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDMEM_DATA_URL_BASE", "http://127.0.0.1:9")  # named datasets never reach the internet

@pytest.fixture
def one_thread():
    """Tiny nets on a shared 2-core machine: more threads only add contention and noise."""
    with pinned_threads():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """The same for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_module")``): its
    module-scoped runs and the tests that compare against them see one thread count."""
    with pinned_threads():
        yield


@pytest.fixture
def cli(capsys):
    """Run ``sdmem ARGS...`` in-process: CliResult(code, stdout, stderr)."""
    from sdmem.cli import main

    def run(*args) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse refusals
            code = exc.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return run


@pytest.fixture(scope="session")
def tiny_edm_run(tmp_path_factory) -> Path:
    """A conditional EDM run on 32 real digits (2 classes), trained 8 epochs: snapshots at epochs 4 and 8."""
    from sdmem.edm.train import train
    from sdmem.runs import load_config

    tmp = tmp_path_factory.mktemp("edm-run")
    with pinned_threads():
        train(load_config(write_tiny_edm(tmp, labels="true")), progress=False)
    return tmp / "run"


# ------------------------------------------------------------------------------------------- EDM-style network pickles


@pytest.fixture
def standin(monkeypatch):
    """The stand-in source counts as a published version (for this test only), with the Oct 2022 version's
    SongUNet signature as its defaults (which its own signature equals: test_standin_signature_is_the_published_one)."""
    from sdmem.edm import pickles

    monkeypatch.setitem(pickles.KNOWN_SOURCES, text_sha256(STANDIN_SRC), STANDIN_LABEL)
    monkeypatch.setitem(pickles.SONGUNET_SIGNATURES, STANDIN_LABEL, pickles.SONGUNET_SIGNATURES[pickles._V_2022_10])


@pytest.fixture
def persistence(monkeypatch):
    """A fake ``torch_utils.persistence`` module, present while pickles are written, so that pickle spells the
    reconstructor as EDM's pickles do. Its function must never be called by the loader."""
    calls = []

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - reaching it is the failure
        calls.append(meta)
        raise AssertionError("the real reconstructor was called")

    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    yield _reconstruct_persistent_obj
    assert not calls
