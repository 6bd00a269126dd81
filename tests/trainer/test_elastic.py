"""Elastic training is exact: the recipe's global batch at any world size, with uneven shares (README, "Elastic").

- The FSDP2 gradient of a global batch split 5/3 over two gloo ranks equals the single-process full-batch gradient.
- ``python -m trainer.train`` on the tiny recipe (global batch 8, same seed, KoLeo and stochastic depth off) in 1, 2
  and 3 processes (shares 8, 4/4, 3/3/2): the same sample ids every step, per-step DINO and iBOT losses and the final
  student and teacher weights equal within float32 summation-order noise (:data:`RTOL`).
- With KoLeo on, what differs (its nearest neighbours are searched within each rank's share) and by how much.
- A run resized 2 -> 3 -> 1 processes across SIGTERM checkpoints sees the same sample ids in every step as the
  uninterrupted run, bit for bit, and ends with the same weights within the tolerance above.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.dist_utils import run_distributed
from tests.trainer import train_harness as h
from trainer import layout
from trainer.batches import random_batch
from trainer.checkpoint import load_model_weights
from trainer.config import batch_share, config_from_dict, resolve_config
from trainer.meta_arch import TrainStep, build_models, select_images

pytestmark = pytest.mark.slow

RTOL = 1e-4
"""Relative tolerance (of each tensor's norm, and of each loss) between world sizes. The only difference between the
runs is the order of float32 sums (per-rank partial sums, all-reduces, reduce-scatters): after 6 AdamW steps of the
tiny recipe it measures about 1e-7 on the losses and 8e-7 on the weights here; 1e-4 leaves margin for other CPUs'
kernels and still fails on any real difference in the data or the weighting (a wrong share weight moves the losses
by percents).

One exception, compared separately (:data:`KEY_BIAS_ATOL`): the key part of each attention's ``qkv.bias``. Softmax is
invariant to a shift of all logits, so the key bias's gradient is exactly zero in exact arithmetic and pure rounding
noise in float32; AdamW normalises that noise into updates of either sign, so those ~1e-6 values differ between any
two summation orders (one process against itself with another thread count too)."""

KEY_BIAS_ATOL = 1e-5
"""Absolute tolerance of the key biases (their values stay around 1e-6: noise, see :data:`RTOL`)."""

EXACT = {"loss.koleo_loss_weight": 0.0, "model.drop_path_rate": 0.0}
"""KoLeo searches neighbours within a rank's share and stochastic depth draws per rank (as in the reference): both are
world-size dependent by design, so the exactness runs turn them off (the KoLeo test measures the difference)."""

OVERRIDES = {"optim__iterations": 6, "checkpoint__interval_iterations": 6, "metrics__log_sample_ids": True}


# ------------------------------------------------------------------------------------------ gradients, in-process


def _config(**overrides: Any):
    return resolve_config("tiny", overrides={"optim.global_batch_size": 8, **EXACT, **overrides})


def _uneven_share_gradients(rank: int, world_size: int) -> dict[str, Any]:
    from trainer.runtime import build_training_models

    config = _config()
    batch = random_batch(config, 8, seed=5)
    share = range(0, 5) if rank == 0 else range(5, 8)  # deliberately not the default 4/4
    torch.manual_seed(config.seed)
    models = build_training_models(config, world_size=world_size, device=torch.device("cpu"))
    step = TrainStep(models, config)
    losses = step.accumulate_gradients(select_images(batch, share.start, share.stop), teacher_temp=0.04)
    grads = {name: p.grad.full_tensor() for name, p in models.student.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads}


def test_fsdp2_gradient_of_uneven_shares_equals_the_full_batch_gradient() -> None:
    ranks = run_distributed(_uneven_share_gradients, world_size=2, timeout_s=600)
    config = _config()
    torch.manual_seed(config.seed)
    models = build_models(config)
    losses = TrainStep(models, config).accumulate_gradients(random_batch(config, 8, seed=5), teacher_temp=0.04)
    expected = {name: p.grad for name, p in models.student.named_parameters() if p.grad is not None}
    assert ranks[0]["losses"] == ranks[1]["losses"]  # all-reduced: every rank reports the global batch's losses
    for name, value in losses.items():
        assert ranks[0]["losses"][name] == pytest.approx(value, rel=1e-5), name
    assert ranks[0]["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        _assert_close(ranks[0]["grads"][name], grad, name)
    # the weighting matters: an unweighted mean over the two ranks would be off by far more than the tolerance
    naive = _naive_rank_mean_gradient(config)
    worst = max((naive[n] - g).norm() / g.norm() for n, g in expected.items() if g.norm() > 0)
    assert worst > 100 * 1e-5


def _naive_rank_mean_gradient(config) -> dict[str, torch.Tensor]:
    """What averaging two ranks' per-rank mean losses (shares 5/3) without the share weights would give."""
    grads: dict[str, torch.Tensor] = {}
    batch = random_batch(config, 8, seed=5)
    for share in (range(0, 5), range(5, 8)):
        torch.manual_seed(config.seed)
        models = build_models(config)
        TrainStep(models, config).accumulate_gradients(select_images(batch, share.start, share.stop), teacher_temp=0.04)
        for name, p in models.student.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, 0) + p.grad / 2
    return grads


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    assert diff <= rtol * scale + 1e-12, f"{name}: |diff| {diff:.3g} > {rtol:g} x |expected| {scale:.3g}"


