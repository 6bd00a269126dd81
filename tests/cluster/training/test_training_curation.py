"""A curation stage through the real Kubeflow training-operator and kwok: curate -> pretrain -> distill.

``dino-ctl submit --wait`` on a spec whose first stage curates (its output and image pool on ReadWriteMany PVCs,
statically bound here to hostPath PersistentVolumes: kwok mounts nothing, the scheduler only needs the claims
bound). The operator turns the curation stage's PyTorchJob into pods running torchrun around ``curation.launch``,
configured by the same PET_* variables as a training stage; the training stages start only after it succeeded and
mount the PVC the curated dataset lives on.
"""

from __future__ import annotations

from typing import Any

from tests.cluster.conftest import wait_for
from tests.cluster.training.training_cluster import Training, cli_passes

STAGES = ("curate", "pretrain", "distill")
CLAIMS = ("curation-scratch", "image-pools")


def _bound_claims(training: Training) -> None:
    """A hostPath PersistentVolume pre-bound to each claim (the PV controller of the real controller-manager binds
    them)."""
    from kubernetes import client

    core = client.CoreV1Api(training.admin_api)
    for claim in CLAIMS:
        volume = f"{training.namespace}-{claim}"[:63]
        core.create_persistent_volume({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "hostPath": {"path": f"/tmp/{volume}"}, "persistentVolumeReclaimPolicy": "Retain",
                     "claimRef": {"namespace": training.namespace, "name": claim}}})
        core.create_namespaced_persistent_volume_claim(training.namespace, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                     "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: all(core.read_namespaced_persistent_volume_claim(c, training.namespace).status.phase == "Bound"
                         for c in CLAIMS), what="the claims to bind")


def _cleanup(training: Training) -> None:
    from kubernetes import client

    core = client.CoreV1Api(training.admin_api)
    for claim in CLAIMS:
        core.delete_persistent_volume(f"{training.namespace}-{claim}"[:63])


def _spec(training: Training) -> dict[str, Any]:
    doc = training.spec(auto_succeed=True)
    pretrain, _highres, distill = doc["spec"]["stages"]
    curation = {
        "output": "pvc://curation-scratch/demo",
        "sources": [{"name": "web", "kind": "filelist", "path": "pvc://image-pools/web/files.txt"}],
        "embed": {"model": "vit_small"},
        "write": {"num_shards": 4},
    }
    doc["spec"]["stages"] = [
        {"name": "curate", "curation": curation},
        {**pretrain, "data": {"from": "curate"}},
        {**distill, "teacher": {"from": "pretrain"}, "data": {"from": "curate"}},
    ]
    return doc


def test_submit_wait_curates_then_trains_through_the_operator(training: Training) -> None:
    training.pool.add(2)
    _bound_claims(training)
    try:
        path = training.write(_spec(training))
        with training.recorder() as seen:
            result = training.cli("submit", str(path), "--wait", "--poll-seconds", "0.2", "--timeout", "120",
                                  "-o", "json")
            assert result.exit_code == 0, result.output
            assert cli_passes(result.stdout)[-1]["phase"] == "Succeeded"
            wait_for(lambda: seen.job_condition_at("demo-distill", "Succeeded"), what="the watch to see the end")

        # pretrain's job was created only after the curation job had succeeded, distill's after pretrain's.
        for before, after in zip(STAGES, STAGES[1:], strict=False):
            succeeded, created = seen.job_condition_at(f"demo-{before}", "Succeeded"), seen.job_created_at(
                f"demo-{after}")
            assert succeeded is not None and created is not None and succeeded.seq < created.seq

        curate_pods = [e.obj for e in seen.of("Pod") if e.type == "ADDED"
                       and e.obj["metadata"]["labels"].get("training.kubeflow.org/job-name") == "demo-curate"]
        assert {p["metadata"]["name"] for p in curate_pods} == {"demo-curate-worker-0", "demo-curate-worker-1"}
        for pod in curate_pods:
            (container,) = pod["spec"]["containers"]
            assert container["command"][3:7] == ["-m", "curation.launch", "--spec", "/etc/dino-ctl/curation.yaml"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["PET_NNODES"] == "2:2" and env["PET_NPROC_PER_NODE"] == "8"
            assert env["PET_RDZV_ENDPOINT"] == "demo-curate-worker-0:23456"
            assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "curation"
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                      if "persistentVolumeClaim" in v}
            assert claims == set(CLAIMS)
        bound = {e.obj["spec"].get("nodeName") for e in seen.of("Pod") if e.obj["spec"].get("nodeName")
                 and e.obj["metadata"]["labels"].get("training.kubeflow.org/job-name") == "demo-curate"}
        assert len(bound) == 2  # both workers scheduled: the claims were bound
        pretrain_pods = [e.obj for e in seen.of("Pod") if e.type == "ADDED"
                         and e.obj["metadata"]["labels"].get("training.kubeflow.org/job-name") == "demo-pretrain"]
        assert pretrain_pods and all("curation-scratch" in {v.get("persistentVolumeClaim", {}).get("claimName")
                                                            for v in p["spec"]["volumes"]} for p in pretrain_pods)

        report = training.status()
        assert [(s["stage"], s["phase"], s["kind"]) for s in report["stages"]] == [
            (stage, "Succeeded", "PyTorchJob") for stage in STAGES]
    finally:
        _cleanup(training)
