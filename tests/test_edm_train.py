"""The EDM trainer: schedule, EMA, data order, tracking, exact resume after a kill, refusals, generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdmem import checkpoint
from sdmem.config import apply_overrides
from sdmem.runs import load_config
from sdmem.edm import train as train_mod
from sdmem.edm.train import Schedule, ema_beta, train
from sdmem.training import batch_indices
from sdmem.errors import InputError, SdmemError

from helpers import TINY_EDM as TINY  # the tiny conditional digits run


def tiny_config(tmp_path, name="run", *, labels="none", epochs=8, track=0, overrides=()):
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(out=tmp_path / name, labels=labels, epochs=epochs, track=track))
    return load_config(path, overrides), path


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: threads only add noise on a shared machine


def test_the_schedule_counts_steps_and_warms_up():
    s = Schedule(num_train=100, batch=32, epochs=10, warmup_epochs=2, snapshot_epochs=4, checkpoint_epochs=1)
    assert s.total_steps == 32  # ceil(10·100 / 32)
    assert s.ramp(0) == pytest.approx(32 / 200) and s.ramp(10) == 1.0


def test_ema_beta_keeps_a_half_life_in_images():
    # Steady state: exactly ema_rate per 512 images; warm-up shortens the half-life.
    assert ema_beta(0.99929, 512, 1.0) == pytest.approx(0.99929, abs=1e-12)
    assert ema_beta(0.99929, 256, 1.0) == pytest.approx(0.99929 ** 0.5, abs=1e-12)
    assert ema_beta(0.99929, 512, 0.1) < ema_beta(0.99929, 512, 1.0)
    assert ema_beta(0.0, 512, 1.0) == 0.0


def test_every_image_is_drawn_once_per_epoch_in_a_seeded_order():
    stream = np.concatenate([batch_indices(k, 32, 100, seed=0) for k in range(25)])  # 800 = 8 epochs
    for e in range(8):
        assert sorted(stream[e * 100 : (e + 1) * 100].tolist()) == list(range(100))
    assert not np.array_equal(batch_indices(0, 32, 100, 0), batch_indices(0, 32, 100, 1))


def test_snapshots_fall_at_epoch_crossings_or_every_snapshot_kimg():
    s = Schedule(num_train=100, batch=32, epochs=10, warmup_epochs=2, snapshot_epochs=4, checkpoint_epochs=1)
    snaps = [k for k in range(1, s.total_steps + 1) if s.crosses(k, 4)]
    assert snaps == [13, 25, 32]  # epochs 4.16, 8.0, and the last step
    assert [k for k in range(1, s.total_steps + 1) if s.snapshot_due(k)] == snaps
    by_images = Schedule(num_train=100, batch=32, epochs=10, warmup_epochs=2, snapshot_epochs=4, checkpoint_epochs=1,
                         snapshot_kimg=0.3)  # every 300 images (snapshot_kimg: thousands of images)
    assert [k for k in range(1, 33) if by_images.snapshot_due(k)] == [10, 19, 29, 32]


def test_ema_rules_agree_at_the_reference_batch_and_differ_elsewhere():
    assert ema_beta(0.99929, 512, 1.0, "per_step") == pytest.approx(ema_beta(0.99929, 512, 1.0)) == \
        pytest.approx(0.99929)
    assert ema_beta(0.99929, 128, 1.0, "per_step") == pytest.approx(0.99929)  # the paper code: per step
    assert ema_beta(0.99929, 128, 1.0) == pytest.approx(0.99929 ** 0.25)  # a fixed half-life in images
    assert ema_beta(0.99929, 128, 0.5, "per_step") == pytest.approx(0.99929 ** 2)  # warm-up halves the half-life


def test_train_tracks_snapshots_logs_and_keeps_the_best(tmp_path):
    cfg, _ = tiny_config(tmp_path, labels="true", track=24)
    summary = train(cfg, progress=False)
    run = Path(cfg.out_dir)
    assert summary["steps"] == 16 and summary["label_dim"] == 2
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["ema-0000004.safetensors",
                                                                     "ema-0000008.safetensors"]
    rows = [json.loads(line) for line in (run / "tracking.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [4, 8] and all(r["num_generated"] == 24 for r in rows)
    best = json.loads((run / "best.json").read_text())
    assert best["memorization_ratio"] == max(r["memorization_ratio"] for r in rows)
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(2, 17, 2)) and all(np.isfinite(r["loss"]) for r in logs)
    assert logs[0]["lr"] < logs[-1]["lr"] == pytest.approx(2e-4)


def test_the_auditor_takes_the_run_folder_as_its_training_set(tiny_edm_run):
    from sdmem.audit import audit
    from sdmem.data.subset import load_subset

    d = load_subset(tiny_edm_run)
    report = audit(tiny_edm_run, np.asarray(d.images[:3]), progress=False)
    assert report.replica.all() and report.nn1_index.tolist() == [0, 1, 2]


def _weights(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "ema.", "opt."))}


def _newest(run):
    """The run's newest checkpoint file (sdmem.checkpoint: checkpoints/step-N.safetensors), None when there is none."""
    return checkpoint.newest(run)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sdmem", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def test_resume_after_kill_is_bitwise_equal(tmp_path):
    epochs = 24
    _, path_a = tiny_config(tmp_path, "a", epochs=epochs)
    _, path_b = tiny_config(tmp_path, "b", epochs=epochs)
    proc = _cli("train", path_a, "--quiet")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    # Run b: killed (SIGKILL) once a checkpoint exists and before the end, then resumed by the same command.
    proc = _cli("train", path_b, "--quiet")
    deadline = time.time() + 240
    while _newest(tmp_path / "b") is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = _newest(tmp_path / "b")
    step_killed = checkpoint.read(ckpt).step if ckpt else None
    assert step_killed is not None and step_killed < 24
    proc = _cli("train", path_b, "--quiet")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    wa, wb = _weights(_newest(tmp_path / "a")), _weights(_newest(tmp_path / "b"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The log of the resumed run equals the uninterrupted one's: rows past the checkpoint dropped, none repeated.
    steps = [[json.loads(line)["step"] for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
             for r in ("a", "b")]
    assert steps[0] == steps[1] and len(set(steps[1])) == len(steps[1])


def test_refusals_keep_files(tmp_path):
    cfg, _ = tiny_config(tmp_path, epochs=2)
    train(cfg, progress=False)
    run = Path(cfg.out_dir)
    # A training key changed: refuse, naming it.
    with pytest.raises(InputError, match="train.lr"):
        train(apply_overrides(cfg, ["train.lr=1e-3"]), progress=False)
    # Only epochs changed: resumes and trains on.
    assert train(apply_overrides(cfg, ["train.epochs=4"]), progress=False)["steps"] == 8
    # A foreign and a corrupt checkpoint are refused and kept as they are.
    ckpt = _newest(run)
    save_file({"x": torch.zeros(2)}, str(ckpt), metadata={"format": "something-else"})
    before = ckpt.read_bytes()
    with pytest.raises(InputError, match="not an sdmem file"):
        train(cfg, progress=False)
    ckpt.write_bytes(b"garbage" * 10)
    with pytest.raises(InputError, match="corrupt"):
        train(cfg, progress=False)
    assert ckpt.read_bytes() == b"garbage" * 10 and before != ckpt.read_bytes()
    # A non-empty folder that is not a run.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(InputError, match="not an sdmem run folder"):
        train(apply_overrides(cfg, [f"out_dir={tmp_path / 'other'}"]), progress=False)


def test_nan_loss_stops_and_keeps_last_good_state(tmp_path, monkeypatch):
    cfg, _ = tiny_config(tmp_path, epochs=6)
    calls = {"n": 0}
    real = train_mod.LOSSES["edm"]

    class Poisoned(real):
        def __call__(self, *a, **k):
            calls["n"] += 1
            loss = super().__call__(*a, **k)
            return loss * float("nan") if calls["n"] > 9 else loss

    monkeypatch.setitem(train_mod.LOSSES, "edm", Poisoned)
    with pytest.raises(SdmemError, match="loss became nan at step 9"):
        train(cfg, progress=False)
    assert checkpoint.read(_newest(Path(cfg.out_dir))).step == 8  # checkpoint every 2 epochs = 4 steps: the last good one


def test_dry_run_and_bad_configs(tmp_path):
    _, path = tiny_config(tmp_path)
    out = subprocess.run([sys.executable, "-m", "sdmem", "train", str(path), "--dry-run",
                          "--set", "model.channels=16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["model"]["channels"] == 16 and resolved["num_params"] > 0
    assert not (tmp_path / "run").exists()
    for override, fragment in [("data.size=5000", "data.size"), ("data.num_classes=20", "data.num_classes"),
                               ("model.skip_mask=[true]", "model.skip_mask"), ("data.sizee=3", "data.sizee"),
                               ("model.channels=18", "model.channels"), ("data.resolution=9", "data.resolution")]:
        out = subprocess.run([sys.executable, "-m", "sdmem", "train", str(path), "--set", override],
                             capture_output=True, text=True)
        assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process run")
def test_accelerate_launch_two_cpu_processes(tmp_path):
    _, path = tiny_config(tmp_path, "ddp", epochs=2, track=8)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(29500 + os.getpid() % 1000), "-m", "sdmem", "train", str(path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    assert _newest(run) is not None and len((run / "tracking.jsonl").read_text().splitlines()) == 1
    assert out.stdout.count("trained 4 steps") == 1  # one summary line per run, not per process


def test_fused_adam_changes_the_update_by_rounding_only(tmp_path):
    """train.fused_adam (the default) against torch's default Adam: the same training up to float rounding."""
    runs = {}
    for name, fused in (("fused", "true"), ("default", "false")):
        cfg, _ = tiny_config(tmp_path, name, epochs=4)
        train(apply_overrides(cfg, [f"train.fused_adam={fused}"]), progress=False)
        runs[name] = _weights(_newest(tmp_path / name))
    a, b = runs["fused"], runs["default"]
    assert a.keys() == b.keys()
    nets = [k for k in a if k.startswith("model.")]
    assert nets and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in nets)
