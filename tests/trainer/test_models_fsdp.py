"""The models under FSDP2 ``fully_shard`` (2 CPU processes, gloo): same gradients as the unsharded modules.

Covers the weight-normalised head (plain ``weight_g``/``weight_v`` parameters sharded by rows) and the backbone's
packed forward (blocks called with a ``TokenLayout`` argument) through every entry point, the non-``forward`` ones
registered with ``register_fsdp_forward_method`` as ``trainer.parallelize`` must do.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.models import DINOHead, build_backbone

WORLD_SIZE = 2


def _inputs(rank: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)  # every rank its own batch
    features = torch.randn(5, 8, generator=generator)
    crops = [torch.randn(2, 3, 16, 16, generator=generator), torch.randn(3, 3, 8, 8, generator=generator)]
    masks = torch.rand(2, 16, generator=generator) < 0.4
    return features, crops, masks


def _backbone_loss(model, crops: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    outputs = model.forward_features_list(crops, [masks, None])
    return sum(out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].sin().sum() for out in outputs)


def _assert_grads_match(sharded, reference, world_size: int) -> None:
    # FSDP averages gradients over ranks; the reference saw every rank's batch, so its gradients are sums
    for (name, param), ref in zip(sharded.named_parameters(), reference.parameters()):
        scale = ref.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(param.grad.full_tensor(), ref.grad / world_size, rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        head = DINOHead(8, 6, 12, 4)  # 6 prototypes: rows split 3 + 3 over the two ranks
        backbone = build_backbone("vit_pico", depth=2, patch_size=4, img_size=16, num_register_tokens=1,
                                  drop_path_rate=0.0, attention_backend="sdpa")
        for param in backbone.parameters():  # make the blocks matter (LayerScale starts at 1e-5)
            if param.dim() == 1 and torch.all(param == 1e-5):
                param.data.fill_(0.5)
        ref_head, ref_backbone = copy.deepcopy(head), copy.deepcopy(backbone)
        fully_shard(head)
        for block in backbone.blocks:
            fully_shard(block)
        fully_shard(backbone)
        for method in ("forward_features", "forward_features_list", "get_intermediate_layers"):
            register_fsdp_forward_method(backbone, method)
        assert type(head.last_layer.weight_g).__name__ == "DTensor"

        features, crops, masks = _inputs(rank)
        head(features).square().sum().backward()
        _backbone_loss(backbone, crops, masks).backward()
        for other in range(WORLD_SIZE):
            features, crops, masks = _inputs(other)
            ref_head(features).square().sum().backward()
            _backbone_loss(ref_backbone, crops, masks).backward()
        _assert_grads_match(head, ref_head, WORLD_SIZE)
        _assert_grads_match(backbone, ref_backbone, WORLD_SIZE)
        with torch.no_grad():  # the other entry points, as the teacher and evaluation call them
            torch.testing.assert_close(backbone(crops[0]), ref_backbone(crops[0]))
            features = backbone.forward_features(crops[1], None)["x_norm_patchtokens"]
            torch.testing.assert_close(features, ref_backbone.forward_features(crops[1])["x_norm_patchtokens"])
            (layer,) = backbone.get_intermediate_layers(crops[0], 1)
            torch.testing.assert_close(layer, ref_backbone.get_intermediate_layers(crops[0], 1)[0])
        Path(out_dir, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def test_fully_shard_gives_the_unsharded_gradients(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]
