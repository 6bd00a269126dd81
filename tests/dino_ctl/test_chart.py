"""The Helm chart lints and renders with default and non-default values; every object validates strictly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dino_ctl.controller.manifests import CHART, render_chart, runtime_experiment
from dino_ctl.controller.validate import SCHEMAS_ENV, ObjectValidator, find_k8s_schemas
from dino_ctl.render.monitoring import AlertThresholds, alert_rule_groups, dashboard, render_pod_monitor
from dino_ctl.render.trainjob import render_cluster_training_runtime
from dino_ctl.schema import crd_manifest

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) renders the chart")

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / CHART

NON_DEFAULT_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/dino-ctl-controller", "tag": "1.2.3"},
    "imagePullSecrets": ["regcred"],
    "watchNamespaces": ["research", "prod-ml"],
    "controller": {"reconcileIntervalSeconds": 60, "logLevel": "DEBUG", "nodeSelector": {"pool": "system"}},
    "serviceAccount": {"name": "dino-operator", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "trainingRuntime": {"enabled": False},
    "monitoring": {
        "labels": {"release": "kube-prometheus-stack"},
        "scrapeInterval": "15s",
        "trainingPodMonitor": {"enabled": True},
        "prometheusRule": {"stallMinutes": 25, "stallForMinutes": 10, "checkpointMaxAgeMinutes": 45,
                           "restartWindowMinutes": 30, "maxRestarts": 6},
        "dashboard": {"namespace": "grafana", "labels": {"team": "ml"}},
    },
}


@pytest.fixture(scope="module")
def validator() -> ObjectValidator:
    folder = find_k8s_schemas(REPO_ROOT)
    if folder is None:
        pytest.skip(f"upstream CRD schemas not found: set {SCHEMAS_ENV} or provide ../shared/k8s-schemas")
    return ObjectValidator(crd_folder=folder, crds=[crd_manifest()])


def _objects(values: dict[str, Any] | None = None, namespace: str = "dino-system") -> list[dict[str, Any]]:
    return [obj for docs in render_chart(CHART_DIR, values, namespace=namespace).values() for obj in docs]


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, [(o["kind"], o["metadata"]["name"]) for o in found]
    return found[0]


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_chart_lints_strictly(values: dict[str, Any] | None) -> None:
    report = helm_python.lint(str(CHART_DIR), values, strict=True, namespace="dino-system")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_every_rendered_object_validates(validator: ObjectValidator, values: dict[str, Any] | None) -> None:
    objects = _objects(values)
    assert validator.validate_all(objects) == len(objects) >= 6
    # Least privilege: nothing cluster-wide, no wildcards, no secrets.
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in (o for o in objects if o["kind"] == "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "secrets" not in rule["resources"]


def test_chart_crd_is_the_generated_one() -> None:
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        (crd,) = chart.crds
    assert yaml.safe_load(crd["data"]) == crd_manifest()


def test_default_deployment_is_hardened() -> None:
    objects = _objects()
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}
    }
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8080, "metrics": 9090}
    assert container["args"] == [
        "--namespace=dino-system", "--health-port=8080", "--metrics-port=9090", "--interval=30", "--log-level=INFO"
    ]
    assert container["image"] == "ghcr.io/dino-ctl/dino-ctl-controller:0.1.0"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    role = _one(objects, "Role")
    assert role["metadata"]["namespace"] == "dino-system"
    binding = _one(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dino-ctl", "namespace": "dino-system"}]
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "PodMonitor", "PrometheusRule", "ConfigMap"}


def test_default_rules_and_dashboard_are_the_generated_ones() -> None:
    objects = _objects()
    assert _one(objects, "PrometheusRule")["spec"]["groups"] == alert_rule_groups()
    data = _one(objects, "ConfigMap", "dino-ctl-dashboard")["data"]
    assert json.loads(data["dino-ctl-training.json"]) == dashboard()


def test_non_default_values() -> None:
    objects = _objects(NON_DEFAULT_VALUES)
    roles = sorted((o["kind"], o["metadata"]["namespace"]) for o in objects if o["kind"] in ("Role", "RoleBinding"))
    assert roles == [("Role", "prod-ml"), ("Role", "research"), ("RoleBinding", "prod-ml"), ("RoleBinding", "research")]
    assert _one(objects, "ServiceAccount")["metadata"]["name"] == "dino-operator"
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dino-operator"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/ml/dino-ctl-controller:1.2.3"
    assert container["args"][:2] == ["--namespace=research", "--namespace=prod-ml"]
    assert "--interval=60" in container["args"] and "--log-level=DEBUG" in container["args"]

    thresholds = AlertThresholds(stall_minutes=25, stall_for_minutes=10, checkpoint_max_age_minutes=45,
                                 restart_window_minutes=30, max_restarts=6)
    rule = _one(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == alert_rule_groups(thresholds)
    training = _one(objects, "PodMonitor", "dino-ctl-training")
    assert training["spec"]["namespaceSelector"] == {"matchNames": ["research", "prod-ml"]}
    expected = render_pod_monitor(name="x", namespace=None, scrape_interval="15s")["spec"]["podMetricsEndpoints"]
    assert training["spec"]["podMetricsEndpoints"] == expected
    for monitoring_object in (rule, training, _one(objects, "PodMonitor", "dino-ctl-controller")):
        assert monitoring_object["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboard_map = _one(objects, "ConfigMap", "dino-ctl-dashboard")
    assert dashboard_map["metadata"]["namespace"] == "grafana"
    assert dashboard_map["metadata"]["labels"]["team"] == "ml"
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_monitoring_and_rbac_can_be_switched_off() -> None:
    values = {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "existing"},
        "trainingRuntime": {"enabled": False},
        "monitoring": {"controllerPodMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                       "dashboard": {"enabled": False}},
    }
    assert [o["kind"] for o in _objects(values)] == ["Deployment"]


@pytest.mark.parametrize(
    ("chart_values", "expected"),
    [
        ({}, {"name": "dino-ctl-torch", "image": "ghcr.io/dino-ctl/dino-ctl-trainer:0.1.0", "metricsPort": 9400,
              "maxRestarts": 3, "gang": "coscheduling"}),
        ({"name": "dino-torch-volcano", "gangScheduler": "volcano", "image": "registry.example.com/t:2",
          "metricsPort": 9500, "maxRestarts": 0},
         {"name": "dino-torch-volcano", "image": "registry.example.com/t:2", "metricsPort": 9500, "maxRestarts": 0,
          "gang": "volcano"}),
        ({"gangScheduler": "none"}, {"name": "dino-ctl-torch", "image": "ghcr.io/dino-ctl/dino-ctl-trainer:0.1.0",
                                     "metricsPort": 9400, "maxRestarts": 3, "gang": "none"}),
    ],
    ids=["default", "volcano", "no-gang"],
)
def test_training_runtime_is_the_rendered_one(
    validator: ObjectValidator, chart_values: dict[str, Any], expected: dict[str, Any]
) -> None:
    runtime = _one(_objects({"trainingRuntime": chart_values}), "ClusterTrainingRuntime")
    validator.validate(runtime)
    gang = expected.pop("gang")
    assert runtime == render_cluster_training_runtime(runtime_experiment(gang, **expected))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required when serviceAccount.create is false"),
        ({"monitoring": {"prometheusRule": {"stallMinutes": 0}}}, "stallMinutes': minimum: got 0, want 1"),
        ({"watchNamespaces": ["Bad_Namespace"]}, "/watchNamespaces/0"),
        ({"controller": {"logLevel": "LOUD"}}, "/controller/logLevel"),
        ({"monitoring": {"scrapeInterval": "30 seconds"}}, "/monitoring/scrapeInterval"),
        ({"monitoring": {"promRule": {}}}, "additional properties 'promRule' not allowed"),
    ],
)
def test_bad_values_are_rejected_with_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message.replace("(", r"\(")):
        _objects(values)
