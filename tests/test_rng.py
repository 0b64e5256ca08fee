"""structvae.rng: seeded blocks are reproducible and leave the caller's generators as they were (issue 22, item 3)."""

import pytest
import torch

from structvae.rng import global_seed, seeded


def test_seeded_blocks_repeat_and_restore_the_callers_stream():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        a = torch.randn(4)
    with seeded(7, "cpu"):
        b = torch.randn(4)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_next)  # as if the blocks had not run


def test_global_seed_reads_lightnings_variable(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert global_seed() == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    assert global_seed() == 42


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device (none here)")
def test_seeded_on_a_cuda_device_restores_its_generator():
    state = torch.cuda.get_rng_state(0)
    with seeded(3, "cuda:0"):
        torch.randn(8, device="cuda:0")
    assert torch.equal(torch.cuda.get_rng_state(0), state)
