"""Pod entry point: torchrun around ``trainer.train`` that keeps the "preempted" exit code.

    python -m trainer.launch --config /etc/dino-ctl/config.yaml [torchrun options ...]

torchrun's agent turns a SIGTERM into an uncaught ``SignalException`` and exits 1, so the pod would report a
failure even though every worker finished its step, wrote a checkpoint and exited 143. This wrapper

- runs ``torchrun <options> -m trainer.train --config CONFIG`` as a child (torchrun reads the ``PET_*`` variables the
  Kubeflow operators inject, so options are rarely needed),
- gives the workers the configured preemption grace before torchrun escalates to SIGKILL
  (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``; its default of 30 s is shorter than a large checkpoint),
- forwards SIGTERM to torchrun and, when the run's work is safe in storage, exits 143
  (:data:`trainer.layout.PREEMPTED_EXIT_CODE`) instead of torchrun's 1: a complete checkpoint with
  ``reason: preemption`` was published after the signal, or the stage's ``final`` checkpoint is published (the signal
  landed while it, the export or ``final.json`` was written: every step ran, and a resubmitted pod resumes at the
  last iteration and only redoes the export). Otherwise torchrun's own exit code; a storage failure while looking
  is logged and changes nothing.

Torch-free: it only reads the config YAML and the checkpoint layout.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import time

from trainer import layout
from trainer.layout import PREEMPTED_EXIT_CODE
from trainer.config import load_config_file

logger = logging.getLogger("trainer.launch")

_SHUTDOWN_MARGIN_S = 30


def torchrun_command(config_path: str, torchrun_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "trainer.train",
            "--config", config_path]


def preempted_after(checkpoint_dir: str, since: float) -> bool:
    """True when a SIGTERM at ``since`` stopped a run whose work is published: the newest complete checkpoint is a
    preemption checkpoint published at or after ``since``, or the stage's final checkpoint."""
    latest = layout.latest_complete(checkpoint_dir)
    if latest is None:
        return False
    if latest.meta.get("reason") == "final":
        return True
    return latest.meta.get("reason") == "preemption" and latest.meta.get("time", 0) >= since


def _published_after(checkpoint_dir: str, since: float) -> bool:
    try:
        return preempted_after(checkpoint_dir, since)
    except Exception as error:  # noqa: BLE001 - the exit code must come back whatever storage says
        logger.error("cannot read %s after SIGTERM (%s); keeping torchrun's exit code", checkpoint_dir, error)
        return False


def run(config_path: str, torchrun_args: list[str], *, checkpoint_dir: str, grace_seconds: float) -> int:
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(math.ceil(grace_seconds) + _SHUTDOWN_MARGIN_S))
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # restarted gloo workers must not reuse stale peers
    child = subprocess.Popen(torchrun_command(config_path, torchrun_args), env=env)
    terminated_at: list[float] = []

    def forward(signum: int, frame: object) -> None:
        del frame
        if not terminated_at:
            terminated_at.append(time.time())
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    code = child.wait()
    if code != 0 and terminated_at and _published_after(checkpoint_dir, terminated_at[0] - 1.0):
        logger.warning("preempted: checkpoint published after SIGTERM; exiting %d", PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.launch", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="stage config YAML passed to trainer.train")
    args, torchrun_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config_file(args.config, [])
    return run(args.config, torchrun_args, checkpoint_dir=config.checkpoint.dir,
               grace_seconds=config.checkpoint.preemption_grace_seconds)


if __name__ == "__main__":
    sys.exit(main())
