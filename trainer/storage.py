"""Storage locations as the trainer, the CLI and curation use them: local paths and fsspec URIs (s3://, gs://, ...).

Torch-free. Three things an object store does differently from a disk, handled here once for every caller:

- **No directories.** ``makedirs`` on s3fs *creates the bucket* when it is missing, so a mistyped bucket name would
  silently become a new bucket; :func:`makedirs` creates directories on local filesystems only.
- **Errors that name nothing.** A missing bucket, refused credentials or an unreachable endpoint surface as
  ``FileNotFoundError("The specified bucket does not exist.")``, ``PermissionError("Forbidden")``,
  ``OSError(EIO)`` or botocore's ``EndpointConnectionError`` (not an ``OSError``), and ``fs.exists`` answers False
  to all of them for a bucket. :func:`storage_errors` turns each into one :class:`StorageError` naming the URI and
  what to check; :func:`check_reachable` asks the store before anything is written.
- **Credentials and endpoint from the environment.** s3fs (through botocore) and mosaicml-streaming (through boto3)
  read ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (streaming also ``S3_ENDPOINT_URL``); gcsfs reads
  ``GOOGLE_APPLICATION_CREDENTIALS``. The renderers export these from the spec's Secret; nothing here takes keys.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

import fsspec

__all__ = ["StorageError", "check_reachable", "describe_error", "is_local", "makedirs", "storage_errors"]

_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "XAdminUserNotFound", "Forbidden",
                 "InvalidToken", "ExpiredToken", "403", "401")
_CONNECTION_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                      "ClientConnectorError", "ServerDisconnectedError", "ConnectionRefusedError", "ConnectionError")


class StorageError(OSError):
    """A storage location cannot be used: ``uri``, what went wrong (``reason``: ``denied``, ``no-bucket``,
    ``unreachable``, ``no-credentials`` or ``io``) and what to check, in one line."""

    def __init__(self, uri: str, reason: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri, self.reason = uri, reason


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (plain paths and file://)."""
    return bool({"file", "local"} & set(_protocols(fs)))


def makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """``mkdir -p`` where directories exist; nothing on object stores (s3fs would create a missing bucket)."""
    if is_local(fs) or not {*_protocols(fs)} & _BUCKET_PROTOCOLS:
        fs.makedirs(path, exist_ok=True)


def _endpoint(fs: fsspec.AbstractFileSystem | None) -> str:
    configured = getattr(fs, "client_kwargs", None) or {}
    return (getattr(fs, "endpoint_url", None) or configured.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "the default endpoint")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _code(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def describe_error(uri: str, error: BaseException, fs: fsspec.AbstractFileSystem | None = None) -> StorageError | None:
    """The :class:`StorageError` for ``error`` raised while using ``uri``, or None when it is no storage failure
    this module recognises (a genuinely missing file stays a FileNotFoundError for the caller to judge)."""
    if isinstance(error, StorageError):
        return error
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    links = list(_chain(error))
    codes = [code for code in map(_code, links) if code]
    names = {type(link).__name__ for link in links}
    text = " ".join(str(link) for link in links)
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return StorageError(uri, "no-credentials", "no credentials found; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (the spec's storage.credentials Secret in a pod)")
    if names & set(_CONNECTION_ERRORS) or any(
            isinstance(link, OSError) and link.errno == errno.ECONNREFUSED for link in links):
        return StorageError(uri, "unreachable", f"cannot reach the storage endpoint {_endpoint(fs)} "
                            "(AWS_ENDPOINT_URL, storage.endpointUrl in the spec)")
    if "NoSuchBucket" in codes or "specified bucket does not exist" in text:
        return StorageError(uri, "no-bucket", f"bucket {bucket!r} does not exist at {_endpoint(fs)}; create it "
                            "first (dino-ctl never creates buckets)")
    if set(codes) & set(_DENIED_CODES) or any(isinstance(link, PermissionError) for link in links):
        detail = codes[0] if codes else str(links[0]).split(":")[0]
        return StorageError(uri, "denied", f"access denied ({detail}): check AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY (the spec's storage.credentials Secret) and the bucket policy")
    return None


@contextlib.contextmanager
def storage_errors(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> Iterator[None]:
    """Re-raise a recognised storage failure inside the block as one :class:`StorageError` naming ``uri``."""
    try:
        yield
    except Exception as error:
        translated = describe_error(uri, error, fs)
        if translated is None or translated is error:
            raise
        raise translated from error


def check_reachable(uri: str) -> None:
    """Ask the store whether ``uri``'s bucket exists and the credentials are accepted (raise StorageError if not).

    Object stores only (one listing of ``uri`` itself, not of the bucket root: a policy may allow listing only below
    a prefix); a local path needs no check. Run it before writing anything, so a mistake is reported as itself and
    not as a half-written checkpoint or a "no checkpoint found" start. Nothing under ``uri`` yet is fine.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    if is_local(fs) or not {*_protocols(fs)} & _BUCKET_PROTOCOLS:
        return
    try:
        fs.ls(root, detail=False, refresh=True)
    except Exception as error:
        translated = describe_error(uri, error, fs)
        if translated is not None:
            raise translated from error
        if not isinstance(error, FileNotFoundError):  # FileNotFoundError alone: an empty prefix, a new location
            raise
