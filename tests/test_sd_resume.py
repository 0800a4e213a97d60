"""SD runs resume exactly after a kill, refuse a changed training config (naming the keys) and keep what they
cannot use."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("diffusers", "transformers", "peft"):  # the sd extra
    pytest.importorskip(_name)

from sdmem.runs import load_config  # noqa: E402
from sdmem.errors import InputError  # noqa: E402
from sdmem.sd.tiny import make_imagenette_like, make_tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-assets")
    return {"model": make_tiny_sd(root / "tiny-sd"), "data": make_imagenette_like(root / "inet", per_class=2,
                                                                                  num_classes=4)}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp: Path, name: str, assets: dict, *, steps: int = 16, method: str = "lora", **train) -> Path:
    cfg = {"kind": "sd", "out_dir": str(tmp / name), "seed": 2,
           "data": {"source": str(assets["data"]), "size": 8, "resolution": 32, "prompt": "class"},
           "model": {"pretrained": str(assets["model"]), "method": method, "rank": 2},
           "train": {"images_seen": 4 * steps, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_steps": 4,
                     "checkpoints_total_limit": 2, "log_every_steps": 4, **train}}
    if method == "lora":
        cfg["model"]["lora_dropout"] = 0.1  # dropout draws from the global RNG: resume must re-seed it too
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "sdmem", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                        HF_HUB_OFFLINE="1"))


def _state(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}.safetensors"))


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_is_bitwise_equal(tmp_path, assets):
    path_a, path_b = write_config(tmp_path, "a", assets), write_config(tmp_path, "b", assets)
    # Run a uninterrupted, side by side with run b, which is killed (SIGKILL) once its first checkpoint exists.
    proc_a, proc_b = _cli("train", path_a, "--quiet"), _cli("train", path_b, "--quiet")
    first = tmp_path / "b" / "checkpoints" / "step-0000004.safetensors"
    deadline = time.time() + 180
    while not first.exists() and time.time() < deadline and proc_b.poll() is None:
        time.sleep(0.02)
    proc_b.send_signal(signal.SIGKILL)
    proc_b.wait()
    assert proc_a.wait(timeout=240) == 0, proc_a.stderr.read()
    done = sorted((tmp_path / "b" / "checkpoints").glob("step-*"))
    assert done and not (tmp_path / "b" / "final.json").exists(), "run b finished before it was killed"
    # Re-running the same command resumes from the newest checkpoint and ends where run a ended, bit for bit.
    proc_b = _cli("train", path_b)
    assert proc_b.wait(timeout=240) == 0, proc_b.stderr.read()
    wa, wb = _state(tmp_path / "a", 16), _state(tmp_path / "b", 16)
    assert wa.keys() == wb.keys() and any(k.startswith("opt.") for k in wa) and any(k.startswith("ema.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    lb = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert _same_tensors(la, lb)
    from sdmem import checkpoint

    meta_a = checkpoint.read(tmp_path / "a" / "checkpoints" / "step-0000016.safetensors").extra
    meta_b = checkpoint.read(tmp_path / "b" / "checkpoints" / "step-0000016.safetensors").extra
    assert meta_a["lr_scheduler"] == meta_b["lr_scheduler"] and meta_a["lr_scheduler"]["last_epoch"] == 16
    logs = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert logs == [4, 8, 12, 16]  # rows past the checkpoint were dropped on resume, never repeated


def test_resume_refusals_and_accepted_changes(tmp_path, assets):
    from sdmem.sd.train import train

    path = write_config(tmp_path, "run", assets, steps=2, checkpoint_steps=1)
    cfg = load_config(path)
    assert train(cfg, progress=False)["steps"] == 2
    run = Path(cfg.out_dir)
    # Keys that change training: refused, named, and nothing is touched.
    before = sorted(p.name for p in run.rglob("*"))
    for sets, named in [(["train.lr=1e-3"], "train.lr"), (["model.rank=4", "data.seed=1"], "data.seed, model.rank"),
                        (["train.images_seen=16"], "train.images_seen"), (["data.prompt=plain"], "data.prompt")]:
        with pytest.raises(InputError, match="different config") as exc:
            train(load_config(path, sets), progress=False)
        assert named in str(exc.value)
    assert sorted(p.name for p in run.rglob("*")) == before
    # Keys that do not: the finished run is recognised (the cache and checkpoint cadence are not training keys).
    again = train(load_config(path, ["train.cache=false", "train.checkpoint_steps=5", "train.log_every_steps=7"]),
                  progress=False)
    assert again.get("already_done") and again["steps"] == 2
    # Killed after its last checkpoint, before the outputs: re-running writes them from that checkpoint (no step runs,
    # the same weights) and reports the loss logged at that step, not nan.
    weights = load_file(str(run / "pytorch_lora_weights.safetensors"))
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (run / "final.json").unlink()
    (run / "pytorch_lora_weights.safetensors").unlink()
    ended = train(cfg, progress=False)
    assert not ended["already_done"] and ended["steps"] == 2 and ended["loss"] == logged[-1]["loss"] > 0
    # (compared as tensors: the safetensors header's metadata order may vary between saves)
    assert _same_tensors(load_file(str(run / "pytorch_lora_weights.safetensors")), weights)
    assert (run / "final.json").exists()
    # A corrupt newest checkpoint is refused and left as it is (final.json removed so training would resume).
    (run / "final.json").unlink()
    state = run / "checkpoints" / "step-0000002.safetensors"
    state.write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt"):
        train(cfg, progress=False)
    assert state.read_bytes() == b"garbage"


def test_full_run_ignores_lora_keys_and_a_folder_of_something_else(tmp_path, assets):
    from sdmem.config import changed_training_keys
    from sdmem.sd.train import train

    path = write_config(tmp_path, "full", assets, steps=1, method="full", ema=False)
    cfg = load_config(path)
    train(cfg, progress=False)
    assert train(load_config(path, ["model.rank=64", "model.lora_forward=merged", "data.plain_template=x"]),
                 progress=False)["already_done"]
    assert changed_training_keys(cfg, load_config(path, ["model.method=lora"])) == ["model.method", "train.lr"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an sdmem run folder"):
        train(load_config(path, [f"out_dir={tmp_path / 'other'}"]), progress=False)


def write_sd_v1(run: Path, ck) -> Path:
    """An SD checkpoint as sdmem wrote it before the one format: checkpoints/step-N/{state.safetensors, meta.json}
    (param./ema./opt. tensors; names, optimizer keys, LR schedule and loss scale in the JSON)."""
    from safetensors.torch import save_file

    from sdmem import checkpoint

    tensors = {f"param.{n}": v for n, v in ck.model.items()}
    tensors.update({f"ema.{n}": v for n, v in ck.ema.items()})
    keys = {}
    for i, st in ck.optimizer.items():
        keys[str(i)] = sorted(st)
        tensors.update({f"opt.{i}.{k}": v for k, v in st.items()})
    folder = run / "checkpoints" / f"step-{ck.step:07d}"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors"),
              metadata={"format": checkpoint.SD_V1, "step": str(ck.step)})
    meta = {"format": checkpoint.SD_V1, "step": ck.step, "fingerprint": ck.fingerprint, "param_names": list(ck.model),
            "optimizer": keys, "lr_scheduler": ck.extra["lr_scheduler"], "grad_scaler": ck.extra["grad_scaler"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_an_sd_run_made_before_the_one_format_resumes_bitwise(tmp_path, assets):
    from sdmem import checkpoint
    from sdmem.sd.train import train

    path = write_config(tmp_path, "run", assets)
    train(load_config(path), progress=False)
    run = tmp_path / "run"
    done = checkpoint.read(run / "checkpoints" / "step-0000016.safetensors")
    # Its step-12 checkpoint in the old layout, the rest gone: re-running resumes from it and ends where it ended.
    new = run / "checkpoints" / "step-0000012.safetensors"
    old = write_sd_v1(run, checkpoint.read(new))
    for p in (new, run / "checkpoints" / "step-0000016.safetensors", run / "final.json"):
        p.unlink()
    assert checkpoint.listing(run) == {12: old}
    summary = train(load_config(path), progress=False)
    assert summary["steps"] == 16 and not summary["already_done"]
    again = checkpoint.read(run / "checkpoints" / "step-0000016.safetensors")
    for part in ("model", "ema"):
        x, y = getattr(done, part), getattr(again, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), part
    assert again.extra["lr_scheduler"] == done.extra["lr_scheduler"]
    assert sorted(checkpoint.listing(run)) == [12, 16] and checkpoint.listing(run)[12] == old  # 2 kept
