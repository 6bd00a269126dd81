"""The controller against a real cluster (marked ``cluster``: skipped without KUBECONFIG).

Needs permission to create the DinoExperiment CRD (or the CRD installed) and a namespace to work in
(``DINO_CTL_TEST_NAMESPACE``, default ``default``). Skips when the Training Operator's PyTorchJob is not served.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from dino_ctl.controller.executor import Executor
from dino_ctl.controller.handlers import Controller
from dino_ctl.controller.metrics import ControllerMetrics
from dino_ctl.schema import CRD_NAME, crd_manifest
from tests.dino_ctl.spec_helpers import document

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a Kubernetes cluster in KUBECONFIG"),
]


def test_controller_submits_and_cleans_up_in_a_real_cluster() -> None:
    from dino_ctl.kube import KubeClient

    client = KubeClient.from_kubeconfig()
    namespace = os.environ.get("DINO_CTL_TEST_NAMESPACE", "default")
    if client.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "pytorchjobs.kubeflow.org") is None:
        pytest.skip("the Training Operator (PyTorchJob) is not installed in this cluster")
    if client.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", CRD_NAME) is None:
        client.apply(crd_manifest())
        time.sleep(3)  # the API server starts serving a new CRD after a moment
    name = f"ctl-test-{uuid.uuid4().hex[:6]}"
    body = document()
    body["metadata"] = {"name": name, "namespace": namespace}
    body = client.apply(body)
    controller = Controller(Executor(client), ControllerMetrics())
    try:
        outcome = controller.reconcile(body)
        assert outcome.error is None, outcome.error
        assert outcome.status["stages"][0]["phase"] == "Pending"
        job = client.get("kubeflow.org/v1", "PyTorchJob", f"{name}-pretrain", namespace=namespace)
        assert job is not None
        assert job["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        assert controller.reconcile({**body, "status": outcome.status}).events == []  # nothing new on a second pass
    finally:
        for _ in range(30):
            if not controller.finalize(body):
                break
            time.sleep(2)
        client.delete("dino-ctl.io/v1alpha1", "DinoExperiment", name, namespace=namespace)
