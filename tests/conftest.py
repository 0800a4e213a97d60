"""Fixtures shared by the test modules: one torch thread, the CLI run in-process, a tiny trained EDM run."""

import os
from pathlib import Path

import pytest

from helpers import CliResult, pinned_threads, write_tiny_edm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
