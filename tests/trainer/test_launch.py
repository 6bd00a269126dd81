"""The pod entry point keeps exit code 143 through torchrun when SIGTERM led to a preemption checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.trainer import train_harness as h
from trainer import layout

pytestmark = pytest.mark.slow

TORCHRUN = ["--standalone", "--nproc-per-node=2", "--monitor-interval=0.2"]


def _start(config) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.launch", "--config", str(config), *TORCHRUN], env=h._env(), cwd=h.REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_sigterm_through_torchrun_exits_preempted_with_a_complete_checkpoint(tmp_path):
    config = h.write_config(tmp_path, optim__iterations=500, checkpoint__interval_iterations=1000)
    process = _start(config)
    ckpt = tmp_path / "ckpt"
    h.wait_for(lambda: any(r["event"] == "step" and r["iteration"] >= 2 for r in h.log_records(ckpt)),
               process=process, what="two steps")
    process.send_signal(signal.SIGTERM)  # what the kubelet does to the container's main process
    code, out = h.finish(process)
    assert code == 143, out[-4000:]
    latest = layout.latest_complete(str(ckpt))
    assert latest.meta["reason"] == "preemption" and latest.meta["world_size"] == 2


def test_a_finished_run_exits_zero(tmp_path):
    config = h.write_config(tmp_path, optim__iterations=4)
    code, out = h.finish(_start(config))
    assert code == 0, out[-4000:]
    assert layout.latest_complete(str(tmp_path / "ckpt")).iteration == 4
