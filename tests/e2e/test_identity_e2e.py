"""A secured pool on a real cluster: operator-issued TLS certificates and callers who prove who
they are (issue 12), in a namespace and pool of this module.

The pool has ``spec.tls.enabled: true`` with no Secret (the operator issues its certificate,
valid ``LIFETIME``, renewed after 2/3 of it) and ``spec.auth`` with one allowed ServiceAccount
and a tokens Secret. Then:
- a pod running as the allowed ServiceAccount calls through the router Service over TLS with
  its projected token (audience ``snakepit``), and a pod of another ServiceAccount is refused
  UNAUTHENTICATED;
- from this machine, a static token of the Secret works through the Service;
- under a steady load from this machine, the operator renews the certificate, the kubelet
  delivers it, the processes reload it: no call fails, enough succeed, and the routers serve
  the new certificate.

The router's ServiceAccount needs ``create tokenreviews``: nothing here grants it by hand, the
operator makes it a subject of the chart's TokenReview ClusterRoleBinding (docs/operator.md,
"Who may review tokens"), and takes it back when the pool is deleted.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from localkube.providers import KubeCluster, wait_until
from snakepit import Client
from snakepit.errors import NotFound, Unauthenticated
from snakepit.security.tls import ChannelTls
from tests.e2e import test_pool_e2e as pool_e2e
from tests.e2e.report import report
from tests.support.load import MixedLoad

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(900)]

POOL = "guarded"
ROUTER_PORT = 50051
LIFETIME_SECONDS = 240  # renewed after 160 s; 80 s left for the kubelet to deliver it
STATIC_TOKEN = "e2e-" + uuid.uuid4().hex

ns = pool_e2e.ns  # a namespace of this module, and an operator release watching it
release = pool_e2e.release


def _spec(namespace: str) -> dict[str, Any]:
    return {
        "replicas": 2,
        "router": {"replicas": 1},
        "tls": {"enabled": True, "certificateLifetime": f"{LIFETIME_SECONDS}s"},
        "auth": {
            "serviceAccounts": [{"namespace": namespace, "name": "caller"}],
            "tokensSecret": "callers",
        },
    }


def _leaf(cluster: KubeCluster, ns: str) -> tuple[x509.Certificate, bytes] | None:
    out = cluster.kubectl_run(
        "-n", ns, "get", "secret", "snakepit-certs", "-o", "json", check=False
    )  # fmt: skip
    if out.returncode != 0:
        return None
    data = json.loads(out.stdout).get("data") or {}
    if f"{POOL}.tls.crt" not in data:
        return None
    cert = x509.load_pem_x509_certificate(base64.b64decode(data[f"{POOL}.tls.crt"]))
    return cert, base64.b64decode(data[f"{POOL}.ca.crt"])


def _served_serial(address: str, ca: Path, server_name: str) -> int:
    """The serial of the certificate the router serves now (a fresh TLS handshake)."""
    import socket

    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def guarded(
    kube_node: KubeCluster, ns: str, release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, str]]:
    """The pool, ready: (router address from this machine, its CA file, the router's name)."""
    if not kube_node.host_reaches_cluster_ips:
        pytest.skip(f"the {kube_node.provider} provider does not route cluster IPs here")
    for account in ("caller", "stranger"):
        kube_node.kubectl_run("-n", ns, "create", "serviceaccount", account)
    kube_node.kubectl_run(
        "-n", ns, "create", "secret", "generic", "callers",
        f"--from-literal=tokens=host:{STATIC_TOKEN}\n",
    )  # fmt: skip
    kube_node.apply(pool_e2e.pool_manifest(kube_node, POOL, _spec(ns)), namespace=ns)
    try:

        def ready() -> bool:
            pool = pool_e2e.kube_json(kube_node, "-n", ns, "get", "snakepitpool", POOL)
            return bool(
                pool_e2e.condition(pool, "Ready").get("status") == "True"
                and pool.get("status", {}).get("readyReplicas") == 2
            )

        try:
            wait_until("secured pool ready", ready, timeout=420, interval=1)
        except AssertionError:
            _diagnose(kube_node, ns)
            raise
        leaf = _leaf(kube_node, ns)
        assert leaf is not None
        ca = tmp_path_factory.mktemp("guarded") / "ca.pem"
        ca.write_bytes(leaf[1])
        name = f"{POOL}-router.{ns}.svc"
        with kube_node.service_address(ns, f"{POOL}-router", ROUTER_PORT) as address:
            tls = ChannelTls(str(ca), server_name=name)
            with Client(address, tls=tls, token=STATIC_TOKEN, timeout=30) as client:
                wait_until("router answers", client.ping, timeout=120)
            wait_until(
                "the router's TokenReview grant",
                lambda: f"{ns}/{POOL}-router" in _reviewers(kube_node),
                timeout=60,
            )
            yield address, ca, name
    finally:
        kube_node.kubectl_run("-n", ns, "delete", "spp", POOL, "--wait=false", check=False)
    wait_until(
        "the router's TokenReview grant taken back",
        lambda: f"{ns}/{POOL}-router" not in _reviewers(kube_node),
        timeout=60,
    )


def _reviewers(cluster: KubeCluster) -> set[str]:
    """Subjects of the chart's TokenReview binding (release ``snakepit``), as NS/NAME."""
    binding = pool_e2e.kube_json(cluster, "get", "clusterrolebinding", "snakepit-tokenreviewer")
    return {f"{s['namespace']}/{s['name']}" for s in binding.get("subjects") or ()}


def _diagnose(cluster: KubeCluster, ns: str) -> None:
    """What a person would look at when the pool does not become ready (the namespace is
    deleted afterwards)."""
    for args in (
        ("get", "snakepitpool", POOL, "-o", "jsonpath={.status}"),
        ("get", "pods", "-o", "wide"),
        ("get", "events", "--sort-by=.lastTimestamp"),
        ("logs", "-l", "app.kubernetes.io/component=router", "--tail=40", "--all-containers"),
        ("logs", "-l", "app.kubernetes.io/component=worker", "--tail=40", "--all-containers"),
        ("logs", "-l", "app.kubernetes.io/component=session-store", "--tail=40"),
    ):
        out = cluster.kubectl_run("-n", ns, *args, check=False)
        print(f"\n$ kubectl {' '.join(args)}\n{out.stdout[-6000:]}{out.stderr[-2000:]}")
    operator = cluster.kubectl_run(
        "-n", f"{ns}-system", "logs", "deployment/snakepit", "--tail=60", check=False
    )  # fmt: skip
    print(f"\noperator log:\n{operator.stdout[-6000:]}{operator.stderr[-2000:]}")


CALLER_SCRIPT = """
import json
from pathlib import Path
from snakepit import Client
from snakepit.errors import SnakepitError
token = Path("/var/run/secrets/snakepit/token").read_text()
target = "{pool}-router.{ns}.svc:{port}"
out = {{}}
for attempt in range(60):  # the NetworkPolicy engine admits a new pod a moment after it starts
    try:
        with Client(target, ca="/etc/snakepit-ca/ca.crt", token=token, timeout=10) as client:
            session = client.session(keep=True)
            out["add"] = session.execute("add", a=2, b=3)
            session.set("owner", "caller")
            out["session"] = session.id
        break
    except SnakepitError as exc:
        out = {{"code": type(exc).__name__, "message": str(exc)}}
        if type(exc).__name__ != "Unavailable":
            break
        import time; time.sleep(1)
print("RESULT " + json.dumps(out))
"""


def _run_as(cluster: KubeCluster, ns: str, account: str) -> dict[str, Any]:
    """A pod of ``account`` with a projected token for the pool's audience and the pool's CA."""
    pod = f"{account}-{uuid.uuid4().hex[:6]}"
    script = CALLER_SCRIPT.format(pool=POOL, ns=ns, port=ROUTER_PORT)
    cluster.apply(
        pool_e2e.client_pod_manifest(cluster, pod, script, POOL, account=account), namespace=ns
    )
    return dict(json.loads(pool_e2e._client_pod_result(cluster, ns, pod)))


def test_an_allowed_service_account_calls_and_another_is_refused(
    kube_node: KubeCluster, ns: str, guarded: tuple[str, Path, str]
) -> None:
    allowed = _run_as(kube_node, ns, "caller")
    assert allowed.get("add") == 5.0, allowed
    refused = _run_as(kube_node, ns, "stranger")
    assert refused["code"] == "Unauthenticated", refused
    assert f"service account {ns}/stranger may not call this pool" in refused["message"]
    # The session is the ServiceAccount's: the host's principal is told it does not exist.
    address, ca, name = guarded
    tls = ChannelTls(str(ca), server_name=name)
    with (
        Client(address, tls=tls, token=STATIC_TOKEN, timeout=30) as client,
        pytest.raises(NotFound),
    ):
        client.session(allowed["session"], keep=True).get("owner")


def test_a_static_token_from_the_secret_works_from_this_machine(
    guarded: tuple[str, Path, str],
) -> None:
    address, ca, name = guarded
    tls = ChannelTls(str(ca), server_name=name)
    with (
        Client(address, tls=tls, token=STATIC_TOKEN, timeout=30) as client,
        client.session() as session,
    ):
        assert session.execute("add", a=1, b=2) == 3
    with (
        Client(address, tls=tls, token="not-" + STATIC_TOKEN, timeout=30) as client,
        pytest.raises(Unauthenticated),
    ):
        client.execute("add", a=1, b=2)


def test_certificates_are_renewed_under_load_without_a_failed_call(
    kube_node: KubeCluster, ns: str, guarded: tuple[str, Path, str]
) -> None:
    address, ca, name = guarded
    first = _leaf(kube_node, ns)
    assert first is not None
    assert _served_serial(address, ca, name) == first[0].serial_number
    options = {"tls": ChannelTls(str(ca), server_name=name), "token": STATIC_TOKEN}
    with MixedLoad(address, sessions=8, tensor_mb=0.1, client_options=options) as load:
        with load.window("certificate renewal") as window:
            started = time.monotonic()
            renewed = wait_until(
                "a renewed certificate",
                lambda: (
                    (leaf := _leaf(kube_node, ns))
                    and leaf[0].serial_number != first[0].serial_number
                    and leaf
                ),
                timeout=LIFETIME_SECONDS,
                interval=2,
            )
            assert renewed[1] == first[1]  # the same CA
            wait_until(
                "the router serving the renewed certificate",
                lambda: _served_serial(address, ca, name) == renewed[0].serial_number,
                timeout=150,
                interval=2,
            )
            served = time.monotonic()
            time.sleep(10)  # calls on connections made with the new certificate too
        report(
            f"certificate renewal under load: {window.summary()}; the new certificate "
            f"served {served - started:.0f} s into the window"
        )
        window.check(min_calls=200)
        load.check_no_acknowledged_write_lost()
