"""Helpers for the server processes tests start on 127.0.0.1 (no torch import: the cluster tests load this).

The control plane (tests/cluster/stack.py), the operators and kwok (tests/cluster/training), the controller
(tests/cluster/controller_process.py) and the S3 server (tests/storage) all start a binary on a free loopback port,
wait until it answers, report the end of its log when it does not, and stop exactly the process they started.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

__all__ = ["HOST", "REPO", "free_port", "http_status", "log_tail", "running", "stack_script_output", "stop_process",
           "wait_ready"]

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


def stack_script_output(option: str) -> Path:
    """The folder ``scripts/k8s-stack.sh OPTION`` prints (``--print``: the binaries, ``--print-crds``: the CRDs)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "k8s-stack.sh"), option], check=True, capture_output=True,
                         text=True)
    return Path(out.stdout.strip())


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def http_status(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers (yet)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:  # noqa: S310 (loopback)
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):  # ssl.SSLError is an OSError
        return None


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file ("(no log)" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(popen: subprocess.Popen, ready: Callable[[], bool], *, name: str, what: str, timeout: float,
               log: Path, error: type[Exception], interval: float = 0.2) -> None:
    """Poll ``ready()`` until it is true; ``error`` with the log's end if the process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise error(f"{name} exited with {popen.returncode} before {what}; last lines of {log}:\n"
                        f"{log_tail(log)}")
        if ready():
            return
        time.sleep(interval)
    raise error(f"{name}: {what} not reached after {timeout:.0f} s; last lines of {log}:\n{log_tail(log)}")


def stop_process(popen: subprocess.Popen | None, *, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: only this process, by PID; nothing when it already ended."""
    if popen is None or popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


@contextmanager
def running(process: Any, start: Callable[[], None], *, what: str,
            errors: tuple[type[BaseException], ...]) -> Iterator[Any]:
    """For a session fixture: ``start()``, yield ``process``, then ``process.stop()``.

    A start that fails with one of ``errors`` stops what was started and fails the test naming ``what``: a server
    that cannot start is an error, never a skip.
    """
    try:
        start()
    except errors as exc:
        process.stop()
        pytest.fail(f"{what} did not start: {exc}", pytrace=False)
    try:
        yield process
    finally:
        process.stop()
