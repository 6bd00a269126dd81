"""Argument types shared by the benchmark scripts."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """``type=`` for counts and sizes: an int >= 1, else argparse's usage error (exit 2) naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; allowed: >= 1")
    return value
