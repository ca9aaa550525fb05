"""The pure parts of identity: session keys, tokens files, tickets, ServiceAccount names, and the
TokenReview cache (its apiserver replaced by a recorded answer here: the real one is in
tests/integration/test_tokenreview_kube.py)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from snakepit.errors import InvalidArgument, Unauthenticated
from snakepit.security.identity import (
    ANONYMOUS,
    Principal,
    check_principal_name,
    session_id_of,
    session_key,
)
from snakepit.security.tickets import (
    TicketIssuer,
    TicketVerifier,
    load_public_key,
    new_private_key,
    public_key_text,
)
from snakepit.security.tokenreview import (
    TokenReviewAuthenticator,
    _expires_at,
    parse_service_accounts,
    service_account_of,
)
from snakepit.security.tokens import StaticTokens, parse_tokens

ALICE = Principal("alice", source="token")


def test_session_keys_are_per_principal_and_anonymous_keeps_bare_ids() -> None:
    assert session_key(ANONYMOUS, "s1") == "s1"
    assert session_key(ALICE, "s1") == "alice/s1"
    assert session_id_of(ALICE, "alice/s1") == "s1"
    assert session_id_of(ALICE, "bob/s1") is None
    assert session_id_of(ALICE, "alicex/s1") is None
    # No caller-chosen id reaches into another principal's keys: names hold no '/'.
    with pytest.raises(InvalidArgument):
        check_principal_name("alice/evil")
    check_principal_name("system:serviceaccount:team-a:caller")


def test_tokens_file_format_and_errors_never_echo_a_token() -> None:
    text = "# comment\n\nalice: token-aaaaaaaaaaaaaaaa  # trailing\nbob:token-bbbbbbbbbbbbbbbb\n"
    assert parse_tokens(text) == [
        ("alice", b"token-aaaaaaaaaaaaaaaa"),
        ("bob", b"token-bbbbbbbbbbbbbbbb"),
    ]
    for bad, expected in (
        ("only-a-token-without-name\n", "line 1: expected PRINCIPAL:TOKEN"),
        ("al/ice:token-aaaaaaaaaaaaaaaa\n", "line 1: principal name"),
        ("# x\nalice:short-secret\n", "line 2: the token of 'alice' is shorter than 16"),
    ):
        with pytest.raises(InvalidArgument, match=expected) as caught:
            parse_tokens(bad)
        assert "short-secret" not in str(caught.value)
        assert "only-a-token" not in str(caught.value)


def test_a_broken_edit_keeps_the_last_good_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice:token-aaaaaaaaaaaaaaaa\n")
    tokens = StaticTokens(path, recheck=0)
    assert tokens.principal_of("token-aaaaaaaaaaaaaaaa") == "alice"
    assert tokens.principal_of("token-aaaaaaaaaaaaaaab") is None
    path.write_text("alice token without colon\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert tokens.principal_of("token-aaaaaaaaaaaaaaaa") == "alice"
    path.write_text("bob:token-bbbbbbbbbbbbbbbb\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert tokens.principal_of("token-aaaaaaaaaaaaaaaa") is None
    assert tokens.principal_of("token-bbbbbbbbbbbbbbbb") == "bob"
    with pytest.raises(InvalidArgument, match="cannot use tokens file"):
        StaticTokens(tmp_path / "missing")


def test_tickets_round_trip_and_refusals() -> None:
    key = new_private_key()
    issuer = TicketIssuer(key, audience="pool-a")
    verifier = TicketVerifier(load_public_key(public_key_text(key.public_key())), audience="pool-a")
    ticket, expires = issuer.ticket_for("alice")
    assert issuer.ticket_for("alice") == (ticket, expires)  # reused, not signed per call
    assert verifier.verify(ticket) == Principal("alice", source="ticket")
    verifier.verify(ticket)
    assert verifier.misses == 1
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(issuer.issue("alice", lifetime=-60))
    with pytest.raises(Unauthenticated, match="audience 'pool-b'"):
        verifier.verify(TicketIssuer(key, audience="pool-b").issue("alice"))
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(TicketIssuer(new_private_key(), audience="pool-a").issue("alice"))
    head, payload, signature = ticket.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "root"  # a changed payload no longer matches its signature
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(f"{head}.{forged}.{signature}")
    with pytest.raises(Unauthenticated, match="malformed"):
        verifier.verify("Bearer something")
    # A cached ticket still ends when it expires.
    assert verifier.verify(ticket, now=expires + 1) is not None  # within the clock skew
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(ticket, now=expires + 3600)


def test_service_account_names() -> None:
    assert service_account_of("system:serviceaccount:team-a:caller") == ("team-a", "caller")
    assert service_account_of("system:node:n1") is None
    assert service_account_of("alice") is None
    assert parse_service_accounts(["team-a/caller", "team-b/*"]) == {
        ("team-a", "caller"),
        ("team-b", "*"),
    }
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        parse_service_accounts(["caller"])


def test_token_expiry_bounds_the_review_cache() -> None:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).decode().rstrip("=")
    assert _expires_at(f"h.{claims}.s") == 1234.0
    assert _expires_at("opaque-static-token") is None
    assert _expires_at("a.b.c") is None  # three parts, no claims: not a token to review


def _jwt(subject: str, exp: float) -> str:
    claims = json.dumps({"sub": subject, "exp": exp}).encode()
    return "h." + base64.urlsafe_b64encode(claims).decode().rstrip("=") + ".sig"


class _Apiserver:
    """TokenReview answers as the kube-apiserver gives them, for tokens made by ``_jwt``."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, token: str, audience: str) -> object:
        from types import SimpleNamespace

        self.asked.append(token)
        subject = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["sub"]
        if subject == "forged":
            return SimpleNamespace(authenticated=False, user=None, audiences=None)
        return SimpleNamespace(
            authenticated=True,
            user=SimpleNamespace(username=f"system:serviceaccount:{subject}"),
            audiences=[audience],
        )


