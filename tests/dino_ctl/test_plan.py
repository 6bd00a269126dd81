"""plan(spec, observed): stage chaining, restarts by reason, failure budget, cancel, idempotency."""

from __future__ import annotations

import copy
import json

from dino_ctl.observe import observe
from dino_ctl.plan import Action, ActionKind, ExperimentPhase, RestartCounts, experiment_phase, plan
from tests.dino_ctl.spec_helpers import experiment
from tests.dino_ctl.test_observe import recorded


def _kinds(actions: list[Action]) -> list[tuple[str, str | None, str]]:
    return [(a.kind.value, a.stage, a.reason) for a in actions]


def _succeeded(stage: str) -> list[dict]:
    """The recorded succeeded pretrain job, relabelled as ``stage``."""
    objects = json.loads(json.dumps(recorded("pretrain_succeeded")).replace("pretrain", stage))
    for obj in objects:
        obj["metadata"]["uid"] = f"{stage}-{obj['metadata'].get('uid', '')}"
    return objects


def test_fresh_submit_starts_only_the_first_stage() -> None:
    exp = experiment()
    observed = observe([], experiment="demo")
    actions = plan(exp, observed)
    assert _kinds(actions) == [("submit", "pretrain", "start")]
    assert actions[0].attempt == 0 and actions[0].restarts == RestartCounts()
    assert experiment_phase(exp, observed) == ExperimentPhase.PENDING


def test_running_stage_needs_nothing() -> None:
    exp = experiment()
    observed = observe(recorded("pretrain_running"), experiment="demo")
    assert plan(exp, observed) == []
    assert experiment_phase(exp, observed) == ExperimentPhase.RUNNING


def test_stage_completion_starts_the_next_stage() -> None:
    exp = experiment()
    observed = observe(_succeeded("pretrain"), experiment="demo")
    assert _kinds(plan(exp, observed)) == [("submit", "highres", "start")]
    both = observe(_succeeded("pretrain") + _succeeded("highres"), experiment="demo")
    assert _kinds(plan(exp, both)) == [("submit", "distill", "start")]


def test_independent_stages_start_together() -> None:
    doc_exp = experiment()
    stages = [s.model_copy(update={"teacher": None, "after": ["pretrain"], "init": s.init, "overrides": {
        **s.overrides, "stage.kind": "pretrain"}}) if s.name == "distill" else s for s in doc_exp.spec.stages]
    exp = doc_exp.model_copy(update={"spec": doc_exp.spec.model_copy(update={"stages": stages})})
    assert _kinds(plan(exp, observe(_succeeded("pretrain"), experiment="demo"))) == [
        ("submit", "highres", "start"), ("submit", "distill", "start")]


def test_next_stage_waits_for_a_published_checkpoint_when_storage_was_read() -> None:
    exp = experiment()
    without = observe(_succeeded("pretrain"), experiment="demo", checkpoints={"pretrain": None})
    assert plan(exp, without) == []
    with_checkpoint = observe(_succeeded("pretrain"), experiment="demo", checkpoints={"pretrain": 200})
    assert _kinds(plan(exp, with_checkpoint)) == [("submit", "highres", "start")]


def test_preemption_resubmits_without_touching_the_failure_budget() -> None:
    exp = experiment()
    observed = observe(recorded("pretrain_preempted"), experiment="demo")
    [delete] = plan(exp, observed)
    assert (delete.kind, delete.stage, delete.reason) == (ActionKind.DELETE, "pretrain", "preemption")
    assert delete.restarts == RestartCounts(failure=1, preemption=2)  # failure count unchanged
    assert delete.counted_job_uid == "job-p3"
    assert "resubmitting from the latest checkpoint" in delete.message
    # After the delete, the stage is absent with the new counts: it is submitted again as attempt 3.
    after = observe([_config_map("pretrain", delete.restarts, delete.counted_job_uid)], experiment="demo")
    [submit] = plan(exp, after)
    assert (submit.kind, submit.reason, submit.attempt) == (ActionKind.SUBMIT, "resubmit", 3)
    assert submit.restarts == RestartCounts(failure=1, preemption=2)


def test_eviction_has_its_own_count() -> None:
    [delete] = plan(experiment(), observe(recorded("pretrain_evicted"), experiment="demo"))
    assert delete.reason == "eviction" and delete.restarts == RestartCounts(failure=1, preemption=1, eviction=1)


def test_preemption_cap_fails_the_stage_when_set() -> None:
    exp = experiment(failureBudget={"preemption": 1})
    [action] = plan(exp, observe(recorded("pretrain_preempted"), experiment="demo"))
    assert (action.kind, action.reason) == (ActionKind.FAIL_STAGE, "preemption")
    assert action.message.endswith("preemption budget of 1 spent")


