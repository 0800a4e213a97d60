"""``sdmem detect``: per-prompt memorization scores from the model alone. Each score against a hand computation
with the UNet (the papers' formulas), the collapse score against brute-force nearest neighbours, AUC against
scikit-learn, the command end to end on the tiny SD with a LoRA as diffusers' example script saves it (resume,
refusals, nothing half-written)."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from helpers import lora_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdmem import cli  # noqa: E402
from sdmem.generation import seeded_latents  # noqa: E402
from sdmem.sd import detect as D  # noqa: E402
from sdmem.sd.tiny import make_tiny_sd  # noqa: E402

PROMPTS = ["a picture of a cat", "a red fox", "a picture", "an astronaut on a horse", "a cup of coffee"]
SMALL = D.DetectSettings(seeds=2, steps=1, schedule_steps=10, collapse_seeds=4, collapse_steps=3, batch=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("detect")
    model = make_tiny_sd(root / "tiny-sd")
    lora_dir = root / "sd-model-finetuned-lora"  # as diffusers' train_text_to_image_lora.py leaves it
    StableDiffusionPipeline.save_lora_weights(save_directory=str(lora_dir), unet_lora_layers=lora_layers(model, 1),
                                              safe_serialization=True)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    labels = root / "labels.txt"
    labels.write_text("1\n0\n0\n1\n0\n")
    ident, load, res = D.model_identity(model, None)
    pipe = load("cpu")
    return {"root": root, "model": model, "lora": lora_dir, "prompts": prompts, "labels": labels, "pipe": pipe,
            "res": res}


def _by_hand(pipe, prompt, seed, t, res, latents=None):
    """The UNet's (unconditional, conditional) predictions for one seed's noise at timestep t, unbatched."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    cond = pipe.encode_prompt([prompt], "cpu", 1, False)[0]
    unc = pipe.encode_prompt([""], "cpu", 1, False)[0]
    side = res // pipe.vae_scale_factor
    x = seeded_latents([seed], (pipe.unet.config.in_channels, side, side)) if latents is None else latents
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        pu = pipe.unet(x, t, encoder_hidden_states=unc).sample
        pc = pipe.unet(x, t, encoder_hidden_states=cond).sample
    return pu, pc, x


def test_wen_is_the_conditional_prediction_norm_at_the_first_steps(tiny, one_thread):
    from diffusers import DDIMScheduler
    from sdmem.sd.generate import PromptEmbeddings

    pipe, res = tiny["pipe"], tiny["res"]
    embed = PromptEmbeddings(pipe)
    with torch.no_grad():
        got = D.wen_scores(pipe, PROMPTS, embed, SMALL, res)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(SMALL.schedule_steps)
    t0 = sched.timesteps[0]
    for p, text in enumerate(PROMPTS):
        want = np.mean([float((lambda u, c, _: (c - u).flatten().norm())(*_by_hand(pipe, text, s, t0, res)))
                        for s in range(SMALL.seeds)])
        assert got[p] == pytest.approx(want, rel=1e-4)  # batched against one by one: rounding only
    # K = 2: the second step's norm after one guided DDIM step, averaged with the first.
    two = D.DetectSettings(seeds=1, steps=2, schedule_steps=10, batch=4)
    with torch.no_grad():
        got2 = D.wen_scores(pipe, PROMPTS[:1], embed, two, res)[0]
        pu, pc, x = _by_hand(pipe, PROMPTS[0], 0, t0, res)
        n1 = float((pc - pu).flatten().norm())
        sched.set_timesteps(10)
        x1 = sched.step(pu + 7.5 * (pc - pu), t0, x).prev_sample
        pu2, pc2, _ = _by_hand(pipe, PROMPTS[0], 0, sched.timesteps[1], res, latents=x1)
    assert got2 == pytest.approx((n1 + float((pc2 - pu2).flatten().norm())) / 2, rel=1e-4)
    assert len({round(v, 6) for v in got.values()}) == len(PROMPTS)  # different prompts, different scores


def test_aniso_combines_the_norm_and_the_channel_cosine_on_pure_noise(tiny, one_thread):
    from diffusers import DDIMScheduler
    from sdmem.sd.generate import PromptEmbeddings

    pipe, res = tiny["pipe"], tiny["res"]
    s = D.DetectSettings(seeds=1, schedule_steps=10, aniso_weights=(1.0, 2.0), batch=3)
    with torch.no_grad():
        got = D.aniso_scores(pipe, PROMPTS, PromptEmbeddings(pipe), s, res)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    for p, text in enumerate(PROMPTS):
        pu, pc, _ = _by_hand(pipe, text, 0, sched.timesteps[0], res)
        norm = float((pc - pu).flatten().norm())
        pu, pc, _ = _by_hand(pipe, text, 0, sched.timesteps[-3], res)
        g = (pc - pu)[0]
        cos = float(((pu[0] * g).sum(0) / (pu[0].norm(dim=0) * g.norm(dim=0)).clamp_min(1e-8)).mean())
        score, n, c = got[p]
        assert n == pytest.approx(norm, rel=1e-4) and c == pytest.approx(cos, abs=1e-4)
        assert score == pytest.approx(norm + 2 * cos, rel=1e-4)


