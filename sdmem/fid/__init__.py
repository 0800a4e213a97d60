"""FID (the paper's Appendix E): Inception-v3 pool features, reference statistics, the Fréchet distance.

The features are the standard 2048-d pool3 features of the TensorFlow Inception-v3 used by every published FID
(EDM's included), computed by torch-fidelity's PyTorch port (``FeatureExtractorInceptionV3``, feature ``2048``:
uint8 images of any size, resized to 299 x 299 the way TF1 did). Its weights are one local file (nothing is
downloaded at run time): ``--weights FILE``, else ``$SDMEM_INCEPTION_WEIGHTS``, else
``<cache>/weights-inception-2015-12-05-6726825d.pth`` (see :func:`cache_root`). The file is loaded without
unpickling anything (safetensors, or ``torch.load(weights_only=True)``) and checked against the network's keys and
shapes before the network sees it.

Statistics are (mu [2048], sigma [2048, 2048]) in float64, accumulated in batches (memory does not grow with the
number of images). EDM's reference files (``np.savez(path, mu=mu, sigma=sigma)``, e.g. ``cifar10-32x32.npz``) are
read as they are; statistics of a reference image set are cached under ``<cache>/fid-ref/`` in the same format,
keyed by a sha256 over its pixels and shape and the weights' digest.
"""

from __future__ import annotations

from .distance import FidResult, compute_fid, frechet_distance, open_reference
from .inception import (FEATURE_DIM, TORCH_FIDELITY, WEIGHTS_NAME, WEIGHTS_URL, Extractor, cache_root,
                        check_state_dict, default_weights_path, expected_shapes, load_extractor, resolve_weights,
                        state_digest, weights_available)
from .stats import STATS_VERSION, Stats, _Moments, pixels_key, read_stats, reference_stats, source_stats, write_stats

__all__ = ["FEATURE_DIM", "STATS_VERSION", "TORCH_FIDELITY", "WEIGHTS_NAME", "WEIGHTS_URL", "Extractor", "FidResult",
           "Stats", "_Moments", "cache_root", "check_state_dict", "compute_fid", "default_weights_path",
           "expected_shapes", "frechet_distance", "load_extractor", "open_reference", "pixels_key", "read_stats",
           "reference_stats", "resolve_weights", "source_stats", "state_digest", "weights_available", "write_stats"]
