"""Local paths, ``s3://`` URIs and ``http(s)://`` URLs behind one small interface.

S3 settings come from the standard AWS mechanisms only: environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)
and the shared files ``~/.aws/config`` and ``~/.aws/credentials`` (including a
profile's ``endpoint_url``). boto3 resolves them once per process, and the same
resolved values configure pyarrow's S3 filesystem, which Ray Data and Ray Train
use. So one setting reaches every reader and writer.

Static keys (from the variables or a credentials file) are passed to pyarrow.
Temporary credentials from an EC2 instance profile, an ECS task role, web
identity (EKS IRSA) or ``credential_process`` are not,
because frozen they would expire mid-job (after an hour for many roles).
pyarrow's AWS SDK resolves and refreshes those itself, from the same variables,
files and metadata endpoints.

Paths and keys are kept byte for byte: nothing is URL-decoded or encoded, so a
key with spaces, ``+``, ``%`` or ``#`` is read and reported exactly as listed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

# Bounded network behaviour: a dead endpoint fails within seconds instead of
# retrying for minutes. Each value is in seconds or attempts.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3

# Error codes in pyarrow's S3 error messages ("AWS Error NO_SUCH_BUCKET during ...").
_NO_SUCH_BUCKET = "AWS Error NO_SUCH_BUCKET"
_REJECTED_REQUEST = re.compile(
    r"AWS Error (ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH|INVALID_ACCESS_KEY_ID|"
    r"INVALID_CLIENT_TOKEN_ID|EXPIRED_TOKEN|UNRECOGNIZED_CLIENT)\b"
)

_SECRET_QUERY = re.compile(
    r"([?&](?:X-Amz-[A-Za-z-]+|Signature|AWSAccessKeyId|Expires|sig|token)=)[^&\s]*",
    re.IGNORECASE,
)


class StorageError(OSError):
    """A path or URI could not be listed, read or written; the message names it."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def is_remote(uri: str) -> bool:
    return is_s3(uri) or is_http(uri)


