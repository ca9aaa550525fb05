"""Python clients of a pool: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from .aio import AsyncClient, AsyncSession
from .hosting import HostedCall, hosted_call
from .ops import ParameterInfo, ToolInfo
from .sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "HostedCall",
    "ParameterInfo",
    "Session",
    "ToolInfo",
    "hosted_call",
]
