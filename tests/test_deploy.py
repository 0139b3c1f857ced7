"""The deployment files under deploy/: Kubernetes overlays that render and validate, an HAProxy
configuration HAProxy accepts, Dockerfiles that run ragws as it should be run.

Core Kubernetes objects are validated against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package bundles (offline, strict: an unknown field fails). The custom
resources (KEDA ``ScaledObject``, Gateway API ``HTTPRoute``, Prometheus Operator
``ServiceMonitor``) have no schema there; their group, version, kind and the fields their CRDs
require are checked here, and so is what they point at: the Deployment, the Service and its
port, the secret, and metric names that ragws really exports. No cluster is needed, and none
was used: these files have not been applied to a cluster or built into images here.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ragws.metrics import Metrics
from ragws.testing.cluster import haproxy_binary, haproxy_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.30.0"  # the oldest release these files are written for
CORE_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
CUSTOM = {
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}


def render(overlay: str) -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered here")
    path = DEPLOY / "kubernetes" / "overlays" / overlay
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(done.stdout) if doc}
    assert set(objects) == CORE_KINDS | set(CUSTOM)
    assert {doc["metadata"]["namespace"] for doc in objects.values()} == {"ragws"}
    return objects


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, Any]]]:
    return request.param, render(request.param)


def test_core_objects_validate_against_the_kubernetes_schemas(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, objects = rendered
    for kind in CORE_KINDS:
        kubernetes_validate.validate(objects[kind], KUBERNETES_VERSION, strict=True)
    # The validator does reject: a misspelt field in a copy of the Deployment fails.
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    assert match, text
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def test_the_deployment_probes_drains_and_sizes_as_ragws_needs(rendered):
    overlay, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["--host", "0.0.0.0"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAGWS_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "ragws-api-key",
        "key": "api-key",
    }
    # Each variable names a real setting.
    from ragws.config import Settings

    settings = {f"RAGWS_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert {name for name in env if name.startswith("RAGWS_")} <= settings
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["failureThreshold"] == 1
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = float(env["RAGWS_SHUTDOWN_GRACE_S"]["value"])
    delay = float(env["RAGWS_DRAIN_DELAY_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] >= float(sleep[1]) + delay + grace + 5
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    limits = container["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and env["RAGWS_DEVICE"]["value"] == "cuda"
        assert mounts["/models"] == "models"
        assert env["RAGWS_OCR_MODEL"]["value"].startswith("/models/")
    else:
        assert "nvidia.com/gpu" not in limits


def test_custom_resources_have_what_their_crds_require_and_point_at_real_things(rendered):
    _, objects = rendered
    for kind, api_version in CUSTOM.items():
        assert objects[kind]["apiVersion"] == api_version, kind
    deployment, service = objects["Deployment"], objects["Service"]
    (port,) = service["spec"]["ports"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()

    route = objects["HTTPRoute"]["spec"]
    assert route["parentRefs"] and all(ref["name"] for ref in route["parentRefs"])
    (rule,) = route["rules"]
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": port["port"]}]
    assert duration_s(rule["timeouts"]["request"]) == 0  # sockets live for minutes

    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["minReplicaCount"] >= 1 and scaled["maxReplicaCount"] > 1
    exported = {
        metric.name for metric in Metrics().registry.collect() if metric.name.startswith("ragws_")
    }
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert set(meta) >= {"serverAddress", "query", "threshold"}
        assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0
        names = set(re.findall(r"\b(ragws_[a-z_]+)", meta["query"]))
        assert names and names <= exported, names - exported
        for queue in re.findall(r'queue="([a-z_]+)"', meta["query"]):
            assert queue in {"layout", "ocr_detect", "ocr_recognize", "ocr_sequences"}

    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    assert endpoint["authorization"]["credentials"] == {"name": "ragws-api-key", "key": "api-key"}

    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_haproxy_configuration_is_the_tested_one_and_haproxy_accepts_it():
    shipped = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    generated = haproxy_config(
        7088,
        [("127.0.0.1", 7100 + i) for i in range(4)],
        stats_socket="/run/haproxy/ragws.sock",
        host="0.0.0.0",
        inter_ms=1000,
    )
    assert shipped.endswith(generated)
    for directive in ("balance leastconn", "option httpchk GET /ready", "timeout tunnel"):
        assert directive in shipped
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    check = subprocess.run([binary, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")])
    assert check.returncode == 0


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_run_ragws_unprivileged_with_the_key_from_the_environment(name):
    lines = [
        line.strip()
        for line in (DEPLOY / name).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["ragws", "serve"]' in lines  # exec form: SIGTERM reaches ragws
    assert 'CMD ["--host", "0.0.0.0"]' in lines
    assert not any("API_KEY" in line for line in lines)  # never baked into the image
    assert all(":latest" not in line for line in lines if line.startswith("FROM "))
    assert "EXPOSE 7088" in lines