def test_collapse_is_minus_the_median_distance_to_the_nearest_other_image():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    imgs[3] = imgs[1]  # an exact copy: distance 0 for both
    flat = imgs.reshape(len(imgs), -1).astype(np.float64)
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
    np.fill_diagonal(d, np.inf)
    score, med = D.collapse_score(imgs)
    assert med == pytest.approx(float(np.median(d.min(1))), rel=1e-9) and score == -med
    assert D.collapse_score(np.repeat(imgs[:1], 4, axis=0)) == (-0.0, 0.0)  # a fully collapsed prompt


def test_auc_and_tpr_at_one_percent_fpr_match_a_reference():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # ties on purpose
    r = D.roc(scores, labels)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert r["tpr_at_1pct_fpr"] == pytest.approx(tpr[fpr <= 0.01].max())
    assert D.roc(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0]))["auc"] == 1.0
    assert D.roc(np.array([1.0, 2.0]), np.array([1, 1]))["auc"] is None  # one class only


def test_the_command_on_a_pipeline_with_a_diffusers_lora_resumes_and_refuses(tiny, tmp_path, capsys, monkeypatch,
                                                                            one_thread):
    out = tmp_path / "det"
    args = ["detect", "--model", str(tiny["model"]), "--lora", str(tiny["lora"]), "--prompts", str(tiny["prompts"]),
            "--labels", str(tiny["labels"]), "--seeds", "2", "--collapse-seeds", "4", "--collapse-steps", "3",
            "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "AUC" in said
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["prompt"] for r in rows] == PROMPTS and [r["label"] for r in rows] == list("10010")
    assert set(rows[0]) >= {"wen", "aniso", "aniso_norm", "aniso_cosine", "collapse", "collapse_median_nn"}
    assert all(np.isfinite(float(r[m])) for r in rows for m in ("wen", "aniso", "collapse"))
    for f in ("scores.md", "roc.png", "hist-wen.png", "hist-aniso.png", "hist-collapse.png", "summary.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["roc"]) == set(D.METHODS) and 0 <= summary["roc"]["wen"]["auc"] <= 1
    md = (out / "scores.md").read_text().splitlines()
    ranked = [line.split(" | ")[1] for line in md if line.startswith("| ") and line[2].isdigit()]
    wen = {r["prompt"]: float(r["wen"]) for r in rows}
    assert ranked == sorted(PROMPTS, key=lambda p: -wen[p])  # ranked by the first method
    # The LoRA counts: without it the scores differ.
    plain = tmp_path / "plain"
    assert cli.main(["detect", "--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--method", "wen",
                     "--seeds", "2", "--out", str(plain), "--quiet"]) == 0
    assert [float(r["wen"]) for r in csv.DictReader((plain / "scores.csv").open())] != [float(r["wen"]) for r in rows]

    # Re-run: everything is read back, the model is never loaded.
    before = (out / "scores.csv").read_text()
    monkeypatch.setattr(D, "model_identity", _no_loading(D.model_identity))
    assert cli.main(args) == 0 and (out / "scores.csv").read_text() == before
    # An interrupted run: the cut-off last line is computed again, the rest kept.
    part = out / "parts" / "wen.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:2]) + lines[2][:7])
    monkeypatch.undo()
    assert cli.main(args) == 0 and (out / "scores.csv").read_text() == before
    capsys.readouterr()
    # Other settings into the same folder: refused, one line, untouched.
    assert cli.main(args[:-3] + ["--seeds", "3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings" in err[0] and (out / "scores.csv").read_text() == before
    # A damaged row: refused in one line, naming the file.
    part.write_text("".join(lines[:1]) + '{"i": 99, "v": [1.0]}\n' + "".join(lines[1:]))
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wen.jsonl" in err[0] and "line 2" in err[0]


def _no_loading(identity):
    def wrapped(model, lora):
        ident, _, res = identity(model, lora)
        return ident, (lambda dev: (_ for _ in ()).throw(AssertionError("loaded the model"))), res
    return wrapped


def test_confirm_audits_the_top_prompts_against_the_training_images(tiny, tmp_path, capsys, one_thread):
    from sdmem.sd.generate import generate_images

    pipe = tiny["pipe"]
    # Plant the training set: prompt 0's own images (seeds 0-3, the confirm sampler) are in it, so they are replicas.
    with torch.no_grad():
        own = generate_images(pipe, [PROMPTS[0]] * 4, list(range(4)), resolution=tiny["res"], steps=3,
                              guidance_scale=7.5)
    rng = np.random.default_rng(0)
    train = np.concatenate([own, rng.integers(0, 256, (12, *own.shape[1:]), dtype=np.uint8)])
    np.savez(tmp_path / "train.npz", images=train)
    out = tmp_path / "det"
    assert cli.main(["detect", "--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--method",
                     "collapse", "--collapse-seeds", "4", "--collapse-steps", "3", "--confirm",
                     str(tmp_path / "train.npz"), "--top", "5", "--confirm-num", "4", "--out", str(out),
                     "--quiet"]) == 0
    rows = {r["prompt"]: r for r in csv.DictReader((out / "scores.csv").open())}
    assert float(rows[PROMPTS[0]]["replica_rate"]) == 1.0 and float(rows[PROMPTS[0]]["knn_distance"]) == 0.0
    assert all(0 <= float(rows[p]["replica_rate"]) <= 1 and rows[p]["nearest_train"] for p in PROMPTS)
    # Another confirmation into the same folder (other images per prompt, another training set): refused, not
    # mixed with the rows above.
    capsys.readouterr()
    np.savez(tmp_path / "other.npz", images=train[::-1].copy())
    for flag, value in (("--confirm-num", "5"), ("--confirm", str(tmp_path / "other.npz"))):
        args = ["detect", "--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--method", "collapse",
                "--collapse-seeds", "4", "--collapse-steps", "3", "--confirm", str(tmp_path / "train.npz"), "--top",
                "5", "--confirm-num", "4", "--out", str(out), "--quiet"]
        args[args.index(flag) + 1] = value
        before = (out / "scores.csv").read_text()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other" in err[0] and (out / "scores.csv").read_text() == before


@pytest.mark.parametrize("case", ["empty", "binary", "labels-count", "labels-value", "seeds", "steps", "method",
                                  "foreign-out"])
def test_bad_inputs_are_refused_in_one_line_with_nothing_written(tiny, tmp_path, capsys, case):
    prompts, labels, out = tiny["prompts"], None, tmp_path / "out"
    extra = []
    if case == "empty":
        prompts = tmp_path / "p.txt"
        prompts.write_text("\n  \n")
    elif case == "binary":
        prompts = tmp_path / "p.txt"
        prompts.write_bytes(b"a cat\n\xff\xfe\n")
    elif case == "labels-count":
        labels = tmp_path / "l.txt"
        labels.write_text("1\n0\n")
    elif case == "labels-value":
        labels = tmp_path / "l.txt"
        labels.write_text("1\n0\n2\n0\n1\n")
    elif case == "seeds":
        extra = ["--seeds", "65"]
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "method":
        extra = ["--method", "wen,sharpness"]
    elif case == "foreign-out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    args = ["detect", "--model", str(tiny["model"]), "--prompts", str(prompts), "--out", str(out), "--quiet", *extra]
    if labels is not None:
        args += ["--labels", str(labels)]
    with pytest.raises(SystemExit) if case in ("seeds", "steps") else _nothing():
        code = cli.main(args)
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0]
    if case == "foreign-out":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_pipeline_without_an_unconditional_branch_is_refused_naming_the_method():
    from sdmem.errors import InputError

    class NoText:  # e.g. an unconditional or a non-Stable-Diffusion pipeline
        pass
    with pytest.raises(InputError, match="wen needs"):
        D.check_pipeline(NoText(), ("wen", "collapse"))
    D.check_pipeline(NoText(), ("collapse",))  # collapse needs only images


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 18's target (wen AUC >= 0.9 against the audit) not reached yet: "
                                       "0.867 on 8 prompts (README, sdmem detect)")
def test_the_detection_study_separates_memorized_prompts(tmp_path, monkeypatch):
    """eval/detect_study.py as the README runs it (about 10 minutes on 2 cores with the tiny SD's build): the
    pixel audit finds memorized and novel prompts, Wen's score separates them with AUC >= 0.9 (the issue's target),
    and every score ranks the copied prompts above the varied ones."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "eval" / "detect_study.py"
    spec = importlib.util.spec_from_file_location("detect_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main([str(tmp_path / "study")]) == 0
    summary = json.loads((tmp_path / "study" / "detect" / "summary.json").read_text())
    labels = [int(x) for x in (tmp_path / "study" / "labels-kept.txt").read_text().split()]
    assert 0 < sum(labels) < len(labels)
    design = json.loads((tmp_path / "study" / "detect-design" / "summary.json").read_text())
    assert all(design["roc"][m]["auc"] >= 0.9 for m in ("wen", "aniso", "collapse")), design["roc"]
    assert summary["roc"]["wen"]["auc"] >= 0.9, summary["roc"]
