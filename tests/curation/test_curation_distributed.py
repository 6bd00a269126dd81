"""Curation on 1, 2 and 3 real gloo ranks: the same decisions, centroids within 1e-4, resumption after SIGKILL.

Every multi-rank run is real: ``tests.dist_utils.run_distributed`` spawns gloo processes for the algorithm and
pipeline checks, and ``torchrun`` runs ``python -m curation.launch`` for the command-line and crash tests (real
faiss, real MDS output, no mocks). Pools are tiny (a few hundred points, 16-192 dimensions) so the file stays short
on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from curation.config import IndexConfig, spec_from_dict
from curation.distributed import gather_arrays, get_rank, get_world_size, owned_range
from curation.dkmeans import balanced_selection, distributed_hierarchical_kmeans, distributed_kmeans
from curation.dknn import build_shard_index, sharded_search
from curation.index import build_index, knn_search
from curation.launch import main as launch_main
from curation.metrics import CurationMetrics
from curation.pipeline import run_pipeline
from curation.sources import MDSSource
from curation_data import augment, encode, make_image, skewed_concepts, write_images
from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
CENTROID_TOLERANCE = 1e-4
"""Max abs difference of k-means centroids between rank counts (float64 sums in a different order, faiss float32
dot products through its BLAS or non-BLAS path: measured ~1e-7)."""
CONCEPT_SIZES = [240, 120, 60, 30, 15]  # a 16x skew
IVF = IndexConfig(kind="ivf_flat", nlist=8, nprobe=3)


def _make_images(root: Path) -> None:
    """pool/: 40 originals + JPEG copies of the first 8; eval/: a twin of original 30; two query sets."""
    rng = np.random.default_rng(0)
    originals = [make_image(rng, 32) for _ in range(40)]
    pool = {f"a/{i:03d}.png": encode(im) for i, im in enumerate(originals)}
    pool |= {f"b/{i:03d}.jpg": encode(augment(rng, originals[i]), "JPEG") for i in range(8)}
    write_images(root / "pool", pool)
    write_images(root / "eval", {"twin.jpg": encode(augment(rng, originals[30]), "JPEG")})
    write_images(root / "near", {f"q{i}.jpg": encode(augment(rng, originals[i]), "JPEG") for i in range(10, 14)})
    write_images(root / "topic", {f"t{i}.jpg": encode(augment(rng, originals[i]), "JPEG") for i in range(20, 26)})


def _spec_dict(images: Path, output: Path) -> dict[str, Any]:
    return {
        "name": "dist",
        "output": str(output),
        "seed": 5,
        "sources": [
            {"name": "pool", "kind": "folder", "path": str(images / "pool")},
            {"name": "bench", "kind": "folder", "path": str(images / "eval"), "role": "eval"},
            {"name": "near", "kind": "folder", "path": str(images / "near"), "role": "query"},
            {"name": "topic", "kind": "folder", "path": str(images / "topic"), "role": "query",
             "retrieval": "cluster"},
        ],
        # thumbnail descriptors: copies above 0.96, distinct generated images below 0.8 (test_curation_pipeline)
        "embed": {"model": "thumbnail", "thumbnail_size": 8, "num_shards": 4, "batch_size": 8},
        "dedup": {"k": 8, "threshold": 0.9, "eval_threshold": 0.9},
        "retrieve": {"k": 3, "cluster": {"num_clusters": 4, "min_queries": 1, "images_per_cluster": 6,
                                         "iterations": 8}},
        "balance": {"enabled": True, "levels": [8, 3], "resampling_rounds": 2, "iterations": 8, "target_size": 12},
        "write": {"num_shards": 3, "size_limit": 4096},
    }


def _outputs(output: Path) -> dict[str, Any]:
    arrays = {f"{step}/{name}": np.load(output / step / f"{name}.npy")
              for step, names in {"dedup": ("selected", "component"),
                                  "retrieve": ("selected", "query_set", "query_row", "cluster"),
                                  "balance": ("selected", "clusters")}.items() for name in names}
    dataset = MDSSource("out", output / "dataset")
    samples = [dataset.sample(i) for i in range(len(dataset))]
    arrays["dataset"] = sorted((s["id"], json.dumps(s["provenance"], sort_keys=True)) for s in samples)
    return arrays


def _concepts() -> tuple[np.ndarray, np.ndarray]:
    return skewed_concepts(np.random.default_rng(7), CONCEPT_SIZES, 32, spread=0.1)


def _all_checks(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """k-means, hierarchical k-means + balanced sampling on synthetic concepts, then the whole pipeline."""
    assert (get_rank(), get_world_size()) == (rank, world_size)
    x, concept = _concepts()
    mine = owned_range(len(x))
    local = x[mine.start : mine.stop]
    centroids = distributed_kmeans(local, 10, iterations=10, seed=0, gpu="off")
    inertia: list[float] = []
    hierarchy = distributed_hierarchical_kmeans(
        local, levels=(30, 10, 5), resampling_rounds=2, resample_fraction=0.5, iterations=10, seed=0, gpu="off",
        on_iteration=lambda stage, it, value: inertia.append(value),
    )
    positions = np.arange(mine.start, mine.stop)
    mask = balanced_selection(hierarchy, positions, 60, sampling="random", seed=0)
    chosen = gather_arrays(positions[mask])
    closest = gather_arrays(positions[balanced_selection(hierarchy, positions, 60, sampling="closest", seed=0)])
    # IVF shards: one quantizer trained on rank 0, each query coarse-quantized once by its owner (batches of 100).
    shard = build_shard_index(local, config=IVF, field="test", seed=0)
    _, ivf_ids = sharded_search(shard, local, 5, batch_size=100)
    ivf_gathered = gather_arrays(ivf_ids)
    spec = spec_from_dict(_spec_dict(Path(tmp) / "images", Path(tmp) / f"out-{world_size}"))
    metrics = CurationMetrics(enabled=True, rank=rank)
    results = run_pipeline(spec, metrics=metrics)
    out: dict[str, Any] = {
        "centroids": centroids,
        "fitted": hierarchy.fitted,
        "sizes": hierarchy.sizes,
        "statuses": [(r.name, r.status) for r in results],
        "embedded": metrics.value("dino_curation_images_embedded_total", source="pool"),
        "inertia": inertia,
    }
    if rank == 0:
        assert chosen is not None and closest is not None
        out["chosen"] = np.concatenate(chosen)
        out["closest"] = np.concatenate(closest)
        out["concept_counts"] = np.bincount(concept[out["chosen"]], minlength=len(CONCEPT_SIZES))
        out["pipeline"] = _outputs(Path(spec.output))
        out["ivf_ids"] = np.concatenate(ivf_gathered)
        out["duplicates"] = metrics.value("dino_curation_duplicates_found_total", kind="copy")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """The same checks on 1 rank (no process group), 2 and 3 gloo ranks."""
    tmp = tmp_path_factory.mktemp("dist")
    _make_images(tmp / "images")
    out = {1: [_all_checks(0, 1, str(tmp))]}
    for world_size in (2, 3):
        out[world_size] = run_distributed(_all_checks, world_size=world_size, args=(str(tmp),), timeout_s=300)
    return out


def test_kmeans_centroids_agree_across_rank_counts(runs: dict[int, list[dict[str, Any]]]) -> None:
    reference = runs[1][0]
    for world_size in (2, 3):
        for rank_result in runs[world_size]:  # replicated: every rank holds the same centroids
            diff = np.abs(rank_result["centroids"] - reference["centroids"]).max()
            print(f"k-means centroids, {world_size} ranks vs 1: max abs diff {diff:.2e}")
            assert diff < CENTROID_TOLERANCE
            for level, fitted in enumerate(rank_result["fitted"]):
                assert np.abs(fitted - reference["fitted"][level]).max() < CENTROID_TOLERANCE
            for level, sizes in enumerate(rank_result["sizes"]):
                np.testing.assert_array_equal(sizes, reference["sizes"][level])
            np.testing.assert_allclose(rank_result["inertia"], reference["inertia"], rtol=1e-5)
    assert reference["inertia"][1] < reference["inertia"][0]  # Lloyd iterations lower the inertia


def test_sharded_ivf_search_equals_one_global_ivf_index(runs: dict[int, list[dict[str, Any]]]) -> None:
    x, _ = _concepts()
    _, expected = knn_search(build_index(x, config=IVF, seed=0), x, 5)  # plain faiss, one process
    for world_size in (1, 2, 3):
        np.testing.assert_array_equal(runs[world_size][0]["ivf_ids"], expected, err_msg=f"{world_size} ranks")


def test_balanced_samples_have_the_same_concept_statistics(runs: dict[int, list[dict[str, Any]]]) -> None:
    reference = runs[1][0]
    counts = reference["concept_counts"]
    print(f"balanced sample per concept (pool {CONCEPT_SIZES}): {counts.tolist()}")
    assert counts.sum() == 60 and counts.max() / counts.min() <= 2  # the pool's skew is 16
    for world_size in (2, 3):
        result = runs[world_size][0]
        np.testing.assert_array_equal(result["concept_counts"], counts)
        # Unique keys (hash of the global position, or similarity + position): the very same points.
        np.testing.assert_array_equal(result["chosen"], reference["chosen"])
        np.testing.assert_array_equal(result["closest"], reference["closest"])


def test_pipeline_decisions_are_identical_across_rank_counts(runs: dict[int, list[dict[str, Any]]]) -> None:
    reference = runs[1][0]["pipeline"]
    assert len(reference["dedup/selected"]) == 48 - 8 - 1  # the 8 planted copies and the evaluation twin
    assert runs[1][0]["duplicates"] == 8
    retrieved = reference["retrieve/query_row"]
    assert set(reference["retrieve/query_set"].tolist()) == {0, 1} and (retrieved >= 0).any()
    assert len(reference["balance/selected"]) == 12 and len(reference["dataset"]) == 12
    for world_size in (2, 3):
        assert [s for _, s in runs[world_size][0]["statuses"]] == ["done"] * 5
        assert sum(r["embedded"] for r in runs[world_size]) == 48  # each pool image once, over the ranks
        result = runs[world_size][0]["pipeline"]
        for name, value in reference.items():
            if name == "dataset":
                assert result[name] == value, name
            else:
                np.testing.assert_array_equal(result[name], value, err_msg=f"{name}, {world_size} ranks")


# --- python -m curation.launch under torchrun: CLI, crash and resume ------------------------------------------------


def _torchrun(spec: Path, num_ranks: int, *, env: dict[str, str] | None = None, steps: str | None = None,
              report: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_ranks}",
               "-m", "curation.launch", "--spec", str(spec)]
    command += ["--steps", steps] if steps else []
    command += ["--report", str(report)] if report else []
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("launch-images")
    _make_images(root)
    return root


def _write_spec(images: Path, output: Path, **changes: Any) -> Path:
    data = _spec_dict(images, output)
    data.update(changes)
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _mtimes(paths: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in paths}


def test_sigkilled_rank_resumes_without_redoing_finished_shards(images: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert launch_main(["--spec", str(_write_spec(images, reference))]) == 0
    output = tmp_path / "crashed"
    spec = _write_spec(images, output)
    embed_dir = output / "embed" / "pool"
    # Rank 1 embeds shards 1 and 3; it dies right after committing shard 1. torchrun then stops rank 0 too.
    kill = {"DINO_CURATION_KILL_AT": "embed:pool:part-00001-of-00004@1"}
    crashed = _torchrun(spec, 2, env=kill)
    assert crashed.returncode != 0, crashed.stderr[-2000:]
    done = sorted(embed_dir.glob("part-*.json"))
    assert "part-00001-of-00004.json" in {p.name for p in done} and "part-00003-of-00004.json" not in {
        p.name for p in done}
    before = _mtimes(done + [p.with_suffix(".npy") for p in done])
    # The same kill trigger stays set: were shard 1 embedded again, rank 1 would die again and the run would fail.
    resumed = _torchrun(spec, 2, env=kill, steps="embed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _mtimes(sorted(embed_dir.glob("part-*.json")) + sorted(embed_dir.glob("part-*.npy")))
    assert {name: after[name] for name in before} == before  # finished shards untouched
    assert "part-00003-of-00004.json" in after

    # Dedup: rank 1 dies right after committing its k-NN search; the restart reuses it (same trigger again).
    kill = {"DINO_CURATION_KILL_AT": "dedup:searched@1"}
    assert _torchrun(spec, 2, env=kill, steps="dedup").returncode != 0
    searched = sorted((output / ".work").glob("dedup-*/rank-1-of-2.npz"))
    assert len(searched) == 1
    # As if rank 0 had died before committing its search: it searches again, rank 1 only answers its queries.
    for other in (output / ".work").glob("dedup-*/rank-0-of-2.npz"):
        other.unlink()
    resumed = _torchrun(spec, 2, env=kill, steps="dedup")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Retrieve: rank 0 dies after committing the k-means of the pool; the restart does not fit it again.
    kill = {"DINO_CURATION_KILL_AT": "retrieve:kmeans@0"}
    assert _torchrun(spec, 2, env=kill, steps="retrieve").returncode != 0
    assert len(list((output / ".work").glob("retrieve-*/centroids.npy"))) == 1
    assert _torchrun(spec, 2, env=kill, steps="retrieve").returncode == 0

    # Balance: rank 0 dies after committing level 1 of the hierarchy; the restart refits nothing of level 1.
    kill = {"DINO_CURATION_KILL_AT": "balance:level-1@0"}
    assert _torchrun(spec, 2, env=kill, steps="balance").returncode != 0
    assert len(list((output / ".work").glob("balance-*/level-1.npy"))) == 1
    report = tmp_path / "report.json"
    resumed = _torchrun(spec, 2, env=kill, steps="balance,write", report=report)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s["name"] for s in json.loads(report.read_text())["steps"]] == ["balance", "write"]
    assert not list((output / ".work").glob("*/*"))  # committed steps clean their partial results up
    _assert_same_outputs(_outputs(output), _outputs(reference))


def _assert_same_outputs(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name, value in b.items():
        if name == "dataset":
            assert a[name] == value
        else:
            np.testing.assert_array_equal(a[name], value, err_msg=name)


def test_launch_exit_codes_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_main(["--spec", str(tmp_path / "missing.yaml")]) == 2
    assert "spec: invalid value" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "output": str(tmp_path), "sources": [
        {"name": "p", "kind": "folder", "path": str(tmp_path)}], "dedup": {"k": 0}}))
    assert launch_main(["--spec", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: dedup.k: invalid value 0; allowed: input should be greater than or equal to 1"]
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("k: 0", "k: 4"))
    assert launch_main(["--spec", str(good), "--steps", "embed,cluster"]) == 2
    assert "--steps: invalid value 'cluster'" in capsys.readouterr().err
    assert launch_main(["--spec", str(good), "--metrics-port", "many"]) == 2
    # A pool folder that does not exist is no spec error: the run fails (exit 1) and says why.
    missing = tmp_path / "missing-pool.yaml"
    missing.write_text(yaml.safe_dump({"name": "x", "output": str(tmp_path / "out"), "sources": [
        {"name": "p", "kind": "folder", "path": str(tmp_path / "nowhere")}]}))
    assert launch_main(["--spec", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_metrics_are_served_while_a_step_runs(images: Path, tmp_path: Path) -> None:
    metrics = CurationMetrics(enabled=True)
    port = metrics.start_server(0)
    scraped: list[str] = []

    def scrape(name: str) -> None:  # the failure hook is called at every checkpoint: scrape there
        if name == "dedup:searched":
            scraped.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())

    try:
        run_pipeline(spec_from_dict(_spec_dict(images, tmp_path / "out")), metrics=metrics, failure_hook=scrape)
    finally:
        metrics.stop_server()
    assert scraped and 'dino_curation_images_embedded_total{source="pool"} 48.0' in scraped[0]
    assert metrics.value("dino_curation_duplicates_found_total", kind="copy") == 8
    assert metrics.value("dino_curation_duplicates_found_total", kind="eval") == 1
    assert metrics.value("dino_curation_kmeans_iteration", fit="balance/level-1/fit") == 8
    assert metrics.value("dino_curation_kmeans_inertia", fit="retrieve") > 0
    assert metrics.value("dino_curation_step_completed", step="write") == 1
