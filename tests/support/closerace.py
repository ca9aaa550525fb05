"""The one failure a router's own connection ageing may still cause, and how tests allow it.

When the router (not the client) closes an aged connection, about one 1 MB call in 15,000
still fails ``Stream removed (sendmsg: Broken pipe)`` or ``(recvmsg:Connection reset by
peer)``: a frame the client sent, likely a flow-control update, is unread in the server's socket
when gRPC core closes it, so the kernel resets the connection (docs/reliability.md, "The last of
the connection-close race"). Under a loaded machine it is more frequent. Snakepit's own clients
close first (client/rotation.py) and never meet it; tests of the router's ageing turn that off
and so allow it: any other failure (a GOAWAY message without a reset is a regression of the
resend race), or more than one reset per 1,000 calls (the probe-PING race gave 2-7 per 1,700),
fails them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CLOSE_RESET = re.compile(
    r"Stream removed \((sendmsg: Broken pipe|recvmsg:Connection reset by peer)"
)


def check_only_close_resets(failures: Sequence[str], done: int) -> None:
    """Fail unless every failure is the close reset, and there is at most one per 1,000
    successful calls (at least one allowed: short runs make fewer than 1,000)."""
    unexplained = [f for f in failures if not CLOSE_RESET.search(f)]
    assert not unexplained, f"{len(failures)} of {done + len(failures)} failed: {unexplained[:3]}"
    allowed = max(1, done // 1000)
    assert len(failures) <= allowed, f"{len(failures)} of {done} calls reset: {failures[:3]}"
