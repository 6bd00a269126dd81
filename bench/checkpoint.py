"""Checkpoint cost of a recipe's full training state on local disk and on an S3 server, and the time from a restart
to the first training step.

    python bench/checkpoint.py --preset tiny
    python bench/checkpoint.py --preset vits14 --no-restart     # the ViT-S/14 training state, local disk vs S3

Prints ONE JSON object:
- ``save_s`` / ``load_s``: sharded DCP save (published with its completion marker) and load of student, teacher,
  centers and AdamW state to local disk, against ``torch.save``/``torch.load`` of the same state dicts in the same run;
- ``s3_save_s`` / ``s3_load_s``: the same save and load through the trainer's code path (fsspec/s3fs) to an S3 server:
  by default a versitygw started on 127.0.0.1 for this run (``scripts/k8s-stack.sh`` builds it; its data lies on the
  same local disk, so the difference is the S3 protocol and client), or ``--s3-uri`` with the environment's
  AWS_* credentials and endpoint;
- ``async_blocked_s`` / ``s3_async_blocked_s``: how long an asynchronous save stalls training (staging to host
  memory), and ``*_async_published_s`` until it is published in the background;
- ``restart_to_first_step_s``: wall time from launching ``python -m trainer.train`` on a stage directory that holds
  a checkpoint until its first step is logged, against a fresh start of the same stage (same process cost, no load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from trainer.batches import random_batch  # noqa: E402
from trainer.checkpoint import CheckpointManager  # noqa: E402
from trainer.config import CheckpointConfig, resolve_config  # noqa: E402
from trainer.meta_arch import TrainStep, build_models  # noqa: E402


def _training_state(preset: str) -> tuple[dict, dict]:
    """(checkpoint state, the same as plain state dicts) after one step: every parameter has AdamW state."""
    config = resolve_config(preset, overrides={"data.dataset": "synthetic", "optim.global_batch_size": 4})
    models = build_models(config)
    step = TrainStep(models, config)
    step(random_batch(config, 4, seed=0), 100)  # past the freeze: every parameter has optimiser state
    state = {"student": models.student, "teacher": models.teacher, "centers": models.centers,
             "optimizer": step.optimizer}
    plain = {"student": models.student.state_dict(), "teacher": models.teacher.state_dict(),
             "centers": models.centers.state_dict(), "optimizer": step.optimizer.state_dict()}
    return state, plain


def _dcp_costs(state: dict, directory: str) -> dict[str, float]:
    """Blocking save (published), load, then an async save: its stall and its time to publication."""
    config = CheckpointConfig(dir=directory, keep_last=0, async_save=True)
    manager = CheckpointManager(config, rank=0, world_size=1)
    start = time.perf_counter()
    manager.save(1, state, meta={"reason": "bench"})
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    manager.load_latest(state)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    blocked_s = manager.save(2, state, meta={"reason": "bench"}, blocking=False)
    manager.wait()
    published_s = time.perf_counter() - start
    manager.close()
    return {"save_s": save_s, "load_s": load_s, "async_blocked_s": blocked_s, "async_published_s": published_s}


def _s3_costs(state: dict, uri: str | None, workdir: str) -> dict[str, float | str]:
    """:func:`_dcp_costs` on S3: ``uri`` from the environment's store, or a versitygw started for this run."""
    if uri is not None:
        return {f"s3_{key}": value for key, value in _dcp_costs(state, uri).items()}
    from tests.storage.s3_server import VERSION, S3Server

    with S3Server(Path(workdir) / "versitygw") as server:
        os.environ.update(server.env())
        server.create_bucket("bench")
        costs = {f"s3_{key}": value for key, value in _dcp_costs(state, "s3://bench/checkpoint").items()}
        costs["s3_server"] = f"versitygw {VERSION} on 127.0.0.1, POSIX backend on the local disk"
        costs["s3_server_startup_s"] = server.startup_seconds
    return costs


def _state_costs(state: dict, plain: dict, directory: str) -> dict[str, float]:
    costs = _dcp_costs(state, f"{directory}/dcp")
    start = time.perf_counter()
    torch.save(plain, f"{directory}/plain.pt")
    os.sync()
    torch_save_s = time.perf_counter() - start
    start = time.perf_counter()
    torch.load(f"{directory}/plain.pt", weights_only=False)
    torch_load_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(f"{directory}/dcp/ckpt-000000001").rglob("*") if f.is_file())
    return {**costs, "baseline_torch_save_s": torch_save_s, "baseline_torch_load_s": torch_load_s,
            "checkpoint_bytes": size}


def _first_step_seconds(config_path: Path, log: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    offset = log.stat().st_size if log.exists() else 0
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "trainer.train", "--config", str(config_path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, start_record = None, {}
    while first is None:
        if log.exists():
            with log.open() as handle:
                handle.seek(offset)
                for line in handle:
                    if not line.endswith("\n"):
                        break
                    record = json.loads(line)
                    if record["event"] == "start":
                        start_record = record
                    if record["event"] == "step" and first is None:
                        first = time.perf_counter() - start
        if process.poll() is not None and first is None:
            raise RuntimeError(f"trainer exited with {process.returncode} before its first step")
        time.sleep(0.02)
    process.wait()
    return first, start_record


def _restart_costs(preset: str, directory: str, steps: int) -> dict[str, float]:
    stage = Path(directory) / "stage"
    values = {"recipe": preset, "data": {"dataset": "synthetic", "num_workers": 0},
              "optim": {"iterations": steps, "global_batch_size": 8, "warmup_iterations": 1},
              "checkpoint": {"dir": str(stage), "interval_iterations": steps},
              "metrics": {"port": -1, "log_interval": 1}}
    config_path = Path(directory) / "stage.yaml"
    config_path.write_text(yaml.safe_dump(values))
    fresh, _ = _first_step_seconds(config_path, stage / "train_log.jsonl")
    values["optim"]["iterations"] = steps + 2
    config_path.write_text(yaml.safe_dump(values))
    resumed, record = _first_step_seconds(config_path, stage / "train_log.jsonl")
    return {"restart_to_first_step_s": resumed, "baseline_fresh_start_to_first_step_s": fresh,
            "resume_load_s": record.get("load_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=4, help="steps of the first run before the restart")
    parser.add_argument("--s3-uri", help="an S3 directory to use (credentials and endpoint from the AWS_* "
                        "environment) instead of a versitygw started for this run")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    parser.add_argument("--no-restart", action="store_true", help="skip the restart-to-first-step rows")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave a core to the S3 server
    state, plain = _training_state(args.preset)
    with tempfile.TemporaryDirectory() as directory:
        result = {"preset": args.preset, **_state_costs(state, plain, directory)}
        if not args.no_s3:
            result.update(_s3_costs(state, args.s3_uri, directory))
        if not args.no_restart:
            result.update(_restart_costs(args.preset, directory, args.steps))
    result["save_vs_torch_save"] = result["save_s"] / result["baseline_torch_save_s"]
    if not args.no_s3:
        result["s3_save_vs_local"] = result["s3_save_s"] / result["save_s"]
        result["s3_load_vs_local"] = result["s3_load_s"] / result["load_s"]
    if not args.no_restart:
        result["restart_overhead_vs_fresh"] = (
            result["restart_to_first_step_s"] / result["baseline_fresh_start_to_first_step_s"]
        )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
