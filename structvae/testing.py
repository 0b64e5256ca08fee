"""Helpers for tests and benchmarks only: nothing in the package imports this module.

Kept inside the package (not under ``tests/``) because ``benchmarks/fid.py`` uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as _tf_inception

__all__ = ["write_random_inception_weights"]


def write_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a RANDOM state dict of torch-fidelity's Inception-v3 architecture to ``path``.

    Only to exercise the weight-loading plumbing offline (tests, ``benchmarks/fid.py``): FIDs computed
    with these weights are NOT FIDs and must never be reported. He-normal conv weights keep the
    2048-d features at a sane scale, so numerical comparisons between implementations stay meaningful.
    """

    class _Unloaded(_tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # skip: there is nothing to load yet
            return None

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        # the constructor insists on fetching weights; hand it an empty dict instead of going online
        with mock.patch.object(_tf_inception, "load_state_dict_from_url", lambda *a, **k: {}):
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
