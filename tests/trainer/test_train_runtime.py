"""The training runtime end to end: real processes, real gloo, real DCP checkpoints, real signals.

Every test runs ``python -m trainer.train`` (directly or under torchrun) on the tiny recipe with synthetic data.
"""

from __future__ import annotations

import os
import shutil
import signal
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.trainer import train_harness as h
from trainer import layout
from trainer.checkpoint import load_model_weights
from trainer.config import config_from_dict
from trainer.models import build_backbone
from trainer.models.checkpoint_io import read_checkpoint
from trainer.meta_arch import build_models

pytestmark = pytest.mark.slow
PREEMPTED = 143


def _complete(directory) -> list[int]:
    return [info.iteration for info in layout.list_checkpoints(str(directory)) if info.complete]


def _student_weights(checkpoint_dir, iteration: int) -> dict[str, torch.Tensor]:
    import yaml

    config = config_from_dict(yaml.safe_load((checkpoint_dir / layout.CONFIG_FILE).read_text()))
    student = build_models(config).student
    load_model_weights(str(checkpoint_dir / layout.checkpoint_name(iteration)), {"student": student})
    return student.state_dict()


def _assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_train_checkpoint_and_export(tmp_path):
    config = h.write_config(tmp_path)
    _assert_ok(h.run(config, nproc=2))
    ckpt = tmp_path / "ckpt"
    assert _complete(ckpt) == [4, 8, 12]
    meta = layout.latest_complete(str(ckpt)).meta
    assert meta["world_size"] == 2 and meta["iteration"] == 12
    steps = [r for r in h.log_records(ckpt) if r["event"] == "step"]
    assert [r["iteration"] for r in steps] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in steps)
    # the export is the released layout and loads strictly into a fresh backbone of the same preset
    exported = read_checkpoint(ckpt / "export" / "backbone.safetensors")
    fresh = build_backbone("vit_pico", patch_size=4, img_size=32)
    fresh.load_state_dict(exported, strict=True)
    assert (ckpt / "final.json").exists() and (ckpt / layout.CONFIG_FILE).exists()


def test_sigkill_of_a_worker_restarts_the_group_and_matches_an_uninterrupted_run(tmp_path):
    overrides = {"optim__iterations": 24, "checkpoint__interval_iterations": 4}
    reference = h.write_config(tmp_path / "reference", **overrides)
    _assert_ok(h.run(reference, nproc=2))

    killed = h.write_config(tmp_path / "killed", **overrides)
    process = h.start(killed, nproc=2, max_restarts=2)
    ckpt = tmp_path / "killed" / "ckpt"
    h.wait_for(lambda: any(i >= 4 for i in _complete(ckpt)) and h.last_step(ckpt) >= 6,
        process=process, what="a complete checkpoint and two more steps")
    os.kill(h.worker_with_rank(process.pid, 1), signal.SIGKILL)
    code, out = h.finish(process)
    assert code == 0, out[-4000:]
    starts = [r for r in h.log_records(ckpt) if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] is not None, "the group was not restarted from a checkpoint"

    ours, theirs = _student_weights(ckpt, 24), _student_weights(tmp_path / "reference" / "ckpt", 24)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs after the restart"


def test_sigterm_writes_a_complete_checkpoint_and_exits_preempted(tmp_path):
    config = h.write_config(tmp_path, optim__iterations=500, checkpoint__interval_iterations=1000)
    process = h.start(config)
    ckpt = tmp_path / "ckpt"
    h.wait_for(lambda: any(r["event"] == "step" and r["iteration"] >= 3 for r in h.log_records(ckpt)),
               process=process, what="three steps")
    process.send_signal(signal.SIGTERM)
    code, out = h.finish(process)
    assert code == PREEMPTED, out[-3000:]
    latest = layout.latest_complete(str(ckpt))
    assert latest is not None and latest.iteration >= 3 and latest.meta["reason"] == "preemption"
    last_step = max(r["iteration"] for r in h.log_records(ckpt) if r["event"] == "step")
    assert latest.iteration == last_step  # the step in flight finished, then the checkpoint was written


def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
    config = h.write_config(tmp_path, optim__iterations=8)
    _assert_ok(h.run(config, nproc=2))
    resumed = h.write_config(tmp_path, optim__iterations=12)  # same directory, longer schedule
    _assert_ok(h.run(resumed, nproc=1))
    ckpt = tmp_path / "ckpt"
    starts = [r for r in h.log_records(ckpt) if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == 8 and starts[-1]["world_size"] == 1
    steps = [r["iteration"] for r in h.log_records(ckpt) if r["event"] == "step"]
    assert steps[-4:] == [9, 10, 11, 12]
    assert layout.latest_complete(str(ckpt)).meta["world_size"] == 1


def test_a_checkpoint_without_its_marker_is_never_resumed(tmp_path):
    config = h.write_config(tmp_path, optim__iterations=8)
    _assert_ok(h.run(config))
    ckpt = tmp_path / "ckpt"
    # a crash in the middle of writing iteration 10: shards present, completion marker missing
    partial = ckpt / layout.checkpoint_name(10)
    shutil.copytree(ckpt / layout.checkpoint_name(8), partial)
    (partial / layout.COMPLETE_MARKER).unlink()
    _assert_ok(h.run(h.write_config(tmp_path, optim__iterations=12)))
    starts = [r for r in h.log_records(ckpt) if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == 8
    assert 10 not in _complete(ckpt) and _complete(ckpt)[-1] == 12


def test_metrics_endpoint_serves_training_metrics_during_a_run(tmp_path):
    config = h.write_config(tmp_path, optim__iterations=500, metrics__port=0)
    process = h.start(config)
    ckpt = tmp_path / "ckpt"
    try:
        port = h.wait_for(
            lambda: next((r["metrics_port"] for r in h.log_records(ckpt) if r["event"] == "start"), None),
            process=process, what="the metrics port")
        h.wait_for(lambda: any(r["event"] == "step" and r["iteration"] >= 3 for r in h.log_records(ckpt)),
                   process=process, what="three steps")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        h.finish(process)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    iterations = families["dino_train_iterations"].samples[0].value  # the parser strips _total from counters
    assert iterations >= 3
    components = {s.labels["component"] for s in families["dino_train_loss"].samples}
    assert {"dino_global", "dino_local", "ibot", "koleo", "total"} <= components
    assert families["dino_train_learning_rate"].samples[0].value > 0
    build = families["dino_build_info"].samples[0]
    assert build.labels["recipe"] == "tiny" and build.labels["stage"] == "pretrain"
