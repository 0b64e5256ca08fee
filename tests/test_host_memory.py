"""The host allocator setting of structvae's training commands: the C library's by default; the opt-in caching
allocator keeps every tensor's bytes intact while it reuses, splits and merges blocks (checked against the live
tensors' contents), glibc's keep policy cuts page faults, a build failure falls back to keep with one warning, a
wrong value is refused with one line, and the training verbs apply it while library calls and other verbs do
not."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from structvae import host_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the keep allocator configures glibc's malloc (Linux)")

# Allocates, touches and frees a 64 MiB tensor 20 times; prints whether keep took effect, the minor page faults
# those allocations caused, and how much of a freed 64 MiB tensor stays resident.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from structvae.host_memory import keep_freed_host_memory
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    took = keep_freed_host_memory() if sys.argv[1] == "keep" else False
    torch.set_num_threads(1)  # no worker threads: their own arenas would blur the count
    torch.ones(1 << 24).sum()  # first use: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(1 << 24).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    t = torch.empty(1 << 25).fill_(1)  # 128 MiB
    held = rss()
    del t
    print(took, faults, (held - rss()) >> 20)  # MiB given back to the kernel by the free
""")


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    took, faults, returned_mib = out.stdout.split()
    return took, int(faults), int(returned_mib)


@glibc_only
def test_keep_reuses_freed_blocks_instead_of_faulting_in_fresh_pages():
    took, kept_faults, kept_mib = _probe("keep")
    _, system_faults, system_mib = _probe("system")
    assert took == "True"
    # glibc alone unmaps a freed tensor and faults the next one in afresh: 64 MiB = 16,384 pages each time
    assert system_mib >= 120 and system_faults > 20 * 10_000
    # kept: a freed tensor stays resident for the next one, which reuses its block (the few faults left
    # vary from run to run: 2-4 tensors' worth of the 20 measured)
    assert kept_mib < 8
    assert kept_faults < system_faults / 2


def test_choice_defaults_to_the_c_library_and_accepts_the_opt_ins(monkeypatch):
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    assert host_memory.host_allocator_choice() == "system"
    assert host_memory.configure_host_allocator() == "system"  # the default changes nothing
    monkeypatch.setenv(host_memory.ENV_VAR, "Cache")
    assert host_memory.host_allocator_choice() == "cache"
    monkeypatch.setenv(host_memory.ENV_VAR, "Keep")
    assert host_memory.host_allocator_choice() == "keep"
    monkeypatch.setenv(host_memory.ENV_VAR, "System")
    assert host_memory.host_allocator_choice() == "system"
    assert host_memory.configure_host_allocator() == "system"  # nothing to do


def test_a_cache_that_cannot_be_built_falls_back_to_keep_with_one_warning(monkeypatch):
    def no_compiler():
        raise RuntimeError("Error building extension 'structvae_host_allocator'\nc++: not found")

    kept = []
    monkeypatch.setenv(host_memory.ENV_VAR, "cache")
    monkeypatch.setattr(host_memory, "_caching_library", no_compiler)
    monkeypatch.setattr(host_memory, "keep_freed_host_memory", lambda: kept.append(1) or True)
    with pytest.warns(RuntimeWarning) as record:
        assert host_memory.configure_host_allocator() == "keep"
    assert len(record) == 1 and kept == [1]
    assert str(record[0].message) == ("structvae's host caching allocator could not be built (Error building "
                                      "extension 'structvae_host_allocator'); using glibc's heap instead "
                                      "(set STRUCTVAE_HOST_ALLOCATOR=keep to skip the build)")


def test_a_wrong_choice_is_one_line_from_the_command():
    env = {"STRUCTVAE_HOST_ALLOCATOR": "jemalloc", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "structvae", "fit", "--trainer.max_epochs=1"], capture_output=True,
                         text=True, env=env, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "structvae: error: STRUCTVAE_HOST_ALLOCATOR='jemalloc': use 'system' (the C library's or a preloaded "
        "allocator, the default), 'keep' (glibc keeps freed memory) or 'cache' (structvae's caching allocator); "
        "tcmalloc/jemalloc are chosen with LD_PRELOAD, see the README"]


