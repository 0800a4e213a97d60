"""Fixtures shared by the test modules: one torch thread, the CLI run in-process, a tiny trained EDM run."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_EDM = """
kind: edm
out_dir: {out}
seed: 3
data: {{source: builtin:digits, size: 32, num_classes: 2, labels: {labels}}}
model: {{arch: ddpmpp, precond: edm, channels: 8, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [],
        dropout: 0.1}}
train: {{epochs: {epochs}, batch_size: 16, warmup_epochs: 2, ema_rate: 0.9, snapshot_epochs: 4,
        checkpoint_epochs: 2, log_every_steps: 2}}
track: {{num_images: {track}, batch: 16, steps: 4}}
"""


@pytest.fixture
def one_thread():
    """Tiny nets on a shared 2-core machine: more threads only add contention and noise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def one_line_error(self, *words: str) -> None:
        """Exit 2, exactly one line on stderr (no traceback) that contains every word."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 2, (self.code, self.err)
        assert len(lines) == 1 and "Traceback" not in self.err, self.err
        for w in words:
            assert w in lines[0], (w, lines[0])


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


def write_tiny_edm(tmp: Path, name: str = "run", *, labels: str = "none", epochs: int = 8, track: int = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(TINY_EDM.format(out=tmp / name, labels=labels, epochs=epochs, track=track))
    return path


@pytest.fixture(scope="session")
def tiny_edm_run(tmp_path_factory) -> Path:
    """A conditional EDM run on 32 real digits (2 classes), trained 8 epochs: snapshots at epochs 4 and 8."""
    from sdmem.edm.train import train
    from sdmem.runs import load_config

    tmp = tmp_path_factory.mktemp("edm-run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(write_tiny_edm(tmp, labels="true")), progress=False)
    finally:
        torch.set_num_threads(n)
    return tmp / "run"
