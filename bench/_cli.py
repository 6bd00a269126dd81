"""Argument types and timing shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable


def positive_int(text: str) -> int:
    """``type=`` for counts and sizes: an int >= 1, else argparse's usage error (exit 2) naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; allowed: >= 1")
    return value


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Run ``fn()`` once: (wall seconds, its result), synchronising a CUDA ``device`` before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def device_label(device: Any) -> str:
    """The GPU's name for a CUDA device, else ``cpu`` (the ``device`` field of a benchmark's JSON)."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
