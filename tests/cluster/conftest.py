"""Fixtures for the tests that run against a real control plane (:mod:`tests.cluster.stack`).

One stack per test session (started on first use: a few seconds), one fresh namespace per test. Every test in this
folder is marked ``cluster``; deselect them with ``-m "not cluster"`` on a machine without the binaries (the README's
set-up command builds them). A stack that cannot start is a test error naming the piece, never a skip.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dino_ctl.kube import KubeClient
from tests.cluster.stack import KubeStack, StackError
from tests.processes import running

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kube_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeStack]:
    stack = KubeStack(tmp_path_factory.mktemp("kube-stack"))
    with running(stack, stack.start, what="the test control plane", errors=(StackError,)):
        yield stack


def api_client(stack: KubeStack, kubeconfig: Path | None = None) -> Any:
    """A ``kubernetes.client.ApiClient`` for ``kubeconfig`` (default: the admin's)."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig or stack.admin_kubeconfig))


@pytest.fixture(scope="session")
def admin_api(kube_stack: KubeStack) -> Any:
    """The admin's ``ApiClient`` (``system:masters``: RBAC does not apply to it)."""
    return api_client(kube_stack)


@pytest.fixture(scope="session")
def dynamic(admin_api: Any) -> Any:
    """The admin's ``kubernetes.dynamic.DynamicClient`` (any kind, server-side apply)."""
    from kubernetes.dynamic import DynamicClient

    return DynamicClient(admin_api)


def _namespace_name(node_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"{stem}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, admin_api: Any) -> Iterator[str]:
    """A fresh namespace for one test (its ``default`` ServiceAccount exists); deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(admin_api)
    name = _namespace_name(request.node.name)
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: _exists(core.read_namespaced_service_account, "default", name), what=f"{name}/default SA")
    yield name
    core.delete_namespace(name)  # asynchronous: the namespace controller empties it


def _exists(read: Any, *args: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read(*args)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def wait_for(condition: Any, *, what: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def kubeconfig_for(kube_stack: KubeStack, tmp_path: Path) -> Any:
    """``kubeconfig_for(namespace, token=None)``: a kubeconfig file (admin's token unless ``token``)."""
    from tests.cluster.stack import ADMIN_TOKEN, kubeconfig

    def write(namespace: str, token: str | None = None) -> Path:
        path = tmp_path / f"kubeconfig-{namespace}-{uuid.uuid4().hex[:4]}"
        path.write_text(json.dumps(kubeconfig(kube_stack.server, kube_stack.ca_file, token or ADMIN_TOKEN,
                                              namespace=namespace)))
        return path

    return write


@pytest.fixture
def kube(kube_stack: KubeStack, namespace: str, kubeconfig_for: Any) -> KubeClient:
    """dino-ctl's own :class:`KubeClient`, as the admin, defaulting to the test's namespace."""
    from kubernetes import config

    return KubeClient(config.new_client_from_config(config_file=str(kubeconfig_for(namespace))), namespace=namespace)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """The documents of a YAML file; libyaml's loader when PyYAML has it (the upstream CRDs are 3.5 MB)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]  # noqa: S506 (a safe loader)


def upstream_crd_folder() -> Path:
    """Upstream CRDs: ``$DINO_CTL_K8S_SCHEMAS`` or ``../shared/k8s-schemas``, else the set from the module proxy."""
    from dino_ctl.controller.validate import find_k8s_schemas
    from tests.cluster.stack import REPO, crd_dir

    return find_k8s_schemas(REPO) or crd_dir()


def install_crds(dynamic: Any, crds: list[dict[str, Any]]) -> None:
    """Server-side apply CRDs and wait until each is ``Established`` (served)."""
    api = dynamic.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    for crd in crds:
        api.server_side_apply(body=crd, name=crd["metadata"]["name"], field_manager="dino-ctl-tests")
    for crd in crds:
        name = crd["metadata"]["name"]
        wait_for(lambda name=name: any(c["type"] == "Established" and c["status"] == "True"
                                       for c in (api.get(name=name).to_dict().get("status") or {}).get("conditions")
                                       or []), what=f"CRD {name} Established")
    dynamic.resources.invalidate_cache()  # discovery learns the new kinds


@pytest.fixture(scope="session")
def crds(dynamic: Any) -> dict[str, dict[str, Any]]:
    """Every upstream CRD found (Kubeflow, Prometheus Operator, Volcano, JobSet) and dino-ctl's own, installed once.

    Returns the installed CRDs by ``kind``.
    """
    from dino_ctl.schema import crd_manifest

    found = [doc for path in sorted(upstream_crd_folder().glob("*.yaml")) for doc in load_yaml_documents(path)
             if doc.get("kind") == "CustomResourceDefinition"]
    found.append(crd_manifest())
    install_crds(dynamic, found)
    return {crd["spec"]["names"]["kind"] + "." + crd["spec"]["group"]: crd for crd in found}


def server_side_apply(dynamic: Any, obj: dict[str, Any], *, namespace: str | None = None, dry_run: bool = False,
                      manager: str = "dino-ctl-tests") -> tuple[dict[str, Any], list[str]]:
    """Server-side apply any kind, as ``kubectl apply --server-side`` does; returns the object and the warnings.

    Unknown fields are kept as warnings (the server's default ``fieldValidation=Warn``), so a test can assert none.
    """
    from dino_ctl.kube import parse_warnings

    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    meta = dict(obj["metadata"])
    if resource.namespaced:
        meta["namespace"] = namespace or meta.get("namespace")
    body = {**obj, "metadata": meta}
    path = resource.path(name=meta["name"], namespace=meta.get("namespace"))
    query = [("fieldManager", manager), ("force", "true"), *([("dryRun", "All")] if dry_run else [])]
    response = dynamic.client.call_api(
        path, "PATCH", query_params=query, body=body, auth_settings=["BearerToken"], _preload_content=False,
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"})
    return json.loads(response.data), parse_warnings(response.headers.getlist("Warning"))
