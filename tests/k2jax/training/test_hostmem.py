"""k2jax.training.hostmem: the huge-page malloc tunable and the one-time re-exec that sets it."""

import os
import subprocess
import sys

import pytest

from k2jax.training import hostmem

# Mallocs and frees a 64 MiB block 5 times (a fresh mmap each time, as XLA's step buffers; not through numpy, which
# asks for huge pages itself), writing every page, and prints the minor page faults that cost, after a re-exec with
# the tunable (unless opted out).
_PROBE = """
import ctypes, os, resource, sys
sys.path.insert(0, {root!r})
from k2jax.training.hostmem import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(opt_out: bool):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env[hostmem.OPT_OUT] = "0" if opt_out else "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=root)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return (out[0] if len(out) == 2 else ""), int(out[-1])


@pytest.mark.skipif(not hostmem.huge_pages_available(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_reexec_sets_the_tunable_and_cuts_page_faults():
    tunables, faults = _probe(opt_out=False)
    plain_tunables, plain_faults = _probe(opt_out=True)
    assert tunables == hostmem.TUNABLE and plain_tunables == ""
    # 5 x 64 MiB is 81,920 pages of 4 KiB; in 2 MiB pages 160 (plus the interpreter's own few thousand)
    assert plain_faults > 80_000, plain_faults
    assert faults < plain_faults / 5, (faults, plain_faults)


def test_tunables_are_appended():
    assert hostmem.tunables_with_huge_pages(None) == hostmem.TUNABLE
    assert hostmem.tunables_with_huge_pages("") == hostmem.TUNABLE
    assert hostmem.tunables_with_huge_pages("glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}"


def test_no_reexec_when_opted_out_set_or_unavailable(monkeypatch):
    def fail(*a):
        raise AssertionError("re-exec attempted")

    monkeypatch.setattr(hostmem.os, "execv", fail)
    monkeypatch.setattr(hostmem, "huge_pages_available", lambda: True)
    monkeypatch.setenv(hostmem.OPT_OUT, "0")
    hostmem.reexec_with_huge_pages()
    monkeypatch.delenv(hostmem.OPT_OUT)
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}")
    hostmem.reexec_with_huge_pages()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(hostmem, "huge_pages_available", lambda: False)
    hostmem.reexec_with_huge_pages()


def test_availability_needs_linux_glibc_and_thp(monkeypatch, tmp_path):
    thp = tmp_path / "enabled"
    monkeypatch.setattr(hostmem, "THP_SETTING", str(thp))
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.36"))
    thp.write_text("always [madvise] never\n")
    assert hostmem.huge_pages_available()
    thp.write_text("always madvise [never]\n")
    assert not hostmem.huge_pages_available()
    thp.write_text("[always] madvise never\n")
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not hostmem.huge_pages_available()
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))
    assert not hostmem.huge_pages_available()
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(hostmem.sys, "platform", "darwin")
    assert not hostmem.huge_pages_available()
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    thp.unlink()
    assert not hostmem.huge_pages_available()
