"""The store's Redis ACL user (store/acl.py) on a real redis-server: the whole store contract
passes as that user, and the commands that own the server are refused to it."""

from __future__ import annotations

import pytest
import redis

from snakepit.store.acl import acl_file_line


def test_admin_commands_are_refused_to_the_store_user(
    redis_acl_url: str, redis_prefix: str
) -> None:
    user = redis.Redis.from_url(redis_acl_url.split("?")[0])
    try:
        assert user.ping()
        user.set(f"{redis_prefix}:x", "1")  # its own prefix: allowed
        for command in (
            ("CONFIG", "GET", "*"),
            ("CONFIG", "SET", "dir", "/tmp"),
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("ACL", "LIST"),
            ("ACL", "SETUSER", "evil", "on", ">x", "+@all"),
            ("SCRIPT", "KILL"),
            ("SCRIPT", "FLUSH"),
            ("MODULE", "LIST"),
            ("KEYS", "*"),
            ("SHUTDOWN",),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("elsewhere:x", "1")  # keys outside the store's prefix
        with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
            # Lua cannot escape the user's rights either
            user.eval("return redis.call('FLUSHALL')", 0)
    finally:
        user.close()


def test_acl_file_line_keeps_the_password_out() -> None:
    line = acl_file_line("s3cret-password", "sp")
    assert line.startswith("user snakepit reset on #") and "s3cret" not in line
    assert "~sp:*" in line and "-@all" in line and "+evalsha" in line
