"""The EDM kind (sdmem.kinds): pixel-space DDPM++/NCSN++ runs, memorization tracked at every snapshot."""

from __future__ import annotations

from ..errors import InputError
from ..kinds import Kind
from ..records import SUBSET_INFO, TRACKED, read_record
from ..reporting import generate_and_audit, replace_audit
from .config import EDMConfig
from .run import EDMPaths


class EDMKind(Kind):
    name = "edm"
    config = EDMConfig
    paths = EDMPaths
    tracks_memorization = True
    numbers = ("best.json",)

    def tracking_log(self, run_dir):
        return EDMPaths(run_dir).tracking

    def train(self, cfg, *, progress: bool = True) -> dict:
        from .train import train

        return train(cfg, progress=progress)

    def dry_run(self, cfg) -> dict:
        from .train import dry_run

        return dry_run(cfg)

    def trained_line(self, cfg, summary: dict) -> str:
        best = summary.get("best")
        line = f"trained {summary['steps']} steps ({summary['epochs']:.1f} epochs) on {summary['num_train']} images"
        if best:
            line += (f"; highest memorization ratio {100 * best['memorization_ratio']:.2f}% at epoch {best['epoch']}"
                     f" (KNN distance {best['knn_distance']:.3f})")
        return line + f"; run folder {summary['out_dir']}"

    def generate(self, run_dir, out_dir, *, seeds, progress=True, guidance=None, compile=False, **options) -> int:
        from .generate import generate_run

        if guidance is not None:
            raise InputError("--guidance", "only SD runs take a guidance scale")
        if compile:
            raise InputError("--compile", "only SD pipelines and runs are compiled")
        return generate_run(run_dir, out_dir, seeds=seeds, progress=progress, **options)

    def sweep_settings(self, report: str, generate: dict) -> dict:
        # report: best judges the best snapshot on the same number of images as report: final does.
        return {"track.num_images": generate["num"]} if report == "best" else {}

    def report(self, point, generate: dict, report: str, *, progress: bool, device: str) -> dict:
        from .config import num_params

        paths = EDMPaths(point.run_dir)
        info = read_record(paths.subset_info, SUBSET_INFO)
        row = {"num_params": num_params(point.config, int(info["resolution"]), int(info["label_dim"])),
               "size": int(info["size"])}
        if report == "best":
            return {**row, **self._best(point, paths, progress, device)}
        from .generate import generate_run
        from .run import snapshot_info

        snaps = paths.list_snapshots()
        if not snaps:
            raise InputError(paths.snapshots, "holds no EMA snapshot to report (the run saved none)")
        epoch = max(snaps)
        row.update(generate_and_audit(point, generate, generate_run, progress=progress, device=device,
                                      snapshot=str(epoch)))
        meta = snapshot_info(snaps[epoch])[1]
        row.update(epoch=epoch, step=meta["step"], images_seen=meta["images_seen"])
        return row

    def _best(self, point, paths: EDMPaths, progress: bool, device: str) -> dict:
        """report: best: the tracked snapshot with the highest ratio (best.json), as the paper reports; its tracked
        audit (per-sample flags) becomes the point's audit: tracking/epoch-N/audit/, or tracking/epoch-N/ itself in a
        run tracked before the images were kept."""
        from .tracking import tracked_audit

        best = read_record(paths.best, TRACKED)
        lo, hi = best["memorization_ratio_ci95"]
        epoch = int(best["epoch"])
        tracked = tracked_audit(paths, epoch)
        if tracked is not None:
            replace_audit(point.dir / "audit", tracked)
        return {"memorization_ratio": best["memorization_ratio"], "memorization_ratio_low": lo,
                "memorization_ratio_high": hi, "knn_distance": best["knn_distance"], "epoch": epoch,
                "step": int(best["step"]), "images_seen": int(best["images_seen"]),
                "num_generated": int(best["num_generated"]),
                "fid": _best_fid(point, epoch, int(best["num_generated"]), progress, device)}


def _best_fid(point, epoch: int, num: int, progress: bool, device: str) -> float | None:
    """The FID of the best snapshot's tracked images when the Inception weights are in their default place (else
    None, an empty cell): computed on tracking/epoch-N/generated/ itself. A run tracked before the images were kept
    has them generated again from that EMA snapshot with the tracked seeds, batch and steps into generated/."""
    from ..fid import compute_fid, weights_available
    from .generate import generate_run
    from .tracking import tracked_generated

    if not weights_available():
        return None
    t = point.config.track
    seeds = list(range(t.seed, t.seed + num))
    folder = tracked_generated(EDMPaths(point.run_dir), epoch)
    if not _holds_seeds(folder, seeds):
        folder = point.dir / "generated"
        generate_run(point.run_dir, folder, seeds=seeds, snapshot=str(epoch), batch=t.batch, steps=t.steps,
                     device=device, progress=progress)
    return compute_fid(folder, point.run_dir, device=device, progress=progress).fid


def _holds_seeds(folder, seeds: list[int]) -> bool:
    """True when a generated folder's manifest records exactly ``seeds`` (the tracked images of a run since they
    are kept; tracking writes the manifest before the images and audits them all before its row is logged)."""
    from ..generation import MANIFEST, image_name, read_manifest

    if not (folder / MANIFEST).is_file():
        return False
    return set(read_manifest(folder)["images"]) == {image_name(s) for s in seeds}


KIND = EDMKind()
