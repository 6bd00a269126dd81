"""Packed multi-crop forward vs one forward per crop size, and grouped vs dense-mask block-diagonal attention.

    .venv/bin/python bench/attention.py [--batch 2] [--repeats 3] [--threads N]

ViT-S/14 (position embedding for 224 px), per image 2 global crops of 224 px and 8 local crops of 98 px.

- ``forward`` / ``train_step``: the student's ONE packed ``forward_features_list`` (eval forward without grad, and
  forward + backward with stochastic depth off) against the baseline of two ``forward_features`` calls, one per crop
  size. Both give the same outputs (``max_abs_diff``).
- ``attention``: the SDPA backend's attention core over the packed tokens (one SDPA call per crop size) against
  the baseline of one SDPA call over the whole packed sequence with a dense ``[T, T]`` block-diagonal boolean mask.

Timings are medians over ``--repeats`` runs after one warm-up, the two variants interleaved so that load from other
processes hits both alike. ``speedup`` = baseline time / packed time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainer.config import CropConfig
from trainer.models import TokenLayout, build_backbone, model_flops_per_image


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (allocator, thread pool)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _compare(baseline: str, candidate: str, seconds: dict[str, float], flops: float | None = None) -> dict:
    result = {f"{baseline}_s": round(seconds[baseline], 4), f"{candidate}_s": round(seconds[candidate], 4),
              "speedup": round(seconds[baseline] / seconds[candidate], 3)}
    if flops is not None:
        result[f"{candidate}_gflops_per_s"] = round(flops / seconds[candidate] / 1e9, 2)
    return result


def bench_model(model, xs: list[torch.Tensor], crops: CropConfig, batch: int, repeats: int) -> dict:
    flops = model_flops_per_image(model.config, crops) * batch

    def packed() -> list[dict]:
        return model.forward_features_list(xs)

    def separate() -> list[dict]:
        return [model.forward_features(x) for x in xs]

    def train(forward: Callable[[], list[dict]]) -> Callable[[], None]:
        def step() -> None:
            sum(out["x_norm_patchtokens"].mean() + out["x_norm_clstoken"].mean() for out in forward()).backward()

        return step

    with torch.no_grad():
        diff = max((a["x_prenorm"] - b["x_prenorm"]).abs().max().item() for a, b in zip(packed(), separate()))
        forward = _median_seconds({"separate": separate, "packed": packed}, repeats)
    step = _median_seconds({"separate": train(separate), "packed": train(packed)}, repeats)
    return {
        "max_abs_diff": diff,
        "forward": _compare("separate", "packed", forward, flops / 3),
        "train_step": _compare("separate", "packed", step, flops),
    }


def bench_attention(model, xs: list[torch.Tensor], repeats: int) -> dict:
    """The attention core (after qkv, before proj) of the first block, on the real packed input tokens."""
    attn = model.blocks[0].attn
    with torch.no_grad():
        groups = [model.prepare_tokens(x) for x in xs]
        layout = TokenLayout(tuple(g.shape[0] for g in groups), tuple(g.shape[1] for g in groups))
        qkv = attn.qkv(model.blocks[0].norm1(torch.cat([g.flatten(0, 1) for g in groups])))  # [T, 3D]
        crop_ids = torch.repeat_interleave(torch.arange(sum(layout.batch_sizes)), torch.tensor(layout.crop_seq_lens()))
        block_mask = crop_ids[:, None] == crop_ids[None, :]  # [T, T]

        def dense() -> torch.Tensor:
            q, k, v = qkv.view(1, layout.num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask)  # [1, H, T, hd]
            return out.transpose(1, 2).reshape(layout.num_tokens, -1)

        def grouped() -> torch.Tensor:
            return attn.grouped_sdpa(qkv, layout)

        diff = (dense() - grouped()).abs().max().item()
        seconds = _median_seconds({"dense_mask": dense, "grouped": grouped}, repeats)
    return {"num_tokens": layout.num_tokens, "max_abs_diff": diff, **_compare("dense_mask", "grouped", seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images (each 2 global + 8 local crops)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    crops = CropConfig(global_size=224, local_size=98, num_local=8)
    model = build_backbone("vit_small", patch_size=14, img_size=224, drop_path_rate=0.0, attention_backend="sdpa")
    xs = [torch.randn(2 * args.batch, 3, 224, 224), torch.randn(crops.num_local * args.batch, 3, 98, 98)]
    result = {
        "benchmark": "packed multi-crop forward vs separate forwards (vit_small/14, 2x224 + 8x98 crops per image)",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch_images": args.batch,
        "repeats": args.repeats,
        "model": bench_model(model, xs, crops, args.batch, args.repeats),
        "attention": bench_attention(model, xs, args.repeats),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
