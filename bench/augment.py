"""Multi-crop input pipeline throughput per CPU core: fast path vs the straightforward PIL/torchvision reference.

Both pipelines run the same recipe (2 x 224 global + 8 x 98 local crops, colour jitter, grayscale, blur, solarize,
normalisation) through the same collate (crop-major stacking + iBOT masks for patch 14) on the same JPEG bytes, in
this process, with one intra-op thread. Also measured: the worker-side cost when the colour ops are deferred to the
GPU (``gpu_augment``: decode + crops only).

    python bench/augment.py [--images 300] [--batch-size 32] [--image-size 256]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import torch

from trainer.config import CropConfig, MaskConfig
from trainer.data.augment import MultiCropAugmentation
from trainer.data.collate import MultiCropCollate
from trainer.data.synthetic import synthetic_image
from trainer.data.workers import keep_freed_memory

PATCH_SIZE = 14


def make_jpegs(num_images: int, size: int) -> list[bytes]:
    """Natural-ish colour JPEGs (smooth colour fields, blobs, noise), quality 90 like typical web images."""
    out = []
    for index in range(num_images):
        buffer = io.BytesIO()
        synthetic_image(index, size, seed=1234).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def measure(collate: MultiCropCollate, images: list[bytes], batch_size: int, repeats: int) -> float:
    """Images per CPU-second of collating every image once, best of ``repeats`` passes.

    CPU time of this process (one thread), not wall time: on a shared machine other processes steal the core.
    """
    samples = [{"id": str(i), "image": data, "label": -1, "_position": i, "_epoch": 0} for i, data in enumerate(images)]
    collate(samples[:batch_size])  # warm-up: lazy imports, allocator
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        for offset in range(0, len(samples), batch_size):
            collate(samples[offset : offset + batch_size])
        best = max(best, len(samples) / (time.process_time() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers: one DataLoader worker is one core
    keep_freed_memory()  # as the training DataLoader workers do (trainer/data/workers.py); applies to both paths

    crops = CropConfig(global_size=224, local_size=98, num_local=8)
    masking = MaskConfig()
    images = make_jpegs(args.images, args.image_size)

    def collate(**options: bool) -> MultiCropCollate:
        augmentation = MultiCropAugmentation(crops, **options)
        return MultiCropCollate(crops, masking, patch_size=PATCH_SIZE, seed=0, augmentation=augmentation)

    reference = measure(collate(fast_path=False), images, args.batch_size, args.repeats)
    fast = measure(collate(fast_path=True, defer_colour=False), images, args.batch_size, args.repeats)
    deferred = measure(collate(fast_path=True, defer_colour=True), images, args.batch_size, args.repeats)
    result = {
        "benchmark": "multicrop_augment_per_core",
        "crops": "2x224 + 8x98, patch 14 masks",
        "num_images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "reference_images_per_s": round(reference, 1),
        "fast_images_per_s": round(fast, 1),
        "speedup": round(fast / reference, 2),
        "gpu_augment_worker_images_per_s": round(deferred, 1),
        "gpu_augment_worker_speedup": round(deferred / reference, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
