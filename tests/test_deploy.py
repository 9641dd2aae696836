"""deploy/: the Kubernetes manifests, validated offline and held to the properties they promise.

No cluster runs here or in CI. Each manifest is checked against the Kubernetes API schemas
(`kubernetes-validate --strict`: unknown fields are errors) and linted (`yamllint --strict`);
the relay config they mount is loaded by the relay's own parser; and the tests below pin what
the README promises: hardened, interchangeable replicas behind a headless Service, probes on the
plaintext health port, a termination grace that covers the drain, a closed network.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay.config import load_config
from relay.server import SERVICE_NAME
from relay.testing.credentials import ApnsKey
from relay.testing.tls import TestPKI

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SECRETS_DIR = "/etc/push-relay/secrets"
# The oldest Kubernetes these manifests support (native gRPC probes are GA from 1.27), and the
# newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

Manifest = dict[str, Any]


def kustomization() -> Manifest:
    data: Manifest = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return data


@cache
def _build() -> tuple[Manifest, ...]:
    """What `kustomize build deploy/` yields, without kustomize: resources and generated maps."""
    k = kustomization()
    docs = [
        doc
        for name in k["resources"]
        for doc in yaml.safe_load_all((DEPLOY / name).read_text())
        if doc
    ]
    for generator in k.get("configMapGenerator", []):
        files = {Path(f).name: (DEPLOY / f).read_text() for f in generator["files"]}
        meta = {"name": generator["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": files})
    return tuple(docs)


def build() -> list[Manifest]:
    return copy.deepcopy(list(_build()))


def one(kind: str) -> Manifest:
    found = [doc for doc in build() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> Manifest:
    spec: Manifest = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> Manifest:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    main: Manifest = containers[0]
    return main


def relay_yaml() -> Manifest:
    data: Manifest = yaml.safe_load((DEPLOY / "relay.yaml").read_text())
    return data


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def container_port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    return int(ports[name])


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def selects_pods(selector: Manifest) -> bool:
    return all(pod_labels().get(k) == v for k, v in selector["matchLabels"].items())


def _venv_tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed: it comes with the dev extra")
    return found


# -- validation ---------------------------------------------------------------------------------


def test_yamllint_strict_is_clean() -> None:
    result = subprocess.run(
        [_venv_tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    docs = build()
    assert {doc["kind"] for doc in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "ServiceAccount",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_does_reject_an_unknown_field() -> None:
    # Guards the test above from passing vacuously.
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomize_builds_what_the_tests_check() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Debian's kubectl is too old for this kustomization; the checks above do without.
        pytest.skip("kubectl (kustomize) is not installed; the other tests check the same files")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)

    def names(docs: list[Manifest]) -> set[tuple[str, str]]:
        return {(d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in docs}

    assert names(built) == names(build())
    deployment = next(d for d in built if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    config_map = next(d for d in built if d["kind"] == "ConfigMap")["metadata"]["name"]
    assert {"name": "config", "configMap": {"name": config_map}} in pod["volumes"]
    assert pod["containers"][0]["image"] == f"push-relay:{_project_version()}"


def _project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


def test_image_tag_is_the_project_version() -> None:
    assert kustomization()["images"] == [{"name": "push-relay", "newTag": _project_version()}]
    assert container()["image"] == "push-relay"


# -- the relay config they mount ----------------------------------------------------------------


def test_the_mounted_config_is_valid(tmp_path: Path, pki: TestPKI, apns_key: ApnsKey) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, data in {
        "server-chain.pem": pki.server_cert_pem,
        "server.key": pki.server_key_pem,
        "hmac.key": b"k" * 32,
        "chat-eu.token": b"a-caller-token-of-some-length",
        "AuthKey.p8": apns_key.key_pem,
    }.items():
        (secrets / name).write_bytes(data)
    text = (DEPLOY / "relay.yaml").read_text().replace(SECRETS_DIR, str(secrets))
    (tmp_path / "relay.yaml").write_text(text)
    config = load_config(tmp_path / "relay.yaml")
    assert config.server.tls is not None, "the API port speaks TLS: probes need the health port"
    assert config.server.health_listen


def test_config_listens_on_every_interface_on_the_declared_ports() -> None:
    server = relay_yaml()["server"]
    for key, port in (("listen", "grpc"), ("http_listen", "metrics"), ("health_listen", "health")):
        assert server[key] == f"0.0.0.0:{container_port(port)}", key


def test_config_names_secret_files_only_under_the_secret_mount() -> None:
    files = re.findall(r"_file: (\S+)", (DEPLOY / "relay.yaml").read_text())
    assert files
    for path in files:
        assert path.startswith(SECRETS_DIR + "/"), path


# -- the Deployment -----------------------------------------------------------------------------


def test_at_least_two_hardened_replicas() -> None:
    assert one("Deployment")["spec"]["replicas"] >= 2
    pod = pod_spec()
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_user = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_user)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not context.get("privileged")
    # Nothing writes, so nothing writable is mounted.
    assert not [v for v in pod["volumes"] if "emptyDir" in v or "hostPath" in v]


def test_resources_are_requested_and_memory_is_limited() -> None:
    resources = container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_probes_are_native_grpc_on_the_plaintext_health_port() -> None:
    health = port_of(relay_yaml()["server"]["health_listen"])
    assert health != port_of(relay_yaml()["server"]["listen"]), "the API port may speak TLS"
    main = container()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert main[probe]["grpc"]["port"] == health, probe
        assert set(main[probe]) - {"grpc"} <= {
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "initialDelaySeconds",
            "successThreshold",
        }
    assert main["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert main["livenessProbe"]["grpc"].get("service", "") == ""


def _prestop_seconds() -> float:
    hook = container()["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_termination_grace_covers_prestop_sleep_and_drain() -> None:
    prestop = _prestop_seconds()
    assert prestop >= 1
    drain = float(relay_yaml()["server"]["shutdown_grace_seconds"])
    grace = pod_spec()["terminationGracePeriodSeconds"]
    # Some room after the drain to close provider connections before SIGKILL.
    assert grace >= prestop + drain + 5, (grace, prestop, drain)


def test_secrets_are_read_only_files_from_a_secret() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    mount = mounts[SECRETS_DIR]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "push-relay-secrets"
    assert secret["defaultMode"] & 0o007 == 0, "no access for others"
    assert all(m["readOnly"] is True for m in mounts.values())
    assert "env" not in container() and "envFrom" not in container(), "secrets never in env"
    assert not [doc for doc in build() if doc["kind"] == "Secret"], "no secret is committed"


def test_config_comes_from_the_generated_config_map() -> None:
    (generator,) = kustomization()["configMapGenerator"]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert volumes["config"]["configMap"]["name"] == generator["name"]
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    args = container()["args"]
    assert args[:2] == ["serve", "--config"]
    assert args[2] == f"{mounts['config']}/relay.yaml"


# -- Service, HPA, PDB, NetworkPolicy -----------------------------------------------------------


def test_service_is_headless_for_client_side_balancing() -> None:
    spec = one("Service")["spec"]
    assert spec["clusterIP"] == "None"
    assert spec.get("publishNotReadyAddresses", False) is False
    assert all(pod_labels().get(k) == v for k, v in spec["selector"].items())
    grpc_port = next(p for p in spec["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == container_port("grpc")


def test_autoscaler_scales_the_deployment_on_cpu() -> None:
    spec = one("HorizontalPodAutoscaler")["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one("Deployment")["metadata"]["name"],
    }
    assert spec["minReplicas"] >= 2
    assert spec["maxReplicas"] > spec["minReplicas"]
    assert [m["resource"]["name"] for m in spec["metrics"] if m["type"] == "Resource"] == ["cpu"]


def test_disruption_budget_keeps_a_replica_serving() -> None:
    spec = one("PodDisruptionBudget")["spec"]
    assert selects_pods(spec["selector"])
    min_replicas = one("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "maxUnavailable" in spec:
        assert 1 <= spec["maxUnavailable"] < min_replicas
    else:
        assert 1 <= spec["minAvailable"] < min_replicas


def _ports(rules: list[Manifest]) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for rule in rules for p in rule["ports"]}


def test_network_policy_admits_callers_and_prometheus_and_lets_out_https_and_dns() -> None:
    spec = one("NetworkPolicy")["spec"]
    assert selects_pods(spec["podSelector"])
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert all(rule.get("from") for rule in spec["ingress"]), "every ingress rule names peers"
    assert _ports(spec["ingress"]) == {
        (container_port("grpc"), "TCP"),
        (container_port("metrics"), "TCP"),
    }
    assert _ports(spec["egress"]) == {(443, "TCP"), (53, "UDP"), (53, "TCP")}
    (dns,) = [rule for rule in spec["egress"] if (53, "UDP") in _ports([rule])]
    assert dns["to"], "DNS only to the cluster's resolver"
