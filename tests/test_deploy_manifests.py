"""The Kubernetes manifests under deploy/ against the schemas that would judge them: the core kinds against the
Kubernetes OpenAPI schemas (`kubernetes-validate`, strict: unknown fields fail), the RayService against the
schema of KubeRay's CRD (vendored in tests/data/kuberay, its source named inside), field by field; and the wiring
between them: probes on our routes, the HPA's metric through the prometheus-adapter rule, the same Serve
application in the RayService and in deploy/ray/serve.yaml, every `args` key a setting."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vlmserve.server.metrics import Metrics
from vlmserve.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in documents(name)}


def rayservice_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gzip.decompress((ROOT / "tests/data/kuberay/rayservice-v1.schema.json.gz")
                                                      .read_bytes()))
    return data


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of `value` that the structural schema does not define (the API server would prune them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                out += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                out.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("name", ["deployment.yaml", "prometheus-adapter.yaml"])
def test_core_kinds_validate_strictly(name: str) -> None:
    docs = documents(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    deployment = by_kind("deployment.yaml")["Deployment"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_probes_and_ports_are_the_servers() -> None:
    kinds = by_kind("deployment.yaml")
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"][0]["containerPort"] == 8000 and "--port" in container["args"]
    assert container["args"][container["args"].index("--port") + 1] == "8000"
    for env in container["env"]:
        assert env["name"].removeprefix("VLMSERVE_").lower() in Settings.model_fields
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", kinds["Deployment"]["metadata"]["name"])


def test_the_hpa_metric_goes_through_the_adapter_rule() -> None:
    hpa = by_kind("deployment.yaml")["HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    wanted = metric["pods"]["metric"]["name"]
    config = yaml.safe_load(by_kind("prometheus-adapter.yaml")["ConfigMap"]["data"]["config.yaml"])
    exported = {m.name for m in Metrics().registry.collect()}
    served = []
    for rule in config["rules"]:
        series = re.search(r'__name__="([^"]+)"', rule["seriesQuery"])
        assert series is not None and series.group(1) in exported, rule["seriesQuery"]
        # prometheus-adapter's renaming: Go's regexp with ${1}, here Python's with \1
        served.append(re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series.group(1)))
        assert ":" not in served[-1]
    assert wanted in served and "vlmserve:num_requests_waiting" in exported


def test_rayservice_matches_kuberays_crd() -> None:
    schema = rayservice_schema()
    (service,) = documents("rayservice.yaml")
    assert service["apiVersion"] == f"{schema['group']}/{schema['version']}" and service["kind"] == schema["kind"]
    jsonschema.validate(service, schema["openAPIV3Schema"])
    assert unknown_fields(service, schema["openAPIV3Schema"]) == []


def test_the_crd_check_catches_unknown_and_mistyped_fields() -> None:
    schema = rayservice_schema()["openAPIV3Schema"]
    (service,) = documents("rayservice.yaml")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 2
    assert unknown_fields(service, schema) == [".spec.rayClusterConfig.workerGroupSpecs[0].maxReplica"]
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, schema)


def test_rayservice_runs_the_serve_config_of_deploy_ray() -> None:
    (service,) = documents("rayservice.yaml")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    serve_yaml = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    assert embedded == serve_yaml["applications"]
    for app in embedded:
        assert app["import_path"] == "vlmserve.server.scale.app:build_app"
        unknown = set(app["args"]) - set(Settings.model_fields)
        assert not unknown, unknown
        Settings(**app["args"])  # valid values, too
