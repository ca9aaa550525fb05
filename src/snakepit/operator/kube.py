"""The few Kubernetes API calls the reconciler makes, over the official ``kubernetes`` client.

Why the official client: it is the supported one, handles every kubeconfig/in-cluster auth
flavour (including projected token refresh), and kopf already logs in through it. Its typed
API would force a model class per kind, so requests go through its generic ``ApiClient`` with
plain dicts and paths from a small table of the kinds the operator owns. It is synchronous:
calls run on a small dedicated thread pool so the kopf event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import quote

from .config import FIELD_MANAGER
from .spec import API_VERSION, JSON, KIND, PLURAL

# (apiVersion, kind) -> plural, for every kind the operator reads or writes. Cluster-scoped
# kinds (the chart's TokenReview ClusterRoleBinding) take the namespace "" in ``path``.
PLURALS: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "clusterrolebindings",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    (API_VERSION, KIND): PLURAL,
}

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


class ApiError(Exception):
    """A refused request, with the API server's own message (it names the offending field)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_body(cls, status: int, body: bytes | str | None) -> ApiError:
        text = body.decode(errors="replace") if isinstance(body, bytes) else (body or "")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return cls(status, str(parsed.get("reason", "")), str(parsed.get("message", text)))
        return cls(status, "", text[:500])


def path(
    api_version: str,
    kind: str,
    namespace: str,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL of a kind, of one object of it, or of its subresource; ``namespace`` "" is
    every namespace for a namespaced kind (a list) and the only form of a cluster-scoped one."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{quote(namespace)}" if namespace else ""
    url = f"{base}{scope}/{PLURALS[(api_version, kind)]}"
    if name:
        url += f"/{quote(name)}"
    if subresource:
        url += f"/{subresource}"
    return url


def object_path(obj: Mapping[str, Any], subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"], subresource)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_api_client() -> Any:
    """In-cluster credentials when running in a pod, else the kubeconfig (like kopf's login)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    config: Any = kube_config  # untyped module
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class Kube:
    def __init__(
        self,
        api_client: Any,
        field_manager: str = FIELD_MANAGER,
        timeout: tuple[float, float] = (5.0, 30.0),
        threads: int = 8,
    ) -> None:
        self.api = api_client
        self.field_manager = field_manager
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self.instance = socket.gethostname()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    def call(
        self,
        method: str,
        url: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> JSON:
        """One request, synchronously (``request`` is the non-blocking form)."""
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method,
            url,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*request, _request_timeout=self.timeout)
        except ApiException as exc:
            raise ApiError.from_body(int(exc.status or 0), exc.body) from None
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError.from_body(response.status, data)
        parsed = json.loads(data) if data else {}
        return parsed if isinstance(parsed, dict) else {}

    async def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> JSON:
        loop = asyncio.get_running_loop()
        call = partial(self.call, method, url, body, content_type, query)
        return await loop.run_in_executor(self._executor, call)

    async def apply(self, obj: JSON) -> JSON:
        """Server-side apply as our field manager; ``force`` takes back fields others changed."""
        query = [("fieldManager", self.field_manager), ("force", "true")]
        return await self.request("PATCH", object_path(obj), obj, APPLY, query)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> JSON | None:
        try:
            return await self.request("GET", path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str = "") -> list[JSON]:
        """Every object of a kind in ``namespace`` ("": all namespaces), one page at a time."""
        items: list[JSON] = []
        query: list[tuple[str, str]] = [("limit", "500")]
        while True:
            page = await self.request("GET", path(api_version, kind, namespace), query=query)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query = [("limit", "500"), ("continue", token)]

    async def create(self, obj: JSON) -> JSON:
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta["namespace"])
        return await self.request("POST", url, obj, query=[("fieldManager", self.field_manager)])

    async def patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: JSON
    ) -> JSON:
        """JSON merge patch (a ``metadata.resourceVersion`` in it makes it conditional)."""
        query = [("fieldManager", self.field_manager)]
        url = path(api_version, kind, namespace, name)
        return await self.request("PATCH", url, patch, MERGE, query)

    async def delete(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str
    ) -> None:
        """Delete exactly the object we saw (uid precondition); gone already is fine."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
            "preconditions": {"uid": uid},
        }
        try:
            await self.request("DELETE", path(api_version, kind, namespace, name), options)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    async def patch_status(self, pool: Mapping[str, Any], patch: JSON) -> JSON:
        query = [("fieldManager", self.field_manager)]
        return await self.request(
            "PATCH", object_path(pool, "status"), {"status": patch}, MERGE, query
        )

    async def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``obj`` (what ``kubectl describe`` shows)."""
        meta = obj["metadata"]
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.field_manager, "host": self.instance},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", path("v1", "Event", meta["namespace"]), event)

    async def served(self, group_version: str) -> bool:
        """Whether the API server serves ``group/version`` (discovery needs no RBAC grant)."""
        try:
            await self.request("GET", f"/apis/{group_version}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