def test_repeated_failure_fails_the_stage_after_the_budget() -> None:
    exp = experiment(failureBudget={"failure": 2})
    objects = recorded("pretrain_failed")  # failure count 1 so far
    [first] = plan(exp, observe(objects, experiment="demo"))
    assert (first.kind, first.reason, first.restarts) == (ActionKind.DELETE, "failure",
                                                         RestartCounts(failure=2, preemption=1))
    # The next failure of a new job is over the budget of 2 resubmissions.
    objects = copy.deepcopy(objects)
    objects[0]["metadata"]["annotations"]["dino-ctl.io/restarts"] = first.restarts.to_json()
    objects[1]["metadata"]["uid"] = "job-p4"
    observed = observe(objects, experiment="demo")
    [failed] = plan(exp, observed)
    assert (failed.kind, failed.stage) == (ActionKind.FAIL_STAGE, "pretrain")
    assert failed.message == ("failure (exit codes 1; evictions none): failure budget of 2 spent")
    assert experiment_phase(exp, observed) == ExperimentPhase.FAILED
    # resume --retry-failed gives it a fresh failure budget; the other counts stay.
    [retry] = plan(exp, observed, retry_failed=True)
    assert (retry.kind, retry.reason, retry.restarts) == (ActionKind.DELETE, "retry",
                                                         RestartCounts(failure=0, preemption=1))


def test_a_failure_is_counted_once_even_if_the_delete_did_not_happen() -> None:
    exp = experiment()
    observed = observe(recorded("pretrain_failed_counted"), experiment="demo")  # counts already include job-p3
    [delete] = plan(exp, observed)
    assert delete.kind == ActionKind.DELETE and delete.restarts == RestartCounts(failure=2, preemption=1)


def test_zero_failure_budget_fails_at_once() -> None:
    [action] = plan(experiment(failureBudget={"failure": 0}), observe(recorded("pretrain_failed"), experiment="demo"))
    assert action.kind == ActionKind.FAIL_STAGE


def test_cancel_stops_unfinished_jobs_keeps_finished_ones_and_starts_nothing() -> None:
    exp = experiment()
    record = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "demo-experiment", "labels": {"dino-ctl.io/experiment": "demo"},
        "annotations": {"dino-ctl.io/cancel-requested": "true"}}}
    observed = observe([*_succeeded("pretrain"), *json.loads(json.dumps(recorded("pretrain_running")).replace(
        '"pretrain"', '"highres"')), record], experiment="demo")
    # The succeeded pretrain job stays: it records that the stage is done, so resume starts at highres.
    assert _kinds(plan(exp, observed)) == [("delete", "highres", "cancel")]
    assert experiment_phase(exp, observed) == ExperimentPhase.CANCELLED
    assert plan(exp, observe([record], experiment="demo")) == []  # nothing left to delete, nothing started


def test_resume_after_the_cli_machine_died_continues_from_cluster_state() -> None:
    """A new machine sees pretrain done and highres never submitted (the old CLI died in between)."""
    exp = experiment()
    observed = observe([*_succeeded("pretrain"), _config_map("highres", RestartCounts())], experiment="demo")
    assert _kinds(plan(exp, observed)) == [("submit", "highres", "start")]
    assert plan(exp, observed) == plan(exp, observed)  # pure and repeatable


def test_all_stages_succeeded_completes() -> None:
    exp = experiment()
    observed = observe(_succeeded("pretrain") + _succeeded("highres") + _succeeded("distill"), experiment="demo")
    assert _kinds(plan(exp, observed)) == [("complete", None, "")]
    assert experiment_phase(exp, observed) == ExperimentPhase.SUCCEEDED


def test_deleting_job_is_waited_for() -> None:
    objects = recorded("pretrain_running")
    objects[1]["metadata"]["deletionTimestamp"] = "2026-03-02T12:00:00Z"
    assert plan(experiment(), observe(objects, experiment="demo")) == []


def _config_map(stage: str, restarts: RestartCounts, counted: str | None = None) -> dict:
    annotations = {"dino-ctl.io/restarts": restarts.to_json()}
    if counted:
        annotations["dino-ctl.io/counted-job"] = counted
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": f"demo-{stage}-config", "annotations": annotations,
        "labels": {"dino-ctl.io/experiment": "demo", "dino-ctl.io/stage": stage}}}


def test_each_kind_of_action_is_its_own_type_with_the_fields_it_needs() -> None:
    import dataclasses

    import pytest

    from dino_ctl.plan import Complete, DeleteJob, FailStage, SubmitStage

    kinds = {SubmitStage: ActionKind.SUBMIT, DeleteJob: ActionKind.DELETE, FailStage: ActionKind.FAIL_STAGE,
             Complete: ActionKind.COMPLETE}
    assert {cls.kind for cls in kinds} == set(ActionKind) and all(cls.kind == kind for cls, kind in kinds.items())
    [submit] = plan(experiment(), observe([], experiment="demo"))
    assert isinstance(submit, SubmitStage) and submit.kind == ActionKind.SUBMIT
    with pytest.raises(TypeError, match="restarts"):
        SubmitStage(stage="pretrain", reason="start", attempt=0)  # a submission always records its counts
    with pytest.raises(TypeError, match="stage"):
        DeleteJob(reason="cancel")
    assert Complete(message="done").stage is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        submit.attempt = 3  # type: ignore[misc]