async def test_token_reviews_are_cached_within_the_ttl_and_the_tokens_life() -> None:
    now = [1000.0]
    apiserver = _Apiserver()
    check = TokenReviewAuthenticator(
        "pool",
        parse_service_accounts(["team/caller"]),
        apiserver,
        ttl=60,
        negative_ttl=10,
        cache_size=2,
        clock=lambda: now[0],
    )
    long_lived = _jwt("team:caller", exp=5000)
    short_lived = _jwt("team:caller", exp=1020)  # expires before the TTL would end
    for _ in range(5):
        principal = await check(long_lived)
        assert principal is not None and principal.name == "system:serviceaccount:team:caller"
    assert apiserver.asked == [long_lived]  # one review, then the cache
    assert await check(short_lived) is not None
    now[0] = 1030.0  # past the short token's exp, within the TTL of both entries
    with pytest.raises(Unauthenticated, match="token has expired"):
        await check(short_lived)
    assert await check(long_lived) is not None
    assert len(apiserver.asked) == 2  # the expired token was refused without a review
    now[0] = 1061.0  # the TTL ended: asked again
    assert await check(long_lived) is not None
    assert len(apiserver.asked) == 3

    # Refusals are cached for the shorter negative TTL; the cache never grows past its size.
    forged = _jwt("forged", exp=5000)
    for _ in range(3):
        assert await check(forged) is None
    assert apiserver.asked.count(forged) == 1
    for i in range(5):
        assert await check(_jwt("team:caller", exp=5000 + i)) is not None
    assert check.cached == 2
    # A ServiceAccount the pool does not list is nobody here, named but its token never shown.
    other = _jwt("team:other", exp=5000)
    with pytest.raises(Unauthenticated, match="service account team/other may not") as caught:
        await check(other)
    assert other not in str(caught.value)
    # What is not a JWT (a static token of no one) never reaches the apiserver.
    asked = len(apiserver.asked)
    assert await check("opaque-static-token") is None
    assert len(apiserver.asked) == asked
