"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize, passes the
Kubernetes 1.32 schemas in strict mode (kubernetes-validate, offline), and says what the
services understand: each container's arguments parse with the real flag parsers, probes and
policies name ports the pods declare, engines dial the control plane's Fleet port, and every
file an argument names is on a mounted volume."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from hotswap.control.settings import Settings as ControlSettings
from hotswap.engine.settings import Settings as EngineSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBERNETES = "1.32.0"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (with kustomize) is not installed: cannot render overlays"
)


def render(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def _of(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _args(container: dict[str, Any]) -> list[str]:
    """The container's arguments with $(VAR) replaced as the kubelet would, by sample values
    for downward-API variables."""
    samples = {
        "status.podIP": "198.18.0.7",
        "metadata.name": "hotswap-engine-7d9f-x2x",
        "spec.nodeName": "node-1",
    }
    values = {
        env["name"]: samples[env["valueFrom"]["fieldRef"]["fieldPath"]]
        for env in container.get("env", [])
    }

    def expand(arg: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg)

    return [expand(a) for a in container["args"]]


def test_overlays_exist() -> None:
    assert OVERLAYS == ["dev", "secured"]


@needs_kubectl
def test_every_overlay_passes_the_kubernetes_schemas_strictly(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "Service", "Service", "StatefulSet", "Deployment",
         "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "NetworkPolicy"]
    )  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@needs_kubectl
def test_the_validator_refuses_a_field_kubernetes_does_not_know() -> None:
    """The check above can fail: a typo in a pod spec is caught in strict mode."""
    docs = render(K8S / "overlays" / "dev")
    deployment = _of(docs, "Deployment", "hotswap-engine")
    _container(deployment)["readinessProbe"]["grpcc"] = {"port": 50061}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@needs_kubectl
def test_containers_take_arguments_the_services_understand(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    control = _args(_container(_of(docs, "StatefulSet", "hotswap-control")))
    engine = _args(_container(_of(docs, "Deployment", "hotswap-engine")))
    assert control[0] == "control" and engine[0] == "engine"
    for flag in ("--control-token-file", "--tokens-file"):  # files read while parsing
        control = [a for a in control if not a.startswith(flag)]
        engine = [a for a in engine if not a.startswith(flag)]
    control_settings = ControlSettings.from_args(control[1:], {})
    engine_settings = EngineSettings.from_args(engine[1:], {})
    assert engine_settings.advertise == "198.18.0.7:50061"
    assert engine_settings.name == "hotswap-engine-7d9f-x2x"
    assert dict(engine_settings.labels) == {"host": "node-1"}
    # Engines dial the control plane's Fleet port through its headless Service.
    service = _of(docs, "Service", "hotswap-control")
    fleet_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "fleet")
    assert control_settings.fleet_listen == f"0.0.0.0:{fleet_port}"
    assert engine_settings.control == f"hotswap-control-0.hotswap-control:{fleet_port}"
    # preStop, the drain and the stop's grace fit in the grace period.
    pod = _of(docs, "Deployment", "hotswap-engine")["spec"]["template"]["spec"]
    pre_stop = _container(_of(docs, "Deployment", "hotswap-engine"))["lifecycle"]["preStop"]
    # The hook starts the drain at once (SIGUSR1 to the engine, PID 1), then waits for the
    # Service endpoints to drop the pod.
    hook = re.fullmatch(r"kill -USR1 1; sleep (\d+)", pre_stop["exec"]["command"][2])
    assert hook is not None, pre_stop
    budget = int(hook.group(1)) + engine_settings.drain_timeout + 2
    assert budget < pod["terminationGracePeriodSeconds"]


def _workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("StatefulSet", "Deployment"))


@needs_kubectl
def test_probes_and_policies_name_ports_the_pods_declare(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for workload in _workloads(docs):
        container = _container(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] in ports.values()
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"
        app = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        policy = _of(docs, "NetworkPolicy", app)
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": app}
        named = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert named <= ports.keys()
        # The plaintext health-only port stays closed to other pods: the kubelet probes from
        # the pod's own node, which a NetworkPolicy always admits.
        assert "health" not in named


@needs_kubectl
def test_only_engines_reach_the_fleet_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    rules = _of(docs, "NetworkPolicy", "hotswap-control")["spec"]["ingress"]
    fleet_rules = [r for r in rules if any(p["port"] == "fleet" for p in r["ports"])]
    assert fleet_rules == [
        {
            "from": [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "hotswap-engine"}}}
            ],
            "ports": [{"port": "fleet", "protocol": "TCP"}],
        }
    ]


@needs_kubectl
def test_secured_metrics_are_for_prometheus_alone(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        [rule] = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
        if name == "secured":
            namespace = {"kubernetes.io/metadata.name": "monitoring"}
            assert rule["from"] == [{"namespaceSelector": {"matchLabels": namespace}}]
        else:
            assert "from" not in rule  # dev: anyone in the cluster may scrape


@needs_kubectl
def test_files_named_in_arguments_are_on_mounted_volumes(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    for workload in _workloads(docs):
        container = _container(workload)
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        volumes = {v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes | claims
        for arg in container["args"]:
            value = arg.partition("=")[2]
            if value.startswith("/"):
                assert any(value == m or value.startswith(m + "/") for m in mounts), arg
    if name == "secured":
        engine = _container(_of(docs, "Deployment", "hotswap-engine"))
        assert any(a.startswith("--control-ca=") for a in engine["args"])
        assert any(a.startswith("--control-token-file=") for a in engine["args"])
        control = _container(_of(docs, "StatefulSet", "hotswap-control"))
        assert any(a.startswith("--tokens-file=") for a in control["args"])
        assert any(a.startswith("--tls-cert=") for a in control["args"])


def test_the_containerfile_runs_the_project_wheel_as_non_root() -> None:
    text = (ROOT / "Containerfile").read_text()
    stages = re.findall(r"^FROM ", text, flags=re.M)
    assert len(stages) == 2  # build, then runtime
    assert "pip wheel" in text and "USER 10001" in text
    assert 'ENTRYPOINT ["hotswap"]' in text
    # The pods' securityContext runs as the image's user.
    for overlay in OVERLAYS if KUBECTL else ():
        for workload in _workloads(render(K8S / "overlays" / overlay)):
            assert workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
