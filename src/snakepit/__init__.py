"""Snakepit for Kubernetes: pools of stateless Python gRPC workers behind a session-affinity router."""

__version__ = "0.1.0"

from .worker import Adapter, Embedding, SessionContext, tool

__all__ = ["Adapter", "AsyncClient", "Client", "Embedding", "SessionContext", "__version__", "tool"]


def __getattr__(name: str) -> object:
    # The clients import grpc channels and numpy helpers a worker never needs at import time.
    if name in ("Client", "AsyncClient"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'snakepit' has no attribute {name!r}")
