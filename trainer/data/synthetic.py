"""``data.dataset: synthetic``: deterministic random images through the real augmentation, collate and resume logic.

Sample ``p`` of the endless stream is the image seeded by ``(seed, p)``; global batch ``t`` holds positions
``[t * G, (t + 1) * G)`` for a global batch size ``G``, and each rank takes its contiguous share of them
(:func:`trainer.config.batch_share`, the same split as the MDS path). The global order is therefore the same at every
world size, and the loader state is just the number of samples consumed.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["SyntheticDataset", "synthetic_image", "synthetic_image_size"]


def synthetic_image_size(global_size: int) -> int:
    """Side of a synthetic image: a little larger than the global crop, as a 256 px image is for 224 crops."""
    return max(16, global_size * 8 // 7)


def synthetic_image(index: int, size: int, *, seed: int = 0) -> Image.Image:
    """A deterministic natural-ish RGB image: a smooth random colour field with a few blobs and pixel noise."""
    rng = np.random.default_rng([seed, index])
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(3):
        cy, cx, radius = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 10, size / 3)]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        field[inside] = rng.integers(0, 256, 3)
    field += rng.integers(-12, 13, size=field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


class SyntheticDataset(IterableDataset):
    """Endless synthetic samples for one rank, split over DataLoader workers batch by batch.

    Args:
        image_size: side of the generated images.
        global_batch_size: images per step over all ranks.
        share: this rank's offsets within each global batch (:func:`trainer.config.batch_share`); its length is the
            DataLoader's batch size, so worker ``w`` of ``n`` produces the rank's batches w, w+n, ...
        seed: image seed.
    """

    def __init__(self, *, image_size: int, global_batch_size: int, share: range, seed: int) -> None:
        super().__init__()
        self.image_size, self.global_batch_size, self.share, self.seed = image_size, global_batch_size, share, seed
        self.batch_size = len(share)
        self.start_sample = 0
        """Global samples consumed before this pass (set by the loader before each ``iter``)."""

    def position(self, rank_batch: int, offset: int) -> int:
        """Global position of sample ``offset`` of this rank's ``rank_batch``-th batch of the pass."""
        return self.start_sample + rank_batch * self.global_batch_size + self.share.start + offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for rank_batch in range(worker, 2**62, num_workers):
            for offset in range(self.batch_size):
                position = self.position(rank_batch, offset)
                yield {
                    "id": f"synthetic-{position:012d}",
                    "image": synthetic_image(position, self.image_size, seed=self.seed),
                    "label": -1,
                    "_position": position,
                    "_batch_offset": self.share.start + offset,
                    "_epoch": 0,
                }

