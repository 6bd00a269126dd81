"""Checkpoint cost of a recipe's full training state, and the time from a restart to the first training step.

    python bench/checkpoint.py --preset tiny

Prints ONE JSON object:
- ``save_s`` / ``load_s``: sharded DCP save (published with its completion marker) and load of student, teacher,
  centers and AdamW state, against ``torch.save``/``torch.load`` of the same state dicts in the same run;
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


def _state_costs(preset: str, directory: str) -> dict[str, float]:
    config = resolve_config(preset, overrides={"data.dataset": "synthetic", "optim.global_batch_size": 4})
    models = build_models(config)
    step = TrainStep(models, config)
    step(random_batch(config, 4, seed=0), 100)  # past the freeze: every parameter has optimiser state
    state = {"student": models.student, "teacher": models.teacher, "centers": models.centers,
             "optimizer": step.optimizer}
    manager = CheckpointManager(CheckpointConfig(dir=f"{directory}/dcp", keep_last=1), rank=0, world_size=1)
    start = time.perf_counter()
    manager.save(1, state, meta={"reason": "bench"})
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    manager.load_latest(state)
    load_s = time.perf_counter() - start
    plain = {"student": models.student.state_dict(), "teacher": models.teacher.state_dict(),
             "centers": models.centers.state_dict(), "optimizer": step.optimizer.state_dict()}
    start = time.perf_counter()
    torch.save(plain, f"{directory}/plain.pt")
    os.sync()
    torch_save_s = time.perf_counter() - start
    start = time.perf_counter()
    torch.load(f"{directory}/plain.pt", weights_only=False)
    torch_load_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(f"{directory}/dcp").rglob("*") if f.is_file())
    manager.close()
    return {"save_s": save_s, "load_s": load_s, "baseline_torch_save_s": torch_save_s,
            "baseline_torch_load_s": torch_load_s, "checkpoint_bytes": size}


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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        result = {"preset": args.preset, **_state_costs(args.preset, directory),
                  **_restart_costs(args.preset, directory, args.steps)}
    result["save_vs_torch_save"] = result["save_s"] / result["baseline_torch_save_s"]
    result["restart_overhead_vs_fresh"] = (
        result["restart_to_first_step_s"] / result["baseline_fresh_start_to_first_step_s"]
    )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
