"""Heap settings of a server process: what it built at start-up kept out of the garbage
collector's full passes, and large message buffers reused instead of mapped afresh per call.

A full (generation 2) collection walks every object the collector tracks, on the event loop's
thread, with the GIL: a router holds ~64,000 of them once started (modules, protobuf
descriptors, grpc, its own tables) and one full pass cost it 41 ms of CPU (45,000 and ~25 ms in
a worker), measured in ``snakepit serve``'s router. A burst of calls that leave objects behind
(300 watch streams opened at once) sets one off in the middle of other callers' calls.

``gc.freeze()`` once the server is up moves those start-up objects into a permanent generation
that collections skip: a full pass then walks only what was made since (0.0 ms right after the
freeze, against 41). Start-up objects live as long as the process anyway; one that becomes
garbage later is still freed by reference counting, only a reference cycle among them would
never be collected. Called by the ``router``, ``worker`` and ``serve`` commands, never by a
library user's process (tests build routers in-process and must not pin their heap).

``keep_large_buffers`` is the same idea for the C heap: glibc maps every block above its
``mmap`` threshold (at most 32 MB on its own) fresh from the kernel and unmaps it when freed,
so each large message costs a page fault per 4 KB page, every call. A fresh 100 MB ``bytes``
took 54 ms, of which ~47 ms page faults (6-9 ms reusing freed heap; measured here, glibc 2.36).
"""

from __future__ import annotations

import ctypes
import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then take the rest out of future collections."""
    gc.collect()
    gc.freeze()


# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
# A message's gRPC framing and snakepit's header around its payload.
_HEADROOM = 1024 * 1024
_LARGEST_KEPT = 1024 * 1024 * 1024


def keep_large_buffers(max_message_mb: int) -> bool:
    """Let glibc serve blocks up to one message (plus headroom) from its heap and keep up to
    two of them when freed, so the next large call reuses their pages instead of faulting in
    fresh ones; returns whether the C library took the settings.

    What it costs: after a large call the process keeps up to twice the largest message of
    freed heap (130 MB with the default ``--max-message-mb 64``; blocks above 1 GB are still
    mapped per call), which ``--max-rss-mb`` then counts. Without glibc (musl has no
    ``mallopt``) nothing changes and large messages are mapped per call, as before. Called by
    the ``router``, ``worker`` and ``serve`` commands only, never in a library user's process.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = min(max_message_mb * 1024 * 1024 + _HEADROOM, _LARGEST_KEPT)
    kept = min(2 * threshold, _INT_MAX)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, kept))
