"""The one checkpoint format (sdmem.checkpoint): a round trip, refusals that name the file, rotation that touches
only sdmem's checkpoints, and EDM run folders made before it (checkpoint.safetensors) resuming bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdmem import checkpoint
from sdmem.errors import InputError
from sdmem.runs import load_config

from helpers import write_tiny_edm

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(step=3):
    gen = torch.Generator().manual_seed(step)
    model = {"b.weight": torch.randn(3, 2, generator=gen), "a.bias": torch.randn(3, generator=gen)}
    ema = {k: v * 0.5 for k, v in model.items()}
    opt = {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(3, 2, generator=gen)},
           1: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(3, generator=gen)}}
    return checkpoint.Checkpoint(step, "f" * 16, model, ema, opt, {"lr_scheduler": {"last_epoch": step}})


def test_round_trip_keeps_every_part_and_the_weight_order(tmp_path):
    ck = _checkpoint()
    path = checkpoint.save(tmp_path / "checkpoints" / "step-0000003.safetensors", ck, kind="edm", images_seen=48,
                           config={"kind": "edm"})
    back = checkpoint.read(path)
    assert back.step == 3 and back.fingerprint == "f" * 16 and back.extra == ck.extra
    assert list(back.model) == list(ck.model)  # the header keeps the order (safetensors sorts its keys)
    for part in ("model", "ema"):
        got, want = getattr(back, part), getattr(ck, part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert back.optimizer.keys() == {0, 1} and torch.equal(back.optimizer[1]["exp_avg"], ck.optimizer[1]["exp_avg"])
    assert back.header["images_seen"] == 48 and back.header["kind"] == "edm"
    assert not list(path.parent.glob(".*"))  # no temporary file left
    none = checkpoint.Checkpoint(1, None, ck.model, None, {}, {})
    assert checkpoint.read(checkpoint.save(tmp_path / "n.safetensors", none, kind="sd", images_seen=1,
                                           config={})).ema is None


@pytest.mark.parametrize("damage", ["header", "tensor", "foreign", "bytes"])
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path, damage):
    path = checkpoint.save(tmp_path / "step-0000003.safetensors", _checkpoint(), kind="edm", images_seen=48, config={})
    tensors = load_file(str(path))
    if damage == "header":
        save_file(tensors, str(path), metadata={"format": checkpoint.FORMAT, "header": '{"step": "3"'})
    elif damage == "tensor":  # the header names a weight that is not there
        save_file({k: v for k, v in tensors.items() if k != "model.a.bias"}, str(path),
                  metadata={"format": checkpoint.FORMAT, "header": json.dumps(checkpoint.read(path).header)})
    elif damage == "foreign":
        save_file(tensors, str(path), metadata={"format": "someone-else/3"})
    else:
        path.write_bytes(path.read_bytes()[:200])
    before = path.read_bytes()
    with pytest.raises(InputError) as exc:
        checkpoint.read(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    assert path.read_bytes() == before


def test_rotation_removes_only_older_sdmem_checkpoints(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path / "checkpoints" / f"step-{step:07d}.safetensors", _checkpoint(step), kind="edm",
                        images_seen=step, config={})
    mine = [tmp_path / "checkpoints" / name for name in ("notes.txt", "step-2.safetensors", "step-0000001.bin")]
    for p in mine:
        p.write_text("the user's")
    (tmp_path / "checkpoints" / "step-0000001").mkdir()  # a folder without an sdmem meta.json
    gone = checkpoint.rotate(tmp_path, 1)
    assert [p.name for p in gone] == ["step-0000002.safetensors", "step-0000004.safetensors"]
    assert sorted(checkpoint.listing(tmp_path)) == [6]
    assert all(p.read_text() == "the user's" for p in mine) and (tmp_path / "checkpoints" / "step-0000001").is_dir()


def write_edm_v1(run: Path, ck: checkpoint.Checkpoint, cfg) -> Path:
    """An EDM checkpoint as sdmem wrote it before the one format: <run>/checkpoint.safetensors, net./ema./opt.
    tensors and string metadata."""
    from sdmem.config import config_to_dict, fingerprint

    tensors = {f"net.{k}": v for k, v in ck.model.items()}
    tensors.update({f"ema.{k}": v for k, v in ck.ema.items()})
    names = {}
    for i, st in ck.optimizer.items():
        names[i] = sorted(st)
        tensors.update({f"opt.{i}.{k}": v for k, v in st.items()})
    meta = {"format": checkpoint.EDM_V1, "fingerprint": fingerprint(cfg), "step": str(ck.step),
            "nimg": str(ck.step * 16), "optimizer": json.dumps(names), "config": json.dumps(config_to_dict(cfg))}
    path = run / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def test_an_edm_run_made_before_the_one_format_resumes_bitwise(tmp_path):
    from sdmem.edm.train import train

    train(load_config(write_tiny_edm(tmp_path, "a", epochs=6)), progress=False)
    # Run b: trained to epoch 2 (step 4), its checkpoint turned into the old layout, then trained to the end.
    train(load_config(write_tiny_edm(tmp_path, "b", epochs=2)), progress=False)
    run = tmp_path / "b"
    new = checkpoint.newest(run)
    old = write_edm_v1(run, checkpoint.read(new), load_config(write_tiny_edm(tmp_path, "b", epochs=6)))
    new.unlink()
    assert checkpoint.listing(run) == {4: old}
    train(load_config(write_tiny_edm(tmp_path, "b", epochs=6)), progress=False)
    a, b = checkpoint.read(checkpoint.newest(tmp_path / "a")), checkpoint.read(checkpoint.newest(run))
    assert a.step == b.step == 12
    for part in ("model", "ema"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
    assert all(torch.equal(a.optimizer[i][k], b.optimizer[i][k]) for i in a.optimizer for k in a.optimizer[i])
    assert not old.exists()  # the next checkpoint replaced it in the rotation (one kept)


def test_a_legacy_checkpoint_of_another_config_is_refused(tmp_path):
    from sdmem.edm.train import train

    cfg = load_config(write_tiny_edm(tmp_path, "b", epochs=2))
    train(cfg, progress=False)
    run = tmp_path / "b"
    new = checkpoint.newest(run)
    other = load_config(write_tiny_edm(tmp_path, "b", epochs=2), ["train.lr=0.5"])
    old = write_edm_v1(run, checkpoint.read(new), other)
    new.unlink()
    before = old.read_bytes()
    with pytest.raises(InputError, match="different training config") as exc:
        train(load_config(write_tiny_edm(tmp_path, "b", epochs=4)), progress=False)
    assert "checkpoint.safetensors" in str(exc.value) and old.read_bytes() == before
