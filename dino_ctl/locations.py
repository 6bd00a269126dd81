"""Where the pods (and ``dino-ctl run``) find the spec's storage URIs: pvc:// and file:// become paths.

Below :mod:`dino_ctl.stages` and :mod:`dino_ctl.curation_stage`, which both map URIs through it.
"""

from __future__ import annotations

__all__ = ["PVC_MOUNT_ROOT", "pvc_claim", "pvc_mount_path", "trainer_path"]

PVC_MOUNT_ROOT = "/mnt/dino-ctl"


def pvc_mount_path(claim: str) -> str:
    """Where the renderers mount PersistentVolumeClaim ``claim`` in the trainer container."""
    return f"{PVC_MOUNT_ROOT}/{claim}"


def pvc_claim(uri: str) -> str | None:
    """The claim of a ``pvc://claim/path`` URI (None for any other location)."""
    return uri[len("pvc://") :].split("/", 1)[0] if uri.startswith("pvc://") else None


def trainer_path(uri: str) -> str:
    """The location the trainer process uses for ``uri``: pvc:// and file:// become paths, object stores stay URIs."""
    if uri.startswith("pvc://"):
        claim, _, rest = uri[len("pvc://") :].partition("/")
        return "/".join(part for part in (pvc_mount_path(claim), rest.strip("/")) if part)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri
