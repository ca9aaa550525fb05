"""ServiceAccount tokens checked with TokenReview against a real kube-apiserver.

Real tokens (``kubectl create token``, audience-bound) of real ServiceAccounts; a router process
with ``--allow-service-account`` asks the apiserver. Allowed ServiceAccount: accepted and named
by its username; another ServiceAccount: PERMISSION_DENIED naming it; a token for another
audience: UNAUTHENTICATED. A steady caller costs one review per cache TTL, not one per call.
"""

from __future__ import annotations

import asyncio

import pytest

from localkube.providers import KubeCluster
from snakepit import Client
from snakepit.errors import PermissionDenied, Unauthenticated
from snakepit.router.discovery import _api_client
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


def test_service_account_tokens_through_a_router(
    kube_control_plane: KubeCluster,
    kube_namespace: str,
    procs: ProcessFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, ns = kube_control_plane, kube_namespace
    for account in ("caller", "other"):
        cluster.kubectl_run("-n", ns, "create", "serviceaccount", account)
    allowed = _token(cluster, ns, "caller")
    other = _token(cluster, ns, "other")
    wrong_audience = _token(cluster, ns, "caller", audience="someone-else")

    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    router, _ = start_pool(
        procs, 1,
        "--allow-service-account", f"{ns}/caller",
        "--token-audience", AUDIENCE,
        adapter=ADAPTER, env=env, router_env=env, token=allowed,
    )  # fmt: skip
    with Client(router.address, token=allowed) as client, client.session() as session:
        assert session.execute("whoami")["principal"] == f"system:serviceaccount:{ns}:caller"
        assert allowed not in repr(session.execute("whoami"))
    with (
        Client(router.address, token=other) as client,
        pytest.raises(PermissionDenied, match=f"service account {ns}/other may not"),
    ):
        client.execute("add", a=1, b=2)
    with Client(router.address, token=wrong_audience) as client:
        with pytest.raises(Unauthenticated, match="not one this pool accepts") as caught:
            client.execute("add", a=1, b=2)
        assert wrong_audience not in str(caught.value)

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
        assert (await check("not-a-token")) is None

    asyncio.run(run())
    assert check.reviews == 4
