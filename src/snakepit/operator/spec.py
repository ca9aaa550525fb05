"""The ``SnakepitPool`` resource as typed, defaulted Python values.

The CRD's structural schema already defaults and validates what the API server stores; parsing
defaults again here keeps the builders total for objects stored before a default existed and
gives them plain attributes instead of nested dict lookups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..security.identity import check_principal_name

JSON = dict[str, Any]

GROUP = "snakepit.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SnakepitPool"
PLURAL = "snakepitpools"

DEFAULT_ADAPTER = "snakepit.examples.showcase:ShowcaseAdapter"
WORKER_PORT = 50052
ROUTER_PORT = 50051
REDIS_PORT = 6379
METRICS_PORT = 9090
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
# What carries tool calls in a router pod (`snakepit router --data-path`, router/dataplane.py).
DATA_PATHS = ("auto", "haproxy", "python")
DEFAULT_MAX_CALL_SECONDS = 300


class SpecError(ValueError):
    """A pool spec the operator cannot build (normally refused earlier by the CRD schema)."""


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = 2
    service_type: str = "ClusterIP"
    port: int = ROUTER_PORT
    node_port: int | None = None
    resources: JSON = field(default_factory=dict)
    service_annotations: dict[str, str] = field(default_factory=dict)
    # CIDRs a LoadBalancer admits (the Service's spec.loadBalancerSourceRanges).
    load_balancer_source_ranges: tuple[str, ...] = ()
    # auto (the default: HAProxy from the router image unless the spec needs the Python router,
    # for strict affinity; see router/dataplane.py), haproxy or python;
    # the router logs which it chose and why.
    data_path: str = "auto"


@dataclass(frozen=True)
class SessionSpec:
    ttl_seconds: int = 3600
    max_sessions: int = 10_000


@dataclass(frozen=True)
class StorageSpec:
    size: str = "1Gi"
    storage_class_name: str | None = None


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = "password"


@dataclass(frozen=True)
class SessionStoreSpec:
    managed: bool = True
    url: str | None = None
    password_secret_ref: SecretKeyRef | None = None
    image: str | None = None
    storage: StorageSpec = field(default_factory=StorageSpec)
    resources: JSON = field(default_factory=dict)


@dataclass(frozen=True)
class PodTemplateOverrides:
    """What a user may add to worker pods; everything else about them is the operator's."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[JSON] = field(default_factory=list)
    affinity: JSON = field(default_factory=dict)
    topology_spread_constraints: list[JSON] = field(default_factory=list)
    service_account_name: str | None = None
    priority_class_name: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NetworkPolicySpec:
    enabled: bool = True
    direct_clients: list[JSON] = field(default_factory=list)
    # NetworkPolicyPeers that may call the router; none means this namespace's pods only.
    router_clients: list[JSON] = field(default_factory=list)
    # NetworkPolicyEgressRules added to the workers' own (DNS, router, session store).
    allow_egress: list[JSON] = field(default_factory=list)


@dataclass(frozen=True)
class LimitsSpec:
    """``spec.limits``: the router's store limits (``--max-*`` flags); None keeps its default."""

    max_value_bytes: int | None = None
    max_parsed_value_bytes: int | None = None
    max_session_bytes: int | None = None
    max_variables_per_session: int | None = None
    max_metadata_bytes: int | None = None
    max_session_ttl_seconds: int | None = None
    max_watchers: int | None = None
    max_watchers_per_session: int | None = None
    max_sessions_per_principal: int | None = None
    max_calls_per_principal: int | None = None
    max_store_calls_per_principal: int | None = None
    store_call_rate_per_principal: int | None = None
    value_helpers: int | None = None
    max_streams_per_connection: int | None = None


@dataclass(frozen=True)
class MetricsSpec:
    enabled: bool = True
    port: int = METRICS_PORT


@dataclass(frozen=True)
class AutoscalingSpec:
    """``spec.autoscaling``; ``target_load_per_worker`` None means 0.75 x workerConcurrency."""

    max_replicas: int
    min_replicas: int = 1
    target_load_per_worker: float | None = None
    scale_up_window_seconds: int = 0
    scale_down_window_seconds: int = 60
    scale_to_zero_after_seconds: int = 300


