"""The `sdmem` command end to end in a subprocess: outputs, and one-line errors for bad input."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sdmem", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_clean_error(proc, *fragments):
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def save_npz(path, images, **extra):
    np.savez(path, images=images, **extra)
    return path


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    gen = np.concatenate([train[:5], rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)])
    return save_npz(tmp_path / "train.npz", train), save_npz(tmp_path / "gen.npz", gen)


def test_audit_end_to_end(data, tmp_path):
    train, gen = data
    out = tmp_path / "out"
    proc = run("audit", "--train", train, "--generated", gen, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "memorization ratio 50.00%" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_replicas"] == 5 and summary["backend"] == "int8"
    assert sorted(p.name for p in out.iterdir()) == ["per_sample.csv", "ratio_hist.png", "replicas.png",
                                                     "summary.json"]


def test_optimum_then_audit(tmp_path):
    rng = np.random.default_rng(3)
    train = save_npz(tmp_path / "t.npz", rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
                     labels=np.arange(40) % 4)
    out = tmp_path / "samples"
    proc = run("optimum", "--train", train, "--num", 20, "--out", out, "--quiet", "--class-conditional")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png"))[:2] == ["000000.png", "000001.png"]
    proc = run("audit", "--train", train, "--generated", out, "--out", tmp_path / "a", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["memorization_ratio"] >= 0.99


def _malicious_cifar(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    return tar


def _bad_inputs(tmp_path, gen):
    rng = np.random.default_rng(1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "nosupported").mkdir()
    (tmp_path / "nosupported" / "notes.txt").write_text("hi")
    (tmp_path / "corrupt").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "corrupt" / f"{i}.png")
    (tmp_path / "corrupt" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage garbage")
    one = save_npz(tmp_path / "one.npz", np.repeat(rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8), 5, 0))
    big = save_npz(tmp_path / "big.npz", rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    floats = save_npz(tmp_path / "float.npz", rng.random((10, 8, 8, 3)).astype(np.float32))
    nan = tmp_path / "nan.npz"
    np.savez(nan, images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), labels=np.full(10, np.nan))
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, pixels=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    return {
        "missing": (["--train", tmp_path / "nope", "--generated", gen], ["nope", "no such file"]),
        "empty folder": (["--train", tmp_path / "empty", "--generated", gen], ["empty"]),
        "no supported images": (["--train", tmp_path / "nosupported", "--generated", gen], ["nosupported"]),
        "corrupt image": (["--train", tmp_path / "corrupt", "--generated", gen], ["3.png"]),
        "shape mismatch": (["--train", big, "--generated", gen], ["--resolution"]),
        "one distinct image": (["--train", one, "--generated", gen], ["one.npz", "2 distinct"]),
        "float npz": (["--train", floats, "--generated", gen], ["float.npz", "uint8"]),
        "nan labels": (["--train", nan, "--generated", gen], ["nan.npz"]),
        "no images key": (["--train", nokey, "--generated", gen], ["nokey.npz", "images"]),
        "malicious cifar": (["--train", _malicious_cifar(tmp_path), "--generated", gen], ["cifar-10", "refus"]),
        "threshold zero": (["--train", gen, "--generated", gen, "--threshold", "0"], ["--threshold"]),
        "threshold above one": (["--train", gen, "--generated", gen, "--threshold", "1.5"], ["--threshold"]),
    }


def test_bad_inputs_are_one_line_errors(data, tmp_path):
    _, gen = data
    for name, (args, fragments) in _bad_inputs(tmp_path, gen).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        proc = run("audit", *args, "--out", out, "--quiet")
        assert_clean_error(proc, *fragments)
        assert not out.exists(), name
    assert not (tmp_path / "pwned").exists()


def test_zip_without_dataset_json_when_labels_needed(tmp_path):
    rng = np.random.default_rng(5)
    z = tmp_path / "ds.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    out = tmp_path / "o"
    proc = run("optimum", "--train", z, "--num", 2, "--out", out, "--class-conditional", "--quiet")
    assert_clean_error(proc, "ds.zip", "dataset.json")
    assert not out.exists()
