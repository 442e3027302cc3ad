"""docker/k8s/: the multi-host layout as Kubernetes manifests.

What runs here: every core object is validated, strictly (no unknown fields), against the
Kubernetes 1.33 OpenAPI schemas bundled with `kubernetes-validate` (from PyPI, offline); the
KEDA ScaledObjects (a CRD, not in those schemas) are checked for the fields KEDA requires;
and the manifests are checked against each other and the code: every reference resolves
(Secrets, ConfigMap keys, scale targets, Service selectors), probes hit the routes the apps
serve, and every LORAPLEX_* name is a real setting. What does not run here: no cluster, no
`kubectl apply`, no KEDA, no image build (no Docker on this machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from api.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "docker" / "k8s"
KUBERNETES = "1.33"
KEDA = "keda.sh/v1alpha1"
REPLICA_ENV = {  # read by serving/vllm_plugin.py inside the replica, not Settings
    "LORAPLEX_REPLICA_STORAGE_URL", "LORAPLEX_REPLICA_CACHE_DIR",
    "LORAPLEX_REPLICA_CACHE_MAX_ADAPTERS", "LORAPLEX_REPLICA_CACHE_MAX_GIB",
    "LORAPLEX_REPLICA_CACHE_KEEP",
}  # fmt: skip


def objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        out += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def pod_specs() -> dict[str, dict[str, Any]]:
    out = {}
    for o in objects():
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            out[o["metadata"]["name"]] = o["spec"]["template"]["spec"]
    return out


@pytest.mark.parametrize(
    "obj",
    [o for o in objects() if o["apiVersion"] != KEDA],  # KEDA's CRD: see the last test
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}",
)
def test_every_core_object_is_valid_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_every_file_in_the_folder_is_applied() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_layout_has_every_part_with_probes_and_resources() -> None:
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    assert {"loraplex-api", "loraplex-gateway", "vllm", "loraplex-worker-gpu",
            "loraplex-worker-cpu"} <= set(workloads)  # fmt: skip
    for name, workload in workloads.items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container.get("livenessProbe"), name
            assert container["resources"]["requests"], name
            assert "memory" in container["resources"]["limits"], name
    for name in ("loraplex-api", "loraplex-gateway"):
        (container,) = workloads[name]["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    gpu = workloads["loraplex-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_probe_paths_are_routes_the_apps_serve() -> None:
    from api.main import create_app

    paths = {getattr(r, "path", None) for r in create_app(Settings()).routes}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_references_resolve() -> None:
    configmaps, secrets = by_kind("ConfigMap"), by_kind("Secret")
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = configmaps[ref["configMapKeyRef"]["name"]]
                    assert ref["configMapKeyRef"]["key"] in cm["data"], (name, env["name"])
                if "secretKeyRef" in ref:
                    secret = secrets[ref["secretKeyRef"]["name"]]
                    assert ref["secretKeyRef"]["key"] in secret["stringData"], (name, env["name"])
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= lab.items() for lab in labels), f"Service {name}"


def test_every_loraplex_variable_is_a_real_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {f"LORAPLEX_{name.upper()}" for name in Settings.model_fields}
    names = set(by_kind("ConfigMap")["loraplex-config"]["data"])
    names |= set(by_kind("Secret")["loraplex-secrets"]["stringData"])
    for spec in pod_specs().values():
        for container in spec["containers"]:
            names |= {env["name"] for env in container.get("env", [])}
    unknown = {n for n in names if n.startswith("LORAPLEX_")} - fields - REPLICA_ENV
    assert not unknown
    config = by_kind("ConfigMap")["loraplex-config"]["data"]
    # The settings parse as the processes will parse them: from the environment.
    for key, value in config.items():
        if key.startswith("LORAPLEX_") and key != "LORAPLEX_HOME":
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.serving_adapter_source == "store"
    assert settings.queue_for(settings.base_model) == "train-cpu"


def test_gateways_find_every_vllm_pod_through_the_headless_service() -> None:
    import json

    config = by_kind("ConfigMap")["loraplex-config"]["data"]
    vllm = by_kind("Deployment")["vllm"]
    service = by_kind("Service")["vllm"]
    assert service["spec"]["clusterIP"] == "None"  # headless: the name resolves to every pod
    assert (
        service["spec"]["selector"].items()
        <= vllm["spec"]["template"]["metadata"]["labels"].items()
    )
    port = service["spec"]["ports"][0]["port"]
    assert json.loads(config["LORAPLEX_SERVING_REPLICAS"]) == [f"dns+http://vllm:{port}"]
    # Replicas read the bucket with their own (read-only) credentials, and run the plugin.
    (container,) = vllm["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_PLUGINS"]["value"] == "loraplex"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "loraplex-replica-s3"
    assert "envFrom" not in container  # never the read-write secret


def test_keda_scaled_objects_target_real_workloads() -> None:
    scaled = [o for o in objects() if o["apiVersion"] == KEDA]
    assert scaled
    workloads = {**by_kind("Deployment"), **by_kind("StatefulSet")}
    queues = {"train-gpu", "train-cpu"}
    for obj in scaled:
        assert obj["kind"] == "ScaledObject"
        target = obj["spec"]["scaleTargetRef"]
        assert target["name"] in workloads
        assert workloads[target["name"]]["kind"] == target.get("kind", "Deployment")
        assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] in {"redis", "prometheus"}
            if trigger["type"] == "redis":  # the Celery queue is a Redis list of that name
                assert trigger["metadata"]["listName"] in queues
                worker = workloads[target["name"]]["spec"]["template"]["spec"]["containers"][0]
                consumes = {
                    e["value"] for e in worker["env"] if e["name"] == "LORAPLEX_WORKER_QUEUES"
                }
                assert consumes == {trigger["metadata"]["listName"]}
            else:
                assert "loraplex_serving_queue_depth" in trigger["metadata"]["query"]
