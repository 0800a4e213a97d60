"""Memorization scores per prompt from the model alone (``sdmem detect``): no training images needed.

Three scores, higher = more likely memorized; each is detection, not proof (the pixel audit confirms):

- ``wen`` (Wen, Liu, Chen & Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
  ICLR 2024, arXiv:2407.21720): the magnitude of the text-conditional part of the noise prediction,
  ``||pred(x_t, c) - pred(x_t, "")||_2`` over the whole latent, at the first K steps of classifier-free-guided
  DDIM sampling (guidance 7.5, a 50-step schedule), averaged over the steps and the seeds. Their code takes this
  norm before the guidance scale multiplies it and without normalisation; their detection setting is the first
  step (K = 1), their generations 4 per prompt.
- ``aniso`` (Asthana & Belagiannis, "Detecting and Mitigating Memorization in Diffusion Models through Anisotropy
  of the Log-Probability", ICLR 2026, arXiv:2601.20642): on pure noise x_T, no sampling. An isotropic term, the
  same norm at the schedule's first timestep, plus an alignment term, the cosine (over the latent channels, per
  pixel, averaged over pixels) between the unconditional prediction and the guidance vector ``pred(c) -
  pred("")`` at a low-noise timestep (the schedule's third-last) for the same x_T: ``g1 * norm + g2 * cosine``,
  with their SD v1 weights g1 = 1, g2 = 2 by default. Both passes are a conditional and an unconditional UNet call.
- ``collapse`` (after Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023): no
  gradients, no model internals. The prompt's images (one per seed, the generation core's per-seed CPU noise) are
  searched against each other with the auditor's exact engine; a memorized prompt collapses onto near-identical
  images. The score is minus the median distance (RMS per pixel, 0-255) from each image to its nearest other one.

``pred`` is the UNet's own output (the noise for epsilon-prediction models, as in both papers' SD v1 code; v for
v-prediction models, where at zero terminal SNR the noise at t = T would be x_T whatever the prompt).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..generation import seeded_latents
from ..utils import atomic_write_text

FORMAT = "sdmem-detect/1"
METHODS = ("wen", "aniso", "collapse")
GRADIENT_FREE = ("collapse",)
CITATIONS = {"wen": "Wen et al., ICLR 2024 (arXiv:2407.21720)",
             "aniso": "Asthana & Belagiannis, ICLR 2026 (arXiv:2601.20642)",
             "collapse": "after Carlini et al., USENIX Security 2023 (arXiv:2301.13188)"}
MAX_SEEDS = 64
# The values each method records per prompt (parts/<method>.jsonl) and their scores.csv columns; the first is the
# score itself.
COLUMNS = {"wen": ("wen",), "aniso": ("aniso", "aniso_norm", "aniso_cosine"),
           "collapse": ("collapse", "collapse_median_nn")}


@dataclass(frozen=True)
class DetectSettings:
    methods: tuple[str, ...] = METHODS
    seeds: int = 4                 # noise seeds 0..seeds-1 for every prompt (wen, aniso)
    steps: int = 1                 # wen: the first K sampling steps
    schedule_steps: int = 50       # the DDIM schedule the steps are taken from (both papers: 50)
    guidance_scale: float = 7.5    # wen's sampling steps, and the collapse and --confirm images
    aniso_weights: tuple[float, float] = (1.0, 2.0)
    collapse_seeds: int = 16       # collapse: images per prompt
    collapse_steps: int = 20       # collapse and --confirm: DDIM steps of those images
    batch: int = 16                # rows (prompt x seed) per UNet call

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InputError("--method", f"expected {', '.join(METHODS)} or all, got {', '.join(unknown) or 'none'}")
        for key, value, low, high in (("--seeds", self.seeds, 1, MAX_SEEDS),
                                      ("--steps", self.steps, 1, self.schedule_steps),
                                      ("--schedule-steps", self.schedule_steps, 3, 1000),
                                      ("--collapse-seeds", self.collapse_seeds, 2, 1024),
                                      ("--collapse-steps", self.collapse_steps, 1, 1000),
                                      ("--batch", self.batch, 1, 4096)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InputError(key, f"expected an integer in [{low}, {high}], got {value!r}")
        for key, value in (("--guidance", self.guidance_scale), ("--aniso-weights", self.aniso_weights[0]),
                           ("--aniso-weights", self.aniso_weights[1])):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(key, f"expected a finite number, got {value!r}")
        if self.guidance_scale < 1:
            raise InputError("--guidance", "expected a guidance scale >= 1")

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# ------------------------------------------------------------------------------------------------------ inputs


def read_labels(path: str | os.PathLike, count: int) -> np.ndarray:
    """``--labels FILE``: one 0 or 1 per non-blank line, as many as prompts."""
    from .foreign import read_lines

    path = Path(path)
    lines = read_lines(path, "labels file", "one 0 or 1 per line")
    bad = next((k for k, line in enumerate(lines) if line not in ("0", "1")), None)
    if bad is not None:
        raise InputError(path, f"label {bad + 1} is {lines[bad][:20]!r}; expected 0 or 1 (1 = memorized)")
    if len(lines) != count:
        raise InputError(path, f"holds {len(lines)} labels for {count} prompts; expected one per prompt")
    return np.asarray([int(x) for x in lines], np.int64)


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def check_pipeline(pipe, methods) -> None:
    """wen and aniso need the conditional and the unconditional (empty-prompt) noise predictions."""
    from .generate import PromptEmbeddings

    need = [m for m in methods if m not in GRADIENT_FREE]
    if need and not PromptEmbeddings.supports(pipe):
        raise InputError("--method", f"{need[0]} needs a StableDiffusionPipeline's text encoder and empty-prompt "
                                     f"embedding (classifier-free guidance); {type(pipe).__name__} has no such "
                                     "unconditional branch (use --method collapse)")


# ------------------------------------------------------------------------------------------------------ scores


def _schedule(pipe, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return sched


def _rows(prompts: list[str], seeds: int):
    """(prompt index, seed) of every row, prompt-major."""
    return [(p, s) for p in range(len(prompts)) for s in range(seeds)]


def _unet_pair(pipe, latents, t, cond, uncond):
    """The UNet's (unconditional, conditional) predictions for the same latents, one batched call."""
    x = torch.cat([latents, latents])
    out = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    return out.chunk(2)


