"""``prepare``: folder / list / Fashion-MNIST sources -> MDS shards that read back byte-identical; errors."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.helpers import encode, jpeg_bytes
from trainer.data.prepare import FASHION_MNIST_DIR, prepare_dataset, prepare_fashion_mnist

HAS_FASHION_MNIST = Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file()


def _read_mds(root: str | Path) -> list[dict]:
    from streaming.base.format import reader_from_json

    index = json.loads(Path(root, "index.json").read_text())
    rows = []
    for shard_info in index["shards"]:
        shard = reader_from_json(str(root), None, shard_info)
        rows.extend(shard[i] for i in range(shard.samples))
    return rows


def _image_folder(root: Path) -> dict[str, bytes]:
    files = {
        "cats/a.jpg": jpeg_bytes(0),
        "cats/deeper/b.png": encode(Image.new("RGB", (9, 7), (1, 2, 3)), "PNG"),
        "dogs/c.jpeg": jpeg_bytes(1),
        "loose.jpg": jpeg_bytes(2),
        "dogs/notes.txt": b"not an image",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {k: v for k, v in files.items() if not k.endswith(".txt")}


def test_folder_roundtrip_is_byte_identical_with_class_labels(tmp_path: Path) -> None:
    files = _image_folder(tmp_path / "images")
    result = prepare_dataset(str(tmp_path / "images"), str(tmp_path / "out"), format="folder")
    assert result.num_samples == 4 and result.classes == ["cats", "dogs"]
    rows = _read_mds(tmp_path / "out")
    assert [r["id"] for r in rows] == ["loose.jpg", "cats/a.jpg", "cats/deeper/b.png", "dogs/c.jpeg"]
    assert [r["label"] for r in rows] == [-1, 0, 0, 1]
    assert all(r["image"] == files[r["id"]] for r in rows)
    assert {r["source"] for r in rows} == {"images"}


def test_same_input_same_shards(tmp_path: Path) -> None:
    _image_folder(tmp_path / "images")
    for out in ("one", "two"):
        prepare_dataset(str(tmp_path / "images"), str(tmp_path / out), format="folder", shard_size=2000)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) > 2  # several shards plus the index
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_list_source_with_labels_and_comments(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.jpg").write_bytes(jpeg_bytes(5))
    absolute = tmp_path / "y.jpg"
    absolute.write_bytes(jpeg_bytes(6))
    listing = tmp_path / "files.txt"
    listing.write_text(f"# training images\npics/x.jpg\t4\n\n{absolute}  # no label\n")
    prepare_dataset(str(listing), str(tmp_path / "out"), format="list")
    rows = _read_mds(tmp_path / "out")
    assert [(r["id"], r["label"]) for r in rows] == [("pics/x.jpg", 4), (str(absolute), -1)]
    assert rows[0]["image"] == jpeg_bytes(5) and rows[1]["image"] == jpeg_bytes(6)


def test_bad_list_label_names_the_line(tmp_path: Path) -> None:
    listing = tmp_path / "files.txt"
    listing.write_text("a.jpg\tcat\n")
    with pytest.raises(ValueError, match=r"files.txt:1: label 'cat' is not an integer"):
        prepare_dataset(str(listing), str(tmp_path / "out"), format="list")


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="needs the dataset-fashion-mnist Debian package")
def test_fashion_mnist_limit_subset(tmp_path: Path) -> None:
    result = prepare_fashion_mnist(str(tmp_path / "fm"), split="test", limit=40)
    assert result.num_samples == 40 and result.classes[0] == "t-shirt/top"
    rows = _read_mds(tmp_path / "fm")
    assert [r["id"] for r in rows] == [f"fashion-mnist/test/{i:05d}" for i in range(40)]
    with gzip.open(Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as handle:
        pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    for index in (0, 17, 39):
        image = Image.open(io.BytesIO(rows[index]["image"]))
        assert image.format == "PNG" and np.array_equal(np.asarray(image), pixels[index])
        assert rows[index]["label"] == labels[index]


def test_fashion_mnist_from_a_directory_without_idx_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no t10k-images-idx3-ubyte.gz in"):
        prepare_fashion_mnist(str(tmp_path / "fm"), split="test", source=str(tmp_path))


def test_verify_skips_undecodable_images(tmp_path: Path) -> None:
    files = _image_folder(tmp_path / "images")
    (tmp_path / "images" / "cats" / "broken.jpg").write_bytes(files["cats/a.jpg"][:100])
    result = prepare_dataset(str(tmp_path / "images"), str(tmp_path / "out"), verify=True)
    assert result.num_samples == 4 and result.skipped_ids == ["cats/broken.jpg"]
    unverified = prepare_dataset(str(tmp_path / "images"), str(tmp_path / "raw"))
    assert unverified.num_samples == 5  # copied as is: the training loader replaces it


def test_upload_to_a_remote_copies_the_shards(tmp_path: Path) -> None:
    """``(local, remote)`` output: streaming's uploader copies every shard and the index, then drops the staging."""
    _image_folder(tmp_path / "images")
    prepare_dataset(str(tmp_path / "images"), (str(tmp_path / "staging"), str(tmp_path / "bucket")), shard_size=2000)
    uploaded = sorted(p.name for p in (tmp_path / "bucket").iterdir())
    assert "index.json" in uploaded and len(uploaded) > 2
    assert not (tmp_path / "staging").exists()
    rows = _read_mds(tmp_path / "bucket")
    assert len(rows) == 4 and rows[1]["image"] == jpeg_bytes(0)


def test_progress_callback_and_file_uri(tmp_path: Path) -> None:
    _image_folder(tmp_path / "images")
    seen: list[tuple[int, int]] = []
    prepare_dataset(str(tmp_path / "images"), f"file://{tmp_path / 'out'}", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert (tmp_path / "out" / "index.json").is_file()


def test_user_mistakes(tmp_path: Path) -> None:
    _image_folder(tmp_path / "images")
    source = str(tmp_path / "images")
    with pytest.raises(ValueError, match="--limit: invalid value 0; allowed: a positive number"):
        prepare_dataset(source, str(tmp_path / "a"), limit=0)
    with pytest.raises(ValueError, match="--format: invalid value 'zip'; allowed: folder, list, fashion-mnist"):
        prepare_dataset(source, str(tmp_path / "b"), format="zip")
    with pytest.raises(FileNotFoundError, match="is not a directory; allowed: an image folder"):
        prepare_dataset(str(tmp_path / "missing"), str(tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        prepare_dataset(str(tmp_path / "empty"), str(tmp_path / "d"))
    prepare_dataset(source, str(tmp_path / "e"))
    with pytest.raises(FileExistsError):
        prepare_dataset(source, str(tmp_path / "e"))
    assert prepare_dataset(source, str(tmp_path / "e"), overwrite=True, limit=2).num_samples == 2
    assert len(_read_mds(tmp_path / "e")) == 2