# Operator-issued certificates (spec.tls without secretName): how long a leaf is valid.
DEFAULT_CERTIFICATE_LIFETIME = 7 * 24 * 3600
# Shorter would leave less than the kubelet's Secret propagation (about a minute) between a
# renewal and the old certificate's expiry; tests use a few minutes.
MIN_CERTIFICATE_LIFETIME = 60
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class TlsSpec:
    """``spec.tls``: TLS on every hop. With ``secret_name`` the certificate is the user's (a
    Secret of type kubernetes.io/tls with ``ca.crt``: what cert-manager writes), renewed by
    whoever writes it; without one the operator issues it from the namespace's CA
    (builders/certs.py), valid ``certificate_lifetime`` seconds and renewed after 2/3 of it.

    On by default (a pool without ``spec.tls`` gets operator-issued certificates); only
    ``enabled: false`` turns it off. ``explicit`` records whether the spec said so, since only an
    explicit opt-out is warned of.
    """

    enabled: bool = True
    secret_name: str | None = None
    explicit: bool = False
    certificate_lifetime: int = DEFAULT_CERTIFICATE_LIFETIME

    @property
    def operator_issued(self) -> bool:
        return self.enabled and self.secret_name is None


def parse_duration(raw: str, field_name: str) -> int:
    """``90s``, ``10m``, ``24h``, ``7d`` (one number, one unit) as seconds."""
    text = raw.strip()
    unit = _DURATION_UNITS.get(text[-1:])
    if unit is None or not text[:-1].isdigit():
        raise SpecError(f"{field_name}: {raw!r} is not a duration like 90s, 10m, 24h or 7d")
    return int(text[:-1]) * unit


@dataclass(frozen=True)
class AuthSpec:
    """``spec.auth``: who may call (docs/security.md). On by default: without
    ``serviceAccounts`` the callers are the ServiceAccounts of the pool's own namespace
    (``NAMESPACE/*``, checked with TokenReview), plus the ``tokensSecret`` lines (PRINCIPAL:TOKEN
    under the Secret's key ``tokens``) if one is named. Only ``enabled: false`` turns it off;
    ``explicit`` records that the spec said so (the opt-out is shown and warned of).
    ``AuthSpec()`` is "on, nobody listed": parse_spec fills in the namespace's callers."""

    service_accounts: tuple[str, ...] = ()  # NAMESPACE/NAME, NAME may be *
    tokens_secret: str | None = None
    admins: tuple[str, ...] = ()
    direct_mode: tuple[str, ...] = ()  # principals allowed direct mode; "*": all
    audience: str = "snakepit"  # what ServiceAccount tokens must be minted for
    enabled: bool = True
    explicit: bool = False  # spec.auth.enabled was written (only an explicit false turns it off)
    # serviceAccounts was not given: the callers are the pool's namespace (NAMESPACE/*)
    default_callers: bool = False


