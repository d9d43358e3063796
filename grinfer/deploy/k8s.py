"""Kubernetes manifests for a fleet: a StatefulSet of replicas (stable names: X-Grinfer-Replica is the pod's),
Services, ingress-nginx Ingresses hashing `$http_x_user_id` (REST, and gRPC over TLS), a PodDisruptionBudget
and, optionally, a Prometheus Operator ServiceMonitor. The CPU and GPU variants differ only in the image,
the device and the `nvidia.com/gpu` resource.

The replicas read their store URL from the Secret `grinfer-store` (key `url`) and use the Redis named by
`--cache`; each keeps its GRINFER_HOME (demo models, compile caches) on a volume of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from grinfer.deploy.plan import READY_PATH

VARIANTS = ("cpu", "gpu")
HTTP_PORT, GRPC_PORT = 8000, 50051
APP = {"app.kubernetes.io/name": "grinfer"}


@dataclass(frozen=True)
class Cluster:
    variant: str = "cpu"
    replicas: int = 3
    image: str = "grinfer:latest"
    cache: str = "redis://redis:6379/0"
    host: str = "grinfer.example.com"
    service_monitor: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 1 <= self.replicas <= 1000:
            raise ValueError(f"--count: expected 1..1000 replicas, got {self.replicas}")


def _container(c: Cluster) -> dict:
    gpu = c.variant == "gpu"
    resources = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    if gpu:
        resources["requests"]["nvidia.com/gpu"] = "1"
        resources["limits"]["nvidia.com/gpu"] = "1"
    env = [{"name": "GRINFER_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "GRINFER_HOST", "value": "0.0.0.0"},
           {"name": "GRINFER_DEVICE", "value": "cuda" if gpu else "cpu"},
           {"name": "GRINFER_STORE", "valueFrom": {"secretKeyRef": {"name": "grinfer-store", "key": "url"}}},
           {"name": "GRINFER_CACHE", "value": c.cache}]
    probe = lambda path, period, failures: {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
                                            "timeoutSeconds": 2, "failureThreshold": failures}
    return {"name": "grinfer", "image": c.image, "imagePullPolicy": "IfNotPresent", "env": env,
            "ports": [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT}],
            # /readyz fails while starting, draining or without its store: the pod leaves the Service (and the ring)
            "readinessProbe": probe(READY_PATH, 2, 2), "livenessProbe": probe("/healthz", 10, 3),
            "resources": resources,
            # endpoints are updated before SIGTERM starts the drain
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "home", "mountPath": "/var/lib/grinfer"}, {"name": "tmp", "mountPath": "/tmp"}]}


def _statefulset(c: Cluster) -> dict:
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                               "seccompProfile": {"type": "RuntimeDefault"}},
           "terminationGracePeriodSeconds": 45, "containers": [_container(c)],
           "volumes": [{"name": "tmp", "emptyDir": {}}]}
    if c.variant == "gpu":
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    claim = {"metadata": {"name": "home"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                   "resources": {"requests": {"storage": "10Gi"}}}}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "grinfer", "labels": APP},
            "spec": {"serviceName": "grinfer-pods", "replicas": c.replicas, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": APP},
                     "template": {"metadata": {"labels": APP}, "spec": pod}, "volumeClaimTemplates": [claim]}}


def _services() -> list[dict]:
    ports = [{"name": "http", "port": HTTP_PORT, "targetPort": "http"},
             {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"}]
    service = lambda name, extra: {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": APP},
                                   "spec": {"selector": APP, "ports": ports, **extra}}
    return [service("grinfer", {}), service("grinfer-pods", {"clusterIP": "None"})]  # pods: stable DNS names


def _ingresses(c: Cluster) -> list[dict]:
    def ingress(name: str, port: str, annotations: dict, tls: bool) -> dict:
        spec = {"ingressClassName": "nginx",
                "rules": [{"host": c.host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
                    "service": {"name": "grinfer", "port": {"name": port}}}}]}}]}
        if tls:
            spec["tls"] = [{"hosts": [c.host], "secretName": "grinfer-tls"}]
        hashing = {"nginx.ingress.kubernetes.io/upstream-hash-by": "$http_x_user_id"}
        return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": name, "labels": APP, "annotations": {**hashing, **annotations}}, "spec": spec}
    return [ingress("grinfer", "http", {"nginx.ingress.kubernetes.io/proxy-body-size": "2m"}, False),
            # gRPC clients reach ingress-nginx over HTTP/2, which it takes over TLS
            ingress("grinfer-grpc", "grpc", {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}, True)]


def _disruption_budget() -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "grinfer", "labels": APP},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": APP}}}


def _service_monitor() -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "grinfer", "labels": APP},
            "spec": {"selector": {"matchLabels": APP}, "endpoints": [{"port": "http", "path": "/metrics",
                                                                       "interval": "15s"}]}}


def manifests(c: Cluster) -> list[dict]:
    """Every object, in the order `kubectl apply` should create them."""
    objects = [*_services(), _statefulset(c), _disruption_budget(), *_ingresses(c)]
    return objects + ([_service_monitor()] if c.service_monitor else [])


class _Plain(yaml.SafeDumper):
    """YAML without anchors and aliases (the label maps are shared objects): plain to read and to diff."""

    def ignore_aliases(self, data) -> bool:
        return True


def render(c: Cluster) -> str:
    """The manifests as one multi-document YAML file."""
    head = f"# generated by `grinfer deploy k8s --variant {c.variant} --image {c.image}` ({c.replicas} replicas)\n"
    return head + "---\n".join(yaml.dump(o, Dumper=_Plain, sort_keys=False) for o in manifests(c))
