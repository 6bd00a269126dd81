"""The embed step with a tiny randomly initialised DINOv2 backbone (trainer.models) on generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curation.config import spec_from_dict
from curation.pipeline import Context, run_pipeline
from curation.step_embed import load_pool
from curation_data import augment, encode, make_image, write_images

torch = pytest.importorskip("torch")
pytest.importorskip("trainer.models")

# layerscale 1.0: with the 1e-5 training init, a random network's CLS output barely depends on the image.
TINY_VIT = {"arch": "vit_pico", "patch_size": 8, "img_size": 32, "drop_path_rate": 0.0, "layerscale_init": 1.0}


def _spec(folder: Path, output: Path, *, num_shards: int, threshold: float = 0.975):
    return spec_from_dict(
        {
            "name": "vit",
            "output": str(output),
            "sources": [{"name": "pool", "kind": "folder", "path": str(folder)}],
            "embed": {
                "model": TINY_VIT,
                "image_size": 32,
                "batch_size": 8,
                "num_shards": num_shards,
                "dtype": "float32",
            },
            "dedup": {"k": 8, "threshold": threshold},
        }
    )


def test_random_backbone_embeddings_find_planted_copies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    originals = [make_image(rng) for _ in range(40)]
    images = {f"a/{i:03d}.png": encode(im) for i, im in enumerate(originals)}
    images |= {f"b/{i:03d}.jpg": encode(augment(rng, originals[i]), "JPEG") for i in range(10)}
    write_images(tmp_path / "pool", images)

    torch.manual_seed(0)
    spec = _spec(tmp_path / "pool", tmp_path / "one", num_shards=1)
    results = run_pipeline(spec, steps=["embed", "dedup"])
    pool = load_pool(Context(spec=spec))
    assert pool.embeddings.shape == (50, 96)
    np.testing.assert_allclose(np.linalg.norm(pool.embeddings, axis=1), 1.0, rtol=1e-5)

    sims = pool.embeddings @ pool.embeddings.T
    copies = sims[np.arange(40, 50), np.arange(10)]
    distinct = sims[:40, :40][np.triu_indices(40, 1)]
    print(f"copies: min {copies.min():.3f}; distinct: 99th percentile {np.percentile(distinct, 99):.3f}")
    assert copies.mean() > np.percentile(distinct, 99)
    np.fill_diagonal(sims, -1.0)
    assert sims[40:].argmax(axis=1).tolist() == list(range(10))  # every copy's nearest image is its original

    removed = set(np.flatnonzero(~np.isin(np.arange(50), np.load(tmp_path / "one" / "dedup" / "selected.npy"))))
    planted = set(range(40, 50))
    precision = len(removed & planted) / max(len(removed), 1)
    recall = len(removed & planted) / len(planted)
    print(f"random ViT-pico dedup at 0.975: precision {precision:.2f} recall {recall:.2f}")
    # Random features also put a few distinct generated images above the threshold: precision stays modest.
    assert recall == 1.0 and precision >= 0.5
    assert results[1].summary["input"] == 50

    # Sharding changes who computes a row, not its embedding.
    torch.manual_seed(0)
    sharded_spec = _spec(tmp_path / "pool", tmp_path / "two", num_shards=3)
    run_pipeline(sharded_spec, steps=["embed"])
    sharded = load_pool(Context(spec=sharded_spec))
    assert sharded.ids == pool.ids
    np.testing.assert_allclose(sharded.embeddings, pool.embeddings, atol=1e-5)
