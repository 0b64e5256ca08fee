"""Helpers for tests and benchmarks only: nothing in the package imports this module.

Kept inside the package (not under ``tests/``) because ``benchmarks/fid.py`` uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from structvae.private_api import inception_weights_not_downloaded

__all__ = ["write_random_inception_weights"]


def write_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a RANDOM state dict of torch-fidelity's Inception-v3 architecture to ``path``.

    Only to exercise the weight-loading plumbing offline (tests, ``benchmarks/fid.py``): FIDs computed
    with these weights are NOT FIDs and must never be reported. He-normal conv weights keep the
    2048-d features at a sane scale, so numerical comparisons between implementations stay meaningful.
    """

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # skip: there is nothing to load yet
            return None

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with inception_weights_not_downloaded():  # the constructor insists on fetching weights
            net = _Unloaded("inception-v3-random", ["2048"])
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    finally:
        torch.random.set_rng_state(generator_state)
    return path
