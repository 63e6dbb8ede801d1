"""Host memory of training on CPU: transparent huge pages for the buffers XLA allocates at every step.

Why: XLA:CPU allocates a jitted program's temporary buffer with malloc at each execution and frees it afterwards.
For the default training step in one micro-batch that buffer was 625 MB (151 MiB in the 4 micro-batches it now
runs); glibc serves a block that large with a fresh mmap and unmaps it on free, so every step faults it in again
4 KiB at a time: 153,000 page faults and ~0.3 s of kernel time per step in one micro-batch (measured with getrusage;
docs/results.md), about a third of the step. With glibc's malloc tunable
`glibc.malloc.hugetlb=1`, malloc marks its mmapped blocks for transparent huge pages (madvise), and the same
buffer faults in 2 MiB at a time (~1,500 faults per step). glibc reads tunables only when a process starts, so an
entry point calls `reexec_with_huge_pages()` first thing: it restarts the same command once with the tunable set.

It does nothing (returns) when: not Linux with glibc >= 2.35, transparent huge pages are off ('[never]'), the
tunable is already set, or K2JAX_HUGE_PAGES=0 (the opt-out, also used to measure the difference).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "K2JAX_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available() -> bool:
    """True on Linux with glibc >= 2.35 (the first with the hugetlb tunable) and transparent huge pages not off."""
    if not sys.platform.startswith("linux"):
        return False
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    if libc != "glibc" or (major, minor) < (2, 35):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tunables_with_huge_pages(current: str | None) -> str:
    """The GLIBC_TUNABLES value `current` (colon-separated, possibly empty or None) with TUNABLE added."""
    return TUNABLE if not current else f"{current}:{TUNABLE}"


def reexec_with_huge_pages() -> None:
    """Restart this process's command line with GLIBC_TUNABLES including TUNABLE (see the module docstring), unless
    it is set already, not available here, or K2JAX_HUGE_PAGES=0. Call it first thing in a `__main__` entry point
    (never from library code or tests: the process is replaced); on success it does not return."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return
    current = os.environ.get("GLIBC_TUNABLES")
    if current and "glibc.malloc.hugetlb" in current:
        return
    if not huge_pages_available():
        return
    os.environ["GLIBC_TUNABLES"] = tunables_with_huge_pages(current)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
