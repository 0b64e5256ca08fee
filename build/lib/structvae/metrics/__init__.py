"""Evaluation metrics: FID of likelihood means and samples, Parzen-window log-likelihood, IWAE NLL.

Every metric is a torchmetrics ``Metric`` whose states are pooled sums, so values are exact under
DDP, and each has a pure-function counterpart usable without Lightning.
"""

from structvae.metrics.fid import FIDResult, MeanAndSampleFID, frechet_distance
from structvae.metrics.fid_reference import (
    CACHE_ENV,
    ReferenceKey,
    ReferenceStatus,
    load_or_compute_reference,
    reference_cache_dir,
)
from structvae.metrics.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    InceptionWeightsUnavailableError,
    resolve_inception_weights,
    to_inception_uint8,
)
from structvae.metrics.nll import (
    ApproximatePosterior,
    ImageLikelihood,
    LatentVariableModel,
    MeanNLL,
    NLLResult,
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
