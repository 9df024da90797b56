"""Give the C heap's free pages back to the system, so a long-running node's RSS follows its real use;
keep the cyclic garbage collector's full collections rare.

Every socket read on asyncio's selector transports (aiohttp's server, redis-py) allocates a 256 KiB
bytes object and shrinks it to what arrived. Once glibc's dynamic mmap threshold has risen above
that size (it rises to the size of any larger block the process frees), those buffers come from
the main heap instead of their own mappings, and the reads interleave with longer-lived objects:
the heap fragments. In-use memory stays flat while the free space inside the heap grows by about
1 MB a minute under 20 writes/s, and glibc only returns free space at the top of the heap, so RSS
never comes back down. `malloc_trim(0)` releases every free page, wherever it lies.

Pinning the threshold instead (M_MMAP_THRESHOLD) keeps the buffers out of the heap but costs an
mmap, an mremap and a munmap per read: a read on a socket pair took 30 µs instead of 4.5 µs.
Elsewhere than glibc (musl, macOS) `trim_heap` does nothing.

CPython's collector runs a full collection, which visits every tracked object of the process, each
time the heap has grown by a quarter since the last one. A reconnect storm grows the heap by every
new connection's objects, so 5,000 connections at once cost 12-14 full collections of an ever
larger heap: 3.2 s of a 10 s storm (bench/connect_storm.py). `tune_garbage_collector` keeps the
objects loaded at startup (modules, classes, the app) out of every collection and lets ten times
as many young collections pass between full ones; the young generations keep CPython's defaults, so
short pauses stay short and cyclic garbage still dies young.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from typing import Any, AsyncIterator

from aiohttp import web

HEAP_TRIM_INTERVAL = 60.0  # seconds; one trim takes a few ms and releases a few MB
FULL_COLLECTION_AFTER = 100  # middle-generation collections between full ones (CPython's default: 10)


def _load_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return malloc_trim


_malloc_trim = _load_malloc_trim()
HEAP_TRIM_SUPPORTED = _malloc_trim is not None


def trim_heap() -> bool:
    """Return the C heap's free pages to the system; True when some were released (glibc only)."""
    return HEAP_TRIM_SUPPORTED and bool(_malloc_trim(0))


async def trim_heap_loop(interval: float = HEAP_TRIM_INTERVAL) -> None:
    """Trim the heap every `interval` seconds until cancelled, off the event loop."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(trim_heap)


async def heap_trim_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the trim loop runs as long as the app (nothing when not on glibc)."""
    task = asyncio.create_task(trim_heap_loop()) if HEAP_TRIM_SUPPORTED else None
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def tune_garbage_collector() -> None:
    """Freeze what is alive now (the loaded server) and make full collections up to ten times rarer."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
