"""The kind interface: a toy kind registered here, in a few lines, trains, generates, audits, sweeps and compares
through the shared code, none of which names it. The toy "model" is a memory of |D| images trained by SGD on the
training skeleton (sdmem.training); after training it is a perfect memorizer: each generated image is a training
image (seed s gives image s mod |D|), optionally with pixel noise, so its replicas are known."""

import csv
import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pytest
import torch
import yaml

from sdmem import checkpoint, kinds
from sdmem.config import Section, fingerprint, setting
from sdmem.runs import RunPaths
from sdmem.training import Trainer, batch_indices, finish_accelerator, fit


@dataclass(frozen=True, kw_only=True)
class ToyData(Section):
    _prefix: ClassVar[str] = "data"
    source: str = setting("builtin:digits")
    size: int = setting(10, ge=2)  # builtin:digits has 10 classes: an equal share of each
    seed: int = setting(0, ge=0)


@dataclass(frozen=True, kw_only=True)
class ToyTrain(Section):
    _prefix: ClassVar[str] = "train"
    steps: int = setting(24, ge=1)
    batch_size: int = setting(10, ge=1)
    lr: float = setting(0.5, gt=0)
    log_every_steps: int = setting(4, ge=1, training=False)
    checkpoint_steps: int = setting(8, ge=1, training=False)


@dataclass(frozen=True, kw_only=True)
class ToyConfig(Section):
    kind: Literal["toy"] = setting("toy")
    out_dir: str = setting(training=False)
    seed: int = setting(0, ge=0)
    data: ToyData = setting(factory=ToyData)
    train: ToyTrain = setting(factory=ToyTrain)
    noise: int = setting(0, ge=0, le=127)  # uniform pixel noise on the copies: 0 memorizes exactly


class ToyTrainer(Trainer):
    """A memory of |D| images learnt by SGD on 0.5·||memory[i] − D[i]||² (each step halves the error of the
    images it draws): the training skeleton does the folder, resume, log and checkpoints."""

    name, keep_checkpoints = "toy", None

    def build_subset(self):
        from sdmem.data.subset import SubsetSpec, build_subset

        d = self.cfg.data
        return build_subset(SubsetSpec(source=d.source, size=d.size, seed=d.seed))

    def build(self):
        self.total = self.cfg.train.steps
        self.target = torch.from_numpy(np.array(self.subset.images)).float() / 255
        torch.manual_seed(self.cfg.seed)
        self.memory = torch.nn.Parameter(torch.rand_like(self.target))
        self.optimizer = torch.optim.SGD([self.memory], lr=self.cfg.train.lr)

    def weights(self):
        return {"memory": self.memory.detach()}, None

    def load_weights(self, model, ema):
        with torch.no_grad():
            self.memory.copy_(model["memory"])

    def backward(self):
        idx = torch.from_numpy(batch_indices(self.step, self.cfg.train.batch_size, len(self.subset), self.cfg.seed))
        loss = 0.5 * ((self.memory[idx] - self.target[idx]) ** 2).sum()
        loss.backward()
        return float(loss.detach())

    def update(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {}

    def images_seen(self, step):
        return step * self.cfg.train.batch_size

    def checkpoint_due(self, step):
        return step % self.cfg.train.checkpoint_steps == 0 or step == self.total

    def finish(self):
        finish_accelerator(self.acc)
        return {"steps": self.step, "num_train": len(self.subset), "out_dir": str(self.paths.root)}


class ToyKind(kinds.Kind):
    name, config, paths = "toy", ToyConfig, RunPaths

    def train(self, cfg, *, progress=True):
        return fit(ToyTrainer(cfg, progress=progress))

    def dry_run(self, cfg):
        return {"num_params": 0, "num_train": cfg.data.size}

    def generate(self, run_dir, out_dir, *, seeds, progress=True, batch=4, device="cpu", **_):
        from sdmem.data.subset import load_subset
        from sdmem.generation import Plan, generate_folder
        from sdmem.runs import read_run_config

        cfg, n = read_run_config(run_dir), len(load_subset(run_dir).images)
        memory = checkpoint.read(checkpoint.newest(run_dir)).model["memory"]
        d = (memory * 255).round().clamp(0, 255).to(torch.uint8).numpy()

        def render(seeds, conditions):
            out = d[np.array(seeds) % n].astype(np.int16)
            noise = np.random.default_rng(seeds).integers(-cfg.noise, cfg.noise + 1, out.shape)
            return np.clip(out + noise, 0, 255).astype(np.uint8)
        plan = Plan({"made_by": {"kind": "toy", "fingerprint": fingerprint(cfg)}, "batch": batch,
                     "size": list(d.shape[1:3])}, lambda seed: {}, lambda: render)
        return generate_folder(out_dir, seeds, plan, progress=progress)

    def report(self, point, generate, report, *, progress, device):
        from sdmem.reporting import generate_and_audit

        row = generate_and_audit(point, generate, self.generate, progress=progress, device=device)
        return {"num_params": 0, "size": point.config.data.size, "step": None, "images_seen": None, **row}


@pytest.fixture
def toy():
    kind = kinds.register(ToyKind())
    yield kind
    kinds.unregister("toy")


def test_a_toy_kind_trains_generates_and_audits_through_the_cli(toy, cli, tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"kind": "toy", "out_dir": str(tmp_path / "run"), "data": {"size": 10}}))
    assert json.loads(cli("train", cfg, "--dry-run").out)["num_train"] == 10
    assert cli("train", cfg, "--quiet").code == 0 and (tmp_path / "run" / "subset.npz").is_file()
    assert cli("generate", tmp_path / "run", "--num", 20, "--out", tmp_path / "gen", "--quiet").code == 0
    r = cli("audit", "--train", tmp_path / "run", "--generated", tmp_path / "gen", "--out", tmp_path / "audit")
    assert r.code == 0
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["memorization_ratio"] == 1.0 and summary["knn_distance"] == 0.0  # every image is a copy
    # Options reach the kind, which owns them: this one ignores a guidance scale (EDM refuses it, SD uses it).
    assert cli("generate", tmp_path / "run", "--num", 2, "--out", tmp_path / "g2", "--guidance", 2).code == 0
    cli("curves", tmp_path / "run").one_line_error("kind toy", "tracks no memorization")


