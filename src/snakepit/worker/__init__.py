"""The worker runtime: the adapter SDK and the gRPC server that runs tools."""

from .adapter import Adapter
from .context import SessionContext
from .tools import Embedding, tool

__all__ = ["Adapter", "Embedding", "SessionContext", "tool"]
