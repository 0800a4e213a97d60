"""The Stable Diffusion kind (sdmem.kinds): fine-tunes (full or LoRA) of a diffusers pipeline, reported from the
final weights' generated images."""

from __future__ import annotations

from ..kinds import Kind
from ..records import FINAL, SUBSET_INFO, read_record
from ..reporting import generate_and_audit
from .config import SDConfig
from .run import SDPaths


class SDKind(Kind):
    name = "sd"
    config = SDConfig
    paths = SDPaths
    layout = (("model.method", "model.rank"), ("data.prompt", "size"))  # the paper's Table 3

    def train(self, cfg, *, progress: bool = True) -> dict:
        from .train import train

        return train(cfg, progress=progress)

    def dry_run(self, cfg) -> dict:
        from .train import dry_run

        return dry_run(cfg)

    def trained_line(self, cfg, summary: dict) -> str:
        if summary.get("already_done"):
            return (f"already trained ({summary['steps']} steps, {summary['images_seen']} images seen); outputs in "
                    f"{summary['out_dir']}")
        final = summary.get("final") or {}
        return (f"trained {summary['steps']} steps ({summary['images_seen']} images seen) on {summary['num_train']} "
                "images" + (f"; last loss {summary['loss']:.4g}" if summary.get("loss") is not None else "")
                + f"; {cfg.model.method} weights ({final.get('weights', 'ema')}) in {summary['out_dir']}")

    def generate(self, run_dir, out_dir, *, seeds, progress=True, **options) -> int:
        from .generate import generate_run

        return generate_run(run_dir, out_dir, seeds=seeds, progress=progress, **options)

    def report(self, point, generate: dict, report: str, *, progress: bool, device: str) -> dict:
        from .components import resolve_pretrained
        from .generate import generate_run
        from .train import count_trainable

        cfg, paths = point.config, SDPaths(point.run_dir)
        final = read_record(paths.final, FINAL)
        pretrained = resolve_pretrained(cfg.model.pretrained, cfg.model.revision, download=False)
        row = {"num_params": count_trainable(cfg, pretrained),
               "size": int(read_record(paths.subset_info, SUBSET_INFO)["size"])}
        row.update(generate_and_audit(point, generate, generate_run, progress=progress, device=device))
        row.update(epoch=None, step=int(final["step"]), images_seen=int(final["images_seen"]))
        return row


KIND = SDKind()
