"""The `sdmem` command: one entry point with subcommands."""

from __future__ import annotations

import argparse
import math
import sys

from .errors import InputError, SdmemError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``sdmem CMD: error: ...``, exit 2), like every other sdmem error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _finite_float(name: str, lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {text!r}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"{name}: expected a finite number in [{lo:g}, {hi:g}], got {text!r}")
        return value
    return parse


def _positive_int(name: str, most: int = 1 << 31):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {text!r}") from None
        if not 0 < value <= most:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer up to {most}, got {value}")
        return value
    return parse


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="find replicas of training images among generated images",
                       description="Exact 2-nearest-neighbour audit with the paper's rule: a generated image is a "
                                   "replica when d1/d2 < 1/3 (RMS l2 in 0-255 pixel units).")
    p.add_argument("--train", required=True, metavar="SRC", help="training images (folder, npz, EDM zip/folder, "
                   "CIFAR-10 archive, Imagenette folder, hf:NAME[:SPLIT])")
    p.add_argument("--generated", required=True, metavar="SRC", help="generated images, any SRC format")
    p.add_argument("--out", metavar="DIR", help="write summary.json, per_sample.csv, replicas.png, ratio_hist.png")
    p.add_argument("--backend", default="auto", choices=["auto", "int8", "faiss", "torch"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threshold", default="1/3", help="replica iff d1/d2 < T, T in (0, 1] (default 1/3)")
    p.add_argument("--resolution", type=_positive_int("--resolution", 8192), metavar="R",
                   help="centre-crop and Lanczos-resize every image to R x R")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="search over every training image, exact duplicates included (d1 = d2 hides replicas)")
    p.add_argument("--fid", action="store_true", help="also the FID of the generated set against the training set "
                   "(Inception-v3 weights: --fid-weights, $SDMEM_INCEPTION_WEIGHTS or the cache; see `sdmem fid`)")
    p.add_argument("--fid-weights", metavar="FILE", help="with --fid: the Inception-v3 weights file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_audit)


def _run_audit(args) -> int:
    # Under `accelerate launch` / `torchrun` the training set is split across the processes; rank 0 reports.
    from .audit.api import audit_distributed

    if args.fid_weights is not None and not args.fid:
        raise InputError("--fid-weights", "only with --fid")
    report = audit_distributed(args.train, args.generated, out=args.out, backend=args.backend, device=args.device,
                               threshold=args.threshold, resolution=args.resolution,
                               dedup=not args.keep_duplicates, progress=not args.quiet,
                               fid=args.fid, fid_weights=args.fid_weights)
    if report is not None:
        print(report.one_line() + (f"; report in {args.out}" if args.out else ""))
    return 0


def _add_fid(sub) -> None:
    from .fid import WEIGHTS_NAME, WEIGHTS_URL

    p = sub.add_parser("fid", help="Frechet Inception distance of generated images against a reference set",
                       description="FID with the standard Inception-v3 pool3 features (torch-fidelity's port of the "
                                   "TensorFlow network; paper Appendix E). The weights are a local file, "
                                   f"{WEIGHTS_NAME} from {WEIGHTS_URL}: --weights, $SDMEM_INCEPTION_WEIGHTS, or "
                                   "$XDG_CACHE_HOME/sdmem (~/.cache/sdmem). Statistics of a reference image set are "
                                   "cached under the same folder in fid-ref/; EDM's reference .npz files (mu, sigma) "
                                   "are read as they are.")
    p.add_argument("--generated", required=True, metavar="SRC", help="generated images, any SRC format")
    p.add_argument("--ref", required=True, metavar="SRC|STATS.npz",
                   help="reference images (e.g. the training set; any SRC) or a statistics .npz with mu and sigma")
    p.add_argument("--weights", metavar="FILE", help=f"Inception-v3 weights ({WEIGHTS_NAME}, or the same state dict "
                   "as .safetensors)")
    p.add_argument("--batch", type=_positive_int("--batch", 4096), default=64, help="images per batch (default 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resolution", type=_positive_int("--resolution", 8192), metavar="R",
                   help="centre-crop and Lanczos-resize the images to R x R first (Inception then resizes to 299)")
    p.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_fid)


def _run_fid(args) -> int:
    import json
    import os

    from .fid import compute_fid
    from .utils import atomic_write_text

    if args.out is not None and os.path.isdir(args.out):
        raise InputError(args.out, "is a folder; --out takes a .json file name")
    result = compute_fid(args.generated, args.ref, weights=args.weights, device=args.device, batch=args.batch,
                         resolution=args.resolution, progress=not args.quiet)
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result.to_dict(), indent=2) + "\n")
    print(result.one_line() + (f"; written to {args.out}" if args.out else ""))
    return 0