def _latents(pipe, seeds: list[int], resolution: int, sched):
    unet = pipe.unet
    side = resolution // pipe.vae_scale_factor
    lat = seeded_latents(seeds, (unet.config.in_channels, side, side), unet.device, unet.dtype)
    return lat * sched.init_noise_sigma


def _row_batches(pipe, prompts, embed, settings: DetectSettings, resolution: int, sched, rows):
    """(rows, conditional embeddings, unconditional embeddings, pure-noise latents) per UNet batch of rows."""
    rows = rows if rows is not None else _rows(prompts, settings.seeds)
    uncond = embed([""])
    for i in range(0, len(rows), settings.batch):
        chunk = rows[i:i + settings.batch]
        yield (chunk, embed([prompts[p] for p, _ in chunk]), uncond.expand(len(chunk), -1, -1),
               _latents(pipe, [s for _, s in chunk], resolution, sched))


def _mean_per_prompt(values: dict[int, list]) -> dict[int, tuple[float, ...]]:
    """Each prompt's values averaged over its seeds."""
    return {p: tuple(float(x) for x in np.mean(np.asarray(v, np.float64), axis=0)) for p, v in values.items()}


def wen_scores(pipe, prompts: list[str], embed, settings: DetectSettings, resolution: int, rows=None) -> dict:
    """{prompt index: mean over seeds and the first K steps of ||pred_c - pred_u||_2} for the rows given."""
    sched = _schedule(pipe, settings.schedule_steps)
    values: dict[int, list[tuple[float]]] = {}
    for chunk, cond, uncond, lat in _row_batches(pipe, prompts, embed, settings, resolution, sched, rows):
        total = torch.zeros(len(chunk), dtype=torch.float64)
        for k, t in enumerate(sched.timesteps[:settings.steps]):
            pu, pc = _unet_pair(pipe, sched.scale_model_input(lat, t), t, cond, uncond)
            total += (pc - pu).float().flatten(1).norm(dim=1).double().cpu()
            if k + 1 < settings.steps:
                lat = sched.step(pu + settings.guidance_scale * (pc - pu), t, lat).prev_sample
        for (p, _), v in zip(chunk, (total / settings.steps).tolist()):
            values.setdefault(p, []).append((v,))
    return {p: v[0] for p, v in _mean_per_prompt(values).items()}


