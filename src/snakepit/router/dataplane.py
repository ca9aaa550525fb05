"""Which data path carries tool calls: the Python router (the default) or HAProxy (opt-in).

HAProxy is not the default yet: its 2.6 stall on multi-MB request bodies is worked around (they
take the Python router), and the default waits for a green e2e run (docs/architecture.md,
"Native data path").
``auto`` takes HAProxy when the ``haproxy`` binary is there and the pool's affinity is ``hint``.
Strict affinity stays on the Python router: it binds a session to the worker that served it last
and fails its calls with FAILED_PRECONDITION while that worker is gone, which HAProxy's hashing
cannot express (it would move the session to the next worker on the ring).
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
    auth: bool = False,
    per_principal: bool = False,
) -> tuple[str, str]:
    """The data path to use and why, for the start-up message.

    With TLS the Python router it is: HAProxy here forwards plaintext HTTP/2 and cannot prove
    the pool's identity to workers (mutual TLS with the pool CA), so it is refused, not silently
    left unencrypted. Nor can it check callers' credentials or hand workers a ticket: with auth
    on it is refused (``haproxy``) or passed over (``auto``) rather than open a door around it.
    """
    from .haproxy.process import haproxy_binary

    if requested not in DATA_PATHS:
        raise ValueError(f"data path must be one of {', '.join(DATA_PATHS)}, got {requested!r}")
    if requested == PYTHON:
        return PYTHON, "asked for"
    if tls:
        if requested == HAPROXY:
            raise ValueError(
                "--data-path haproxy does not carry TLS yet; use --data-path python with TLS"
            )
        return PYTHON, "TLS needs the Python router"
    if auth:
        if requested == HAPROXY:
            raise ValueError(
                "--data-path haproxy cannot verify callers' credentials: with auth on "
                "(--auth-tokens) use --data-path python"
            )
        return PYTHON, "auth is on, which HAProxy cannot check"
    binary = haproxy_binary()
    if affinity == STRICT:
        return PYTHON, "strict affinity needs the Python router"
    if per_principal:
        if requested == HAPROXY:
            raise ValueError(
                "--data-path haproxy cannot count calls per principal: with "
                "--max-calls-per-principal use --data-path python"
            )
        return PYTHON, "calls per principal are counted by the Python router"
    if binary is None:
        if requested == HAPROXY:
            raise ValueError("--data-path haproxy, but no haproxy binary was found")
        return PYTHON, "haproxy is not installed"
    return HAPROXY, binary


def make_router(config: RouterConfig, **kwargs: Any) -> tuple[RouterServer, str]:
    """A router on the chosen data path, and a line saying which."""
    tls = config.tls is not None or config.pool_tls is not None
    path, why = choose(
        config.data_path,
        config.pool.affinity,
        tls=tls,
        auth=config.auth.enabled,
        per_principal=bool(config.pool.max_calls_per_principal),
    )
    if path == HAPROXY:
        from .haproxy.router import HaproxyRouter

        return HaproxyRouter(config, **kwargs), f"data path: haproxy ({why})"
    return RouterServer(config, **kwargs), f"data path: python ({why})"
