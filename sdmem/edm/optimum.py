"""The closed-form optimal denoiser of a training set (paper Eq. 2 / Eq. 32; Eq. 61 per class) and its samples.

D*(x; σ) = Σ_n softmax_n(−||x − x_n||² / 2σ²) · x_n, computed exactly over the whole training set: the rows
stream in blocks, one GEMM gives a block's squared distances (``gemm.sqdist``) and a second GEMM its
weighted sum, and an online log-sum-exp merges the blocks, so memory is O(batch × block) and nothing
under/overflows even at σ = 0.002 (logits near −1e6).

fp32 cancellation: ||x||² + ||x_n||² − 2 x·x_n is off by ~1e-4 for 3072-dim images, i.e. ~10 logit units at
σ = 0.002, enough to mis-weigh near-duplicate training images (errors up to half a uint8 level). So for
σ < RESCORE_BELOW the ``rescore`` nearest rows of each query (top-k of the GEMM logits, kept out of the
streamed sums) are re-scored from the direct differences Σ (x − x_n)² summed in float64, which have no
cancellation: D* is then within ~1 fp32 ulp of the float64 softmax, and exactly the nearest image when it wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..audit.gemm import row_blocks, sqdist, sqnorms
from ..data.base import ImageSource
from ..errors import InputError
from ..generation import Plan, array_fingerprint, generate_folder, image_name
from .sampler import from_uint8, heun_sampler, seeded_class_labels, seeded_latents, to_uint8

_NEG_INF = float("-inf")
RESCORE_BELOW = 1.0  # σ under which the nearest rows are re-scored; above, fp32 GEMM logits are within ~1e-6


class OptimalDenoiser:
    """D*(x; σ) of a uint8 training set, unconditional (Eq. 32) or class-conditional (Eq. 61)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, *, device: str | torch.device = "cpu",
                 block_size: int | None = None, rescore: int = 8):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"expected uint8 [N>0, H, W, 3] training images, got {images.dtype} {images.shape}")
        self.device = torch.device(device)
        self.shape_chw = (3, images.shape[1], images.shape[2])
        self.block_size, self.rescore = block_size, int(rescore)
        data = from_uint8(images, self.device).reshape(len(images), -1)  # float32 [N, D], resident on device
        self._ranges: dict[int, tuple[int, int]] | None = None
        if labels is not None:
            labels = np.asarray(labels).reshape(-1).astype(np.int64)
            if len(labels) != len(images):
                raise ValueError(f"{len(labels)} labels for {len(images)} images")
            # Eq. 61 runs over one class's rows: sort rows by class once so each class is a contiguous range.
            order = np.argsort(labels, kind="stable")
            data = data[torch.as_tensor(order, device=self.device)]
            classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
            self._ranges = {int(c): (int(a), int(a + n)) for c, a, n in zip(classes, starts, counts)}
        self.data = data.contiguous()
        self.sqn = sqnorms(self.data)  # ||x_n||², computed once

    @property
    def classes(self) -> list[int] | None:
        """Sorted label values present in the training set (None when unconditional)."""
        return None if self._ranges is None else sorted(self._ranges)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """D*(x; σ) as float32 with x's shape; x [B, C, H, W] in data space, sigma a float or [B], labels int [B]."""
        batch = x.shape[0]
        q = x.reshape(batch, -1).to(self.device, torch.float32)
        if q.shape[1] != self.data.shape[1]:
            raise ValueError(f"x has {q.shape[1]} values per image, the training images {self.data.shape[1]}")
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=self.device).reshape(-1).expand(batch)
        sig_min = float(sig.min())  # the one host sync of a call
        if not sig_min > 0:
            raise ValueError("sigma must be > 0")
        if self._ranges is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional optimum (build it with labels=...)")
            return self._posterior_mean(q, sig, 0, self.data.shape[0], sig_min).reshape(x.shape)
        if class_labels is None:
            raise ValueError("the class-conditional optimum needs class_labels")
        lab = torch.as_tensor(class_labels).reshape(-1).to(self.device, torch.int64)
        if lab.numel() != batch:
            raise ValueError(f"expected one integer class label per image ({batch}), got {tuple(class_labels.shape)}")
        out = torch.empty_like(q)
        for c in torch.unique(lab).tolist():
            if c not in self._ranges:
                raise InputError("class_labels", f"class {c} has no training images (classes: {self.classes})")
            rows = torch.nonzero(lab == c).squeeze(1)
            # Eq. 61: the softmax runs over the training images of class c only.
            out[rows] = self._posterior_mean(q[rows], sig[rows], *self._ranges[c], sig_min)
        return out.reshape(x.shape)

    def _block(self, batch: int) -> int:
        """Training rows per block: the given block_size, else a [batch, block] tile of 32 MB (256 MB on CUDA)."""
        if self.block_size:
            return int(self.block_size)
        budget = 1 << (26 if self.device.type == "cuda" else 23)  # elements of one [batch, block] logit tile
        return max(1024, budget // max(batch, 1))

    def _posterior_mean(self, q: torch.Tensor, sig: torch.Tensor, a: int, b: int, sig_min: float) -> torch.Tensor:
        """Eq. 32 over training rows [a, b) for float32 queries q [B, D] with noise levels sig [B]."""
        batch, dim = q.shape
        q_sqn = sqnorms(q)
        neg_inv = (-0.5 / sig**2).to(torch.float32).unsqueeze(1)  # logit_n = −||x − x_n||² / 2σ²
        k = min(self.rescore, b - a) if sig_min < RESCORE_BELOW else 0
        m = torch.full((batch,), _NEG_INF, device=q.device)  # running max of the streamed logits
        s = torch.zeros(batch, device=q.device)  # running Σ exp(logit − m)
        acc = torch.zeros(batch, dim, device=q.device)  # running Σ exp(logit − m) · x_n
        cand_l = torch.full((batch, k), _NEG_INF, device=q.device)  # top-k rows, kept out of the stream
        cand_i = torch.zeros((batch, k), dtype=torch.int64, device=q.device)
        for start, stop in row_blocks(b - a, self._block(batch)):
            xb = self.data[a + start : a + stop]
            # Eq. 32 logits from one GEMM: −(||x||² + ||x_n||² − 2 x·x_n) / 2σ².
            logits = sqdist(q, xb, q_sqn, self.sqn[a + start : a + stop]).mul_(neg_inv)
            evicted = None
            if k:
                blk_l, blk_i = logits.topk(min(k, stop - start), dim=1)
                all_l, all_i = torch.cat([cand_l, blk_l], 1), torch.cat([cand_i, blk_i + (a + start)], 1)
                cand_l, sel = all_l.topk(k, dim=1)
                kept = torch.zeros_like(all_l, dtype=torch.bool).scatter_(1, sel, True)
                logits.scatter_(1, blk_i, blk_l.masked_fill(kept[:, k:], _NEG_INF))  # new candidates leave
                if start:  # old candidates pushed out of the top-k join the stream
                    evicted = (all_l[:, :k].masked_fill(kept[:, :k], _NEG_INF), all_i[:, :k])
                cand_i = all_i.gather(1, sel)
            # Online log-sum-exp: rescale the running sums to the new max before adding this block.
            m_new = torch.maximum(m, logits.amax(1))
            if evicted is not None:
                m_new = torch.maximum(m_new, evicted[0].amax(1))
            ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            scale = torch.exp(m - ref)
            p = torch.exp(logits.sub_(ref.unsqueeze(1)))
            s = s * scale + p.sum(1)
            acc = acc.mul_(scale.unsqueeze(1)).addmm_(p, xb)  # second GEMM: weights @ block
            if evicted is not None:
                pe = torch.exp(evicted[0] - ref.unsqueeze(1))
                qi, j = torch.nonzero(pe > 0, as_tuple=True)
                if qi.numel():
                    s = s + pe.sum(1)
                    acc.index_add_(0, qi, pe[qi, j].unsqueeze(1) * self.data.index_select(0, evicted[1][qi, j]))
            m = m_new
        if not k:
            return acc / s.unsqueeze(1)
        return self._rescore(q, sig, cand_l, cand_i, m, s, acc)

    def _rescore(self, q, sig, cand_l, cand_i, m, s, acc) -> torch.Tensor:
        """Eq. 32 with the candidates' weights re-scored from direct differences, merged with the streamed rest."""
        out = torch.empty_like(q)
        # CPU: chunks of a few MB per thread, so the [b, k, D] gather stays in cache.
        chunk = q.shape[0] if q.is_cuda else 16 * torch.get_num_threads()
        for lo, hi in row_blocks(q.shape[0], chunk):
            xc = self.data.index_select(0, cand_i[lo:hi].reshape(-1)).view(hi - lo, -1, q.shape[1])
            # Eq. 32 logits from Σ (x − x_n)²: fp32 differences and squares (relative error ≤ eps), float64 sum.
            dc = torch.sum((xc - q[lo:hi].unsqueeze(1)).square_(), dim=2, dtype=torch.float64)
            lc = dc * (-0.5 / sig[lo:hi] ** 2).unsqueeze(1)
            # Shift the streamed logits by the candidates' mean (GEMM − exact) error: that common part (mostly
            # the rounding of ||x||², ~1e-4 logits at σ = 80) cancels within the stream and must cancel here too.
            m_r = m[lo:hi].double() - (cand_l[lo:hi].double() - lc).mean(1)
            top = torch.maximum(lc.amax(1), m_r)
            wc, wr = torch.exp(lc - top.unsqueeze(1)), torch.exp(m_r - top)
            den = wc.sum(1) + wr * s[lo:hi].double()
            # Softmax-weighted sum: candidates exactly (one-hot weights give the image bit for bit), then the rest.
            out[lo:hi] = ((wc / den.unsqueeze(1)).float().unsqueeze(2) * xc).sum(1)
            out[lo:hi] += (wr / den).float().unsqueeze(1) * acc[lo:hi]
        return out


def optimum_plan(source: ImageSource, *, class_conditional: bool = False, steps: int = 18, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Plan:
    """The generation plan of the optimum of ``source``: made by its training set's fingerprint (images, and labels
    when class-conditional), so a folder is never extended from another training set."""
    if len(source) == 0:
        raise InputError(source.name, "no training images")
    if class_conditional and source.labels is None:
        raise InputError(source.name, "class-conditional sampling needs class labels, and this source has none")
    images = source.load()
    labels = np.asarray(source.labels, dtype=np.int64) if class_conditional else None
    classes = None if labels is None else np.unique(labels)
    h, w = images.shape[1:3]
    settings = {"made_by": {"kind": "optimum", "train_fingerprint": array_fingerprint(images, labels),
                            "class_conditional": class_conditional},
                "sampler": "edm-heun", "steps": steps, "batch": batch_size, "size": [int(h), int(w)]}

    def condition(seed: int) -> dict:
        if classes is None:
            return {}
        return {"class": int(classes[int(seeded_class_labels([seed], len(classes))[0])])}

    def load():
        denoiser = OptimalDenoiser(images, labels, device=device)

        def render(seeds: list[int], conds: list[dict]) -> np.ndarray:
            latents = seeded_latents(seeds, denoiser.shape_chw, denoiser.device)
            lab = None if classes is None else torch.tensor([c["class"] for c in conds], device=denoiser.device)
            return to_uint8(heun_sampler(denoiser, latents, lab, num_steps=steps))
        return render

    return Plan(settings, condition, load, {"train": str(source.name), "device": str(device)})


def sample_optimum(source: ImageSource, num: int, out_dir, *, class_conditional: bool = False, steps: int = 18,
                   seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                   progress: bool = True) -> list[Path]:
    """Heun-sample the optimum of `source` for seeds seed..seed+num−1 into out_dir/{seed:06d}.png (resumable)."""
    if seed < 0:
        raise InputError("--seed", f"must be >= 0, got {seed}")
    plan = optimum_plan(source, class_conditional=class_conditional, steps=steps, batch_size=batch_size,
                        device=device)
    seeds = list(range(seed, seed + num))
    generate_folder(out_dir, seeds, plan, progress=progress, desc="optimum")
    return [Path(out_dir) / image_name(s) for s in seeds]
