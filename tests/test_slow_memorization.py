"""The paper's central effect end to end on real digits (about 15 CPU minutes): `pytest -m slow`.

A 1M-parameter DDPM++ trained 3000 steps on |D| = 60 real digits memorizes (measured: 97.3% replicas);
the same network and step count on |D| = 1000 does not (0.0%). Trainer, tracking sampler and auditor together.
"""

import json
from pathlib import Path

import pytest

from sdmem.runs import load_config
from sdmem.edm.train import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size,epochs,low,high", [(60, 3000, 0.8, 1.0), (1000, 180, 0.0, 0.05)])
def test_small_training_sets_are_memorized_and_large_ones_not(tmp_path, size, epochs, low, high):
    cfg = load_config(Path(__file__).parents[1] / "train_configs/edm/digits.yaml",
                      [f"out_dir={tmp_path / 'run'}", f"data.size={size}", f"train.epochs={epochs}"])
    summary = train(cfg, progress=False)
    assert summary["steps"] == 3000
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert low <= best["memorization_ratio"] <= high, best
