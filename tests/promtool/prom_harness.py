"""A real Prometheus server for tests: start it on loopback, let it scrape targets, read metrics back over its HTTP API.

Usage from any test module (the repository root is on ``sys.path`` under ``python -m pytest``)::

    from tests.promtool.prom_harness import prometheus_server  # noqa: F401  (pytest fixture)

    def test_scrape(prometheus_server):
        prom = prometheus_server(targets=["127.0.0.1:9400"], labels={"experiment": "demo"})
        samples = prom.wait_for('dino_train_iterations_total{experiment="demo"}', timeout=60)
        assert float(samples[0]["value"][1]) > 0

Each server gets a free port, its own storage directory and log file; ``stop()`` (called by the fixture on teardown,
also when the test fails) terminates the process and kills it if it does not exit. Tests skip with a clear message
where ``/usr/bin/prometheus`` (Debian package ``prometheus``, installed by scripts/setup.sh) is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

logger = logging.getLogger(__name__)

PROMETHEUS_BINARY = os.environ.get("DINO_CTL_PROMETHEUS", "/usr/bin/prometheus")
_HTTP_TIMEOUT_S = 5.0


class PrometheusError(RuntimeError):
    """The server did not start, exited, or answered a query with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server retries once if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """One ``prometheus`` process scraping ``targets`` every ``scrape_interval``.

    Args:
        targets: ``host:port`` addresses serving ``/metrics``.
        workdir: directory for the config, the TSDB and the log (created).
        labels: extra target labels (e.g. ``namespace``/``pod``/``experiment`` as a PodMonitor would add).
        scrape_interval: Prometheus duration; short so tests see samples within seconds.
        rule_files: rule files to load (paths are copied into the config as absolute paths).
        binary: the prometheus executable.
    """

    def __init__(
        self,
        *,
        targets: Sequence[str],
        workdir: Path,
        labels: Mapping[str, str] | None = None,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        binary: str = PROMETHEUS_BINARY,
    ) -> None:
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.labels = dict(labels or {})
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.binary = binary
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise PrometheusError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def _write_config(self) -> Path:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": "test", "static_configs": [{"targets": self.targets, "labels": self.labels}]}
            ],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, *, timeout: float = 60.0) -> PrometheusServer:
        """Start the server and wait until ``/-/ready`` answers; raise :class:`PrometheusError` with the log tail."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self._write_config()
        attempts = 2  # the free port can be taken between free_port() and the bind: try another once
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            self._spawn(config_path)
            try:
                self._wait_ready(timeout)
                break
            except PrometheusError:
                self.stop()
                if attempt == attempts or "address already in use" not in self.log_tail():
                    raise
        return self

    def _spawn(self, config_path: Path) -> None:
        self._log_file = self.log_path.open("ab")
        command = [
            self.binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        logger.info("starting %s", " ".join(command))
        self._process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=_HTTP_TIMEOUT_S) as response:
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        """The end of the server's log (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def stop(self, *, grace: float = 10.0) -> None:
        """Terminate the server; kill it if it has not exited after ``grace`` seconds. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return ``data``; raise :class:`PrometheusError` on an API error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400/422 carry a JSON error body
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the ``result`` list of a vector (``[{"metric": {...}, "value": [ts, "v"]}]``)."""
        data = self.api("query", query=promql)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{promql!r} returned a {data['resultType']}, not a vector")
        return list(data["result"])

    def wait_for(
        self,
        promql: str,
        *,
        timeout: float = 30.0,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
    ) -> list[dict[str, Any]]:
        """Poll ``promql`` until ``predicate(result)`` holds (default: non-empty); raise with the targets on timeout."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        targets = "; ".join(
            f"{t['scrapeUrl']} {t['health']} {t['lastError']}".strip() for t in self.api("targets")["activeTargets"]
        )
        raise PrometheusError(
            f"{promql!r} not satisfied after {timeout:.0f}s; last result {result}; targets: {targets}"
        )

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory fixture: ``prometheus_server(targets=[...], **kwargs)`` starts a server; all are stopped on teardown."""
    if shutil.which(PROMETHEUS_BINARY) is None:
        pytest.skip(f"prometheus binary not found at {PROMETHEUS_BINARY}: install the Debian package 'prometheus' "
                    "(scripts/setup.sh does) or set DINO_CTL_PROMETHEUS")
    servers: list[PrometheusServer] = []

    def start(**kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(workdir=tmp_path / f"prometheus-{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