def _add_optimum(sub) -> None:
    p = sub.add_parser("optimum", help="sample the closed-form optimal denoiser of a training set (paper Eq. 2)",
                       description="Samples D*(x; sigma) = sum_n softmax(-||x - x_n||^2 / 2 sigma^2)_n x_n with "
                                   "EDM's Heun sampler; one PNG per seed, named by the seed.")
    p.add_argument("--train", required=True, metavar="SRC")
    p.add_argument("--num", required=True, type=_positive_int("--num", 10_000_000), metavar="N")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--class-conditional", action="store_true", help="the class-conditional optimum (Eq. 61)")
    p.add_argument("--steps", type=_positive_int("--steps", 1000), default=18)
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0, help="first seed; images use seeds S .. S+N-1")
    p.add_argument("--batch", type=_positive_int("--batch", 4096), default=256)
    p.add_argument("--resolution", type=_positive_int("--resolution", 8192), metavar="R")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_optimum)


def _run_optimum(args) -> int:
    from .data import open_source
    from .edm.optimum import sample_optimum
    from .utils import resolve_device

    source = open_source(args.train, resolution=args.resolution, labels=args.class_conditional)
    paths = sample_optimum(source, args.num, args.out, class_conditional=args.class_conditional,
                           steps=args.steps, seed=args.seed, batch_size=args.batch,
                           device=resolve_device(args.device), progress=not args.quiet)
    print(f"{len(paths)} optimum samples (seeds {args.seed}-{args.seed + args.num - 1}) in {args.out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on embedded data: memorization against |D| (EDM, real digits) and "
                                    "against LoRA rank (a tiny Stable Diffusion trained here)",
                       description="Two studies on data that ships with scikit-learn and scikit-image, no downloads. "
                                   "EDM part (into DIR): EDM models trained on real digits of three |D| (the same steps "
                                   "each), audited with the paper's rule, the ratio against |D| and the EMM beside the "
                                   "theoretical optimum and held-out digits. SD part (into DIR/sd): the tiny SD, "
                                   "pretrained here on first use and cached, fine-tuned on photo crops with LoRA of "
                                   "several ranks and fully, laid out as the paper's Table 3. Timings on 2 CPU cores "
                                   "are in the README. Re-running resumes.")
    p.add_argument("--out", default="demo_out", metavar="DIR")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps: a first look")
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--part", default="all", choices=["all", "edm", "sd"],
                   help="run one part: edm (|D| on digits, into DIR) or sd (LoRA ranks on the tiny SD, into DIR/sd)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, progress=not args.quiet,
             part=args.part)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run from a YAML config",
                       description="Trains the run a config describes; re-running the same command resumes it. "
                                   "Also works under `accelerate launch -m sdmem train CONFIG`.")
    p.add_argument("config", metavar="CONFIG", help="YAML run config (kind: edm or sd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by its dotted path (repeatable), e.g. --set data.size=1000")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON (with num_params)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    import json

    from . import kinds
    from .runs import load_config

    cfg = load_config(args.config, args.overrides)
    kind = kinds.get(cfg.kind)
    if args.dry_run:
        print(json.dumps(kind.dry_run(cfg), indent=2))
        return 0
    summary = kind.train(cfg, progress=not args.quiet)
    if summary.get("main_process", True):  # one line per run, not per process
        print(kind.trained_line(cfg, summary))
    return 0


def _nonneg_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 0, got {text!r}") from None
        if not 0 <= value < 1 << 31:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer in [0, 2^31), got {value}")
        return value
    return parse


