"""What the machine offers (physical cores, native bfloat16 arithmetic, free memory) and how we use it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
from pathlib import Path


def usable_cpus() -> int:
    """Logical CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def physical_cores() -> int:
    """Cores, not hyper-threads: two threads of one core share the vector units matmuls saturate."""
    siblings = set()
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            continue
    usable = usable_cpus()
    return max(1, min(len(siblings) or usable, usable))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("unknown CPU" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def available_memory(device: str = "cpu") -> int:
    """Bytes free for new allocations on `device`: free GPU memory on CUDA; else MemAvailable, or 8 GiB if unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> None:
    """Have glibc keep large freed blocks for reuse instead of unmapping them at once.

    A prefill pass allocates and frees tens of megabytes (expanded weights, activations); by default
    blocks over 128 KiB are fresh mmaps, so every pass paid page faults on all of them (prefill ran
    ~35% slower until something happened to raise glibc's adaptive threshold). No-op off glibc."""
    if (libc := _glibc()) is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)


def release_freed_memory() -> None:
    """Hand what the allocator keeps of freed memory (glibc: `keep_freed_memory`, up to 128 MB an arena, in
    every thread's arena; tcmalloc: its page heap) back to the system, for an engine that has gone idle: its
    resident memory is then what it holds. No-op off glibc."""
    if (libc := _glibc()) is None:
        return
    libc.malloc_trim(0)
    if (release := _tcmalloc_release()) is not None:
        release()


@functools.cache
def _tcmalloc_release():
    """tcmalloc's call that returns its free pages, where the process runs on it (`exec_with_tcmalloc`)."""
    return getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)


# Blocked by `exec_with_tcmalloc`, across its exec, until `unblock_start_signals`.
START_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def exec_with_tcmalloc() -> None:
    """Start this command again, same process, with tcmalloc preloaded, where it is installed (Debian:
    libtcmalloc-minimal4) and nothing else is: for `serve`, whose glibc heaps fragment under hours of
    mixed requests (resident memory +6-10% in a 20-minute soak) where tcmalloc's stay flat at the same
    speed. SERIATIM_MALLOC=system keeps glibc's. SIGINT and SIGTERM stay blocked across the exec, so that
    one sent meanwhile waits for the handlers the new start installs instead of killing it half-started."""
    if "LD_PRELOAD" in os.environ or os.environ.get("SERIATIM_MALLOC") == "system" or sys.platform != "linux":
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, START_SIGNALS)  # until unblock_start_signals, exec or not
    if (library := ctypes.util.find_library("tcmalloc_minimal")) is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, "LD_PRELOAD": library})
    except OSError as e:  # this process goes on, on glibc's allocator
        print(f"seriatim: warning: cannot start again on tcmalloc ({e})", file=sys.stderr)


def unblock_start_signals() -> None:
    """Deliver a SIGINT or SIGTERM that arrived while `exec_with_tcmalloc` had them blocked, to the handlers
    installed by now (`serve` unblocks them whether or not they were)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, START_SIGNALS)
