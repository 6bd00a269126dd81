"""``dino-ctl curate SPEC.yaml``: dataset curation (embed, dedup, retrieve, balance, write MDS).

The command lives in :mod:`curation.cli` (torch-free at import) so ``python -m curation`` runs the same code in the
Kubernetes Jobs that :func:`curation.kube.render_curation_jobs` renders.
"""

from __future__ import annotations

import typer
from curation.cli import register as register_curate


def register(app: typer.Typer) -> None:
    """Add ``curate`` to the ``dino-ctl`` application."""
    register_curate(app)