def test_training_commands_configure_the_allocator_but_library_calls_and_other_verbs_do_not(monkeypatch):
    from structvae import cli, lightning_cli
    from structvae.data import cli as data_cli

    calls = []
    monkeypatch.setattr(host_memory, "configure_host_allocator", lambda: calls.append(1) or "cache")
    monkeypatch.setattr(lightning_cli, "run", lambda argv: 0)
    monkeypatch.setattr(data_cli, "main", lambda argv: 0)
    monkeypatch.setattr(sys, "argv", ["structvae", "fit"])
    assert cli.main(["fit"]) == 0
    assert calls == []  # a notebook's or a test's process is left alone
    assert cli.main() == 0
    assert calls == [1]
    for argv in (["structvae", "data", "mnist"], ["structvae", "fit", "--help"], ["structvae", "fit", "-h"]):
        monkeypatch.setattr(sys, "argv", argv)
        assert cli.main() == 0
    assert calls == [1]  # data and --help leave it alone


# Installs the caching allocator, then checks its bookkeeping and every live tensor's bytes through a random
# sequence of allocations and frees (1-40 MiB: splits and merges), small tensors, a DataLoader that forks
# workers allocating large tensors, and a training step that must match the one before the install.
_CACHE_PROBE = textwrap.dedent("""
    import json, random, torch
    from structvae import host_memory as hm
    MiB, GRANULE = 1 << 20, hm.CACHE_GRANULE
    def rounded(t):
        return -(-t.numel() * t.element_size() // GRANULE) * GRANULE
    def step():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 3, 1))
        loss = net(torch.rand(8, 3, 96, 96)).square().mean()
        loss.backward()
        return [loss.item()] + [p.grad.double().sum().item() for p in net.parameters()]
    report = {"before": step(), "installed": hm.cache_host_memory(), "again": hm.cache_host_memory()}
    report["after"] = step()
    hm.release_cached_host_memory()
    stats = hm.host_memory_stats()
    report["empty"] = [stats.allocated, stats.reserved]

    big = torch.empty(64 * MiB // 4)  # one 64 MiB segment, then two halves of it, then the whole again
    del big
    a, b = torch.empty(30 * MiB // 4), torch.empty(30 * MiB // 4)
    report["split"] = hm.host_memory_stats().reserved // MiB
    del a, b
    c = torch.empty(64 * MiB // 4)
    report["merged"] = hm.host_memory_stats().reserved // MiB
    del c
    small = torch.ones(100_000)  # 400 kB: the C library's
    report["small"] = hm.host_memory_stats().allocated

    rng, live, corrupt, mismatch = random.Random(0), {}, 0, 0
    for i in range(400):
        if live and rng.random() < 0.45:
            live.pop(rng.choice(sorted(live)))
        else:
            live[i] = torch.full((rng.randint(MiB // 4, 40 * MiB // 4),), float(i))
        if i % 20 == 0:
            corrupt += sum(int((t != k).any()) for k, t in live.items())
            mismatch += hm.host_memory_stats().allocated != sum(rounded(t) for t in live.values())
    report["corrupt"], report["mismatch"] = corrupt, mismatch
    live.clear()
    stats = hm.host_memory_stats()
    report["drained"] = [stats.allocated, stats.peak_reserved >= stats.peak_allocated > 0]
    report["released"] = hm.release_cached_host_memory() == stats.reserved and hm.host_memory_stats().reserved == 0

    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            return torch.full((2 * MiB,), float(i))  # 8 MiB: the cache, in a forked worker
    loader = torch.utils.data.DataLoader(Big(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    report["workers"] = [float(batch[:, 0].sum()) for batch in loader]
    print(json.dumps(report))
""")


@glibc_only
def test_the_cache_reuses_splits_and_merges_blocks_and_keeps_every_tensor_intact():
    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["installed"] is True and report["again"] is False
    assert report["after"] == report["before"]  # a training step's loss and gradients, bit for bit
    assert report["empty"] == [0, 0]
    assert report["split"] == 64  # both 30 MiB tensors came out of the freed 64 MiB segment
    assert report["merged"] == 64  # freed, the halves merged back into one block that fits 64 MiB again
    assert report["small"] == 0
    assert report["corrupt"] == 0 and report["mismatch"] == 0
    assert report["drained"] == [0, True] and report["released"] is True
    assert report["workers"] == [1.0, 5.0, 9.0, 13.0]


def test_a_compiler_that_fails_is_one_warning_line_and_the_command_still_runs(tmp_path):
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "STRUCTVAE_HOST_ALLOCATOR": "cache"}
    code = "from structvae.host_memory import configure_host_allocator as c; print(c())"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "keep"
    assert "Traceback" not in out.stderr and "could not be built" in out.stderr
