"""Rotating a pool's operator-issued CA without a failed call, as a pure state machine.

Pool members check each other's leaf against the ``ca.crt`` they mount, and the kubelet hands
a changed Secret to each pod on its own schedule (up to a minute or so apart). Swapping the CA
and the leaves at once would leave, for that minute, pods that trust only the old CA talking to
pods that present a leaf of the new one: failed handshakes. So a rotation is three published
states, each given ``settle`` to reach every pod before the next:

1. *published*: ``ca.crt`` = old + new CA; leaves still from the old CA. Every pod learns to
   trust the new CA while nobody presents a leaf of it yet.
2. *switched*: leaves re-issued from the new CA; ``ca.crt`` still trusts both, so a pod with a
   new leaf and one still on an old leaf accept each other.
3. *done*: ``ca.crt`` = the new CA only, once no pod can still hold an old leaf.

Each step changes one kind of file only (the bundle, then the leaf, then the bundle), so a
process that reads ``ca.crt`` and ``tls.crt`` at different moments never holds a pair that does
not verify. A rotation starts when the pool's annotation ``ROTATE_ANNOTATION`` takes a value it
did not have at the last rotation, or when the CA has lived ``ROTATE_FRACTION`` of its life.

The state lives in the namespace's ``snakepit-ca`` Secret beside the CA (``rotation_keys``), so
a restarted operator carries on where it stopped; ``rotation_step`` decides, the reconciler
only reads and writes.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ...security.localca import LocalCA

ROTATE_ANNOTATION = "snakepit.dev/rotate-ca"
# Start a rotation once this share of the CA's validity has passed.
ROTATE_FRACTION = 2 / 3
# How long each published step is given to reach every pod: the kubelet's Secret sync (about
# a minute with its default watch-based cache) plus the processes' reload checks (a second).
DEFAULT_SETTLE = datetime.timedelta(minutes=3)


@dataclass(frozen=True)
class CaRotation:
    """A pool's CA and where its rotation stands.

    ``current`` signs the leaves; ``pending`` (step 1) is trusted but signs nothing yet;
    ``retiring`` (step 2) is the old CA's certificate, still trusted, its key gone. ``since``
    is when the last step was published; ``request`` the annotation value last acted on.
    """

    current: LocalCA
    pending: LocalCA | None = None
    retiring: bytes | None = None
    since: datetime.datetime | None = None
    request: str = ""

    @property
    def phase(self) -> str:
        return "published" if self.pending else "switched" if self.retiring else "steady"

    def trusted(self) -> bytes:
        """``ca.crt`` for the pool's pods: every CA a member's leaf may come from now."""
        pems = [self.current.cert_pem]
        if self.pending is not None:
            pems.append(self.pending.cert_pem)
        if self.retiring is not None:
            pems.append(self.retiring)
        return b"".join(pem.strip() + b"\n" for pem in pems)


def ca_due(ca: LocalCA, now: datetime.datetime) -> bool:
    """Whether ``ca`` has lived ``ROTATE_FRACTION`` of its validity."""
    start, end = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    return now >= start + (end - start) * ROTATE_FRACTION


def rotation_step(
    state: CaRotation,
    now: datetime.datetime,
    *,
    request: str,
    new_ca: Callable[[], LocalCA],
    settle: datetime.timedelta = DEFAULT_SETTLE,
) -> CaRotation | None:
    """The next state to publish, or None when the current one stays (not yet settled, or
    nothing asked for). ``new_ca`` is called only when a rotation starts."""
    settled = state.since is None or now >= state.since + settle
    if state.pending is not None:
        if not settled:
            return None
        return replace(
            state, current=state.pending, pending=None, retiring=state.current.cert_pem, since=now
        )
    if state.retiring is not None:
        return replace(state, retiring=None, since=now) if settled else None
    if request != state.request or ca_due(state.current, now):
        return replace(state, pending=new_ca(), since=now, request=request)
    return None


def next_step_after(state: CaRotation, now: datetime.datetime, settle: datetime.timedelta) -> float:
    """Seconds until ``rotation_step`` can move a rotation in progress on (inf: none is)."""
    if state.phase == "steady" or state.since is None:
        return float("inf")
    return max(1.0, (state.since + settle - now).total_seconds())


def rotation_keys(pool_name: str) -> dict[str, str]:
    """The keys of ``snakepit-ca`` that hold a rotation, by role."""
    return {
        "pending_cert": f"{pool_name}.next.crt",
        "pending_key": f"{pool_name}.next.key",
        "retiring": f"{pool_name}.old.crt",
        "record": f"{pool_name}.rotation",
    }


def read_rotation(pool_name: str, current: LocalCA, data: Mapping[str, Any]) -> CaRotation:
    """The rotation state stored beside the pool's CA (``current``) in ``snakepit-ca``'s data.
    A damaged record counts as none: the worst that does is start a rotation again."""
    keys = rotation_keys(pool_name)
    pending = None
    if keys["pending_cert"] in data and keys["pending_key"] in data:
        pending = LocalCA.from_pem(
            _unb64(data[keys["pending_cert"]]), _unb64(data[keys["pending_key"]])
        )
    retiring = _unb64(data[keys["retiring"]]) if keys["retiring"] in data else None
    since, request = None, ""
    try:
        record = json.loads(_unb64(data.get(keys["record"], "")) or b"{}")
        since = datetime.datetime.fromisoformat(record["since"]) if record.get("since") else None
        request = str(record.get("request", ""))
    except (ValueError, TypeError, KeyError):
        pass
    return CaRotation(current, pending, retiring, since, request)


def rotation_data(
    pool_name: str, cert_key: str, key_key: str, state: CaRotation
) -> dict[str, str | None]:
    """A merge patch of ``snakepit-ca``'s data storing ``state`` (null: a key it no longer has)."""
    keys = rotation_keys(pool_name)
    record = {"since": state.since.isoformat() if state.since else "", "request": state.request}
    return {
        cert_key: _b64(state.current.cert_pem),
        key_key: _b64(state.current.key_pem),
        keys["pending_cert"]: _b64(state.pending.cert_pem) if state.pending else None,
        keys["pending_key"]: _b64(state.pending.key_pem) if state.pending else None,
        keys["retiring"]: _b64(state.retiring) if state.retiring else None,
        # No record for a CA never rotated nor asked to be: a pool's keys stay its two.
        keys["record"]: (
            _b64(json.dumps(record, sort_keys=True).encode())
            if state.since or state.request
            else None
        ),
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)
