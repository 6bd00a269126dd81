"""The registry of steps: what each step's hash covers and which function runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curation.context import Context
from curation.step_embed import embed_inputs, run_embed
from curation.step_select import run_balance, run_dedup, run_retrieve, selection_inputs
from curation.step_write import run_write, write_inputs

__all__ = ["STEP_INPUTS", "STEP_RUNNERS"]

STEP_INPUTS: dict[str, Callable[[Context], Any]] = {
    "embed": embed_inputs,
    "dedup": selection_inputs("dedup", "embed"),
    "retrieve": selection_inputs("retrieve", "dedup"),
    "balance": selection_inputs("balance", "retrieve"),
    "write": write_inputs,
}
"""Everything a step's output depends on besides the seed (hashed into its done marker)."""

STEP_RUNNERS: dict[str, Callable[[Context, str], tuple[str, dict[str, Any]]]] = {
    "embed": run_embed,
    "dedup": run_dedup,
    "retrieve": run_retrieve,
    "balance": run_balance,
    "write": run_write,
}
"""``runner(context, config_hash) -> (status, summary)`` with status ``done`` or ``partial``."""
