"""curate -> pretrain -> distill through ``dino-ctl run``: one spec from a raw image pool to a distilled model.

The pool is generated (tests/curation/curation_data.py): 24 distinct pictures, JPEG-augmented copies of 8 of them and
an evaluation look-alike of one more. The curation stage (``python -m curation.launch`` in a child process, the
torch-free thumbnail descriptor) must drop the 8 copies and the look-alike and write the 23 originals as MDS; the
pretraining stage trains on exactly that dataset (``data: {from: curate}``) and the distillation stage, with
pretrain as its frozen teacher, too. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.curation.curation_data import augment, encode, make_image, write_images
from trainer import layout

pytestmark = pytest.mark.slow

NUM_ORIGINALS, NUM_COPIED, EVAL_TWIN = 24, 8, 20
TINY = ("optim.iterations: 4, optim.warmup_iterations: 1, optim.global_batch_size: 8, data.num_workers: 0, "
        "metrics.port: -1, metrics.log_interval: 1")
SPEC = f"""
apiVersion: dino-ctl.io/v1alpha1
kind: DinoExperiment
metadata: {{name: curated}}
spec:
  image: dino-ctl:test
  backend: local
  storage: {{checkpoints: "file://STORAGE"}}
  resources: {{nodes: {{min: 1, max: 1}}, gpusPerNode: 0}}
  monitoring: {{port: 9467}}
  stages:
    - name: curate
      curation:
        sources:
          - {{name: pool, kind: folder, path: POOL}}
          - {{name: bench, kind: folder, path: EVAL, role: eval}}
        embed: {{model: thumbnail, batch_size: 8}}
        dedup: {{k: 8, threshold: 0.9, eval_threshold: 0.9}}
        write: {{num_shards: 2, size_limit: 4096}}
    - name: pretrain
      recipe: tiny
      data: {{from: curate}}
      overrides: {{{TINY}}}
    - name: distill
      recipe: tiny
      teacher: {{from: pretrain}}
      data: {{from: curate}}
      overrides: {{stage.kind: distill, model.depth: 2, {TINY}}}
"""


def _pool(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    originals = [make_image(rng) for _ in range(NUM_ORIGINALS)]
    pool = {f"a-orig/{i:03d}.png": encode(image) for i, image in enumerate(originals)}
    pool |= {f"b-copy/{i:03d}.jpg": encode(augment(rng, originals[i]), "JPEG") for i in range(NUM_COPIED)}
    write_images(root / "pool", pool)
    write_images(root / "eval", {"twin.jpg": encode(augment(rng, originals[EVAL_TWIN]), "JPEG")})
    return root / "pool", root / "eval"


def test_curate_pretrain_distill_chain(tmp_path: Path) -> None:
    pool, evaluation = _pool(tmp_path / "images")
    runs = tmp_path / "runs"
    spec = tmp_path / "curated.yaml"
    text = textwrap.dedent(SPEC).replace("STORAGE", str(runs)).replace("POOL", str(pool))
    spec.write_text(text.replace("EVAL", str(evaluation)))

    result = CliRunner().invoke(app, ["run", str(spec), "--no-eval", "--output", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in summary["stages"]] == ["curate", "pretrain", "distill"]
    curate = summary["stages"][0]
    assert curate["kind"] == "curation" and curate["exit_code"] == 0
    assert [(s["name"], s["status"]) for s in curate["curation_steps"]] == [
        (step, "done") for step in ("embed", "dedup", "retrieve", "balance", "write")]
    dataset = runs / "curate" / "dataset"
    assert curate["dataset"] == str(dataset)

    # Copies and the evaluation look-alike are gone: the 23 originals are the dataset.
    manifest = json.loads((runs / "curate" / "manifest.json").read_text())
    assert manifest["samples"] == NUM_ORIGINALS - 1
    assert manifest["steps"]["dedup"]["summary"]["removed_copies"] == NUM_COPIED
    index = json.loads((dataset / "index.json").read_text())
    assert sum(shard["samples"] for shard in index["shards"]) == NUM_ORIGINALS - 1

    # Both training stages read that dataset in place, and ran every step.
    for stage in ("pretrain", "distill"):
        config = yaml.safe_load((runs / stage / layout.CONFIG_FILE).read_text())
        assert config["data"]["dataset"] == "mds"
        assert [(s["local"], s["remote"]) for s in config["data"]["streams"]] == [(str(dataset), None)]
    assert [s["steps"] for s in summary["stages"][1:]] == [4, 4]
    distill = yaml.safe_load((runs / "distill" / layout.CONFIG_FILE).read_text())
    assert distill["stage"]["teacher_from"] == str(runs / "pretrain")
    assert (runs / "distill" / "export" / "backbone.safetensors").exists()


def test_curation_stage_on_two_ranks(tmp_path: Path) -> None:
    """``--nproc 2``: the curation stage runs under a standalone torchrun, each rank owning a shard of the pool."""
    pool, evaluation = _pool(tmp_path / "images")
    runs = tmp_path / "runs"
    spec = tmp_path / "curated.yaml"
    text = textwrap.dedent(SPEC).replace("STORAGE", str(runs)).replace("POOL", str(pool))
    spec.write_text(text.replace("EVAL", str(evaluation)))
    result = CliRunner().invoke(app, ["run", str(spec), "--stage", "curate", "--nproc", "2", "--output", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in summary["stages"]] == ["curate"] and "checkpoint" not in summary
    steps = {s["name"]: s for s in summary["stages"][0]["curation_steps"]}
    assert steps["dedup"]["summary"] == {"input": 32, "components": 24, "removed_copies": 8, "removed_eval": 1,
                                         "kept": 23}
    assert steps["write"]["summary"] == {"samples": 23, "partitions": 2}
    assert json.loads((runs / "curate" / "manifest.json").read_text())["samples"] == NUM_ORIGINALS - 1
