"""Retention unpublishes first: a kill at any point of pruning never leaves COMPLETE.json beside missing data.

The kill is emulated at every single deletion the filesystem performs: on local disk an audit hook aborts the
process's n-th ``unlink``/``rmdir`` (what a SIGKILL inside ``shutil.rmtree`` amounts to), on the S3 server a botocore
hook aborts the client's n-th delete request before it is sent. After each abort every checkpoint that still has its
marker must still have all its files, and the newest complete and the promoted checkpoint are never touched.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import fsspec
import torch

from trainer import layout
from trainer.checkpoint import CheckpointManager
from trainer.config import CheckpointConfig


class _Killed(Exception):
    """Stands for the process dying between two storage operations."""


def _manager(directory: str, *, keep_last: int) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(dir=directory, keep_last=keep_last), rank=0, world_size=1)


def _save_four(directory: str) -> None:
    manager = _manager(directory, keep_last=0)
    for iteration in (1, 2, 3, 4):
        manager.save(iteration, {"model": torch.nn.Linear(3, 3), "progress": {"i": iteration}}, meta={})


def _files(fs, root: str) -> dict[str, set[str]]:
    """``{checkpoint name: its file names}`` as stored now."""
    fs.invalidate_cache()
    found: dict[str, set[str]] = {}
    for path in fs.find(root):
        relative = path[len(root.rstrip("/")) + 1:]
        if relative.startswith("ckpt-"):
            name, _, file = relative.partition("/")
            found.setdefault(name, set()).add(file)
    return found


def _assert_no_marker_beside_missing_data(before: dict[str, set[str]], after: dict[str, set[str]]) -> None:
    for name, files in after.items():
        if layout.COMPLETE_MARKER in files:
            assert files == before[name], f"{name} keeps {layout.COMPLETE_MARKER} but lost {before[name] - files}"


# ------------------------------------------------------------------------------------------------ local disk

_local_kill: dict[str, int | None] = {"after": None, "seen": 0}


def _audit(event: str, args: tuple) -> None:
    if _local_kill["after"] is None or event not in ("os.remove", "os.rmdir"):
        return
    _local_kill["seen"] += 1
    if _local_kill["seen"] > _local_kill["after"]:
        raise _Killed(f"killed before {event}{args[:1]}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; it is idle unless a test arms it


def test_a_kill_at_any_deletion_on_local_disk_leaves_no_marker_beside_missing_data(tmp_path: Path) -> None:
    template = tmp_path / "template"
    _save_four(str(template))
    (template / layout.PUBLISHED_FILE).write_text(json.dumps({"checkpoint": "ckpt-000000001"}))
    fs = fsspec.filesystem("file")
    before = _files(fs, str(template))
    kill_points = 0
    while True:
        trial = tmp_path / f"trial-{kill_points}"
        shutil.copytree(template, trial)
        manager = _manager(str(trial), keep_last=1)
        _local_kill.update(after=kill_points, seen=0)
        try:
            removed = manager.prune()
        except _Killed:
            removed = None
        finally:
            _local_kill["after"] = None
        after = _files(fs, str(trial))
        _assert_no_marker_beside_missing_data(before, after)
        assert after["ckpt-000000004"] == before["ckpt-000000004"]  # the newest complete
        assert after["ckpt-000000001"] == before["ckpt-000000001"]  # the promoted one
        if removed is not None:  # the prune ran to its end: every kill point was tried
            assert sorted(path.rsplit("/", 1)[-1] for path in removed) == ["ckpt-000000002", "ckpt-000000003"]
            assert sorted(after) == ["ckpt-000000001", "ckpt-000000004"]
            break
        # what a restarted run's own retention makes of the debris: interrupted writes, removed
        manager.prune()
        assert [info.iteration for info in layout.list_checkpoints(str(trial))] == [1, 4]
        kill_points += 1
    assert kill_points >= 8  # two checkpoints of four files and a directory each


# ------------------------------------------------------------------------------------------------ S3 server


def test_a_kill_at_any_delete_request_on_s3_leaves_no_marker_beside_missing_data(s3) -> None:
    kill_points = 0
    while True:
        prefix = f"trial-{kill_points}/pretrain"
        directory = s3.uri(prefix)
        _save_four(directory)
        s3.fs.pipe_file(f"{s3.name}/{prefix}/{layout.PUBLISHED_FILE}", b'{"checkpoint": "ckpt-000000001"}')
        before = _files(s3.fs, f"{s3.name}/{prefix}")
        manager = _manager(directory, keep_last=1)
        requests = {"seen": 0}

        def kill(model, **kwargs) -> None:
            if model.name in ("DeleteObject", "DeleteObjects"):
                requests["seen"] += 1
                if requests["seen"] > kill_points:
                    raise _Killed(f"killed before {model.name}")

        client = manager._fs.s3  # the very client retention uses (fsspec's cached s3fs instance)
        client.meta.events.register("before-call.s3", kill)
        try:
            removed = manager.prune()
        except _Killed:
            removed = None
        finally:
            client.meta.events.unregister("before-call.s3", kill)
        after = _files(s3.fs, f"{s3.name}/{prefix}")
        _assert_no_marker_beside_missing_data(before, after)
        assert after["ckpt-000000004"] == before["ckpt-000000004"]
        assert after["ckpt-000000001"] == before["ckpt-000000001"]
        if removed is not None:
            assert sorted(after) == ["ckpt-000000001", "ckpt-000000004"]
            break
        kill_points += 1
    assert kill_points == 4  # per pruned checkpoint: the marker's DELETE, then one bulk delete of the rest

    # The server saw it in that order: each marker deleted alone before the bulk delete of its checkpoint.
    requests_seen = [(method, path) for _, method, path in s3.server.requests() if f"/trial-{kill_points}/" in path
                     or path.endswith("?delete=")]
    marker_deletes = [path for method, path in requests_seen if method == "DELETE"]
    assert [path.split("/")[-2] for path in marker_deletes][-2:] == ["ckpt-000000002", "ckpt-000000003"]