def _seed_range(text: str) -> tuple[int, int]:
    try:
        a, _, b = text.partition("-")
        lo, hi = int(a), int(b) if b else int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected A-B (e.g. 0-9999), got {text!r}") from None
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"--seeds: expected 0 <= A <= B, got {text!r}")
    return lo, hi


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample a trained run or any diffusers text-to-image model",
                       description="One PNG per seed ({seed:06d}.png) through the generation core (seed grid, manifest, "
                                   "verified resume). EDM runs: the EMA snapshot, Heun sampler. SD runs: the final (EMA) "
                                   "weights or a checkpoint step, DDIM with 50 steps, safety checker off; class prompts "
                                   "give N/C images per class in seed order (recorded in manifest.json). --model: any "
                                   "diffusers pipeline folder or cached hub id, optionally with a LoRA (diffusers or "
                                   "kohya format), with --prompt, --prompts or --class-prompts.")
    p.add_argument("run", metavar="RUN", nargs="?", help="run folder (out_dir of sdmem train); or give --model")
    p.add_argument("--model", metavar="DIR|HUB_ID|PKL", help="a diffusers text-to-image pipeline not trained by sdmem, "
                   "or a published EDM network pickle (edm-*.pkl, loaded without running any code in it)")
    p.add_argument("--lora", metavar="FILE", help="with --model: a LoRA file or folder (diffusers or kohya format)")
    p.add_argument("--revision", help="with --model: the hub revision (in the local cache)")
    p.add_argument("--prompt", metavar="TEXT", help="with --model: the prompt of every image")
    p.add_argument("--prompts", metavar="FILE", help="with --model: one prompt per line; seed s gets line s mod L")
    p.add_argument("--class-prompts", metavar="FOLDER", help="with --model: class sub-folders (e.g. Imagenette); N/C "
                   "images per class in seed order, prompt from --template")
    p.add_argument("--template", help="with --class-prompts (default: 'a picture of a {class}')")
    p.add_argument("--resolution", type=_positive_int("--resolution", 8192), metavar="R",
                   help="with --model: image size (default: the model's)")
    p.add_argument("--num", type=_positive_int("--num", 10_000_000), metavar="N", help="images (seeds 0..N-1 unless --seeds)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--snapshot", default="latest", help="latest or an epoch number K (EDM); latest/final or a "
                   "checkpoint step (SD)")
    p.add_argument("--seeds", type=_seed_range, metavar="A-B", help="inclusive seed range")
    p.add_argument("--class", dest="class_label", default="random", metavar="C|random",
                   help="class label for conditional runs (default: random per seed); SD class prompts: a class "
                        "index or name (default: N/C images per class)")
    p.add_argument("--batch", type=_positive_int("--batch", 4096), help="images per batch (default 256 EDM; SD: the run's generate.batch)")
    p.add_argument("--steps", type=_positive_int("--steps", 1000), help="sampler steps (default 18 EDM, 50 SD)")
    p.add_argument("--guidance", type=_finite_float("--guidance", 0, 100), metavar="W", help="SD classifier-free guidance scale (default: the "
                   "run's generate.guidance_scale, 7.5)")
    p.add_argument("--compile", action="store_true", help="SD: run the UNet through torch.compile (faster after a "
                   "compile of a minute or more; images then equal the uncompiled ones only within a tolerance, and "
                   "the folder records it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    if args.seeds is None and args.num is None:
        raise InputError("--num", "give --num N or --seeds A-B")
    lo, hi = args.seeds if args.seeds else (0, args.num - 1)
    if args.seeds and args.num is not None and args.num != hi - lo + 1:
        raise InputError("--num", f"--num {args.num} disagrees with --seeds {lo}-{hi} ({hi - lo + 1} seeds)")
    if (args.run is None) == (args.model is None):
        raise InputError("RUN/--model", "give a run folder or --model DIR|HUB_ID (one of them)")
    foreign = ("--lora", "--revision", "--prompt", "--prompts", "--class-prompts", "--resolution")
    if args.model is None and any(getattr(args, o[2:].replace("-", "_")) is not None for o in foreign):
        raise InputError(next(o for o in foreign if getattr(args, o[2:].replace("-", "_")) is not None),
                         "only with --model (a run folder carries its own model and prompts)")
    if args.model is not None and str(args.model).lower().endswith(".pkl"):
        from .edm.generate import pickle_plan
        from .generation import generate_folder

        if args.guidance is not None or args.lora or args.prompt or args.prompts or args.class_prompts:
            raise InputError(args.model, "an EDM network pickle takes no guidance, LoRA or prompts (--class picks "
                                         "the class of a conditional network)")
        if args.compile:
            raise InputError("--compile", "only SD pipelines and runs are compiled")
        plan = pickle_plan(args.model, class_label=args.class_label, device=args.device,
                           **_given(batch=args.batch, steps=args.steps))
        written = generate_folder(args.out, list(range(lo, hi + 1)), plan, progress=not args.quiet)
        print(f"{hi - lo + 1} images (seeds {lo}-{hi}, {written} new) in {args.out}")
        return 0
    if args.model is not None:
        from .generation import generate_folder
        from .sd.foreign import foreign_plan

        seeds = list(range(lo, hi + 1))
        plan = foreign_plan(args.model, seeds, lora=args.lora, prompt=args.prompt, prompts_file=args.prompts,
                            class_prompts=args.class_prompts, resolution=args.resolution, revision=args.revision,
                            device=args.device, compile=args.compile,
                            **_given(template=args.template, steps=args.steps, guidance=args.guidance,
                                     batch=args.batch))
        written = generate_folder(args.out, seeds, plan, progress=not args.quiet)
        print(f"{hi - lo + 1} images (seeds {lo}-{hi}, {written} new) in {args.out}")
        return 0
    from . import kinds
    from .runs import run_kind

    written = kinds.get(run_kind(args.run)).generate(
        args.run, args.out, seeds=list(range(lo, hi + 1)), progress=not args.quiet, device=args.device,
        **_given(snapshot=args.snapshot, class_label=args.class_label, batch=args.batch, steps=args.steps,
                 guidance=args.guidance, compile=args.compile or None))
    print(f"{hi - lo + 1} images (seeds {lo}-{hi}, {written} new) in {args.out}")
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train, generate and audit a grid of runs from one spec; collect results.csv",
                       description="Runs every point of a sweep spec (axes: a product; zip: values that move together) "
                                   "not yet finished: train (resuming), generate, audit; then writes OUT_DIR/results.csv "
                                   "and results.md. Points are claimed, so concurrent workers (--shard) never run one "
                                   "twice.")
    p.add_argument("spec", metavar="SPEC", help="sweep spec (YAML)")
    p.add_argument("--dry-run", action="store_true", help="list the points with their parameter counts; write nothing")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="only the points with this swept value (repeatable)")
    p.add_argument("--shard", metavar="I/N", help="this worker's deterministic share: points I, I+N, ... (1-based)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from .study.sweep import dry_run, load_spec, markdown_table, parse_shard, run_sweep

    spec = load_spec(args.spec)
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.dry_run:
        rows = dry_run(spec, only=args.only, shard=shard)
        cols = ["point", *spec.swept, "size", "num_params", "status"]
        print(markdown_table(rows, cols), end="")
        print(f"{len(rows)} points; nothing was written")
        return 0
    rows = run_sweep(spec, only=args.only, shard=shard, progress=not args.quiet, device=args.device)
    from .study.sweep import launched

    if launched()[0] == 0:  # one summary line per sweep, not per process
        print(f"{len(rows)} finished points in {spec.out_dir / 'results.csv'}")
    return 0


def _given(**options) -> dict:
    """The options the user gave (not None): the callee owns every default."""
    return {k: v for k, v in options.items() if v is not None}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_io_error(exc: BaseException) -> str | None:
    """One line for an error that comes from reading, decoding or writing a file (or memory): the path when the
    error knows it, and the problem. None for anything else (a bug: its traceback is kept)."""
    import json
    import tarfile
    import zipfile
    import zlib

    if isinstance(exc, OSError):
        import errno

        where = exc.filename if exc.filename is not None else "file system"
        if isinstance(where, bytes):
            where = where.decode("utf-8", "backslashreplace")
        advice = {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EEXIST: "already exists",
                  errno.ENOTDIR: "a path component is a file, not a folder", errno.EISDIR: "is a folder",
                  errno.EXDEV: "cannot rename across file systems"}.get(exc.errno)
        detail = exc.strerror or str(exc)
        return f"{where}: {advice or detail}" + (f" ({detail})" if advice and detail != advice else "")
    if isinstance(exc, MemoryError):
        return "out of memory (a size option is too large for this machine: lower --batch, --num or --resolution)"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc})"
    if isinstance(exc, UnicodeError):
        return f"a file or file name is not valid UTF-8 ({exc})"
    if isinstance(exc, (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, zlib.error, EOFError)):
        return f"corrupt or unsupported archive ({exc.__class__.__name__}: {exc})"
    try:
        from safetensors import SafetensorError
        if isinstance(exc, SafetensorError):
            return f"corrupt safetensors file ({exc})"
    except ImportError:  # pragma: no cover
        pass
    try:
        from PIL import Image, UnidentifiedImageError
        if isinstance(exc, (UnidentifiedImageError, Image.DecompressionBombError)):
            return f"unreadable image ({exc})"
    except ImportError:  # pragma: no cover
        pass
    return None


