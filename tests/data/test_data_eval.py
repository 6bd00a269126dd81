"""Evaluation datasets: resize + centre crop + normalise over labelled MDS shards and image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.data.helpers import encode, jpeg_bytes, write_mds
from trainer.data.colour import IMAGENET_MEAN, IMAGENET_STD
from trainer.data.eval_data import build_eval_dataset, eval_transform


def test_eval_transform_resizes_short_side_and_centre_crops() -> None:
    # Left half red, right half blue, 80 x 40: the centre crop of the 73 px-high resize shows both halves.
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))
    out = eval_transform(encode(image, "PNG"), image_size=64)
    assert out.shape == (3, 64, 64)
    pixels = out * torch.tensor(IMAGENET_STD).reshape(3, 1, 1) + torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    assert pixels[0, 32, 2] == pytest.approx(1.0, abs=0.01) and pixels[2, 32, 61] == pytest.approx(1.0, abs=0.01)


def test_mds_eval_dataset_in_order_with_labels(tmp_path: Path) -> None:
    ids = [f"e{i}" for i in range(6)]
    root = write_mds(tmp_path / "eval", ids, labels=[5, 4, 3, 2, 1, 0], images={"e2": b"broken"})
    dataset = build_eval_dataset(str(root), image_size=16)
    assert len(dataset) == 6
    images, labels, sample_ids = next(iter(DataLoader(dataset, batch_size=6)))
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [5, 4, 3, 2, 1, 0] and list(sample_ids) == ids
    assert torch.count_nonzero(images[2]) == 0  # the undecodable sample is blank, the others are images
    assert torch.count_nonzero(images[1]) > 0


def test_folder_eval_dataset_with_split(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("test", 2)):
        for i in range(count):
            path = tmp_path / split / f"class{i % 2}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(i))
    dataset = build_eval_dataset(str(tmp_path), image_size=8, split="test")
    assert [dataset[i][1:] for i in range(len(dataset))] == [(0, "class0/0.jpg"), (1, "class1/1.jpg")]


def test_eval_dataset_user_mistakes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory; allowed: MDS shards or an image folder"):
        build_eval_dataset(str(tmp_path / "missing"), image_size=8)
    with pytest.raises(ValueError, match="image_size: invalid value 0"):
        build_eval_dataset(str(tmp_path), image_size=0)
    with pytest.raises(ValueError, match="format: 'folder' cannot read 's3://bucket/x'"):
        build_eval_dataset("s3://bucket/x", image_size=8, format="folder")
