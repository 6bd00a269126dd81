"""Fixtures of the storage tests: one real S3 server (versitygw) per session, a fresh bucket per test.

``s3`` sets the environment a pod gets from the spec's Secret and ``storage.endpointUrl`` (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, S3_ENDPOINT_URL, AWS_DEFAULT_REGION), so the code under test and every
process it starts reach the server exactly as in a cluster: through fsspec/s3fs and boto3 with no test-only option.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from tests.storage.s3_server import VERSION, S3Server

_bucket_numbers = itertools.count()
_started: list[S3Server] = []


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("versitygw")) as server:
        _started.append(server)
        yield server


@dataclass
class Bucket:
    """A fresh bucket of the session's server."""

    server: S3Server
    name: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    @property
    def fs(self):
        return self.server.filesystem()


def _clear_s3fs_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches instances by arguments, not by environment


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    name = f"dino-test-{next(_bucket_numbers):03d}"
    s3_server.create_bucket(name)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    _clear_s3fs_instances()
    yield Bucket(s3_server, name)
    _clear_s3fs_instances()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # -m "not s3" deselects them on a machine without Go, like -m "not cluster"
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


def pytest_terminal_summary(terminalreporter) -> None:
    for server in _started:
        terminalreporter.write_line(
            f"versitygw {VERSION} (S3 server of tests/storage) started in {server.startup_seconds:.2f} s")
