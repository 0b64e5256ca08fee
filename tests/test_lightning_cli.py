"""The LightningCLI layer: fast settings (bf16-mixed opt-in, not yet checked on a device; channels_last selectable,
default CUDA only) and settings refused while building (one line, exit code 2, or the output folder named)."""

from __future__ import annotations

import pytest
import torch
from support import QUIET, one_error_line

from structvae.cli import main
from structvae.lightning_cli import build_cli, fast_precision

SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def test_bf16_is_opt_in_until_a_device_has_checked_it(monkeypatch):
    """bf16-mixed changes the numerics and no CUDA run has compared it with fp32 yet (``make gpu-check``):
    even on a bf16-capable GPU the default stays fp32, and an explicit choice is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert fast_precision(None, "auto") is None
    assert fast_precision(None, "gpu") is None
    assert fast_precision("bf16-mixed", "gpu") == "bf16-mixed"
    assert fast_precision("32-true", "auto") == "32-true"


def _weights(model, memory_format) -> list[bool]:
    return [p.is_contiguous(memory_format=memory_format) for p in model.parameters() if p.dim() == 4]


def test_channels_last_is_selectable_and_off_by_default_on_cpu(in_tmp):
    common = ["fit", "-c", "configs/experiment/digits.yaml", "--trainer.fast_dev_run=1", *QUIET]
    on = build_cli([*common, "--model.channels_last=true"])
    assert on.trainer.precision == "32-true" and all(_weights(on.model, torch.channels_last))
    assert not all(_weights(on.model, torch.contiguous_format))
    off = build_cli(common)
    assert all(_weights(off.model, torch.contiguous_format))


def test_channels_last_refuses_the_narrow_strided_convolutions_torch_crashes_on_cpu(in_tmp, capsys):
    """torch 2.14.1's CPU backward of a 1×1 stride-2 convolution in channels_last with < 16 image-side channels
    corrupts the heap (a segfault; found with the narrowed native networks of the smoke tests). Such a run stops
    with one line before any step, SOS-VAE's own widths are not flagged, and the first unflagged width runs
    (and matches the contiguous layout's gradients)."""
    from torch import nn

    from structvae.cli import main
    from structvae.model import cpu_channels_last_hazards
    from structvae.networks import ResidualDecoder, ResidualEncoder

    narrow = ["fit", "-c", "configs/experiment/betavae_celeba_native.yaml", "--trainer.fast_dev_run=1",
              "--trainer.accelerator=cpu", *QUIET, "--data=structvae.data.SyntheticImageDataModule",
              "--data.image_shape=[3,218,178]", "--data.batch_size=2", "--data.num_workers=0",
              "--model.encoder.init_args.widths=[4,4,4,8]", "--model.decoder.init_args.widths=[4,4,4,8]"]
    assert main([*narrow, "--model.channels_last=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("structvae: error: channels_last on CPU: ")
    assert err[0].endswith("use --model.channels_last=false, or widths of at least 16 channels")

    assert cpu_channels_last_hazards(ResidualEncoder().build((3, 218, 178), 256)) == []
    assert cpu_channels_last_hazards(ResidualDecoder().build((128,), (3, 218, 178))) == []
    assert len(cpu_channels_last_hazards(ResidualEncoder(widths=(4, 4, 4, 8)).build((3, 64, 64), 8))) == 3
    assert cpu_channels_last_hazards(nn.Conv2d(15, 64, 1, 2)) and not cpu_channels_last_hazards(nn.Conv2d(16, 4, 1, 2))
    assert cpu_channels_last_hazards(nn.ConvTranspose2d(64, 15, 1, 2)) and not cpu_channels_last_hazards(
        nn.ConvTranspose2d(4, 16, 1, 2))
    assert not cpu_channels_last_hazards(nn.Conv2d(4, 4, 3, 2)) and not cpu_channels_last_hazards(nn.Conv2d(4, 4, 1))

    torch.manual_seed(0)
    conv, x = nn.Conv2d(16, 16, 1, 2), torch.rand(2, 16, 64, 64)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        conv.zero_grad()
        conv.to(memory_format=layout)
        xi = x.clone().contiguous(memory_format=layout).requires_grad_()
        conv(xi).square().sum().backward()
        grads.append((xi.grad, conv.weight.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def _benchmark():
    import importlib
    import sys

    from support import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module("train_step")


def test_the_benchmarks_ours_is_what_the_experiments_run():
    """``ours`` in benchmarks/train_step.py claims the settings the experiments use: the C library's allocator
    (the caching one is opt-in), checkpointing at 218×178 (the native experiments) and not at 64×64,
    channels_last on CUDA (bf16 is opt-in)."""
    from structvae.lightning_cli import resolved_config

    bench = _benchmark()
    assert bench.options_of("ours", "cpu", large=True) == {"ckpt"}
    assert bench.options_of("ours", "cpu", large=False) == set()
    assert bench.options_of("ours", "cuda", large=False) == {"cl"}
    assert bench.options_of("ours-ckpt+cl", "cpu", large=True) == {"cl"}
    assert bench.options_of("ours+keep", "cpu", large=False) == {"keep"}
    assert bench.options_of("ours+cache", "cpu", large=True) == {"cache", "ckpt"}
    for name, large in (("sosvae_celeba_native", True), ("betavae_celeba_native", True),
                        ("sosvae_resnet_celeba", False)):
        model = resolved_config(f"configs/experiment/{name}.yaml")["model"]
        for network in ("encoder", "decoder"):
            assert model[network]["init_args"]["checkpoint_blocks"] is large, (name, network)
        assert model["channels_last"] is None, name  # on CUDA only (see test_channels_last_refuses_…)


def test_the_benchmark_refuses_configurations_it_cannot_run():
    import pytest

    bench = _benchmark()
    for name, message in (("torch+cl", "only an allocator"), ("ours+compile", "do not combine"),
                          ("ours+cache+keep", "one host allocator"),
                          ("ours+fast", "unknown configuration"), ("mine", "unknown configuration")):
        with pytest.raises(SystemExit, match=message):
            bench.options_of(name, "cpu", large=True)


@pytest.mark.parametrize("setting, message", [
    ("--model.likelihood.init_args.rank=-1", "rank must be at least 1"),
    ("--model.likelihood.init_args.rank=1000", "rank 1000 exceeds the number of pixels"),
    ("--model.posterior.init_args.size=0", "size must be a positive integer"),
    ("--model.likelihood.init_args.epsilon=0", "epsilon must be positive"),
    ("--model.objective.init_args.damping=-1", "damping must be non-negative"),
])
def test_bad_model_setting_is_one_line_and_exit_code_2(setting, message, in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/digits_sos.yaml", *QUIET, setting])
    assert code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (in_tmp / "lightning_logs").exists()


def test_bad_beta_is_one_line_and_exit_code_2(in_tmp, capsys):
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, "--model.objective=structvae.objectives.BetaELBO",
                 "--model.objective.beta=-1"])
    assert code == 2
    assert "beta must be non-negative" in one_error_line(capsys.readouterr().err)


def test_unwritable_output_folder_names_it_and_the_option(in_tmp, capsys):
    blocked = in_tmp / "a_file"
    blocked.write_text("not a folder")
    code = main(["fit", "-c", "configs/experiment/digits.yaml", *QUIET, *SHORT,
                 f"--trainer.default_root_dir={blocked}/run"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"{blocked}/run" in line and "--trainer.default_root_dir" in line
