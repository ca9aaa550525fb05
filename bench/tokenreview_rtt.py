"""What one TokenReview cache miss costs: real TokenReviews against a real kube-apiserver.

    flock /tmp/snakepit-cluster.lock python bench/tokenreview_rtt.py KUBECONFIG [--reviews N]

(the local cluster's admin kubeconfig: /var/lib/snakepit-cluster/admin.kubeconfig; the lock
because the machine's one cluster is shared; the run takes a few seconds.)

Mints a projected-style token for ServiceAccount ``default/default`` with the pool audience
(TokenRequest, as the kubelet does for a pod), then has the router's own
``TokenReviewAuthenticator`` check it N times with its cache off (ttl 0), so every check is a
miss: one ``POST .../tokenreviews`` through the official client, in a thread, as in the router.
Printed: median and p90 milliseconds per miss, and a cached check for comparison. A steady
caller pays one miss per token per ``ttl`` (60 s) and router replica.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from snakepit.security.tokenreview import TokenReviewAuthenticator, kube_review

AUDIENCE = "snakepit"


def tokenreview_rtt(kubeconfig: str, reviews: int = 50) -> str:
    from kubernetes import client, config

    def api_client() -> client.ApiClient:
        return config.new_client_from_config(config_file=kubeconfig)

    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=600)
    )
    minted = client.CoreV1Api(api_client()).create_namespaced_service_account_token(
        "default", "default", request
    )
    token = minted.status.token
    allowed = frozenset({("default", "default")})
    misses = TokenReviewAuthenticator(AUDIENCE, allowed, kube_review(api_client), ttl=0.0)
    cached = TokenReviewAuthenticator(AUDIENCE, allowed, kube_review(api_client))

    async def timed(auth: TokenReviewAuthenticator, n: int) -> list[float]:
        await auth(token)  # warm up: the client's connection, the thread pool
        out = []
        for _ in range(n):
            start = time.perf_counter()
            principal = await auth(token)
            out.append((time.perf_counter() - start) * 1000)
            assert principal is not None and principal.name.endswith(":default:default")
        return out

    miss = asyncio.run(timed(misses, reviews))
    hit = asyncio.run(timed(cached, 1000))
    assert misses.reviews == reviews + 1 and cached.reviews == 1
    p90 = statistics.quantiles(miss, n=10)[-1]
    return (
        f"TokenReview cache miss (real kube-apiserver, {reviews} reviews): "
        f"median {statistics.median(miss):.2f} ms, p90 {p90:.2f} ms; "
        f"cached check: median {statistics.median(hit) * 1000:.1f} µs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kubeconfig")
    parser.add_argument("--reviews", type=int, default=50)
    args = parser.parse_args()
    print(tokenreview_rtt(args.kubeconfig, args.reviews))
    return 0


if __name__ == "__main__":
    sys.exit(main())
