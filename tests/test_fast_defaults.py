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


def _benchmark():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("train_step")


def test_the_benchmarks_ours_is_what_the_experiments_run():
    """``ours`` in benchmarks/train_step.py claims the settings the experiments use: the keep allocator, decoder
    checkpointing at 218×178 (the native experiments) and not at 64×64, bf16 + channels_last on CUDA."""
    from structvae.cli import resolved_config

    bench = _benchmark()
    assert bench.options_of("ours", "cpu", large=True) == {"keep", "ckpt"}
    assert bench.options_of("ours", "cpu", large=False) == {"keep"}
    assert bench.options_of("ours", "cuda", large=False) == {"keep", "cl", "bf16"}
    assert bench.options_of("ours-keep-ckpt+cl", "cpu", large=True) == {"cl"}
    for name, large in (("sosvae_celeba_native", True), ("betavae_celeba_native", True),
                        ("sosvae_resnet_celeba", False)):
        model = resolved_config(f"configs/experiment/{name}.yaml")["model"]
        for network in ("encoder", "decoder"):
            assert model[network]["init_args"]["checkpoint_blocks"] is large, (name, network)


def test_the_benchmark_refuses_configurations_it_cannot_run():
    import pytest

    bench = _benchmark()
    for name, message in (("torch+cl", "only the allocator"), ("ours+compile", "do not combine"),
                          ("ours+fast", "unknown configuration"), ("mine", "unknown configuration")):
        with pytest.raises(SystemExit, match=message):
            bench.options_of(name, "cpu", large=True)