def _add_detect(sub) -> None:
    p = sub.add_parser("detect", help="per-prompt memorization scores from the model alone (no training images)",
                       description="Scores each prompt for memorization from a text-to-image model alone: wen "
                                   "(Wen et al., ICLR 2024: the text-conditional noise prediction's magnitude at the "
                                   "first sampling steps), aniso (Asthana & Belagiannis, ICLR 2026: that norm on pure "
                                   "noise plus the alignment of the guidance vector with the unconditional "
                                   "prediction at a low-noise step) and collapse (the prompt's own images collapsing "
                                   "onto near-copies, exact nearest neighbours). Higher = more likely memorized. "
                                   "Detection, not proof: --confirm TRAIN --top K audits the top prompts against the "
                                   "training images. Resumable: re-run the same command.")
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID|RUN",
                   help="an sdmem SD run, a diffusers pipeline folder, or a hub id in the local cache")
    p.add_argument("--lora", metavar="FILE", help="a LoRA in diffusers' or kohya's format (with --model DIR|HUB_ID)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="UTF-8 text, one prompt per line")
    p.add_argument("--method", default="all", metavar="wen|aniso|collapse|all",
                   help="one method, a comma-separated list, or all (default); the first ranks scores.md")
    p.add_argument("--seeds", type=_positive_int("--seeds", 64), default=4,
                   help="noise seeds per prompt for wen and aniso (Wen et al.: 4; default 4)")
    p.add_argument("--steps", type=_positive_int("--steps", 50), default=1,
                   help="wen: the first K DDIM steps of a 50-step schedule averaged (their detection: 1)")
    p.add_argument("--guidance", type=_finite_float("--guidance", 1.0, 100.0), default=7.5)
    p.add_argument("--aniso-weights", default="1,2", metavar="G1,G2",
                   help="aniso = G1 * norm + G2 * cosine (their SD v1 weights: 1,2; SD v2: 1,0.1)")
    p.add_argument("--collapse-seeds", type=_positive_int("--collapse-seeds", 1024), default=16,
                   help="collapse: images per prompt (default 16)")
    p.add_argument("--collapse-steps", type=_positive_int("--collapse-steps", 1000), default=20,
                   help="collapse and --confirm: DDIM steps of those images (default 20)")
    p.add_argument("--labels", metavar="FILE", help="0/1 per prompt (1 = memorized): ROC, AUC and TPR at 1%% FPR")
    p.add_argument("--confirm", metavar="TRAIN_SRC", help="audit the top prompts against these training images")
    p.add_argument("--top", type=_positive_int("--top"), default=10, help="with --confirm: how many prompts")
    p.add_argument("--confirm-num", type=_positive_int("--confirm-num", 10000), default=16,
                   help="with --confirm: images per prompt")
    p.add_argument("--batch", type=_positive_int("--batch", 4096), default=16, help="rows per UNet call")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_detect)