def redact(text: str) -> str:
    """Remove signatures, tokens and keys from the query string of signed URLs."""
    return _SECRET_QUERY.sub(r"\1<redacted>", text)


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into bucket and key, keeping the key verbatim."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}; expected s3://bucket/prefix")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URIs alike."""
    if not is_remote(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    return out


def parent(uri: str) -> str:
    if is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def basename(uri: str) -> str:
    """Return the last path component; an http(s) URL loses its query and fragment.

    The query of a presigned URL contains its signature, which must not end up
    in a local file name. In s3:// keys, '?' and '#' are ordinary characters.
    """
    if is_http(uri):
        uri = uri.split("#", 1)[0].split("?", 1)[0]
    if is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(uri.rstrip(os.sep))


def resolve(path: str, base_dir: str) -> str:
    """Resolve a path found in a manifest against the manifest's folder.

    Absolute paths and URIs are returned unchanged; relative paths join the base
    folder (local or ``s3://``) without any decoding of their characters.
    """
    if is_remote(path) or os.path.isabs(path):
        return path
    if is_remote(base_dir):
        return join(base_dir, path)
    return os.path.normpath(os.path.join(base_dir, path))


# botocore's names of temporary credential sources that pyarrow's AWS SDK (C++)
# resolves and refreshes itself. Its default chain (AWS SDK for C++ 1.11 docs,
# "Credentials Providers") reads the variables and shared files, web identity,
# credential_process, the ECS container endpoint and EC2 instance metadata.
SELF_REFRESHED_SOURCES = frozenset(
    {"env", "iam-role", "container-role", "assume-role-with-web-identity", "custom-process"}
)


@dataclass(frozen=True)
class S3Settings:
    """S3 connection settings as boto3 resolved them. Never logged with secrets."""

    region: str | None
    endpoint_url: str | None
    access_key: str | None  # None: pyarrow's AWS SDK resolves the credentials itself
    secret_key: str | None
    session_token: str | None
    credential_source: str | None = None  # botocore's method name: env, iam-role, sso...

    def __repr__(self) -> str:  # keeps keys out of logs and tracebacks
        return (
            f"S3Settings(region={self.region!r}, endpoint_url={self.endpoint_url!r}, "
            f"credential_source={self.credential_source!r})"
        )


@functools.lru_cache(maxsize=1)
def s3_settings() -> S3Settings:
    """Resolve S3 settings through boto3, the same way the AWS CLI does."""
    import boto3
    from botocore.credentials import RefreshableCredentials

    session = boto3.Session()
    client = session.client("s3", region_name=_region_override())
    endpoint = client.meta.endpoint_url
    # A default AWS endpoint is left to pyarrow, which derives it from the region.
    if endpoint and re.match(r"https://s3[.-]([a-z0-9-]+[.-])?amazonaws\.com", endpoint):
        endpoint = None
    credentials = session.get_credentials()
    source = getattr(credentials, "method", None)
    frozen = None
    refreshable = isinstance(credentials, RefreshableCredentials)
    if refreshable and source in SELF_REFRESHED_SOURCES:
        logger.info("S3 credentials from %s refresh; pyarrow resolves them itself", source)
    elif credentials is not None:
        frozen = credentials.get_frozen_credentials()
        if refreshable:
            # NOTE: these sources (SSO, assume-role profiles) are not in the AWS SDK
            # for C++ default chain as documented, so pyarrow gets a frozen copy.
            logger.warning(
                "S3 credentials from %s are temporary and cannot be refreshed in pyarrow, "
                "so S3 requests fail once they expire; for long jobs use an instance or "
                "container role, web identity or credential_process",
                source,
            )
    return S3Settings(
        region=client.meta.region_name,
        endpoint_url=endpoint,
        access_key=frozen.access_key if frozen else None,
        secret_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
        credential_source=source,
    )


def _region_override() -> str | None:
    """Return ``AWS_REGION`` when it is set, else None to let boto3 decide.

    botocore 1.44 reads only ``AWS_DEFAULT_REGION`` and the profile's region.
    Other AWS SDKs check ``AWS_REGION`` before the shared config file (AWS SDKs
    and Tools Reference Guide, "AWS Region"), and AWS Lambda sets it, so here
    it takes precedence too.
    """
    return os.environ.get("AWS_REGION") or None


def reset_settings() -> None:
    """Forget cached settings and clients (after the environment changed)."""
    s3_settings.cache_clear()
    s3_filesystem.cache_clear()
    boto3_client.cache_clear()


@functools.lru_cache(maxsize=1)
def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from :func:`s3_settings`."""
    settings = s3_settings()
    kwargs: dict = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    if settings.region:
        kwargs["region"] = settings.region
    if settings.access_key and settings.secret_key:
        kwargs["access_key"] = settings.access_key
        kwargs["secret_key"] = settings.secret_key
        if settings.session_token:
            kwargs["session_token"] = settings.session_token
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
        # S3-compatible servers (SeaweedFS, MinIO, Ceph) expect path-style requests.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=1)
def boto3_client():
    """A boto3 S3 client with the bounded timeouts and retries of this module."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=REQUEST_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    return boto3.Session().client("s3", region_name=s3_settings().region, config=config)


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem for a URI and the path within it.

    ``s3://bucket/key`` gives the configured S3 filesystem and ``bucket/key``;
    a local path gives the local filesystem and the absolute path. Ray Data's
    ``filesystem=`` and Ray Train's ``storage_filesystem=`` take this pair.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    if is_http(uri):
        raise StorageError(f"{redact(uri)}: http(s) URLs can be read, not listed or written")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _describe(uri: str, exc: BaseException) -> str:
    text = redact(str(exc)).strip().splitlines()
    return f"{redact(uri)}: {text[0] if text else type(exc).__name__}"


def _bucket_not_found(uri: str) -> FileNotFoundError:
    bucket, _ = split_s3(uri)
    return FileNotFoundError(
        f"bucket not found: {bucket!r} in {redact(uri)}; create it or fix the bucket name"
    )


def _storage_error(uri: str, exc: BaseException, missing: str = "not found") -> OSError:
    """Translate an error from pyarrow, urllib or the OS into one that names the URI.

    A missing file, key, bucket or http(s) resource becomes FileNotFoundError,
    because pyarrow reports a missing bucket as a plain OSError. Anything else
    becomes StorageError, with a hint when S3 rejected the credentials.
    """
    message = str(exc)
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"{missing}: {redact(uri)}")
    if _NO_SUCH_BUCKET in message:
        return _bucket_not_found(uri)
    if isinstance(exc, urllib.error.HTTPError) and exc.code in (404, 410):
        return FileNotFoundError(f"{missing}: {redact(uri)} (HTTP {exc.code})")
    text = _describe(uri, exc)
    if _REJECTED_REQUEST.search(message):
        text += (
            "; S3 rejected the credentials or denied access: check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
        )
    return StorageError(text)


def read_bytes(uri: str, *, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
    """Read a whole object: a local file, an ``s3://`` object or an ``http(s)`` URL."""
    try:
        if is_s3(uri):
            fs, path = filesystem_and_path(uri)
            with fs.open_input_stream(path) as stream:
                return stream.read()
        if is_http(uri):
            with urllib.request.urlopen(uri, timeout=timeout) as response:
                return response.read()
        with open(uri, "rb") as handle:
            return handle.read()
    except (OSError, ValueError) as exc:
        raise _storage_error(uri, exc) from exc


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local parent folders are created."""
    try:
        if is_s3(uri):
            fs, path = filesystem_and_path(uri)
            with fs.open_output_stream(path) as stream:
                stream.write(data)
            return
        if is_http(uri):
            raise StorageError(f"{redact(uri)}: cannot write to an http(s) URL")
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        tmp = f"{uri}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, uri)
    except StorageError:
        raise
    except OSError as exc:
        raise _storage_error(uri, exc) from exc


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    try:
        info = file_info(uri)
    except FileNotFoundError:
        return False
    return info.type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    if is_http(uri):
        return False
    if not is_s3(uri):
        return os.path.isdir(uri)
    info = file_info(uri)
    return info.type == pafs.FileType.Directory


def file_info(uri: str) -> pafs.FileInfo:
    """Return pyarrow's FileInfo; a missing file or key has type NotFound.

    A bare ``s3://bucket`` that does not exist raises FileNotFoundError instead,
    so that a wrong bucket name is reported rather than read as an empty folder.
    """
    fs, path = filesystem_and_path(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise _storage_error(uri, exc) from exc
    if is_s3(uri) and "/" not in path and info.type == pafs.FileType.NotFound:
        raise _bucket_not_found(uri)
    return info


def check_bucket(uri: str) -> None:
    """Raise FileNotFoundError naming the bucket when an ``s3://`` URI's bucket is missing.

    Jobs call this before writing to S3, because pyarrow, Ray Data and Ray Train
    report a missing bucket without the URI and suggest pyarrow's
    ``allow_bucket_creation`` option, which herbray does not expose. Any other
    error (credentials allowed on a prefix only, for example) is left to the
    write itself to report. Local paths and http(s) URLs pass unchecked.
    """
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    try:
        info = s3_filesystem().get_file_info(bucket)
    except OSError as exc:
        logger.debug("cannot check bucket %r before writing: %s", bucket, redact(str(exc)))
        return
    if info.type == pafs.FileType.NotFound:
        raise _bucket_not_found(uri)


def walk_files(root: str) -> Iterator[tuple[str, int]]:
    """Yield (path relative to root, size in bytes) for every file under root.

    Relative paths use '/' and are sorted, so a listing is deterministic. For
    S3, a prefix counts as a folder tree.
    """
    fs, base = filesystem_and_path(root)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=False)
    try:
        infos = fs.get_file_info(selector)
    except OSError as exc:
        raise _storage_error(root, exc, missing="folder not found") from exc
    prefix = base.rstrip("/") + "/"
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(prefix) :] if info.path.startswith(prefix) else info.path
        if os.sep != "/" and not is_s3(root):
            rel = rel.replace(os.sep, "/")
        files.append((rel, info.size or 0))
    files.sort()
    yield from files


def makedirs(uri: str) -> None:
    if is_s3(uri):
        return  # S3 has no folders; writing a key creates its prefix.
    os.makedirs(uri, exist_ok=True)


def delete_dir(uri: str) -> None:
    """Delete a folder or S3 prefix and everything under it, if it exists.

    A bare ``s3://bucket`` raises StorageError before any request is sent,
    because pyarrow would delete every object in the bucket and only then
    refuse to delete the bucket itself.
    """
    fs, path = filesystem_and_path(uri)
    if is_s3(uri) and "/" not in path:
        raise StorageError(
            f"{redact(uri)}: deleting a whole bucket is not supported; pass a prefix such as "
            f"s3://{path}/outputs"
        )
    try:
        fs.delete_dir(path)
    except OSError as exc:
        error = _storage_error(uri, exc)
        if not isinstance(error, FileNotFoundError):
            raise error from exc


def delete_file(uri: str) -> None:
    """Delete a file or S3 object, if it exists."""
    fs, path = filesystem_and_path(uri)
    try:
        fs.delete_file(path)
    except OSError as exc:
        error = _storage_error(uri, exc)
        if not isinstance(error, FileNotFoundError):
            raise error from exc


def list_dir(uri: str) -> list[str]:
    """Return the sorted names of the direct children of a folder or S3 prefix.

    A missing folder or prefix gives an empty list, but a missing bucket raises
    FileNotFoundError.
    """
    fs, path = filesystem_and_path(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=False))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _storage_error(uri, exc) from exc
    return sorted(info.base_name for info in infos)


def local_or_download(uri: str, workdir: str) -> str:
    """Return a local path for a file, downloading a remote one into workdir."""
    if not is_remote(uri):
        return uri
    target = os.path.join(workdir, basename(uri))
    with open(target, "wb") as handle:
        handle.write(read_bytes(uri))
    return target