def aniso_scores(pipe, prompts: list[str], embed, settings: DetectSettings, resolution: int, rows=None) -> dict:
    """{prompt index: (score, norm, cosine)}: g1 * ||pred_c - pred_u|| at the first timestep + g2 * the per-pixel
    channel cosine between pred_u and pred_c - pred_u at the third-last timestep, both on pure noise x_T."""
    sched = _schedule(pipe, settings.schedule_steps)
    t_norm, t_cos = sched.timesteps[0], sched.timesteps[-3]
    g1, g2 = settings.aniso_weights
    values: dict[int, list[tuple[float, float]]] = {}
    for chunk, cond, uncond, lat in _row_batches(pipe, prompts, embed, settings, resolution, sched, rows):
        pu, pc = _unet_pair(pipe, sched.scale_model_input(lat, t_norm), t_norm, cond, uncond)
        norm = (pc - pu).float().flatten(1).norm(dim=1)
        pu, pc = _unet_pair(pipe, sched.scale_model_input(lat, t_cos), t_cos, cond, uncond)
        cos = torch.nn.functional.cosine_similarity(pu.float(), (pc - pu).float(), dim=1).flatten(1).mean(dim=1)
        for (p, _), n, c in zip(chunk, norm.tolist(), cos.tolist()):
            values.setdefault(p, []).append((n, c))
    return {p: (g1 * n + g2 * c, n, c) for p, (n, c) in _mean_per_prompt(values).items()}


def collapse_score(images: np.ndarray) -> tuple[float, float]:
    """(score, median nearest-other distance) of one prompt's images: each searched against all of them with the
    auditor's exact engine (no dedup, so an exact copy counts as distance 0); the nearest other image of image i is
    its second neighbour (the first is itself, or a copy at distance 0)."""
    from ..audit.knn import search_top2

    top = search_top2(images, images, dedup=False, device="cpu")
    d = np.sqrt(np.maximum(top.sqdist[:, 1], 0) / float(np.prod(images.shape[1:])))
    med = float(np.median(d))
    return -med, med


# ------------------------------------------------------------------------------------------------------ report


