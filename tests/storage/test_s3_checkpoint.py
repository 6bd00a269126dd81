"""DCP checkpoints on a real S3 server, through the trainer's own code paths.

- Sharded save on 2 gloo ranks (sync and async), exact reload on 2, resharded reload in 1 process.
- ``python -m trainer.train`` on 2 ranks with ``checkpoint.dir: s3://...``: a worker SIGKILLed after a checkpoint,
  the torchrun group restarts from S3, then a 1-process run resumes the same S3 directory; the final weights equal,
  bit for bit, those of the same schedule run uninterrupted on local disk.
- A process SIGKILLed in the middle of a checkpoint's multipart upload leaves an unpublished prefix that resume,
  ``dino-ctl checkpoints list`` and ``promote`` all treat as an interrupted write; saving that iteration again
  replaces it.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.dist_utils import run_distributed
from tests.trainer import train_harness as h
from tests.trainer.ssl_toy import toy_loss, toy_ssl_model
from trainer import layout
from trainer.checkpoint import CheckpointManager, OptimizerState, load_model_weights
from trainer.config import CheckpointConfig, ParallelConfig
from trainer.meta_arch import build_models
from trainer.parallelize import parallelize

FULL = StateDictOptions(full_state_dict=True)


def _manager(directory: str, rank: int = 0, world_size: int = 1, **kwargs) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(dir=directory, **kwargs), rank=rank, world_size=world_size)


def _train(model, optimizer, *, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        toy_loss(model, torch.randn(4, 4, 6, generator=generator)).backward()
        optimizer.step()


def _full_state(model, optimizer) -> dict:
    return {"model": {k: v.clone() for k, v in get_model_state_dict(model, options=FULL).items()},
            "optim": copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=FULL))}  # steps are shared


def _assert_equal(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _assert_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_equal(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where


def _sharded_round_trip(rank: int, world_size: int, directory: str) -> dict:
    model = parallelize(toy_ssl_model(seed=0), ParallelConfig(), world_size=world_size, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=2, seed=rank)
    progress = {"iteration": 2, "rank": rank}
    state = {"student": model, "optimizer": OptimizerState(model, optimizer), "progress": progress}
    manager = _manager(directory, rank, world_size, async_save=True)
    manager.save(2, state, meta={"reason": "interval"})  # blocking
    expected = _full_state(model, optimizer)
    _train(model, optimizer, steps=1, seed=7)
    assert manager.load_latest(state) == 2
    _assert_equal(_full_state(model, optimizer), expected, "reloaded from s3")
    assert progress == {"iteration": 2, "rank": rank}
    manager.save(3, state, meta={}, blocking=False)  # async: staged, uploaded while training goes on
    after_async = _full_state(model, optimizer)
    _train(model, optimizer, steps=1, seed=8)
    manager.wait()
    assert manager.last_saved_iteration == 3
    manager.close()
    return after_async


def test_sharded_sync_and_async_checkpoints_on_s3_reload_on_two_ranks_and_in_one(s3) -> None:
    directory = s3.uri("dcp", "pretrain")
    expected = run_distributed(_sharded_round_trip, world_size=2, args=(directory,))[0]
    keys = sorted(key.rsplit("/", 1)[-1] for key in s3.fs.find(f"{s3.name}/dcp/pretrain/ckpt-000000003"))
    assert keys == [".metadata", "COMPLETE.json", "__0_0.distcp", "__1_0.distcp",
                    "extra-rank00000.json", "extra-rank00001.json"]

    model = toy_ssl_model(seed=5)  # one process, no process group: the two shards are reassembled
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress: dict = {}
    state = {"student": model, "optimizer": OptimizerState(model, optimizer), "progress": progress}
    assert _manager(directory).load_latest(state) == 3
    _assert_equal(_full_state(model, optimizer), expected, "resharded from s3")
    assert progress == {"iteration": 2, "rank": 0}


# ---------------------------------------------------------------------------------------------- the trainer itself

OVERRIDES = {"optim__iterations": 8, "checkpoint__interval_iterations": 4}


def _student_weights(stage_dir: str, iteration: int) -> dict[str, torch.Tensor]:
    config = layout.read_stage_config(stage_dir)
    student = build_models(config).student
    load_model_weights(layout.join(stage_dir, layout.checkpoint_name(iteration)), {"student": student})
    return student.state_dict()


def _assert_same_weights(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs: {what}"


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    """The same schedule on local disk, uninterrupted: 2 ranks to iteration 8, then 1 rank to 12."""
    base = tmp_path_factory.mktemp("local-reference")
    _ok(h.run(h.write_config(base, **OVERRIDES), nproc=2))
    _ok(h.run(h.write_config(base, optim__iterations=12, checkpoint__interval_iterations=4), nproc=1))
    stage_dir = str(base / "ckpt")
    return {iteration: _student_weights(stage_dir, iteration) for iteration in (8, 12)}


def _complete_on_s3(bucket, stage_dir: str) -> list[int]:
    bucket.server.filesystem()  # nothing cached: a fresh listing each time
    fs = bucket.fs
    prefix = stage_dir.split("://", 1)[1]
    if not fs.exists(prefix):
        return []
    names = [path.rsplit("/", 1)[-1] for path in fs.ls(prefix, detail=False)]
    return [int(name[5:]) for name in names if name.startswith("ckpt-")
            and fs.exists(f"{prefix}/{name}/{layout.COMPLETE_MARKER}")]


@pytest.mark.slow
def test_sigkill_and_resize_resume_from_s3_equal_an_uninterrupted_local_run(s3, tmp_path, local_reference) -> None:
    stage_dir = s3.uri("runs", "pretrain")
    logs = tmp_path / "logs"
    config = h.write_config(tmp_path, **OVERRIDES, checkpoint__dir=stage_dir, checkpoint__async_save=True,
                            metrics__log_file=str(logs / "train_log.jsonl"))
    process = h.start(config, nproc=2, max_restarts=2)
    h.wait_for(lambda: 4 in _complete_on_s3(s3, stage_dir) and h.last_step(logs) >= 6,
        process=process, what="checkpoint 4 on s3 and two more steps")
    os.kill(h.worker_with_rank(process.pid, 1), signal.SIGKILL)
    code, out = h.finish(process)
    assert code == 0, out[-4000:]
    starts = [r for r in h.log_records(logs) if r["event"] == "start"]
    assert [s["resumed_from"] for s in starts] == [None, 4], "the restarted group did not resume from s3"
    _assert_same_weights(_student_weights(stage_dir, 8), local_reference[8], "SIGKILL + resume from s3")

    resized = h.write_config(tmp_path, optim__iterations=12, checkpoint__interval_iterations=4,
                             checkpoint__dir=stage_dir, metrics__log_file=str(logs / "train_log.jsonl"))
    _ok(h.run(resized, nproc=1))
    starts = [r for r in h.log_records(logs) if r["event"] == "start"]
    assert starts[-1]["resumed_from"] == 8 and starts[-1]["world_size"] == 1
    _assert_same_weights(_student_weights(stage_dir, 12), local_reference[12], "resumed at world size 1 from s3")
    assert s3.fs.exists(f"{s3.name}/runs/pretrain/export/backbone.safetensors")
    final = json.loads(s3.fs.cat_file(f"{s3.name}/runs/pretrain/final.json"))
    assert final["iteration"] == 12


# ------------------------------------------------------------------------------------------ a kill mid-upload

_SAVER = """
import sys, torch
from torch import nn
from trainer.checkpoint import CheckpointManager
from trainer.config import CheckpointConfig
manager = CheckpointManager(CheckpointConfig(dir=sys.argv[1], keep_last=0))
manager.save(1, {"model": nn.Linear(4, 4), "progress": {"iteration": 1}}, meta={"reason": "interval"})
big = nn.Linear(4096, 8192, bias=False)  # 128 MiB: several multipart parts
manager.save(2, {"model": big, "progress": {"iteration": 2}}, meta={"reason": "interval"})
print("published", flush=True)
"""


def _upload_started(server, key: str) -> bool:
    return any(method == "POST" and path.endswith(key + "?uploads=") for _, method, path in server.requests())


def test_a_kill_mid_upload_is_never_resumed_listed_complete_or_promoted(s3) -> None:
    stage_dir = s3.uri("torn", "pretrain")
    process = subprocess.Popen([sys.executable, "-c", _SAVER, stage_dir], cwd=h.REPO, env=h._env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    shard = "torn/pretrain/ckpt-000000002/__0_0.distcp"
    deadline = time.monotonic() + 120
    while not _upload_started(s3.server, shard):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the node died mid-upload
    out = process.communicate()[0]
    assert "published" not in out
    fs = s3.fs
    assert not fs.exists(f"{s3.name}/torn/pretrain/ckpt-000000002/{layout.COMPLETE_MARKER}")
    assert not fs.exists(f"{s3.name}/{shard}")  # an unfinished multipart upload is no object
    assert fs.exists(f"{s3.name}/torn/pretrain/ckpt-000000002/extra-rank00000.json")  # debris of the save

    progress: dict = {}
    assert _manager(stage_dir).load_latest({"model": torch.nn.Linear(4, 4), "progress": progress}) == 1
    assert progress == {"iteration": 1}
    runner = CliRunner()
    listed = runner.invoke(app, ["checkpoints", "list", "--dir", stage_dir, "--output", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["iteration"]: row["complete"] for row in json.loads(listed.stdout)["checkpoints"]}
    assert rows == {1: True, 2: False}
    refused = runner.invoke(app, ["checkpoints", "promote", "2", "--dir", stage_dir])
    assert refused.exit_code == 2 and "interrupted write" in refused.output

    manager = _manager(stage_dir, keep_last=0)  # saving iteration 2 again replaces the debris
    manager.save(2, {"model": torch.nn.Linear(4, 4), "progress": {"iteration": 2}}, meta={})
    files = sorted(path.rsplit("/", 1)[-1] for path in s3.fs.find(f"{s3.name}/torn/pretrain/ckpt-000000002"))
    assert files == [".metadata", "COMPLETE.json", "__0_0.distcp", "extra-rank00000.json"]
