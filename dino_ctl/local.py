"""Run stages on this machine (the embedded default): torchrun or TorchX ``local_cwd``, progress from the JSON log.

Torch-free: the trainer runs in a child process (``python -m trainer.train``); this module only launches it, follows
its JSON-lines log for progress and returns the exit code. Exit code 143 means the trainer was preempted after
writing a checkpoint (a rerun resumes it). A curation stage runs ``python -m curation.launch`` the same way (under
torchrun with more than one process): its progress goes to stderr, its step results to a JSON report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.layout import PREEMPTED_EXIT_CODE

__all__ = ["LocalStageResult", "curation_command", "launch_command", "read_log_records", "run_curation", "run_stage"]



@dataclass
class LocalStageResult:
    """What one local stage run produced."""

    exit_code: int
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> dict[str, Any] | None:
        steps = [r for r in self.records if r.get("event") == "step"]
        return steps[-1] if steps else None


def launch_command(config_path: str, *, nproc: int, launcher: str = "auto") -> list[str]:
    """The command that trains one stage locally.

    ``auto``: one process runs the entry directly (fast start-up, no rendezvous); more use torchrun with a local
    c10d rendezvous. ``torchx`` runs the ``dist.torchrun`` component on the ``local_cwd`` scheduler (the same
    component the Kubernetes TorchX backend renders).
    """
    entry = ["-m", "trainer.train", "--config", config_path]
    if launcher == "torchx":
        return [
            sys.executable, "-m", "torchx.cli.main", "run", "--scheduler", "local_cwd", "dist.torchrun",
            "-j", f"1x{nproc}", "-m", "trainer.train", "--", "--config", config_path,
        ]
    if launcher == "torchrun" or nproc > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=3", *entry,
        ]
    if launcher not in ("auto", "python"):
        raise ValueError(f"launcher: invalid value {launcher!r}; allowed: auto, python, torchrun, torchx")
    return [sys.executable, *entry]


def read_log_records(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """JSON records appended to ``path`` since byte ``offset`` (complete lines only) and the new offset."""
    if not path.exists():
        return [], offset
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data.rfind(b"\n") + 1
    records = []
    for line in data[:complete].splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records, offset + complete


def run_stage(
    config_path: str,
    log_path: Path,
    *,
    nproc: int = 1,
    launcher: str = "auto",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    env: dict[str, str] | None = None,
    poll_seconds: float = 0.5,
) -> LocalStageResult:
    """Launch one stage and follow its JSON log until the process exits."""
    command = launch_command(config_path, nproc=nproc, launcher=launcher)
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # environment.md: restarted gloo workers
    repo_root = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, child_env.get("PYTHONPATH")]))
    if launcher == "torchx":
        child_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), child_env.get("PATH", "")])
        if shutil.which("torchrun", path=child_env["PATH"]) is None:
            raise FileNotFoundError("torchrun is not on PATH; the TorchX dist.torchrun component needs it")
    offset = log_path.stat().st_size if log_path.exists() else 0
    start = time.monotonic()
    records: list[dict[str, Any]] = []
    with subprocess.Popen(command, env=child_env) as process:
        while True:
            code = process.poll()
            new, offset = read_log_records(log_path, offset)
            for record in new:
                records.append(record)
                if on_record:
                    on_record(record)
            if code is not None:
                break
            time.sleep(poll_seconds)
    return LocalStageResult(exit_code=code, seconds=time.monotonic() - start, records=records)


def curation_command(spec_path: str, report_path: str, *, nproc: int) -> list[str]:
    """The command that runs one curation stage locally: ``curation.launch`` in this process's Python, under a
    standalone torchrun when ``nproc`` > 1 (each rank owns a shard of the pool, as in the cluster)."""
    entry = ["-m", "curation.launch", "--spec", spec_path, "--report", report_path]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]
    return [sys.executable, *entry]


def run_curation(spec_path: str, report_path: Path, *, nproc: int = 1, env: dict[str, str] | None = None
                 ) -> LocalStageResult:
    """Run one curation stage to completion; ``records`` holds the report's step results (rank 0 writes them)."""
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    repo_root = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, child_env.get("PYTHONPATH")]))
    report_path.unlink(missing_ok=True)  # a report left by an earlier run must not pass for this one's
    start = time.monotonic()
    code = subprocess.run(curation_command(spec_path, str(report_path), nproc=nproc), env=child_env,
                          check=False).returncode
    records = json.loads(report_path.read_text())["steps"] if code == 0 and report_path.exists() else []
    return LocalStageResult(exit_code=code, seconds=time.monotonic() - start, records=records)
