"""Evaluation metrics: FID of likelihood means and samples, Parzen-window log-likelihood, IWAE NLL.

Every metric is a torchmetrics ``Metric`` whose states are pooled sums, so values are exact under
DDP, and each has a pure-function counterpart usable without Lightning.
"""

import warnings
from typing import Any

from structvae.metrics.fid import (
    CACHE_ENV,
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    FIDResult,
    InceptionWeightsUnavailableError,
    MeanAndSampleFID,
    ReferenceKey,
    ReferenceStatus,
    frechet_distance,
    load_or_compute_reference,
    reference_cache_dir,
    resolve_inception_weights,
    to_inception_uint8,
)
from structvae.metrics.nll import (
    ApproximatePosterior,
    ImageLikelihood,
    LatentVariableModel,
    MeanNLL,
    NLLResult,
    Posterior,
    bits_per_dim,
    dequantize,
    importance_sampled_nll,
)
from structvae.metrics.parzen import (
    DEFAULT_PARZEN_SIGMAS,
    BandwidthScore,
    BandwidthSelection,
    ParzenEvaluation,
    ParzenLogLikelihood,
    ParzenResult,
    evaluate_parzen,
    parzen_log_likelihood,
    select_parzen_bandwidth,
)

__all__ = [
    "CACHE_ENV",
    "DEFAULT_PARZEN_SIGMAS",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "ApproximatePosterior",
    "BandwidthScore",
    "BandwidthSelection",
    "FIDResult",
    "ImageLikelihood",
    "InceptionWeightsUnavailableError",
    "LatentVariableModel",
    "MeanAndSampleFID",
    "MeanNLL",
    "NLLResult",
    "ParzenEvaluation",
    "ParzenLogLikelihood",
    "ParzenResult",
    "Posterior",
    "ReferenceKey",
    "ReferenceStatus",
    "bits_per_dim",
    "dequantize",
    "evaluate_parzen",
    "frechet_distance",
    "importance_sampled_nll",
    "load_or_compute_reference",
    "parzen_log_likelihood",
    "reference_cache_dir",
    "resolve_inception_weights",
    "select_parzen_bandwidth",
    "to_inception_uint8",
]


def __getattr__(name: str) -> Any:
    # Deprecated location (see README): the random-weights helper is test-only and lives in structvae.testing.
    if name == "write_random_inception_weights":
        warnings.warn(
            "structvae.metrics.write_random_inception_weights moved to structvae.testing",
            DeprecationWarning,
            stacklevel=2,
        )
        from structvae.testing import write_random_inception_weights

        return write_random_inception_weights
    raise AttributeError(f"module 'structvae.metrics' has no attribute {name!r}")
