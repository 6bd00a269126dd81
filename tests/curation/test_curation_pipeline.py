"""The whole pipeline on generated images: copies and evaluation look-alikes removed, MDS output, crash resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from curation.config import CurationSpec, spec_from_dict
from curation.pipeline import run_pipeline
from curation.sources import MDSSource
from curation_data import augment, encode, make_image, write_images

NUM_ORIGINALS, NUM_COPIED, EVAL_TWIN = 24, 8, 20


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pool/: originals + JPEG-augmented copies of the first NUM_COPIED; eval/: a look-alike of original EVAL_TWIN."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    originals = [make_image(rng) for _ in range(NUM_ORIGINALS)]
    pool = {f"a-orig/{i:03d}.png": encode(im) for i, im in enumerate(originals)}
    pool |= {f"b-copy/{i:03d}.jpg": encode(augment(rng, originals[i]), "JPEG") for i in range(NUM_COPIED)}
    write_images(root / "pool", pool)
    write_images(root / "eval", {"twin.jpg": encode(augment(rng, originals[EVAL_TWIN]), "JPEG")})
    return root


def _spec(folders: Path, output: Path, **sections: Any) -> CurationSpec:
    data: dict[str, Any] = {
        "name": "test",
        "output": str(output),
        "seed": 3,
        "sources": [
            {"name": "pool", "kind": "folder", "path": str(folders / "pool")},
            {"name": "bench", "kind": "folder", "path": str(folders / "eval"), "role": "eval"},
        ],
        # The thumbnail descriptor puts copies above 0.96 and distinct generated images below 0.8 (measured).
        "embed": {"model": "thumbnail", "num_shards": 2, "batch_size": 8},
        "dedup": {"k": 8, "threshold": 0.9, "eval_threshold": 0.9},
        "write": {"num_shards": 2, "size_limit": 4096},
    }
    data.update(sections)
    return spec_from_dict(data)


def _read_dataset(output: Path) -> list[dict[str, Any]]:
    """Every sample of the written dataset, through mosaicml-streaming's shard readers."""
    dataset = MDSSource("out", output / "dataset")
    return [dataset.sample(i) for i in range(len(dataset))]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_copies_and_eval_lookalikes_are_removed_and_originals_written(image_folders: Path, tmp_path: Path) -> None:
    results = run_pipeline(_spec(image_folders, tmp_path))
    assert [(r.name, r.status) for r in results] == [
        (s, "done") for s in ("embed", "dedup", "retrieve", "balance", "write")
    ]
    samples = _read_dataset(tmp_path)
    written = {s["id"] for s in samples}
    planted = {f"pool/b-copy/{i:03d}.jpg" for i in range(NUM_COPIED)} | {f"pool/a-orig/{EVAL_TWIN:03d}.png"}
    everything = {f"pool/a-orig/{i:03d}.png" for i in range(NUM_ORIGINALS)} | planted
    removed = everything - written
    precision = len(removed & planted) / max(len(removed), 1)
    recall = len(removed & planted) / len(planted)
    print(f"image-level dedup: precision {precision:.3f} recall {recall:.3f}")
    assert precision == 1.0 and recall == 1.0
    # Original bytes, contract columns and provenance.
    by_id = {s["id"]: s for s in samples}
    original = (image_folders / "pool/a-orig/000.png").read_bytes()
    assert by_id["pool/a-orig/000.png"]["image"] == original
    provenance = by_id["pool/a-orig/000.png"]["provenance"]
    assert provenance["source"] == "pool" and provenance["step"] == "dedup" and provenance["query_id"] is None
    assert by_id["pool/a-orig/000.png"]["source"] == "pool"
    # Pre-shuffled: the written order is not the sorted listing.
    assert [s["id"] for s in samples] != sorted(written)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples"] == len(samples) == NUM_ORIGINALS - 1
    dedup = manifest["steps"]["dedup"]["summary"]
    assert dedup == {"input": 32, "components": 24, "removed_copies": 8, "removed_eval": 1, "kept": 23}


def test_rerun_after_a_crash_reuses_finished_work_and_is_byte_identical(image_folders: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    run_pipeline(_spec(image_folders, clean))

    crashed = tmp_path / "crashed"
    spec = _spec(image_folders, crashed)

    def crash_after_first_partition(point: str) -> None:
        if point == "write:part-00000":
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(spec, failure_hook=crash_after_first_partition)
    assert not (crashed / "manifest.json").exists()

    reached: list[str] = []
    results = run_pipeline(spec, failure_hook=reached.append)
    assert [r.status for r in results] == ["reused"] * 4 + ["done"]
    assert reached == ["write:part-00001"]  # only the missing partition was written
    assert _files(crashed / "dataset") == _files(clean / "dataset")
    assert (crashed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_crash_inside_a_selection_step_and_config_change(image_folders: Path, tmp_path: Path) -> None:
    spec = _spec(
        image_folders,
        tmp_path,
        balance={"enabled": True, "levels": [6, 2], "target_size": 10, "resampling_rounds": 1, "iterations": 5},
    )

    def crash(point: str) -> None:
        if point == "balance:commit":
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        run_pipeline(spec, failure_hook=crash)
    assert not (tmp_path / "balance").exists()  # the half-done step left nothing behind
    results = run_pipeline(spec)
    assert [r.status for r in results] == ["reused", "reused", "reused", "done", "done"]
    assert results[3].summary["selected"] == 10
    samples = _read_dataset(tmp_path)
    assert len(samples) == 10 and all(len(s["provenance"]["cluster"]) == 2 for s in samples)

    changed = _spec(image_folders, tmp_path, dedup={"k": 8, "threshold": 0.999, "eval_threshold": 0.9})
    results = run_pipeline(changed)
    assert [r.status for r in results] == ["reused", "done", "done", "done", "done"]
    assert results[1].summary["kept"] > 23  # a stricter copy threshold keeps more images


def test_sharded_embed_commits_when_the_last_shard_lands(image_folders: Path, tmp_path: Path) -> None:
    spec = _spec(image_folders, tmp_path)
    first = run_pipeline(spec, steps=["embed"], shard_index=1)
    assert [r.status for r in first] == ["partial"]
    assert not (tmp_path / "embed" / "DONE.json").exists()
    with pytest.raises(RuntimeError, match="needs step 'embed'"):
        run_pipeline(spec, steps=["dedup"])
    second = run_pipeline(spec, steps=["embed"], shard_index=0)
    assert [r.status for r in second] == ["done"]
    assert second[0].summary == {
        "pool.embedded": 32,
        "pool.undecodable": 0,
        "bench.embedded": 1,
        "bench.undecodable": 0,
    }
    results = run_pipeline(spec)
    assert [r.status for r in results] == ["reused", "done", "done", "done", "done"]


def test_curated_dataset_is_a_valid_mds_source(image_folders: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_pipeline(_spec(image_folders, first))
    second = spec_from_dict(
        {
            "name": "again",
            "output": str(tmp_path / "second"),
            "sources": [{"name": "curated", "kind": "mds", "path": str(first / "dataset")}],
            "embed": {"model": "thumbnail"},
            "dedup": {"k": 8, "threshold": 0.9},
        }
    )
    results = run_pipeline(second)
    assert results[1].summary["removed_copies"] == 0  # already deduplicated
    ids = {s["id"] for s in _read_dataset(tmp_path / "second")}
    assert ids == {f"curated/{s['id']}" for s in _read_dataset(first)}
