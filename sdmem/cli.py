"""The `sdmem` command: one entry point with subcommands."""

from __future__ import annotations

import argparse
import sys

from .errors import InputError, SdmemError


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {value}")
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
    p.add_argument("--resolution", type=_positive_int("--resolution"), metavar="R",
                   help="centre-crop and Lanczos-resize every image to R x R")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="search over every training image, exact duplicates included (d1 = d2 hides replicas)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_audit)


def _run_audit(args) -> int:
    from .audit.api import audit

    report = audit(args.train, args.generated, out=args.out, backend=args.backend, device=args.device,
                   threshold=args.threshold, resolution=args.resolution, dedup=not args.keep_duplicates,
                   progress=not args.quiet)
    print(report.one_line() + (f"; report in {args.out}" if args.out else ""))
    return 0


def _add_optimum(sub) -> None:
    p = sub.add_parser("optimum", help="sample the closed-form optimal denoiser of a training set (paper Eq. 2)",
                       description="Samples D*(x; sigma) = sum_n softmax(-||x - x_n||^2 / 2 sigma^2)_n x_n with "
                                   "EDM's Heun sampler; one PNG per seed, named by the seed.")
    p.add_argument("--train", required=True, metavar="SRC")
    p.add_argument("--num", required=True, type=_positive_int("--num"), metavar="N")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--class-conditional", action="store_true", help="the class-conditional optimum (Eq. 61)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=18)
    p.add_argument("--seed", type=int, default=0, help="first seed; images use seeds S .. S+N-1")
    p.add_argument("--batch", type=_positive_int("--batch"), default=256)
    p.add_argument("--resolution", type=_positive_int("--resolution"), metavar="R")
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
    p = sub.add_parser("demo", help="the main job on embedded data: optimum samples vs real held-out digits",
                       description="Audits samples of the theoretical optimum and real held-out digits against a "
                                   "subset of scikit-learn's digits: replicas vs novel images. No downloads.")
    p.add_argument("--out", default="demo_out", metavar="DIR")
    p.add_argument("--train-size", type=_positive_int("--train-size"), default=500)
    p.add_argument("--num", type=_positive_int("--num"), default=500, help="optimum samples and held-out images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, train_size=args.train_size, num=args.num, seed=args.seed, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sdmem", description="Does a diffusion model memorize its training data?")
    parser.add_argument("--version", action="version", version=f"sdmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_audit(sub)
    _add_optimum(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SdmemError as exc:
        print(f"sdmem {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sdmem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
