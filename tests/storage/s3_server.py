"""A real S3-compatible server on 127.0.0.1 for the storage tests: versitygw with its POSIX backend.

versitygw (github.com/versity/versitygw, Apache-2.0) is a maintained S3 gateway written in Go; it speaks the S3 REST
protocol with SigV4 authentication, multipart uploads, bulk deletes and conditional writes, and its POSIX backend
keeps buckets as directories under one root. ``scripts/k8s-stack.sh`` builds it from the Go module proxy into the
same cache as the Kubernetes binaries (``versitygw-v1.8.0``). MinIO, the usual choice, is AGPL.

:class:`S3Server` starts it on a free port with a temporary root and its own credentials, waits for the first HTTP
answer (that time is :attr:`S3Server.startup_seconds`) and stops exactly the process it started, by PID. Its request
log (one line per request: status, method, path) lets tests see the order in which a client talked to it.
"""

from __future__ import annotations

import http.client
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import HOST, free_port, stack_script_output, stop_process

__all__ = ["VERSION", "S3Server", "S3ServerError", "binary"]

VERSION = "v1.8.0"
REGION = "us-east-1"


class S3ServerError(RuntimeError):
    """The server could not be started; the message names the binary or the log."""


def binary() -> Path:
    """``$DINO_CTL_VERSITYGW``, else ``versitygw-<VERSION>`` in ``scripts/k8s-stack.sh``'s bin directory."""
    configured = os.environ.get("DINO_CTL_VERSITYGW")
    return Path(configured) if configured else stack_script_output("--print") / f"versitygw-{VERSION}"


@dataclass
class S3Server:
    """versitygw serving ``workdir/root`` on 127.0.0.1; use as a context manager."""

    workdir: Path
    access_key: str = "dino-ctl-test"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    startup_seconds: float = 0.0
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "versitygw.log"

    def env(self) -> dict[str, str]:
        """What a pod gets from the spec's Secret and ``storage.endpointUrl`` (see dino_ctl/render/common.py)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, attempts: int = 3) -> None:
        executable = binary()
        if not executable.is_file():
            raise S3ServerError(f"{executable} is missing: build it with `bash scripts/k8s-stack.sh` "
                                "(part of scripts/setup.sh; needs Go and the Go module proxy)")
        root = self.workdir / "root"
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            started = time.monotonic()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [str(executable), "--access", self.access_key, "--secret", self.secret_key,
                     "--port", f"{HOST}:{self.port}", "--region", REGION, "posix", str(root)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            if self._wait_ready(timeout=30):
                self.startup_seconds = time.monotonic() - started
                return
            self.stop()
        raise S3ServerError(f"versitygw did not start on 127.0.0.1; log {self.log_path}:\n"
                            f"{self.log_path.read_text()[-2000:]}")

    def _wait_ready(self, *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=1)
                connection.request("GET", "/")
                connection.getresponse().read()  # any answer (403 without a signature) means it serves
                connection.close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s, of the one process this object started."""
        process, self.process = self.process, None
        stop_process(process, grace=5)

    def filesystem(self, **overrides: str):
        """An s3fs filesystem with this server's credentials (``overrides``: key, secret, endpoint_url)."""
        import s3fs

        options = {"key": self.access_key, "secret": self.secret_key, "endpoint_url": self.endpoint,
                   "skip_instance_cache": True, **overrides}
        return s3fs.S3FileSystem(**options)

    def create_bucket(self, name: str) -> None:
        self.filesystem().mkdir(name)

    def requests(self) -> list[tuple[int, str, str]]:
        """``(status, method, path with query)`` of every request served so far, in order."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            columns = [column.strip() for column in line.split("|")]
            # time | vgw | status | latency | client | method | path | - | query
            if len(columns) >= 7 and columns[1] == "vgw" and columns[2].isdigit():
                query = columns[8] if len(columns) > 8 and columns[8] else ""
                found.append((int(columns[2]), columns[5], columns[6] + (f"?{query}" if query else "")))
        return found
