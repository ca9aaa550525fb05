"""Python clients of a pool: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from .aio import AsyncClient, AsyncSession
from .ops import ParameterInfo, ToolInfo
from .sync import Client, Session

__all__ = ["AsyncClient", "AsyncSession", "Client", "ParameterInfo", "Session", "ToolInfo"]
