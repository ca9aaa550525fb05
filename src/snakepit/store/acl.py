"""The Redis ACL user a pool's routers and workers use: only the commands the store sends.

Redis's ``default`` user may run anything (CONFIG, FLUSHALL, DEBUG, SCRIPT KILL, ACL, MODULE…),
so whoever holds its password owns the server. The store needs a short list of commands on keys
under its prefix, and ACL checks apply to the commands its Lua scripts run too, so the list below
names every command the client and the scripts (``lua.py``) send. Anything else answers NOPERM.
``tests/integration/test_store_acl.py`` runs the whole store contract as this user, so a command
added to the store without being added here fails there.
"""

from __future__ import annotations

import hashlib

DEFAULT_ACL_USER = "snakepit"

# What the client sends itself: scripts, the hosted-tool directory, session listing, watching.
CLIENT_COMMANDS = (
    "evalsha",
    "eval",
    "script|load",
    "script|exists",
    "get",
    "set",
    "exists",
    "hmget",
    "hlen",
    "xread",
    "multi",
    "exec",
    "discard",
    "ping",
    "select",
    "client|setname",
)
# What the Lua scripts run.
SCRIPT_COMMANDS = (
    "del",
    "exists",
    "hdel",
    "hexists",
    "hget",
    "hgetall",
    "hincrby",
    "hlen",
    "hmget",
    "hset",
    "hstrlen",
    "pexpire",
    "pttl",
    "sadd",
    "scard",
    "smembers",
    "srem",
    "time",
    "xadd",
    "xrevrange",
    "zadd",
    "zcard",
    "zrange",
    "zrem",
    "zremrangebyscore",
    "zscore",
)
STORE_COMMANDS: tuple[str, ...] = tuple(dict.fromkeys(CLIENT_COMMANDS + SCRIPT_COMMANDS))


def scope_rules(prefix: str = "sp") -> list[str]:
    """What the store's user may touch, without the password: keys under ``prefix:`` only, no
    Pub/Sub channels, no command but the store's."""
    return [f"~{prefix}:*", "resetchannels", "-@all", *(f"+{c}" for c in STORE_COMMANDS)]


def acl_rules(password: str, prefix: str = "sp", *, hashed: bool = True) -> list[str]:
    """The rules of ``ACL SETUSER <user> ...`` (or a ``user`` line of an ACL file) for the store's
    user: on, the password (as its SHA-256 with ``hashed``, so the file does not hold it), keys
    under ``prefix:`` only, no Pub/Sub channels, no command but the store's."""
    secret = "#" + hashlib.sha256(password.encode()).hexdigest() if hashed else ">" + password
    return ["reset", "on", secret, *scope_rules(prefix)]


# Redis's own ``default`` user where the store's user is the way in: off (nobody logs in as it,
# with any password) and without one, but with every permission. Not "no permission": Redis
# 7.0 to 8.2 re-check each MULTI/EXEC they replay from the append-only file at start against
# ``default``'s rules (redis/redis#14541, fixed upstream by #14545), so a ``default`` that may run
# nothing drops every transaction - every write of the store's Lua scripts - when Redis restarts.
# ``tests/integration/test_operator_redis_script.py`` restarts a real redis-server to show it.
DISABLED_DEFAULT_USER_LINE = "user default off resetpass ~* &* +@all"


def acl_file_line(password: str, prefix: str = "sp", user: str = DEFAULT_ACL_USER) -> str:
    """``user <name> <rules>``: a line of a Redis ACL file (``aclfile``) or ``redis.conf``."""
    return " ".join(["user", user, *acl_rules(password, prefix)])
