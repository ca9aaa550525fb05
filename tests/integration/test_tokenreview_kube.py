"""ServiceAccount tokens checked with TokenReview against a real kube-apiserver.

Real tokens (``kubectl create token``, audience-bound) of real ServiceAccounts; a router process
with ``--allow-service-account`` asks the apiserver. Allowed ServiceAccount: accepted and named
by its username. UNAUTHENTICATED, with a message saying what was expected and never the token:
no token, a token the apiserver does not vouch for (its signature altered), a token for another
audience, an expired one, one of a deleted ServiceAccount, and one of a ServiceAccount the pool
does not list (named). The apiserver mints tokens for at least 10 minutes, so the expired token
is one whose ``exp`` claim is in the past (refused before any review; the apiserver would refuse
it too: its signature no longer matches). A steady caller costs one review per cache TTL.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from localkube.providers import KubeCluster
from snakepit import Client
from snakepit.errors import Unauthenticated
from snakepit.router.discovery import _api_client
from snakepit.security.tickets import new_private_key, private_key_pem, public_key_pem
from snakepit.security.tokenreview import (
    TokenReviewAuthenticator,
    kube_review,
    parse_service_accounts,
)
from tests.fixtures.processes import ProcessFactory, start_pool

pytestmark = pytest.mark.timeout(1800)  # includes waiting for the machine's cluster lock
AUDIENCE = "snakepit-test"
ADAPTER = "tests.support.adapters:IdentityProbeAdapter"


def _token(cluster: KubeCluster, namespace: str, account: str, audience: str = AUDIENCE) -> str:
    out = cluster.kubectl_run(
        "-n", namespace, "create", "token", account, "--audience", audience, "--duration", "10m"
    )
    return out.stdout.strip()


def _expired(token: str) -> str:
    """``token`` with its ``exp`` claim moved an hour into the past (its signature then fails)."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] = claims["iat"] - 3600
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{encoded}.{signature}"


def test_service_account_tokens_through_a_router(
    kube_control_plane: KubeCluster,
    kube_namespace: str,
    procs: ProcessFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    cluster, ns = kube_control_plane, kube_namespace
    for account in ("caller", "other", "gone"):
        cluster.kubectl_run("-n", ns, "create", "serviceaccount", account)
    allowed = _token(cluster, ns, "caller")
    other = _token(cluster, ns, "other")
    wrong_audience = _token(cluster, ns, "caller", audience="someone-else")
    gone = _token(cluster, ns, "gone")
    cluster.kubectl_run("-n", ns, "delete", "serviceaccount", "gone", "--wait")
    tampered = allowed[:-4] + ("AAAA" if not allowed.endswith("AAAA") else "BBBB")

    # The router vouches for its callers to the workers with pool tickets (as the operator wires
    # it): workers then see the ServiceAccount as the call's principal.
    key = new_private_key()
    (tmp_path / "ticket.key").write_bytes(private_key_pem(key))
    (tmp_path / "ticket.pub").write_bytes(public_key_pem(key.public_key()))
    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    router, _ = start_pool(
        procs, 1,
        "--allow-service-account", f"{ns}/caller",
        "--token-audience", AUDIENCE,
        "--ticket-key", str(tmp_path / "ticket.key"), "--ticket-audience", "tr-pool",
        adapter=ADAPTER, env=env, router_env=env, token=allowed,
        worker_args=("--ticket-public-key", str(tmp_path / "ticket.pub"),
                     "--ticket-audience", "tr-pool"),
    )  # fmt: skip
    with Client(router.address, token=allowed) as client, client.session() as session:
        assert session.execute("whoami")["principal"] == f"system:serviceaccount:{ns}:caller"
        assert allowed not in repr(session.execute("whoami"))
    with Client(router.address) as client, pytest.raises(Unauthenticated, match="Bearer"):
        client.execute("add", a=1, b=2)
    refusals = {
        other: f"service account {ns}/other may not call this pool",
        wrong_audience: "not one this pool accepts",
        tampered: "not one this pool accepts",
        gone: "not one this pool accepts",
        _expired(allowed): "token has expired",
    }
    for token, message in refusals.items():
        with Client(router.address, token=token) as client:
            with pytest.raises(Unauthenticated, match=message) as caught:
                client.execute("add", a=1, b=2)
            assert token not in str(caught.value)

    # The authenticator itself: one review per token until the cache entry ends.
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    check = TokenReviewAuthenticator(
        AUDIENCE, parse_service_accounts([f"{ns}/*"]), kube_review(_api_client)
    )

    async def run() -> None:
        for _ in range(20):
            principal = await check(allowed)
            assert principal is not None and principal.source == "serviceaccount"
        assert (await check(other)) is not None  # the whole namespace is allowed here
        assert (await check(wrong_audience)) is None
        assert (await check(tampered)) is None
        assert (await check("not-a-token")) is None  # not a JWT: never reviewed

    asyncio.run(run())
    assert check.reviews == 4
