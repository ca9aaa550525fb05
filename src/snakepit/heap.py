"""Keep what a server process built at start-up out of the garbage collector's full passes.

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
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then take the rest out of future collections."""
    gc.collect()
    gc.freeze()
