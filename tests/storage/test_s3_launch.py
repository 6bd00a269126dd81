"""The pod entry point on S3: SIGTERM while the final checkpoint is uploaded is not a failure.

Every step ran and the final checkpoint gets published (the workers finish it after the signal), but torchrun's
agent turns the SIGTERM into exit 1. ``trainer.launch`` must report 143 ("stopped after a published checkpoint"),
so the control plane resubmits without counting a failure; the resubmitted run resumes at the last iteration.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.trainer import train_harness as h
from trainer import layout

pytestmark = pytest.mark.slow


def test_sigterm_during_the_final_checkpoint_upload_exits_143_with_it_published(s3, tmp_path) -> None:
    stage_dir = s3.uri("launch", "pretrain")
    config = h.write_config(tmp_path, optim__iterations=8, checkpoint__interval_iterations=4,
                            checkpoint__dir=stage_dir, metrics__log_file=str(tmp_path / "train_log.jsonl"))
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.launch", "--config", str(config), "--standalone", "--nproc-per-node=2",
         "--monitor-interval=0.2"],
        env=h._env(), cwd=h.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    final_started = "/launch/pretrain/ckpt-000000008/extra-rank00000.json"
    deadline = time.monotonic() + 240
    while not any(method == "PUT" and path.endswith(final_started) for _, method, path in s3.server.requests()):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-4000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # the kubelet, while the final checkpoint is being written
    code, out = h.finish(process)
    assert "SignalException" in out or "Received" in out, out[-3000:]  # torchrun itself saw the signal
    assert code == layout.PREEMPTED_EXIT_CODE, out[-4000:]
    latest = layout.latest_complete(stage_dir)
    assert latest.iteration == 8 and latest.meta["reason"] == "final"