def _run_detect(args) -> int:
    from .sd.detect import METHODS, DetectSettings, run_detect

    methods = METHODS if args.method == "all" else tuple(m.strip() for m in args.method.split(",") if m.strip())
    try:
        weights = tuple(float(x) for x in args.aniso_weights.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 2 or not all(math.isfinite(w) for w in weights):
        raise InputError("--aniso-weights", f"expected two numbers G1,G2, got {args.aniso_weights!r}")
    settings = DetectSettings(methods=methods, seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance,
                              aniso_weights=weights, collapse_seeds=args.collapse_seeds,
                              collapse_steps=args.collapse_steps, batch=args.batch)
    run_detect(args.model, args.prompts, args.out, settings=settings, lora=args.lora, labels_file=args.labels,
               confirm=args.confirm, top=args.top, confirm_num=args.confirm_num, device=args.device,
               progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sdmem", description="Does a diffusion model memorize its training data?")
    parser.add_argument("--version", action="version", version=f"sdmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_audit(sub)
    _add_fid(sub)
    _add_optimum(sub)
    _add_demo(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_sweep(sub)
    _add_detect(sub)
    from .study import compare, curves, emm

    for study in (emm, compare, curves):
        study.add_parser(sub)
    from .data import named

    named.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SdmemError as exc:
        print(f"sdmem {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 (only the file, codec and memory errors below; the rest re-raised)
        problem = describe_io_error(exc)
        if problem is None:
            raise
        print(f"sdmem {args.command}: error: {_one_line(problem)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdmem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
