"""Decoding what the Redis scripts answer into the store's records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from . import rules
from .base import SessionInfo, Variable


def _s(data: bytes | None) -> str:
    return data.decode() if data else ""


def session_info(session_id: str, fields: Sequence[Any]) -> SessionInfo:
    created, accessed, ttl, worker, meta, hlen = fields
    accessed_s, ttl_s = int(accessed) / 1000, int(ttl) / 1000
    return SessionInfo(
        session_id=session_id,
        created_at=int(created) / 1000,
        last_accessed_at=accessed_s,
        expires_at=accessed_s + ttl_s,
        ttl_seconds=ttl_s,
        last_worker_id=_s(worker),
        metadata=json.loads(meta) if meta else {},
        variable_count=int(hlen) // 3,
    )


def variable(
    name: str, decl_text: bytes, state: bytes, data: bytes, value: Any = rules.UNDECODED
) -> Variable:
    """A variable from its declaration, state and stored bytes; ``value`` when the caller
    already holds it (else it is decoded from ``data`` only when asked for)."""
    decl = rules.parse_declaration(decl_text.decode())
    version, created, updated = state.split(b":")
    return Variable(
        name=name,
        type=decl.type,
        value=value,
        version=int(version),
        created_at=int(created) / 1000,
        updated_at=int(updated) / 1000,
        constraints=decl.constraints,
        metadata=decl.metadata,
        data=data,
    )
