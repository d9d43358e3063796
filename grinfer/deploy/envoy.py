"""envoy.yaml for a fleet: a ring-hash cluster keyed on the `x-user-id` header, active /readyz checks.

Routes: rank and recommend may be retried on another replica when the connection failed before the
request went out (`retry_on: connect-failure,reset-before-request`), nothing else is retried. With
gRPC, a second listener routes HTTP/2 to the replicas' gRPC ports (a cluster speaking HTTP/2
upstream) on the same ring (replicas are placed by a hash key of their own, not their address, so a
user's REST and gRPC calls meet on one replica) with the REST port's /readyz as its health check (a
replica's readiness speaks for both of its ports). The admin interface (`--admin`) serves Envoy's
own stats and /clusters.
"""

from __future__ import annotations

import ipaddress
import json

from grinfer.deploy.plan import READY_PATH, RETRYABLE_PATHS, USER_HEADER, Address, Plan

CHECK_INTERVAL = "0.5s"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _socket(a: Address) -> dict:
    return {"socket_address": {"address": a.host.strip("[]"), "port_value": a.port}}


def _route(cluster: str, plan: Plan, retry: bool) -> dict:
    route: dict = {"cluster": cluster, "timeout": "60s"}
    if plan.affine:
        route["hash_policy"] = [{"header": {"header_name": USER_HEADER.lower()}}]
    if retry:
        # connect-failure: the replica is gone; reset-before-request: a pooled connection to it died before the
        # request went out. Either way nothing reached a replica, so nothing can run twice.
        route["retry_policy"] = {"retry_on": "connect-failure,reset-before-request", "num_retries": 2,
                                 "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                           "typed_config": {"@type": "type.googleapis.com/envoy."
                                                                            "extensions.retry.host.previous_hosts.v3."
                                                                            "PreviousHostsPredicate"}}],
                                 "host_selection_retry_max_attempts": 3}
    return route


def _listener(name: str, at: Address, routes: list[dict], grpc: bool) -> dict:
    manager = {"@type": _HCM, "stat_prefix": name, "codec_type": "HTTP2" if grpc else "AUTO",
               "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}]}
    return {"name": name, "address": _socket(at),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}]}


def _cluster(name: str, servers: tuple[Address, ...], checks: tuple[Address, ...], plan: Plan, http2: bool) -> dict:
    # the ring places replica i by its hash key "r<i>", not its address: the REST and gRPC rings agree
    endpoints = [{"endpoint": {"address": _socket(a), "health_check_config": {"port_value": c.port}},
                  "metadata": {"filter_metadata": {"envoy.lb": {"hash_key": f"r{i}"}}}}
                 for i, (a, c) in enumerate(zip(servers, checks))]
    named = any(not _is_ip(a.host) for a in servers)  # host names (Compose services) are resolved by DNS
    cluster = {"name": name, "type": "STRICT_DNS" if named else "STATIC", "connect_timeout": "2s",
               "lb_policy": "RING_HASH" if plan.affine else "ROUND_ROBIN",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
               "health_checks": [{"timeout": "1s", "interval": CHECK_INTERVAL, "unhealthy_threshold": 2,
                                  "healthy_threshold": 2, "no_traffic_interval": CHECK_INTERVAL,
                                  # /readyz is HTTP/1.1 on the REST port, whatever the cluster speaks
                                  "http_health_check": {"path": READY_PATH, "codec_client_type": "HTTP1"}}],
               "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
               # Envoy's default allows 3 retries in flight per cluster: a replica's death retries all its users'
               "circuit_breakers": {"thresholds": [{"max_retries": 1024}]}}
    if plan.affine:
        cluster["ring_hash_lb_config"] = {"minimum_ring_size": 1024}
    if http2:
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def render(plan: Plan) -> str:
    """The whole envoy.yaml text (JSON, which is YAML)."""
    retried = [{"match": {"path": p}, "route": _route("grinfer", plan, retry=True)} for p in RETRYABLE_PATHS]
    listeners = [_listener("rest", plan.listen, [*retried, {"match": {"prefix": "/"},
                                                            "route": _route("grinfer", plan, retry=False)}], False)]
    clusters = [_cluster("grinfer", plan.replicas, plan.replicas, plan, http2=False)]
    if plan.grpc and plan.grpc_listen is not None:
        listeners.append(_listener("grpc", plan.grpc_listen, [{"match": {"prefix": "/"},
                                                               "route": _route("grinfer_grpc", plan, False)}], True))
        clusters.append(_cluster("grinfer_grpc", plan.grpc_replicas, plan.replicas, plan, http2=True))
    config: dict = {"static_resources": {"listeners": listeners, "clusters": clusters}}
    if plan.admin:
        config["admin"] = {"address": _socket(plan.admin)}
    header = f"# generated by `grinfer deploy envoy` ({plan.policy}, {len(plan.replicas)} replicas)\n"
    return header + json.dumps(config, indent=2) + "\n"
