"""parallelize: FSDP2 on 2 gloo ranks computes what one process computes; activation checkpointing changes nothing."""

from __future__ import annotations

import pytest
import torch
from ssl_toy import toy_loss, toy_ssl_model
from torch import nn
from torch.distributed.tensor import DTensor

from tests.dist_utils import run_distributed
from trainer.config import ConfigError, ParallelConfig, resolve_config
from trainer.parallelize import (
    autocast_dtype,
    build_on_meta,
    configure_cuda_matmul,
    materialize,
    parallelize,
    uses_fsdp,
)

CPU = torch.device("cpu")


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(seed))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _count_block_calls(model: nn.ModuleDict) -> list[int]:
    """Per-block forward counts, live (activation checkpointing shows up as a second call during backward)."""
    counts = [0] * len(model["backbone"].blocks)
    for index, block in enumerate(model["backbone"].blocks):
        block.fc1.register_forward_hook(lambda *args, index=index: counts.__setitem__(index, counts[index] + 1))
    return counts


def _loss_and_grads(model: nn.Module, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = toy_loss(model, tokens)
    loss.backward()
    return loss.item(), {name: _full(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}


def _sharded_run(rank: int, world_size: int) -> dict:
    """Each rank takes its half of the batch; FSDP2 averages the gradients over ranks."""
    tokens = _batch().chunk(world_size)[rank]
    results = {}
    for checkpointing in (False, True):
        config = ParallelConfig(activation_checkpointing=checkpointing)
        model = parallelize(toy_ssl_model(seed=0), config, world_size=world_size, device=CPU)
        counts = _count_block_calls(model)
        results[checkpointing] = _loss_and_grads(model, tokens)
        assert counts == [2 if checkpointing else 1] * 3
    teacher = parallelize(toy_ssl_model(seed=0), ParallelConfig(), world_size=world_size, device=CPU,
                          is_teacher=True)
    with torch.no_grad():
        results["teacher"] = teacher["dino_head"](teacher["backbone"](tokens))
    results["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    return results


def test_fsdp_on_two_ranks_matches_one_process_with_and_without_checkpointing() -> None:
    reference = toy_ssl_model(seed=0)
    ref_loss, ref_grads = _loss_and_grads(reference, _batch())
    with torch.no_grad():
        ref_teacher = reference["dino_head"](reference["backbone"](_batch()))

    ranks = run_distributed(_sharded_run, world_size=2)
    assert all(rank["sharded"] for rank in ranks)
    for checkpointing in (False, True):
        mean_loss = sum(rank[checkpointing][0] for rank in ranks) / 2
        assert mean_loss == pytest.approx(ref_loss, rel=1e-6)
        grads = ranks[0][checkpointing][1]
        assert grads.keys() == ref_grads.keys()  # parameter names unchanged by checkpointing and sharding
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in ranks[0][True][1].items():
        torch.testing.assert_close(grad, ranks[0][False][1][name], rtol=1e-6, atol=1e-7, msg=name)
    teacher_out = torch.cat([rank["teacher"] for rank in ranks])
    torch.testing.assert_close(teacher_out, ref_teacher, rtol=1e-5, atol=1e-6)


def test_single_process_checkpointing_gives_the_same_grads_and_names() -> None:
    plain = parallelize(toy_ssl_model(seed=3), ParallelConfig(), world_size=1, device=CPU)
    checkpointed = parallelize(
        toy_ssl_model(seed=3), ParallelConfig(activation_checkpointing=True), world_size=1, device=CPU
    )
    counts = _count_block_calls(checkpointed)
    loss_a, grads_a = _loss_and_grads(plain, _batch(1))
    loss_b, grads_b = _loss_and_grads(checkpointed, _batch(1))
    assert counts == [2, 2, 2]  # recomputed in backward
    assert loss_a == loss_b
    assert list(grads_a) == list(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def _meta_run(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = build_on_meta(
        toy_ssl_model,
        shard=lambda m: parallelize(m, ParallelConfig(), world_size=world_size, device=CPU),
        device=CPU,
    )
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = toy_loss(model, _batch().chunk(world_size)[rank])
    loss.backward()
    optimizer.step()
    return {
        "devices": {p.to_local().device.type for p in params.values()},
        "finite": all(torch.isfinite(_full(p)).all().item() for p in params.values()),
        "names": sorted(params),
        "gains": _full(model["dino_head"].last_layer.weight_g.detach()),
        "loss": loss.item(),
    }


def test_build_on_meta_shards_then_materialises_on_two_ranks() -> None:
    ranks = run_distributed(_meta_run, world_size=2)
    assert ranks[0]["devices"] == {"cpu"} and all(rank["finite"] for rank in ranks)
    assert ranks[0]["names"] == sorted(name for name, _ in toy_ssl_model().named_parameters())
    # reset_parameters fallback for the head (which has no init_weights): gains start at 1, then AdamW moves them.
    assert not torch.equal(ranks[0]["gains"], torch.ones_like(ranks[0]["gains"]))
    assert torch.allclose(ranks[0]["gains"], torch.ones_like(ranks[0]["gains"]), atol=0.05)
    assert all(torch.isfinite(torch.tensor(rank["loss"])) for rank in ranks)


def test_materialize_uses_reset_parameters_like_eager_construction() -> None:
    with torch.device("meta"):
        lazy = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    torch.manual_seed(7)
    materialize(lazy, CPU)
    torch.manual_seed(7)
    eager = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    for (name, a), (_, b) in zip(lazy.named_parameters(), eager.named_parameters()):
        assert torch.equal(a, b), name


def test_materialize_refuses_parameters_it_cannot_initialise() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        model = nn.ModuleDict({"head": nn.Sequential(nn.Linear(2, 2), Bare())})
    with pytest.raises(TypeError, match=r"head\.1 \(Bare\) owns parameters but has neither init_weights"):
        materialize(model, CPU)


def test_fsdp_off_with_several_ranks_is_a_config_error() -> None:
    assert uses_fsdp(ParallelConfig(fsdp="auto"), world_size=2)
    assert not uses_fsdp(ParallelConfig(fsdp="auto"), world_size=1)
    with pytest.raises(ValueError, match=r"parallel\.fsdp: invalid value 'off' with world size 4"):
        uses_fsdp(ParallelConfig(fsdp="off"), world_size=4)


def test_parallelize_without_a_process_group_refuses_fsdp_on() -> None:
    with pytest.raises(RuntimeError, match="initialised process group"):
        parallelize(toy_ssl_model(), ParallelConfig(fsdp="on"), world_size=1, device=CPU)


@pytest.mark.slow
def test_compiled_checkpointed_blocks_match_eager() -> None:
    eager = toy_ssl_model(seed=5, depth=1)
    from torch._dynamo.utils import counters

    config = ParallelConfig(compile=True, activation_checkpointing=True)
    compiled = parallelize(toy_ssl_model(seed=5, depth=1), config, world_size=1, device=CPU)
    loss_a, grads_a = _loss_and_grads(eager, _batch(2))
    counters.clear()
    loss_b, grads_b = _loss_and_grads(compiled, _batch(2))
    assert counters["stats"]["unique_graphs"] == 1  # the block really was compiled, checkpoint included
    assert not counters["graph_break"]
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def _compiled_sharded_run(rank: int, world_size: int) -> dict:
    from torch._dynamo.utils import counters

    tokens = _batch().chunk(world_size)[rank]
    config = ParallelConfig(compile=True, activation_checkpointing=True)
    model = parallelize(toy_ssl_model(seed=0, depth=1), config, world_size=world_size, device=CPU)
    loss, grads = _loss_and_grads(model, tokens)
    return {"loss": loss, "grads": grads, "graphs": counters["stats"]["unique_graphs"]}


@pytest.mark.slow
def test_compiled_checkpointed_fsdp_blocks_match_one_eager_process() -> None:
    ref_loss, ref_grads = _loss_and_grads(toy_ssl_model(seed=0, depth=1), _batch())
    ranks = run_distributed(_compiled_sharded_run, world_size=2, timeout_s=300)
    assert all(rank["graphs"] == 1 for rank in ranks)
    assert sum(rank["loss"] for rank in ranks) / 2 == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ranks[0]["grads"].items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_dtype_is_the_one_gpu_half_of_mixed_precision():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    # one rank on a GPU: the step autocasts the backbones (no FSDP policy to do it)
    assert autocast_dtype(ParallelConfig(), world_size=1, device=cuda) is torch.bfloat16
    assert autocast_dtype(ParallelConfig(param_dtype="float32"), world_size=1, device=cuda) is None
    # FSDP2 (several ranks, or forced on one) casts through its MixedPrecisionPolicy instead; CPUs run float32
    assert autocast_dtype(ParallelConfig(), world_size=2, device=cuda) is None
    assert autocast_dtype(ParallelConfig(fsdp="on"), world_size=1, device=cuda) is None
    assert autocast_dtype(ParallelConfig(), world_size=1, device=cpu) is None


def test_configure_cuda_matmul_follows_allow_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        configure_cuda_matmul(ParallelConfig(allow_tf32=False))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_cuda_matmul(ParallelConfig())
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_float16_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"parallel.param_dtype: invalid value 'float16'; allowed: bfloat16 or float32"):
        resolve_config("tiny", overrides={"parallel.param_dtype": "float16"})
