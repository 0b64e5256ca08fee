"""The host allocator setting of structvae's commands: it takes effect (fewer page faults on reused memory), can
be switched off, refuses a wrong value with one line, and is applied by the commands, not by library calls."""

from __future__ import annotations

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


def test_choice_defaults_to_keep_and_accepts_system(monkeypatch):
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    assert host_memory.host_allocator_choice() == "keep"
    monkeypatch.setenv(host_memory.ENV_VAR, "System")
    assert host_memory.host_allocator_choice() == "system"
    assert host_memory.configure_host_allocator() is False  # nothing to do


def test_a_wrong_choice_is_one_line_from_the_command():
    env = {"STRUCTVAE_HOST_ALLOCATOR": "jemalloc", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "structvae", "fit", "--help"], capture_output=True, text=True,
                         env=env, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "structvae: error: STRUCTVAE_HOST_ALLOCATOR='jemalloc': use 'keep' (reuse freed host memory, the default) "
        "or 'system' (the C library's own policy)"]


def test_commands_configure_the_allocator_but_library_calls_do_not(monkeypatch):
    from structvae import cli

    calls = []
    monkeypatch.setattr(host_memory, "configure_host_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "_lightning_cli", lambda argv: 0)
    monkeypatch.setattr(sys, "argv", ["structvae", "fit"])
    assert cli.main(["fit"]) == 0
    assert calls == []  # a notebook's or a test's process is left alone
    assert cli.main() == 0
    assert calls == [1]