# ------------------------------------------------------------------------------------ trainer runs, 1/2/3 processes


def _run(directory: Path, nproc: int, **overrides: Any) -> Path:
    config = h.write_config(directory, **{**OVERRIDES, **overrides})
    result = h.run(config, nproc=nproc, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return directory / "ckpt"


def _steps(ckpt: Path) -> dict[int, dict[str, Any]]:
    """Iteration -> its (last) step record."""
    return {r["iteration"]: r for r in h.log_records(ckpt) if r["event"] == "step"}


def _weights(ckpt: Path, iteration: int) -> dict[str, torch.Tensor]:
    config = config_from_dict(yaml.safe_load((ckpt / layout.CONFIG_FILE).read_text()))
    models = build_models(config)
    load_model_weights(str(ckpt / layout.checkpoint_name(iteration)), {"student": models.student,
                                                                       "teacher": models.teacher})
    return {**{f"student.{k}": v for k, v in models.student.state_dict().items()},
            **{f"teacher.{k}": v for k, v in models.teacher.state_dict().items()}}


def _worst_differences(ours: Path, reference: Path, iterations: int) -> dict[str, float]:
    """Worst relative difference of the step losses, of the final weights (of each tensor's norm) and of all weights
    together; the key biases' worst absolute difference (:data:`RTOL`)."""
    a, b = _steps(ours), _steps(reference)
    worst = {}
    for term in ("dino_global", "dino_local", "ibot", "koleo"):
        pairs = [(a[i].get(f"loss/{term}"), b[i].get(f"loss/{term}")) for i in range(1, iterations + 1)]
        if all(x is not None for pair in pairs for x in pair):
            worst[term] = max(abs(x - y) / abs(y) for x, y in pairs)
    wa, wb = _weights(ours, iterations), _weights(reference, iterations)
    assert wa.keys() == wb.keys()
    worst["weights"] = worst["key_bias"] = 0.0
    total_diff = total_norm = 0.0
    for name in wb:
        a, b = wa[name].clone(), wb[name].clone()
        if name.endswith("attn.qkv.bias"):
            keys = slice(b.numel() // 3, 2 * b.numel() // 3)
            worst["key_bias"] = max(worst["key_bias"], (a[keys] - b[keys]).abs().max().item())
            a[keys] = b[keys] = 0.0
        if b.norm() > 0:
            worst["weights"] = max(worst["weights"], ((a - b).norm() / b.norm()).item())
        total_diff, total_norm = total_diff + (a - b).square().sum().item(), total_norm + b.square().sum().item()
    worst["all_weights"] = (total_diff / total_norm) ** 0.5  # every tensor together (student and teacher)
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("single"), 1, **{k.replace(".", "__"): v for k, v in EXACT.items()})


@pytest.mark.parametrize("nproc", [2, 3])
def test_any_world_size_trains_the_same_batches_to_the_same_weights(tmp_path: Path, single: Path, nproc: int) -> None:
    ckpt = _run(tmp_path, nproc, **{k.replace(".", "__"): v for k, v in EXACT.items()})
    ours, reference = _steps(ckpt), _steps(single)
    assert sorted(ours) == sorted(reference) == list(range(1, 7))
    for iteration, record in reference.items():
        assert ours[iteration]["sample_ids"] == record["sample_ids"], f"step {iteration}: other samples"
        assert len(record["sample_ids"]) == 8
    starts = [r for r in h.log_records(ckpt) if r["event"] == "start"]
    assert starts[0]["world_size"] == nproc
    worst = _worst_differences(ckpt, single, 6)
    assert set(worst) == {"dino_global", "dino_local", "ibot", "weights", "all_weights", "key_bias"}
    _assert_within_tolerance(worst)


def test_with_koleo_on_the_runs_differ_only_through_koleo_neighbourhoods(tmp_path: Path) -> None:
    """KoLeo (on by default) searches each image's nearest neighbour within its rank's share: at 3 ranks (3/3/2)
    neighbourhoods are smaller than in one process, so the KoLeo term differs, and through its gradient everything
    after the first step. The first step's DINO and iBOT losses (same weights, same batch) still agree."""
    koleo = {"model__drop_path_rate": 0.0}
    one, three = _run(tmp_path / "one", 1, **koleo), _run(tmp_path / "three", 3, **koleo)
    first_one, first_three = _steps(one)[1], _steps(three)[1]
    for term in ("dino_global", "dino_local", "ibot"):
        assert first_three[f"loss/{term}"] == pytest.approx(first_one[f"loss/{term}"], rel=RTOL), term
    worst = _worst_differences(three, one, 6)
    assert worst["koleo"] > 1e-3  # a real difference, not noise: README quotes the measured numbers
    print(f"\nKoLeo on, 3 processes vs 1: {worst}")


# --------------------------------------------------------------------------------------- resize across restarts


def _sigterm_after(config: Path, nproc: int, ckpt: Path, step: int) -> int:
    """Start ``nproc`` processes through the pod entry point (``trainer.launch``: torchrun that keeps exit code 143),
    SIGTERM it once step ``step`` is logged, as the kubelet would; returns the iteration of the checkpoint written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.launch", "--config", str(config), "--standalone", f"--nproc-per-node={nproc}",
         "--monitor-interval=0.2"],
        env=h._env(), cwd=h.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    h.wait_for(lambda: h.last_step(ckpt) >= step, process=process, what=f"step {step}")
    process.send_signal(signal.SIGTERM)
    code, out = h.finish(process)
    assert code == 143, out[-3000:]
    latest = layout.latest_complete(str(ckpt))
    assert latest is not None and latest.meta["reason"] == "preemption" and latest.meta["world_size"] == nproc
    return latest.iteration


RESIZE = {"optim__iterations": 40, "checkpoint__interval_iterations": 100, "metrics__log_sample_ids": True,
          **{k.replace(".", "__"): v for k, v in EXACT.items()}}
"""Long enough (a step takes about 0.1 s here) that each SIGTERM lands well before the schedule ends."""


def test_a_run_resized_two_three_one_sees_the_same_samples_and_ends_with_the_same_weights(tmp_path: Path) -> None:
    reference = h.write_config(tmp_path / "reference", **RESIZE)
    result = h.run(reference, nproc=1, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = h.write_config(tmp_path / "resized", **RESIZE)
    ckpt = tmp_path / "resized" / "ckpt"
    first = _sigterm_after(config, 2, ckpt, 3)
    second = _sigterm_after(config, 3, ckpt, first + 3)
    assert first < second < 40
    result = h.run(config, nproc=1, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    starts = [r for r in h.log_records(ckpt) if r["event"] == "start"]
    assert [(s["world_size"], s["resumed_from"]) for s in starts] == [(2, None), (3, first), (1, second)]
    ours, theirs = _steps(ckpt), _steps(tmp_path / "reference" / "ckpt")
    assert sorted(ours) == sorted(theirs) == list(range(1, 41))
    for iteration, record in theirs.items():
        assert ours[iteration]["sample_ids"] == record["sample_ids"], f"step {iteration}: other samples after resize"
    worst = _worst_differences(ckpt, tmp_path / "reference" / "ckpt", 40)
    _assert_within_tolerance(worst)
    print(f"\nresized 2 -> 3 -> 1 (at {first} and {second}) vs 1 process, 40 steps: {worst}")


def _assert_within_tolerance(worst: dict[str, float]) -> None:
    assert worst["key_bias"] <= KEY_BIAS_ATOL, worst
    assert all(value <= RTOL for name, value in worst.items() if name != "key_bias"), worst


def test_batch_shares_cover_the_global_batch_in_rank_order() -> None:
    config = _config()
    assert [list(batch_share(config, 3, r)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
