"""Calls in flight per principal on the HAProxy data path (``--max-calls-per-principal``).

The same promise as the Python router's ``PrincipalShares`` (``router/shares.py``): a principal
runs at most N tool calls at once on a router, the rest wait in that principal's own line
(at most ``--queue-size`` of them, each at most ``--queue-timeout``), so other principals' calls
go straight to free worker slots while one caller holds N.

HAProxy counts a principal's calls in two stick tables, each entry's ``trackers`` being the
streams tracking it (released when each ends, however it ends):

- ``share_lines``: every tool call of the principal HAProxy holds, waiting or running. A call
  that would make it more than N + queue size is refused at once: RESOURCE_EXHAUSTED.
- ``shares``: its calls let through. A call that finds N there waits in the Lua action
  ``snakepit_share`` (``principal_shares.lua``) until fewer than N are, then the next rule tracks
  it there; past the queue timeout it is refused: DEADLINE_EXCEEDED. A caller whose own deadline
  comes first ends its call itself (its gRPC library says DEADLINE_EXCEEDED).

Looking and tracking are one step because HAProxy runs one thread here (``HaproxySpec.threads``,
1): a Lua action that returns goes straight on to the next rule. Waiting calls take a freed slot
in no set order (they look again every 1-32 ms; HAProxy 2.6's Lua has no queue to wake them in
order), where the Python router's line is first come, first served.

The principal is the ``sub`` of the pool ticket HAProxy puts on a call of a caller the Python
router verified (``authmap``): the ticket is the pool's own, from the map, never the caller's.
Calls HAProxy hands to the Python router (large bodies, callers not yet verified, callers
with a ticket of their own, no worker ready) are counted there too, on the Python router's
line, so a principal holds at most N slots through HAProxy's rules plus N through the Python
router's on one router replica. Without authentication every caller is ``anonymous``: the
limit then caps the router's tool calls as a whole, as on the Python data path.
"""

from __future__ import annotations

from importlib import resources

from ...errors import DeadlineExceeded, ResourceExhausted
from ...security.identity import ANONYMOUS
from .replies import error_headers, quote

RUNNING_TABLE = "shares"
LINES_TABLE = "share_lines"
# Principals whose counts HAProxy keeps at once (an entry goes 60 s after its last call).
TABLE_SIZE = 65536
LUA_ACTION = "snakepit_share"
LUA_SCRIPT = "principal_shares.lua"
# The ticket's claims (``security/tickets``: v1.<base64url JSON>.<signature>) -> its principal,
# hashed: a principal name may be longer than a stick table's string key.
_TICKET_PRINCIPAL = "var(txn.ticket),field(2,.),ub64dec,json_query('$.sub'),sha2(256),hex"


def lua_script_path() -> str:
    """Where the Lua action's script is (package data, read by HAProxy at start-up)."""
    return str(resources.files(__package__).joinpath(LUA_SCRIPT))


def global_lines(limit: int) -> list[str]:
    """``global`` lines: the Lua action, when there is a share to keep. (Its sleeps do not count
    towards ``tune.lua.session-timeout``: a call waited 20 s in it and went on.)"""
    if limit <= 0:
        return []
    return [f"  lua-load {quote(lua_script_path())}"]


def share_lines(
    limit: int, *, to_workers: str, queue_size: int, queue_timeout_ms: int, auth: bool
) -> list[str]:
    """Frontend lines that keep each principal's tool calls to ``limit`` running at once, after
    ``fast`` is known and before a backend is chosen. ``to_workers``: the condition of the calls
    HAProxy will send to the workers itself (the rest the Python router counts, ``share_sync``)."""
    if limit <= 0:
        return []
    principal = _TICKET_PRINCIPAL if auth else f"str({ANONYMOUS.name})"
    full = ResourceExhausted(
        f"this principal has {limit} calls running and {queue_size} waiting on this router, "
        f"its most (--max-calls-per-principal {limit}, --queue-size {queue_size})"
    )
    waited = DeadlineExceeded(
        f"waited {queue_timeout_ms / 1000:.3g}s for one of this principal's {limit} slots for "
        "calls on this router (--max-calls-per-principal)"
    )
    shared = "{ var(txn.principal) -m found }"
    # The Python router's calls of this principal are in the running table's gpc0 (share_sync).
    elsewhere = f"{{ var(txn.principal),table_gpc0({RUNNING_TABLE}) gt 0 }}"
    return [
        f"  http-request set-var(txn.principal) {principal} if {to_workers}",
        f"  http-request track-sc0 var(txn.principal) table {LINES_TABLE} if {shared}",
        f"  http-request return status 200 {error_headers(full)} "
        f"if {shared} {{ sc0_trackers({LINES_TABLE}) gt {limit + queue_size} }}",
        f"  http-request lua.{LUA_ACTION} {limit} {queue_timeout_ms} {RUNNING_TABLE} "
        f"if {shared} {{ sc0_trackers({LINES_TABLE}) gt {limit} }} || {shared} {elsewhere}",
        f"  http-request return status 200 {error_headers(waited)} "
        "if { var(txn.share_waited) -m bool }",
        f"  http-request track-sc2 var(txn.principal) table {RUNNING_TABLE} if {shared}",
    ]


def share_table_lines(limit: int) -> list[str]:
    """The stick tables ``share_lines`` counts in."""
    if limit <= 0:
        return []
    table = f"  stick-table type string len 64 size {TABLE_SIZE} expire 60s"
    return [
        f"backend {LINES_TABLE}",
        table,
        "",
        f"backend {RUNNING_TABLE}",
        f"{table} store gpc0",  # gpc0: the Python router's calls (share_sync)
        "",
    ]
