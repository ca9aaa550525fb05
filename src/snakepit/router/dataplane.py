"""Which data path carries tool calls: HAProxy or the Python router.

``auto`` (the default of ``snakepit router``, ``snakepit serve`` and ``spec.router.dataPath``)
takes HAProxy when the ``haproxy`` binary is there, for either affinity,
with or without TLS and authentication (HAProxy terminates TLS and forwards calls whose caller
the Python router has already verified; see ``haproxy/authmap.py`` and ``haproxy/tlsfiles.py``).
With strict affinity the Python router carries the tool calls behind HAProxy: it binds a session
to the worker that served it last and fails its calls with FAILED_PRECONDITION while that worker
is gone, which HAProxy's hashing cannot express (it would move the session to the next worker on
the ring). HAProxy still stands in front (``HaproxySpec.tools_via_router``), so a strict pool
keeps HAProxy's own refusals: a message over the size limit, a session's watchers over its limit
(the Python router alone accepts one new call per event-loop round trip, so a burst of them
holds everyone's next call). Calls counted per principal (``--max-calls-per-principal``) are
counted by HAProxy too (``haproxy/principal_shares``).
"""

from __future__ import annotations

from typing import Any

from .pool import STRICT
from .server import RouterConfig, RouterServer

AUTO, HAPROXY, PYTHON = "auto", "haproxy", "python"
DATA_PATHS = (AUTO, HAPROXY, PYTHON)


def choose(
    requested: str,
    affinity: str,
    *,
    tls: bool = False,
    pool_tls: bool = False,
) -> tuple[str, str]:
    """The data path to use and why, for the start-up message.

    ``tls``: TLS on the pool port; ``pool_tls``: mutual TLS inside the pool. HAProxy carries
    both, but TLS on the pool port only together with the pool's own TLS: HAProxy reaches the
    Python router (every RPC but tool calls) on its internal port, mutual TLS with the pool CA,
    and a pool port with TLS in front of a plaintext pool is a configuration `snakepit serve`
    and the operator never make. Authentication needs nothing: the Python router verifies
    every credential HAProxy has not seen before (``haproxy/authmap.py``).
    """
    from .haproxy.process import haproxy_binary

    if requested not in DATA_PATHS:
        raise ValueError(f"data path must be one of {', '.join(DATA_PATHS)}, got {requested!r}")
    if requested == PYTHON:
        return PYTHON, "asked for"
    if tls and not pool_tls:
        if requested == HAPROXY:
            raise ValueError(
                "--data-path haproxy with TLS on the pool port needs the pool's TLS too "
                "(--pool-tls-dir): use both, or --data-path python"
            )
        return PYTHON, "TLS on the pool port without the pool's TLS needs the Python router"
    binary = haproxy_binary()
    if binary is None:
        if requested == HAPROXY:
            raise ValueError("--data-path haproxy, but no haproxy binary was found")
        return PYTHON, "haproxy is not installed"
    if affinity == STRICT:
        return HAPROXY, f"{binary}; strict affinity: tool calls through the Python router"
    return HAPROXY, binary


def make_router(config: RouterConfig, **kwargs: Any) -> tuple[RouterServer, str]:
    """A router on the chosen data path, and a line saying which."""
    path, why = choose(
        config.data_path,
        config.pool.affinity,
        tls=config.tls is not None,
        pool_tls=config.pool_tls is not None,
    )
    if path == HAPROXY:
        from .haproxy.router import HaproxyRouter

        return HaproxyRouter(config, **kwargs), f"data path: haproxy ({why})"
    return RouterServer(config, **kwargs), f"data path: python ({why})"