@dataclass(frozen=True)
class PoolSpec:
    replicas: int = 2
    image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    adapter: str = DEFAULT_ADAPTER
    worker_concurrency: int = 4
    drain_timeout_seconds: int = 25
    resources: JSON = field(default_factory=dict)
    env: list[JSON] = field(default_factory=list)
    env_from: list[JSON] = field(default_factory=list)
    pod_template: PodTemplateOverrides = field(default_factory=PodTemplateOverrides)
    router: RouterSpec = field(default_factory=RouterSpec)
    session: SessionSpec = field(default_factory=SessionSpec)
    session_store: SessionStoreSpec = field(default_factory=SessionStoreSpec)
    network_policy: NetworkPolicySpec = field(default_factory=NetworkPolicySpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    max_call_seconds: int = DEFAULT_MAX_CALL_SECONDS
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    autoscaling: AutoscalingSpec | None = None
    tls: TlsSpec = field(default_factory=TlsSpec)
    # spec.hostedTools.poolWidePrincipals: who may register pool-wide caller-hosted tools.
    pool_tool_principals: tuple[str, ...] = ()
    auth: AuthSpec = field(default_factory=AuthSpec)


@dataclass(frozen=True)
class Pool:
    """Identity of one pool object plus its parsed spec.

    ``desired_replicas`` is the autoscaler's ``status.desiredReplicas`` (None when it has not
    decided yet): with ``spec.autoscaling`` it, not ``spec.replicas``, sizes the workers.
    """

    name: str
    namespace: str
    uid: str
    generation: int
    spec: PoolSpec
    desired_replicas: int | None = None

    @property
    def worker_replicas(self) -> int:
        """Worker pods to run: spec.replicas, or the autoscaler's choice within its limits."""
        scaling = self.spec.autoscaling
        if scaling is None:
            return self.spec.replicas
        wanted = self.spec.replicas if self.desired_replicas is None else self.desired_replicas
        return min(scaling.max_replicas, max(scaling.min_replicas, wanted))


def _map(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return [dict(v) if isinstance(v, Mapping) else v for v in value] if value else []


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items()}


def load_balancer_missing(router: RouterSpec, tls: TlsSpec, auth: AuthSpec) -> list[str]:
    """What a LoadBalancer router still lacks: it publishes the router outside the cluster, so
    it needs TLS, authentication and source ranges (empty for other Service types)."""
    if router.service_type != "LoadBalancer":
        return []
    missing = []
    if not tls.enabled:
        missing.append("TLS (spec.tls.enabled is false)")
    if not auth.enabled:
        missing.append("authentication (spec.auth.enabled is false)")
    if not router.load_balancer_source_ranges:
        missing.append("spec.router.loadBalancerSourceRanges (the addresses that may connect)")
    return missing


def load_balancer_refusal(missing: list[str]) -> str:
    return (
        "spec.router.serviceType LoadBalancer publishes the router outside the cluster, which "
        "needs TLS, authentication and spec.router.loadBalancerSourceRanges; missing: "
        + "; ".join(missing)
        + " (or use ClusterIP or NodePort; docs/security.md)"
    )


def _source_ranges(raw: Any) -> tuple[str, ...]:
    ranges = tuple(str(cidr).strip() for cidr in _list(raw))
    for cidr in ranges:
        if cidr in _EVERYWHERE:
            raise SpecError(
                f"spec.router.loadBalancerSourceRanges: {cidr} admits every address; list the "
                "networks of your callers"
            )
    return ranges


def _parse_router(raw: Mapping[str, Any]) -> RouterSpec:
    service_type = str(raw.get("serviceType", "ClusterIP"))
    if service_type not in SERVICE_TYPES:
        raise SpecError(f"spec.router.serviceType must be one of {', '.join(SERVICE_TYPES)}")
    node_port = raw.get("nodePort")
    data_path = str(raw.get("dataPath", "auto"))
    if data_path not in DATA_PATHS:
        raise SpecError(f"spec.router.dataPath must be one of {', '.join(DATA_PATHS)}")
    return RouterSpec(
        replicas=int(raw.get("replicas", 2)),
        service_type=service_type,
        port=int(raw.get("port", ROUTER_PORT)),
        node_port=int(node_port) if node_port is not None else None,
        resources=_map(raw.get("resources")),
        service_annotations=_str_map(raw.get("serviceAnnotations")),
        load_balancer_source_ranges=_source_ranges(raw.get("loadBalancerSourceRanges")),
        data_path=data_path,
    )


def _parse_store(raw: Mapping[str, Any]) -> SessionStoreSpec:
    managed = bool(raw.get("managed", True))
    url = raw.get("url") or None
    if not managed and not url:
        raise SpecError("spec.sessionStore.url is required when sessionStore.managed is false")
    ref_raw = raw.get("passwordSecretRef")
    ref = None
    if isinstance(ref_raw, Mapping) and ref_raw.get("name"):
        ref = SecretKeyRef(name=str(ref_raw["name"]), key=str(ref_raw.get("key", "password")))
    storage_raw = _map(raw.get("storage"))
    class_name = storage_raw.get("storageClassName")
    return SessionStoreSpec(
        managed=managed,
        url=str(url) if url else None,
        password_secret_ref=ref,
        image=str(raw["image"]) if raw.get("image") else None,
        storage=StorageSpec(
            size=str(storage_raw.get("size", "1Gi")),
            storage_class_name=str(class_name) if class_name is not None else None,
        ),
        resources=_map(raw.get("resources")),
    )


def _parse_pod_template(raw: Mapping[str, Any]) -> PodTemplateOverrides:
    meta = _map(raw.get("metadata"))
    return PodTemplateOverrides(
        labels=_str_map(meta.get("labels")),
        annotations=_str_map(meta.get("annotations")),
        node_selector=_str_map(raw.get("nodeSelector")),
        tolerations=_list(raw.get("tolerations")),
        affinity=_map(raw.get("affinity")),
        topology_spread_constraints=_list(raw.get("topologySpreadConstraints")),
        service_account_name=raw.get("serviceAccountName") or None,
        priority_class_name=raw.get("priorityClassName") or None,
        image_pull_secrets=[
            str(s["name"]) for s in raw.get("imagePullSecrets") or () if s.get("name")
        ],
    )


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return None if value is None else int(value)


def _parse_limits(raw: Mapping[str, Any]) -> LimitsSpec:
    return LimitsSpec(
        max_value_bytes=_opt_int(raw, "maxValueBytes"),
        max_parsed_value_bytes=_opt_int(raw, "maxParsedValueBytes"),
        max_session_bytes=_opt_int(raw, "maxSessionBytes"),
        max_variables_per_session=_opt_int(raw, "maxVariablesPerSession"),
        max_metadata_bytes=_opt_int(raw, "maxMetadataBytes"),
        max_session_ttl_seconds=_opt_int(raw, "maxSessionTTLSeconds"),
        max_watchers=_opt_int(raw, "maxWatchers"),
        max_watchers_per_session=_opt_int(raw, "maxWatchersPerSession"),
        max_sessions_per_principal=_opt_int(raw, "maxSessionsPerPrincipal"),
        max_calls_per_principal=_opt_int(raw, "maxCallsPerPrincipal"),
        max_store_calls_per_principal=_opt_int(raw, "maxStoreCallsPerPrincipal"),
        store_call_rate_per_principal=_opt_int(raw, "storeCallRatePerPrincipal"),
        value_helpers=_opt_int(raw, "valueHelpers"),
        max_streams_per_connection=_opt_int(raw, "maxStreamsPerConnection"),
    )


_EVERYWHERE = ("0.0.0.0/0", "::/0")


def _peers(raw: Any, where: str) -> list[JSON]:
    """NetworkPolicy peers, refusing the ones that would admit anybody at all."""
    peers = _list(raw)
    for peer in peers:
        block = _map(peer.get("ipBlock")) if isinstance(peer, Mapping) else {}
        if block.get("cidr") in _EVERYWHERE and not block.get("except"):
            raise SpecError(f"{where}: ipBlock {block['cidr']} admits every address")
        if (
            isinstance(peer, Mapping)
            and peer.get("namespaceSelector") == {}
            and not peer.get("podSelector")
        ):
            raise SpecError(f"{where}: an empty namespaceSelector admits every pod in the cluster")
    return peers


def _parse_autoscaling(raw: Any) -> AutoscalingSpec | None:
    if not isinstance(raw, Mapping):
        return None
    if "maxReplicas" not in raw:
        raise SpecError("spec.autoscaling.maxReplicas is required")
    target = raw.get("targetLoadPerWorker")
    scaling = AutoscalingSpec(
        max_replicas=int(raw["maxReplicas"]),
        min_replicas=int(raw.get("minReplicas", 1)),
        target_load_per_worker=float(target) if target is not None else None,
        scale_up_window_seconds=int(raw.get("scaleUpWindowSeconds", 0)),
        scale_down_window_seconds=int(raw.get("scaleDownWindowSeconds", 60)),
        scale_to_zero_after_seconds=int(raw.get("scaleToZeroAfterSeconds", 300)),
    )
    if not 0 <= scaling.min_replicas <= scaling.max_replicas or scaling.max_replicas < 1:
        raise SpecError(
            "spec.autoscaling needs 0 <= minReplicas <= maxReplicas and maxReplicas >= 1"
        )
    return scaling


def _parse_tls(raw: Mapping[str, Any]) -> TlsSpec:
    explicit = "enabled" in raw
    secret = raw.get("secretName") or None
    enabled = bool(raw.get("enabled", True))
    lifetime = DEFAULT_CERTIFICATE_LIFETIME
    if raw.get("certificateLifetime"):
        lifetime = parse_duration(str(raw["certificateLifetime"]), "spec.tls.certificateLifetime")
        if lifetime < MIN_CERTIFICATE_LIFETIME:
            raise SpecError(
                f"spec.tls.certificateLifetime must be at least {MIN_CERTIFICATE_LIFETIME}s"
            )
    return TlsSpec(
        enabled=enabled,
        secret_name=str(secret) if secret else None,
        explicit=explicit,
        certificate_lifetime=lifetime,
    )


def _parse_auth(raw: Mapping[str, Any], namespace: str) -> AuthSpec:
    """``spec.auth`` with the secure default: on, and without ``serviceAccounts`` every
    ServiceAccount of ``namespace`` (the pool's) may call; an explicit list (even an empty one,
    for a pool reached with static tokens only) replaces that."""
    explicit = "enabled" in raw
    enabled = bool(raw.get("enabled", True))
    default_callers = raw.get("serviceAccounts") is None
    accounts = [f"{namespace}/*"] if default_callers else []
    for entry in _list(raw.get("serviceAccounts")):
        account = _map(entry)
        ns, name = str(account.get("namespace", "")), str(account.get("name", ""))
        if not ns or not name:
            raise SpecError("spec.auth.serviceAccounts: each entry needs a namespace and a name")
        accounts.append(f"{ns}/{name}")
    tokens_secret = str(raw["tokensSecret"]) if raw.get("tokensSecret") else None
    if enabled and not accounts and not tokens_secret:
        raise SpecError(
            "spec.auth.serviceAccounts is empty and there is no spec.auth.tokensSecret: nobody "
            "could call this pool (leave serviceAccounts out for the namespace's own "
            "ServiceAccounts, or say spec.auth.enabled: false to turn authentication off)"
        )
    return AuthSpec(
        service_accounts=tuple(accounts) if enabled else (),
        tokens_secret=tokens_secret if enabled else None,
        admins=tuple(str(v) for v in _list(raw.get("admins"))),
        direct_mode=tuple(str(v) for v in _list(raw.get("directMode"))),
        audience=str(raw.get("audience") or "snakepit"),
        enabled=enabled,
        explicit=explicit,
        default_callers=default_callers and enabled,
    )


def auth_of(raw_spec: Mapping[str, Any], namespace: str) -> AuthSpec:
    """``spec.auth`` alone, for readers that need only it (the TokenReview binding)."""
    return _parse_auth(_map(raw_spec.get("auth")), namespace)


def parse_spec(raw: Mapping[str, Any], namespace: str = "default") -> PoolSpec:
    """Defaulted, typed view of ``spec`` of a pool in ``namespace`` (the default callers are
    that namespace's ServiceAccounts); raises SpecError for what the builders cannot use."""
    session = _map(raw.get("session"))
    policy = _map(raw.get("networkPolicy"))
    metrics = _map(raw.get("metrics"))
    router = _parse_router(_map(raw.get("router")))
    tls = _parse_tls(_map(raw.get("tls")))
    auth = _parse_auth(_map(raw.get("auth")), namespace)
    missing = load_balancer_missing(router, tls, auth)
    if missing:
        raise SpecError(load_balancer_refusal(missing))
    limits = _parse_limits(_map(raw.get("limits")))
    autoscaling = _parse_autoscaling(raw.get("autoscaling"))
    return PoolSpec(
        replicas=int(raw.get("replicas", 2)),
        image=str(raw["image"]) if raw.get("image") else None,
        image_pull_policy=str(raw.get("imagePullPolicy", "IfNotPresent")),
        adapter=str(raw.get("adapter") or DEFAULT_ADAPTER),
        worker_concurrency=int(raw.get("workerConcurrency", 4)),
        drain_timeout_seconds=int(raw.get("drainTimeoutSeconds", 25)),
        resources=_map(raw.get("resources")),
        env=_list(raw.get("env")),
        env_from=_list(raw.get("envFrom")),
        pod_template=_parse_pod_template(_map(raw.get("podTemplate"))),
        router=router,
        session=SessionSpec(
            ttl_seconds=int(session.get("ttlSeconds", 3600)),
            max_sessions=int(session.get("maxSessions", 10_000)),
        ),
        session_store=_parse_store(_map(raw.get("sessionStore"))),
        network_policy=NetworkPolicySpec(
            enabled=bool(policy.get("enabled", True)),
            direct_clients=_peers(policy.get("directClients"), "spec.networkPolicy.directClients"),
            router_clients=_peers(policy.get("routerClients"), "spec.networkPolicy.routerClients"),
            allow_egress=_list(policy.get("allowEgress")),
        ),
        metrics=MetricsSpec(
            enabled=bool(metrics.get("enabled", True)),
            port=int(metrics.get("port", METRICS_PORT)),
        ),
        max_call_seconds=int(raw.get("maxCallSeconds", DEFAULT_MAX_CALL_SECONDS)),
        limits=limits,
        autoscaling=autoscaling,
        tls=tls,
        pool_tool_principals=_principals(
            _map(raw.get("hostedTools")).get("poolWidePrincipals"),
            "spec.hostedTools.poolWidePrincipals",
        ),
        auth=auth,
    )


def _principals(raw: Any, where: str) -> tuple[str, ...]:
    """Principal names (or ``*``), checked as the router checks them."""
    names = tuple(str(name) for name in _list(raw))
    for name in names:
        if name != "*":
            try:
                check_principal_name(name)
            except InvalidArgument as exc:
                raise SpecError(f"{where}: {exc}") from None
    return names


def parse_pool(body: Mapping[str, Any]) -> Pool:
    """A ``Pool`` from a SnakepitPool object as the API server returns it."""
    meta = _map(body.get("metadata"))
    return Pool(
        name=str(meta["name"]),
        namespace=str(meta["namespace"]),
        uid=str(meta["uid"]),
        generation=int(meta.get("generation", 1)),
        spec=parse_spec(_map(body.get("spec")), str(meta["namespace"])),
        desired_replicas=_desired(_map(body.get("status")).get("desiredReplicas")),
    )


def _desired(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value >= 0 else None
