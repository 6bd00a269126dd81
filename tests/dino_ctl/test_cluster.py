"""Tests against a real cluster (``@pytest.mark.cluster``): skipped unless KUBECONFIG points at one.

See docs/cluster-tests.md for a kind or k3d set-up. Objects are created in ``$DINO_CTL_TEST_NAMESPACE`` (default
``default``) under unique names and deleted afterwards.
"""

from __future__ import annotations

import os
import uuid

import pytest

from dino_ctl.kube import KubeClient
from dino_ctl.render import render
from tests.dino_ctl.spec_helpers import GOLDEN

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client() -> KubeClient:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("no cluster: set KUBECONFIG to a test cluster (see docs/cluster-tests.md)")
    return KubeClient.from_kubeconfig()


@pytest.fixture
def namespace() -> str:
    return os.environ.get("DINO_CTL_TEST_NAMESPACE", "default")


def test_apply_get_list_delete_config_map(client: KubeClient, namespace: str) -> None:
    name = f"dino-ctl-test-{uuid.uuid4().hex[:8]}"
    label = {"dino-ctl.io/experiment": name}
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace,
                                                                  "labels": label}, "data": {"a": "1"}}
    try:
        live = client.apply(obj)
        assert live["metadata"]["uid"]
        client.apply({**obj, "data": {"a": "2"}})  # server-side apply again: an update, not a conflict
        assert client.get("v1", "ConfigMap", name, namespace=namespace)["data"] == {"a": "2"}
        found = client.list("v1", "ConfigMap", namespace=namespace, selector=f"dino-ctl.io/experiment={name}")
        assert [o["metadata"]["name"] for o in found] == [name]
    finally:
        client.delete("v1", "ConfigMap", name, namespace=namespace, propagation="Background")
    assert client.get("v1", "ConfigMap", name, namespace=namespace) is None


def test_rendered_objects_pass_server_side_dry_run(client: KubeClient, namespace: str) -> None:
    """Every rendered object whose kind the cluster serves is admitted by a server-side dry run."""
    from dino_ctl.errors import KubeError
    from dino_ctl.validation import load_spec

    experiment = load_spec(GOLDEN / "spec-elastic.yaml")
    served = 0
    for obj in render(experiment):
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
        try:
            client.apply(obj, dry_run=True)
            served += 1
        except KubeError as exc:
            if exc.status != 404:  # 404: the kind's CRD is not installed on this cluster
                raise
    assert served >= 2  # the ConfigMaps at least
