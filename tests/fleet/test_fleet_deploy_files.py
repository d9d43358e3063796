"""The deployment files: the shipped balancer and Kubernetes files are what `grinfer deploy` writes, every
generated balancer configuration passes the balancer's own check, the Dockerfiles pass hadolint, the
Compose file passes `docker compose config` and the manifests the Kubernetes schemas (offline). No image
is built here: there is no Docker engine on these machines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_util import BALANCERS, CONFIG_NAME, RENDER, binary

from grinfer.deploy.k8s import Cluster, render
from grinfer.deploy.plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
LOOPBACK = {"replicas": "127.0.0.1:18001,127.0.0.1:18002,127.0.0.1:18003", "listen": "127.0.0.1:18080",
            "grpc_replicas": "127.0.0.1:19001,127.0.0.1:19002,127.0.0.1:19003", "grpc_listen": "127.0.0.1:18090",
            "admin": "127.0.0.1:18099"}


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}:/usr/local/bin:/usr/bin")
    if found is None:
        pytest.skip(f"{name} is not installed (the test extra installs it)")
    return found


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_shipped_files_are_what_the_documented_commands_write(tmp_path):
    block = re.search(r"```bash\n(.*?)```", (DEPLOY / "README.md").read_text(), re.S).group(1)
    script = f'grinfer() {{ "{sys.executable}" -m grinfer.cli "$@"; }}\nset -e\n{block}'
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 5
    for path in written:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: regenerate it"


@pytest.mark.parametrize("policy", ["hash", "round-robin"])
@pytest.mark.parametrize("kind", BALANCERS)
def test_generated_configurations_pass_the_balancers_own_check(kind, policy, tmp_path):
    text = RENDER[kind](make_plan(policy=policy, **LOOPBACK))
    config = tmp_path / CONFIG_NAME[kind]
    config.write_text(text)
    if kind == "nginx":
        done = run(binary("nginx"), "-t", "-p", str(tmp_path), "-c", str(config))
    elif kind == "haproxy":
        done = run(binary("haproxy"), "-c", "-f", str(config))
    else:
        done = run(binary("envoy"), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id")
    assert done.returncode == 0, done.stdout + done.stderr
    hashed = {"nginx": "hash $http_x_user_id consistent", "haproxy": "balance hdr(X-User-Id)",
              "envoy": '"header_name": "x-user-id"'}[kind]
    assert (hashed in text) == (policy == "hash")


def test_the_shipped_envoy_configuration_validates_with_compose_host_names():
    done = run(binary("envoy"), "--mode", "validate", "-c", str(DEPLOY / "envoy" / "envoy.yaml"),
               "--use-dynamic-base-id")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("argv, message", [
    (["nginx", "--replicas", "127.0.0.1"], "--replicas: expected HOST:PORT"),
    (["haproxy", "--replicas", "a:1,a:1"], "--replicas: a replica is listed twice"),
    (["envoy", "--replicas", "a:1,b:2", "--grpc-replicas", "a:3", "--grpc-listen", "0.0.0.0:9"], "--grpc-replicas"),
    (["nginx", "--replicas", "a:1", "--policy", "random"], "--policy"),
    (["k8s", "--count", "0"], "--count"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message):
    done = run(sys.executable, "-m", "grinfer.cli", "deploy", *argv)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {message}") and done.stderr.count("\n") == 1


def test_the_compose_file_is_valid_and_wires_the_fleet():
    plugin = run("docker", "compose", "version") if shutil.which("docker") else None
    compose = ["docker", "compose"] if plugin is not None and plugin.returncode == 0 else [tool("docker-compose")]
    done = run(*compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    replicas = sorted(s for s in services if s.startswith("grinfer-"))
    assert replicas == ["grinfer-1", "grinfer-2", "grinfer-3"]
    assert {"postgres", "redis", "nginx", "prometheus", "grafana"} <= set(services)
    assert {services[r]["environment"]["GRINFER_REPLICA"] for r in replicas} == set(replicas)
    nginx_conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    targets = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = targets["scrape_configs"][0]["static_configs"][0]["targets"]
    for r in replicas:
        assert f"server {r}:8000 " in nginx_conf and f"{r}:8000" in scraped
    mounted = [v["source"] for v in services["grafana"]["volumes"]]
    assert str(DEPLOY / "grafana" / "grinfer.json") in mounted


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_the_dockerfiles_pass_hadolint_and_run_unprivileged_with_a_healthcheck(dockerfile):
    path = DEPLOY / dockerfile
    done = run(tool("hadolint"), "--failure-threshold", "info", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    text = path.read_text()
    assert re.search(r"^USER 10001", text, re.M) and re.search(r"^HEALTHCHECK .*\n.*/readyz", text, re.M)
    assert (DEPLOY / f"{dockerfile}.dockerignore").is_file()


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_the_manifests_pass_the_kubernetes_schemas(variant):
    path = DEPLOY / "k8s" / f"grinfer-{variant}.yaml"
    done = run(tool("kubernetes-validate"), "--strict", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    objects = {o["kind"] + "/" + o["metadata"]["name"]: o for o in yaml.safe_load_all(path.read_text())}
    for name in ("Ingress/grinfer", "Ingress/grinfer-grpc"):
        assert objects[name]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == \
            "$http_x_user_id"
    container = objects["StatefulSet/grinfer"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (variant == "gpu")
    assert objects["PodDisruptionBudget/grinfer"]["spec"]["maxUnavailable"] == 1


def test_the_optional_service_monitor_scrapes_the_services_http_port():
    objects = list(yaml.safe_load_all(render(Cluster(service_monitor=True))))
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    service = next(o for o in objects if o["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