def test_a_toy_kind_resumes_through_the_training_skeleton(toy, cli, tmp_path):
    """The skeleton's checkpoints (every 8 steps, all kept), trimmed log and resume serve a kind that wrote none of
    them: resumed from step 16, the run ends where the uninterrupted one ended, bit for bit."""
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({"kind": "toy", "out_dir": str(tmp_path / "run"), "data": {"size": 10}}))
    assert cli("train", cfg, "--quiet").code == 0
    run = tmp_path / "run"
    assert sorted(checkpoint.listing(run)) == [8, 16, 24]
    done = checkpoint.read(checkpoint.newest(run))
    assert done.header["kind"] == "toy" and done.header["images_seen"] == 240
    (run / "checkpoints" / "step-0000024.safetensors").unlink()
    assert cli("train", cfg, "--quiet").code == 0
    again = checkpoint.read(checkpoint.newest(run))
    assert again.step == 24 and torch.equal(again.model["memory"], done.model["memory"])
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]  # the rows past step 16 were dropped on resume, then logged once


def test_a_toy_kind_sweeps_and_compares(toy, cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sweep"), "base": {"kind": "toy", "data": {"size": 10}},
                                    "axes": {"noise": [0, 120]}, "generate": {"num": 16, "batch": 4}}))
    assert cli("sweep", spec, "--dry-run").code == 0 and not (tmp_path / "sweep").exists()
    r = cli("sweep", spec, "--quiet")
    assert r.code == 0, r.err
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        rows = {r["noise"]: r for r in csv.DictReader(f)}
    assert float(rows["0"]["memorization_ratio"]) == 1.0  # exact copies
    assert float(rows["120"]["memorization_ratio"]) < 1.0 < float(rows["120"]["knn_distance"])  # noisy copies
    r = cli("compare", tmp_path / "sweep")
    assert r.code == 0 and "100.00%" in r.out and (tmp_path / "sweep" / "compare.png").is_file()
    r = cli("compare", tmp_path / "sweep" / "noise-0", tmp_path / "sweep" / "noise-120", "--out", tmp_path / "cmp")
    assert r.code == 0 and "noise" in r.out


def test_an_unknown_kind_is_one_line(cli, tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump({"kind": "toy", "out_dir": str(tmp_path / "run")}))
    cli("train", cfg).one_line_error("kind", "unknown kind 'toy'")
