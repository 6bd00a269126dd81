"""Fixtures for training jobs through the real Kubeflow training-operator on fake GPU nodes (kwok).

Builds on ``tests/cluster/conftest.py`` (the control plane, a fresh namespace per test, the upstream CRDs): one
training-operator (PyTorchJob controller only) and one kwok per session, started on first use and stopped by PID
at the end; each test gets its own pool of fake GPU nodes (see :mod:`training_components` for the Stages that play
the kubelets). The last lines of the operator's and kwok's logs are printed after every test (pytest shows them when
the test fails); the whole logs stay in the session's temporary directory.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dino_ctl.kube import KubeClient
from tests.cluster.stack import KubeStack
from tests.cluster.training.training_cluster import GpuPool, Training
from tests.cluster.conftest import install_crds
from tests.cluster.training.training_components import ComponentError, Kueue, Kwok, TrainingOperator
from tests.processes import running


@pytest.fixture(scope="session")
def training_operator(kube_stack: KubeStack, admin_api: Any, crds: dict,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingOperator]:
    """The Kubeflow training-operator v1.9 (PyTorchJob only) against the test control plane, as its admin."""
    assert "PyTorchJob.kubeflow.org" in crds
    operator = TrainingOperator.for_stack(kube_stack, tmp_path_factory.mktemp("training-operator"))
    with running(operator, lambda: operator.start(admin_api), what="the training-operator", errors=(ComponentError,)):
        yield operator


@pytest.fixture(scope="session")
def kwok(kube_stack: KubeStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kwok]:
    """kwok playing the kubelets of the nodes labelled ``type=kwok``."""
    process = Kwok.for_stack(kube_stack, tmp_path_factory.mktemp("kwok"))
    with running(process, process.start, what="kwok", errors=(ComponentError,)):
        yield process


@pytest.fixture(scope="session")
def kueue(kube_stack: KubeStack, admin_api: Any, dynamic: Any, training_operator: TrainingOperator,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """Kueue v0.17.0 admitting PyTorchJobs (started on first use: only the Kueue test needs it)."""
    process = Kueue.for_stack(kube_stack, tmp_path_factory.mktemp("kueue"))
    with running(process, lambda: process.start(admin_api, lambda crds: install_crds(dynamic, crds)), what="Kueue",
                 errors=(ComponentError, OSError, subprocess.CalledProcessError)):
        yield process


@pytest.fixture
def training(training_operator: TrainingOperator, kwok: Kwok, kube: KubeClient, admin_api: Any, namespace: str,
             kubeconfig_for: Any, tmp_path: Path) -> Iterator[Training]:
    """A fresh namespace with its own (initially empty) GPU pool; ``training.pool.add(n)`` adds fake nodes."""
    from kubernetes import client

    pool = GpuPool(client.CoreV1Api(admin_api), f"gpu-{namespace}"[:50])
    training = Training(namespace, kube, admin_api, kubeconfig_for(namespace), tmp_path, pool)
    try:
        yield training
    finally:
        training.stop_background()
        pool.cleanup()
        for process in training.background:
            print(f"--- dino-ctl {process.args[3:]} ({process.log})\n{process.log.read_text()[-3000:]}")
        print(training_operator.tail(30))
        print(kwok.tail(15))
