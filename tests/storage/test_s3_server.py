"""The S3 server under the storage tests is real: SigV4, multipart uploads, bulk deletes, and our client finds it
through the environment alone."""

from __future__ import annotations

import os

import fsspec
import pytest


def test_server_starts_quickly_and_refuses_unsigned_requests(s3_server) -> None:
    assert 0 < s3_server.startup_seconds < 10
    assert s3_server.requests()[0][0] == 403  # the readiness probe carried no signature


def test_the_environment_alone_reaches_the_server(s3) -> None:
    fs, root = fsspec.core.url_to_fs(s3.uri("hello.txt"))  # no options: what the trainer and the CLI do
    fs.pipe_file(root, b"hello")
    assert s3.fs.cat_file(f"{s3.name}/hello.txt") == b"hello"


def test_multipart_upload_assembles_parts_and_an_aborted_one_leaves_nothing(s3) -> None:
    fs = s3.fs
    parts = [os.urandom(5 * 2**20 + 1) for _ in range(3)]
    with fs.open(f"{s3.name}/big.bin", "wb", block_size=5 * 2**20) as handle:
        for part in parts:
            handle.write(part)
            handle.flush()  # one UploadPart per flush of >= 5 MiB
    assert fs.info(f"{s3.name}/big.bin")["ETag"].strip('"').endswith("-3")  # a completed 3-part upload
    assert fs.cat_file(f"{s3.name}/big.bin") == b"".join(parts)

    handle = fs.open(f"{s3.name}/torn.bin", "wb", block_size=5 * 2**20)
    handle.write(parts[0])
    handle.flush()  # one part uploaded, then the writer dies
    handle.discard()  # AbortMultipartUpload, what a crashed upload amounts to once the store cleans up
    handle.closed = True  # nothing left to flush when the object is collected
    fs.invalidate_cache()
    assert not fs.exists(f"{s3.name}/torn.bin")
    methods = [method for _, method, _ in s3.server.requests()]
    assert methods.count("DELETE") >= 1  # the abort


def test_bulk_delete_removes_every_key(s3) -> None:
    fs = s3.fs
    for index in range(5):
        fs.pipe_file(f"{s3.name}/dir/file-{index}", b"x")
    fs.rm(f"{s3.name}/dir", recursive=True)
    fs.invalidate_cache()
    assert fs.ls(s3.name, detail=False) == []
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{s3.name}/dir/file-0")