def roc(scores: np.ndarray, labels: np.ndarray) -> dict:
    """ROC of ``scores`` (higher = positive) against 0/1 ``labels``: AUC (Mann-Whitney, ties count half), TPR at
    1% FPR (the highest TPR among thresholds whose FPR <= 0.01), and the curve's points."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return {"auc": None, "tpr_at_1pct_fpr": None, "fpr": [], "tpr": []}
    greater = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    auc = float(greater / (len(pos) * len(neg)))
    thresholds = np.unique(scores)[::-1]
    fpr = [0.0] + [float((neg >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((pos >= t).mean()) for t in thresholds]
    ok = [t for f, t in zip(fpr, tpr) if f <= 0.01]
    return {"auc": auc, "tpr_at_1pct_fpr": max(ok) if ok else 0.0, "fpr": fpr, "tpr": tpr}


def score_columns(methods) -> list[str]:
    return [c for m in methods for c in COLUMNS[m]]


def write_report(out: Path, prompts: list[str], table: dict[str, dict], methods, *, labels=None,
                 confirm: dict | None = None) -> dict:
    """scores.csv, scores.md (ranked by the first method), hist-<method>.png, and with labels roc.png and the
    AUCs; everything written atomically. Returns the summary (AUCs per method)."""
    cols = score_columns(methods)
    buf = io.StringIO()
    extra = ["label"] if labels is not None else []
    conf = ["replica_rate", "knn_distance", "nearest_train"] if confirm else []
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["prompt", *cols, *extra, *conf])
    for i, text in enumerate(prompts):
        row = [text, *(f"{table[c][i]:.6g}" for c in cols)]
        row += [int(labels[i])] if labels is not None else []
        if confirm:
            c = confirm.get(i)
            row += [f"{c['replica_rate']:.4f}", f"{c['knn_distance']:.3f}", c["nearest_train"]] if c else ["", "", ""]
        w.writerow(row)
    atomic_write_text(out / "scores.csv", buf.getvalue())

    summary = {"methods": list(methods), "prompts": len(prompts), "citations": {m: CITATIONS[m] for m in methods}}
    curves = {}
    if labels is not None:
        for m in methods:
            r = roc(np.asarray(table[m], np.float64), labels)
            curves[m] = r
            summary.setdefault("roc", {})[m] = {"auc": r["auc"], "tpr_at_1pct_fpr": r["tpr_at_1pct_fpr"]}
    first = methods[0]
    order = sorted(range(len(prompts)), key=lambda i: -table[first][i])
    lines = [f"# Memorization scores of {len(prompts)} prompts (higher = more likely memorized)", "",
             "Detection, not proof: confirm the top prompts with the pixel audit (`--confirm TRAIN --top K`).", ""]
    if curves:
        lines += ["| method | AUC | TPR at 1% FPR |", "|---|---|---|"]
        for m in methods:
            a, t = summary["roc"][m]["auc"], summary["roc"][m]["tpr_at_1pct_fpr"]
            lines.append(f"| {m} | {'—' if a is None else f'{a:.3f}'} | {'—' if t is None else f'{100 * t:.1f}%'} |")
        lines.append("")
    head = ["rank", "prompt", *methods, *(["label"] if labels is not None else []),
            *(["replica rate", "KNN distance"] if confirm else [])]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, i in enumerate(order, 1):
        cells = [str(k), prompts[i].replace("|", "\\|")[:80], *(f"{table[m][i]:.4g}" for m in methods)]
        cells += [str(int(labels[i]))] if labels is not None else []
        if confirm:
            c = confirm.get(i)
            cells += [f"{100 * c['replica_rate']:.1f}%", f"{c['knn_distance']:.2f}"] if c else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "scores.md", "\n".join(lines) + "\n")
    _plots(out, table, methods, labels, curves)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _plots(out: Path, table, methods, labels, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write

    for m in methods:
        v = np.asarray(table[m], np.float64)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if labels is not None:
            for lab, name in ((0, "label 0"), (1, "label 1 (memorized)")):
                if (labels == lab).any():
                    ax.hist(v[labels == lab], bins=20, alpha=0.6, label=name)
            if labels.size:
                ax.legend(fontsize=8)
        else:
            ax.hist(v, bins=20)
        ax.set_xlabel(f"{m} score")
        ax.set_ylabel("prompts")
        ax.set_title(CITATIONS[m], fontsize=8)
        fig.tight_layout()
        atomic_write(out / f"hist-{m}.png", lambda p: fig.savefig(p, format="png", dpi=110))
        plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        drawn = [m for m, r in curves.items() if r["auc"] is not None]
        for m in drawn:
            ax.plot(curves[m]["fpr"], curves[m]["tpr"], label=f"{m} (AUC {curves[m]['auc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if drawn:
            ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(out / "roc.png", lambda p: fig.savefig(p, format="png", dpi=110))
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------ driver


def _is_run(model) -> bool:
    from ..runs import run_kind

    p = Path(os.fspath(model))
    if not (p / "config.json").is_file():
        return False
    try:
        return run_kind(p) == "sd"
    except InputError:
        return False


def model_identity(model, lora) -> tuple[dict, callable, int]:
    """(identity record, loader, resolution) of ``--model`` (an sdmem SD run, a pipeline folder or a cached hub id)
    and ``--lora``; nothing is loaded until ``loader(device)`` is called."""
    from ..utils import file_sha256
    from .foreign import default_resolution, load_lora, load_pipeline, model_fingerprint, resolve_lora, resolve_model

    if _is_run(model):
        if lora is not None:
            raise InputError("--lora", "an sdmem run carries its own weights; --lora is for --model DIR|HUB_ID")
        from ..runs import read_run_config
        from .generate import load_run_pipeline
        from .run import SDPaths

        cfg = read_run_config(model, "sd")
        paths = SDPaths(model)
        if not paths.final.exists():
            raise InputError(model, "has no final weights yet (final.json); finish training first")
        ident = {"kind": "sdmem-run", "run": str(Path(model).resolve()), "final_sha256": file_sha256(paths.final)}
        return ident, (lambda dev: load_run_pipeline(model, device=dev)[0]), int(cfg.data.resolution)
    root, name, rev = resolve_model(model)
    lora_file = resolve_lora(lora) if lora is not None else None
    ident = {"kind": "diffusers", "model": name, "revision": rev, "model_fingerprint": model_fingerprint(root),
             "lora_sha256": file_sha256(lora_file) if lora_file is not None else None}

    def load(dev):
        pipe = load_pipeline(root, device=dev)
        if lora_file is not None:
            from .generate import fuse_lora

            load_lora(pipe, lora_file)
            fuse_lora(pipe.unet)
        return pipe
    return ident, load, default_resolution(root)


def _open_out(out: Path, record: dict) -> None:
    """Make ``out`` this detection's folder (detect.json) or check that it is: other settings, another model or
    other prompts are refused, naming the keys; a folder holding anything else is refused, never cleaned."""
    path = out / "detect.json"
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} record")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(path, f"unreadable detection record ({exc.__class__.__name__}: {str(exc)[:80]})") from None
        differ = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
        if differ:
            raise InputError(out, f"holds a detection with other {', '.join(differ)}; use another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "exists and is not an sdmem detect folder (no detect.json); refusing to write into "
                              "it (use a new or empty --out)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _read_part(path: Path, count: int, width: int) -> dict[int, list[float]]:
    """The rows computed so far (``parts/<method>.jsonl``: {"i": prompt index, "v": [values]} per line). A last line
    cut off by an interruption is dropped; any other damage is refused."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] != b"":  # an unfinished last line: written again
        lines = lines[:-1]
    done = {}
    for k, line in enumerate(lines):
        if not line:
            continue
        try:
            row = json.loads(line)
            i, v = row["i"], row["v"]
            ok = (isinstance(i, int) and 0 <= i < count and isinstance(v, list) and len(v) == width
                  and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise InputError(path, f"line {k + 1} is not a detection row ({{\"i\": index < {count}, \"v\": "
                                   f"{width} finite numbers}}); move the folder away to start again")
        done[i] = [float(x) for x in v]
    return done


def _append(path: Path, rows: dict[int, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for i, v in rows.items():
            f.write(json.dumps({"i": i, "v": v}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_detect(model, prompts_file, out, *, settings: DetectSettings = DetectSettings(), lora=None,
               labels_file=None, confirm=None, top: int = 10, confirm_num: int = 16, device: str = "auto",
               progress: bool = True, log=print) -> dict:
    """``sdmem detect``: per-prompt scores of every method into ``out`` (resumable), the report, and with
    ``confirm`` (a training-image SRC) the replica rate of the ``top`` highest-scored prompts by the pixel audit."""
    from tqdm.auto import tqdm

    from ..utils import resolve_device
    from .foreign import read_prompts

    settings.check()
    prompts = read_prompts(prompts_file)
    labels = read_labels(labels_file, len(prompts)) if labels_file is not None else None
    if confirm is not None and not (isinstance(top, int) and 1 <= top <= len(prompts)):
        raise InputError("--top", f"expected an integer in [1, {len(prompts)}] (the prompts), got {top!r}")
    if confirm is not None and not (isinstance(confirm_num, int) and 2 <= confirm_num <= 10000):
        raise InputError("--confirm-num", f"expected an integer in [2, 10000], got {confirm_num!r}")
    dev = resolve_device(device)
    ident, loader, resolution = model_identity(model, lora)
    out = Path(out)
    record = {"format": FORMAT, "model": ident, "settings": settings.record(), "resolution": resolution,
              "prompts": {"count": len(prompts), "sha256": prompts_digest(prompts)}}
    _open_out(out, record)

    pipe = embed = None

    def ready():
        nonlocal pipe, embed
        if pipe is None:
            from .generate import PromptEmbeddings

            pipe = loader(dev)
            pipe.set_progress_bar_config(disable=True)
            check_pipeline(pipe, settings.methods)
            embed = PromptEmbeddings(pipe) if PromptEmbeddings.supports(pipe) else None
        return pipe

    results: dict[str, dict[int, list[float]]] = {}
    per_chunk = max(1, settings.batch // settings.seeds)
    for m in settings.methods:
        part = out / "parts" / f"{m}.jsonl"
        done = _read_part(part, len(prompts), len(COLUMNS[m]))
        todo = [i for i in range(len(prompts)) if i not in done]
        bar = tqdm(total=len(prompts), initial=len(done), desc=m, unit="prompt", disable=not progress)
        step = 1 if m == "collapse" else per_chunk
        for k in range(0, len(todo), step):
            idx = todo[k:k + step]
            ready()
            with torch.no_grad():
                if m == "collapse":
                    from .generate import generate_images

                    seeds = list(range(settings.collapse_seeds))
                    imgs = generate_images(pipe, [prompts[idx[0]]] * len(seeds), seeds, resolution=resolution,
                                           steps=settings.collapse_steps, guidance_scale=settings.guidance_scale)
                    new = {idx[0]: list(collapse_score(imgs))}
                else:
                    rows = [(p, s) for p in idx for s in range(settings.seeds)]
                    fn = wen_scores if m == "wen" else aniso_scores
                    got = fn(pipe, prompts, embed, settings, resolution, rows=rows)
                    new = {p: ([v] if m == "wen" else list(v)) for p, v in got.items()}
            _append(part, new)
            done.update(new)
            bar.update(len(idx))
        bar.close()
        results[m] = done
    table = _table(results, settings.methods, len(prompts))
    conf = None
    if confirm is not None:
        conf = _confirm(out, prompts, table[settings.methods[0]], confirm, top, confirm_num, settings, resolution,
                        ready, progress)
    summary = write_report(out, prompts, table, settings.methods, labels=labels, confirm=conf)
    log(f"scores of {len(prompts)} prompts ({', '.join(settings.methods)}) in {out}/scores.csv, scores.md")
    for m, r in summary.get("roc", {}).items():
        if r["auc"] is not None:
            log(f"  {m}: AUC {r['auc']:.3f}, TPR at 1% FPR {100 * r['tpr_at_1pct_fpr']:.1f}%")
    return summary


def _table(results, methods, count) -> dict[str, list[float]]:
    """{column: its value for every prompt, in prompt order}."""
    return {col: [results[m][i][k] for i in range(count)] for m in methods for k, col in enumerate(COLUMNS[m])}


def _confirm(out, prompts, scores, train_src, top, num, settings, resolution, ready, progress) -> dict:
    """The pixel audit of the ``top`` highest-scored prompts: ``num`` images each (seeds 0..num-1, the collapse
    sampler's steps and guidance) against the training images; {prompt index: replica rate, KNN, nearest}."""
    from ..audit.api import audit
    from ..data import open_source
    from .generate import generate_images

    try:  # any training SRC of `sdmem audit --train` (a folder, npz, an sdmem run's subset, ...)
        train = open_source(os.fspath(train_src))
    except InputError as exc:
        raise InputError(f"--confirm: {exc.where}", exc.problem) from None
    part = out / "parts" / "confirm.jsonl"
    _confirm_record(out / "parts" / "confirm.json", {"train": _source_name(train_src), "train_images": len(train),
                                                     "images_per_prompt": num})
    order = sorted(range(len(prompts)), key=lambda i: -scores[i])[:top]
    done = _read_part(part, len(prompts), 3)
    for i in order:
        if i in done:
            continue
        pipe = ready()
        with torch.no_grad():
            imgs = generate_images(pipe, [prompts[i]] * num, list(range(num)), resolution=resolution,
                                   steps=settings.collapse_steps, guidance_scale=settings.guidance_scale)
        rep = audit(train, imgs, progress=False)
        s = rep.summary()
        nearest = int(np.bincount(np.asarray(rep.nn1_index, np.int64)).argmax())  # the most frequent nearest
        new = {i: [float(s["memorization_ratio"]), float(s["knn_distance"]), float(nearest)]}
        _append(part, new)
        done.update(new)
    files = getattr(train, "files", None)
    return {i: {"replica_rate": done[i][0], "knn_distance": done[i][1],
                "nearest_train": (files[int(done[i][2])] if files is not None else str(int(done[i][2])))}
            for i in order}


def _source_name(src) -> str:
    """A training SRC as recorded: an existing path made absolute, anything else (a dataset name, hf:) as given."""
    name = os.fspath(src)
    return str(Path(name).resolve()) if os.path.exists(name) else name


def _confirm_record(path: Path, record: dict) -> None:
    """The confirmation's training set and image count (parts/confirm.json, written with its first row): rows of
    another confirmation in the same folder are refused, never mixed."""
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(path, f"unreadable confirmation record ({exc.__class__.__name__}); move the folder "
                                   "away to start again") from None
        differ = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
        if differ:
            raise InputError(path.parent.parent, f"holds a confirmation with other {', '.join(differ)} "
                                                 f"({', '.join(f'{k} = {old.get(k)!r}' for k in differ)}); use "
                                                 "another --out")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
