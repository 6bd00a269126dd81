"""The pure parts of the kopf wiring; the handlers against the real API server are in tests/cluster."""

from __future__ import annotations

import kopf

from dino_ctl.controller.executor import Executor
from dino_ctl.controller.handlers import Controller, build_registry, status_patch
from dino_ctl.controller.metrics import ControllerMetrics


def test_registry_wires_every_handler_and_a_login() -> None:
    registry = build_registry(Controller(Executor(None), ControllerMetrics()), interval=20)  # type: ignore[arg-type]
    changing = registry._changing.get_all_handlers()
    assert sorted(h.id for h in changing) == ["cleanup", "reconcile", "reconcile", "reconcile"]
    (timer,) = registry._spawning.get_all_handlers()
    assert (timer.id, timer.interval) == ("periodic", 20)
    # A plain OperatorRegistry gets none of kopf's fallback logins: without one the operator cannot authenticate.
    logins = [h for h in registry._activities.get_all_handlers() if h.activity.value == "authentication"]
    assert [(h.id, h.fn) for h in logins] == [("login", kopf.login_via_client)]


def test_status_patch_writes_only_what_changed() -> None:
    old = {"phase": "Pending", "message": "m", "currentStage": "pretrain", "kopf": {"progress": {}}}
    assert status_patch(old, {"phase": "Pending", "message": "m", "currentStage": "pretrain"}) == {}
    assert status_patch(old, {"phase": "Running", "message": "m"}) == {"phase": "Running", "currentStage": None}
    assert status_patch({}, {"phase": "Pending"}) == {"phase": "Pending"}
