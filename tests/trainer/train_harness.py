"""Launch real training processes (plain python or torchrun with gloo) for the runtime tests, and watch them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def write_config(directory: Path, **overrides: Any) -> Path:
    """A tiny-recipe stage config (synthetic data) with dotted ``overrides`` (``optim__iterations=8`` style keys)."""
    values: dict[str, Any] = {
        "optim.global_batch_size": 8,
        "optim.iterations": 12,
        "optim.warmup_iterations": 2,
        "optim.freeze_last_layer_iterations": 2,
        "checkpoint.interval_iterations": 4,
        "checkpoint.keep_last": 0,
        "checkpoint.dir": str(directory / "ckpt"),
        "metrics.port": -1,
        "metrics.log_interval": 1,
        "data.num_workers": 0,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    data: dict[str, Any] = {"recipe": "tiny"}
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = directory / "stage.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def command(config: Path, *, nproc: int, max_restarts: int = 0, extra: list[str] | None = None) -> list[str]:
    entry = ["-m", "trainer.train", "--config", str(config), *(extra or [])]
    if nproc == 1:
        return [sys.executable, *entry]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0", "--rdzv-conf=last_call_timeout=1", f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}", "--monitor-interval=0.2", *entry,
    ]


def start(config: Path, *, nproc: int = 1, **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(
        command(config, nproc=nproc, **kwargs), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def run(config: Path, *, nproc: int = 1, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(config, nproc=nproc, **kwargs), env=_env(), cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )


def log_records(checkpoint_dir: Path) -> list[dict[str, Any]]:
    path = checkpoint_dir / "train_log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip() and line.endswith("}")]


def last_step(checkpoint_dir: Path) -> int:
    """The newest iteration the run's log reports a step for (0 before the first)."""
    return max((r["iteration"] for r in log_records(checkpoint_dir) if r["event"] == "step"), default=0)


def wait_for(predicate, *, process: subprocess.Popen, timeout: float = 180, what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail with the process output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"process exited ({process.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_with_rank(agent_pid: int, rank: int) -> int:
    for pid in children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent_pid}")


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        raise AssertionError(f"training did not finish in {timeout}s:\n{out[-4000:]}")
    return process.returncode, out
