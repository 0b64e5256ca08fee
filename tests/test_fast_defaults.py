"""Fast settings: bf16-mixed by default on CUDA only, channels_last selectable (default: CUDA only)."""

from __future__ import annotations

import torch

from structvae.cli import build_cli, fast_precision

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_bf16_mixed_is_the_default_only_on_a_bf16_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert fast_precision(None, "auto") == "bf16-mixed"
    assert fast_precision(None, "gpu") == "bf16-mixed"
    assert fast_precision("32-true", "auto") == "32-true"  # an explicit choice wins
    assert fast_precision(None, "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert fast_precision(None, "auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_precision(None, "auto") is None


def _weights(model, memory_format) -> list[bool]:
    return [p.is_contiguous(memory_format=memory_format) for p in model.parameters() if p.dim() == 4]


def test_channels_last_is_selectable_and_off_by_default_on_cpu(in_tmp):
    common = ["fit", "-c", "configs/experiment/digits.yaml", "--trainer.fast_dev_run=1", *QUIET]
    on = build_cli([*common, "--model.channels_last=true"])
    assert on.trainer.precision == "32-true" and all(_weights(on.model, torch.channels_last))
    assert not all(_weights(on.model, torch.contiguous_format))
    off = build_cli(common)
    assert all(_weights(off.model, torch.contiguous_format))
