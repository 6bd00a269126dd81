"""The control plane's error taxonomy.

- :class:`SpecError`: a user mistake in an experiment spec (exit code 2). A ``trainer.config.ConfigError`` (field
  path, bad value, what is allowed), so users read one style of message and callers catch one type.
- :class:`SpecErrors`: several :class:`SpecError` found in one pass (the CLI prints all of them).
- :class:`KubeError`: the Kubernetes API refused or failed a call; ``permanent`` separates mistakes that retrying
  cannot fix (403, 404, 422) from transient ones (timeouts, 409 conflicts, 5xx), as kopf does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.config import ConfigError

__all__ = ["DinoCtlError", "KubeError", "SpecError", "SpecErrors"]


class DinoCtlError(Exception):
    """Base class of every error the control plane raises on purpose."""


class SpecError(DinoCtlError, ConfigError):
    """One invalid field of an experiment spec: ``path``, the bad ``value`` and what is ``allowed`` (``context``:
    under which circumstance, e.g. ``with world size 16``)."""

    def __init__(self, path: str, value: Any, allowed: str, *, context: str = "") -> None:
        ConfigError.__init__(self, path, value, allowed, context=context)


class SpecErrors(DinoCtlError, ValueError):
    """Every :class:`SpecError` of one validation pass, in document order. ``errors[0]`` is the first."""

    def __init__(self, errors: Sequence[SpecError]) -> None:
        assert errors, "SpecErrors needs at least one error"
        self.errors: tuple[SpecError, ...] = tuple(errors)
        super().__init__("\n".join(str(error) for error in self.errors))


class KubeError(DinoCtlError):
    """A failed Kubernetes API call: the verb, the object, the HTTP status (0 when none) and the server's reason."""

    def __init__(self, verb: str, target: str, status: int, reason: str, *, permanent: bool | None = None) -> None:
        self.verb, self.target, self.status, self.reason = verb, target, status, reason
        # 403/404/422 are the caller's mistake (RBAC, missing CRD or object, invalid object); others may pass later.
        self.permanent = status in (400, 401, 403, 404, 405, 422) if permanent is None else permanent
        detail = f"HTTP {status}: {reason}" if status else reason
        super().__init__(f"{verb} {target} failed ({detail})")
