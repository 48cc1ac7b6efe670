"""herbray.storage against a real S3 server (SeaweedFS on 127.0.0.1), local folders and http.

The same round trips run on local paths and on s3:// URIs. S3 results are also
checked with boto3's ListObjectsV2, so a key that pyarrow or boto3 encoded,
decoded or normalised on the way shows up as a mismatch.
"""

from __future__ import annotations

import http.server
import os
import pickle
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3server import S3Server, S3ServerError, free_ports

from herbray import storage

# Keys whose characters are special in URLs, in S3 signing or in Unicode.
# "e\u0301" (e + combining acute) and "\u00e9" (é) are different keys: neither
# side may normalise one into the other.
SPECIAL_KEYS = [
    "plain.txt",
    "with space.txt",
    "plus+sign.txt",
    "percent%20literal.txt",
    "percent%2Fslash.txt",
    "hash#fragment.txt",
    "question?mark.txt",
    "paren(1).txt",
    "amp&ersand=1.txt",
    "Viola odorata L. × V. hirta (é).txt",
    "tree 🌳.txt",
    "e\u0301-decomposed.txt",
    "\u00e9-composed.txt",
    "sub folder/Ébène+1 #2.txt",
    "sub folder/deeper/100% (copy).txt",
]

# Upper bounds for failures: rejected credentials need no retries, and a closed
# port fails at connect time on every attempt.
REJECTED_CREDENTIALS_MAX_S = 15.0
UNREACHABLE_ENDPOINT_MAX_S = 30.0


def content_of(key: str) -> bytes:
    return f"content of {key}\n".encode()


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path) -> str:
    """A root folder for round trips: a local temporary folder or an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


@pytest.fixture
def fresh_settings():
    """Reset storage's cached settings before and after a test that changes AWS_* variables."""
    storage.reset_settings()
    yield
    storage.reset_settings()


def s3_keys(server: S3Server, bucket: str) -> list[str]:
    """List every key of a bucket with boto3, without pyarrow in the path."""
    paginator = server.client().get_paginator("list_objects_v2")
    keys = []
    for page in paginator.paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


# Round trips


def test_round_trip_special_keys(storage_root):
    for key in SPECIAL_KEYS:
        storage.write_bytes(storage.join(storage_root, key), content_of(key))

    listed = list(storage.walk_files(storage_root))

    assert [path for path, _ in listed] == sorted(SPECIAL_KEYS)
    for path, size in listed:
        assert size == len(content_of(path)), path
    for key in SPECIAL_KEYS:
        assert storage.read_bytes(storage.join(storage_root, key)) == content_of(key), key
    assert (
        storage.read_text(storage.join(storage_root, SPECIAL_KEYS[1]))
        == "content of with space.txt\n"
    )


def test_round_trip_special_keys_seen_by_boto3(s3_server, s3_bucket):
    for key in SPECIAL_KEYS:
        storage.write_bytes(f"s3://{s3_bucket}/written/{key}", content_of(key))

    assert s3_keys(s3_server, s3_bucket) == sorted(f"written/{key}" for key in SPECIAL_KEYS)


def test_keys_written_by_boto3_read_exactly(s3_server, s3_bucket):
    client = s3_server.client()
    for key in SPECIAL_KEYS:
        client.put_object(Bucket=s3_bucket, Key=f"uploaded/{key}", Body=content_of(key))

    listed = [path for path, _ in storage.walk_files(f"s3://{s3_bucket}/uploaded")]

    assert listed == sorted(SPECIAL_KEYS)
    for key in SPECIAL_KEYS:
        assert storage.read_bytes(f"s3://{s3_bucket}/uploaded/{key}") == content_of(key), key


def test_list_dir_special_names(storage_root):
    for key in SPECIAL_KEYS:
        storage.write_bytes(storage.join(storage_root, key), b"x")

    names = storage.list_dir(storage_root)

    expected = sorted({key.split("/", 1)[0] for key in SPECIAL_KEYS})
    assert names == expected


def test_bare_bucket_uri(s3_bucket):
    bucket_uri = f"s3://{s3_bucket}"
    storage.write_bytes(f"{bucket_uri}/top.txt", b"1")
    storage.write_bytes(f"{bucket_uri}/folder/inner #1.txt", b"22")

    assert list(storage.walk_files(bucket_uri)) == [("folder/inner #1.txt", 2), ("top.txt", 1)]
    assert list(storage.walk_files(bucket_uri + "/")) == [
        ("folder/inner #1.txt", 2),
        ("top.txt", 1),
    ]
    assert storage.list_dir(bucket_uri) == ["folder", "top.txt"]
    assert storage.exists(bucket_uri)
    assert storage.is_dir(bucket_uri)
    assert storage.file_info(bucket_uri).type == pafs.FileType.Directory


def test_empty_bucket_lists_nothing(s3_bucket):
    assert list(storage.walk_files(f"s3://{s3_bucket}")) == []
    assert storage.list_dir(f"s3://{s3_bucket}") == []


def test_exists_and_is_dir(storage_root):
    file_uri = storage.join(storage_root, "folder", "file name.txt")
    storage.write_bytes(file_uri, b"abc")

    assert storage.exists(file_uri)
    assert not storage.is_dir(file_uri)
    assert storage.exists(storage.join(storage_root, "folder"))
    assert storage.is_dir(storage.join(storage_root, "folder"))
    assert not storage.exists(storage.join(storage_root, "missing.txt"))
    assert storage.file_info(file_uri).size == 3


def test_delete_file_and_dir(storage_root):
    keep = storage.join(storage_root, "keep.txt")
    doomed = storage.join(storage_root, "doomed", "a b.txt")
    storage.write_bytes(keep, b"k")
    storage.write_bytes(doomed, b"d")
    storage.write_bytes(storage.join(storage_root, "doomed", "sub", "c.txt"), b"c")

    storage.delete_dir(storage.join(storage_root, "doomed"))
    storage.delete_file(keep)

    assert list(storage.walk_files(storage_root)) == []
    # Deleting what is already gone is not an error.
    storage.delete_dir(storage.join(storage_root, "doomed"))
    storage.delete_file(keep)


def test_delete_dir_refuses_bucket(s3_server, s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/a.txt", b"a")

    with pytest.raises(storage.StorageError, match=s3_bucket):
        storage.delete_dir(f"s3://{s3_bucket}")

    assert s3_keys(s3_server, s3_bucket) == ["a.txt"]


def test_parquet_through_filesystem_and_path(storage_root):
    table = pa.table(
        {
            "specimen_id": ["a", "b #2", "c é"],
            "image_uri": ["s3://x/a b.jpg", "s3://x/b+c.jpg", "s3://x/%41.jpg"],
            "label": [0, 1, 2],
        }
    )
    uri = storage.join(storage_root, "shards", "part 0+1.parquet")
    storage.makedirs(storage.parent(uri))
    filesystem, path = storage.filesystem_and_path(uri)

    pq.write_table(table, path, filesystem=filesystem)
    read_back = pq.read_table(path, filesystem=filesystem)

    assert read_back.equals(table)
    assert [name for name, _ in storage.walk_files(storage_root)] == ["shards/part 0+1.parquet"]


def test_parquet_key_seen_by_boto3(s3_server, s3_bucket):
    filesystem, path = storage.filesystem_and_path(f"s3://{s3_bucket}/out/rows #1.parquet")

    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=filesystem)

    assert path == f"{s3_bucket}/out/rows #1.parquet"
    assert s3_keys(s3_server, s3_bucket) == ["out/rows #1.parquet"]


def test_local_or_download_s3(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/scans/sheet (1).jpg"
    storage.write_bytes(uri, b"\xff\xd8jpeg")

    local = storage.local_or_download(uri, str(tmp_path))

    assert Path(local) == tmp_path / "sheet (1).jpg"
    assert Path(local).read_bytes() == b"\xff\xd8jpeg"


def test_boto3_client_uses_environment(s3_server, s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/k.txt", b"v")

    response = storage.boto3_client().get_object(Bucket=s3_bucket, Key="k.txt")

    assert response["Body"].read() == b"v"
    assert storage.s3_settings().endpoint_url == s3_server.endpoint_url
    assert storage.s3_settings().region == "us-east-1"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"AWS_REGION": "eu-west-1"}, "eu-west-1"),
        ({"AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-2"),
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-1"),
    ],
)
def test_region_from_environment(s3_server, monkeypatch, fresh_settings, variables, expected):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    storage.reset_settings()

    assert storage.s3_settings().region == expected
    assert storage.boto3_client().meta.region_name == expected
    assert storage.s3_filesystem().region == expected


# Faults


def test_missing_key_raises_file_not_found(s3_bucket):
    uri = f"s3://{s3_bucket}/no/such key.txt"

    with pytest.raises(FileNotFoundError, match="no/such key.txt") as info:
        storage.read_bytes(uri)

    assert uri in str(info.value)
    assert not storage.exists(uri)
    assert storage.file_info(uri).type == pafs.FileType.NotFound


def test_missing_prefix_raises_file_not_found(s3_bucket):
    uri = f"s3://{s3_bucket}/no-such-prefix"

    with pytest.raises(FileNotFoundError) as info:
        list(storage.walk_files(uri))

    assert uri in str(info.value)
    assert storage.list_dir(uri) == []


@pytest.mark.parametrize(
    "operation",
    ["read_bytes", "write_bytes", "walk_files", "walk_files_bare", "list_dir", "file_info"],
)
def test_missing_bucket_raises_file_not_found(s3_server, operation):
    bucket = "herbray-no-such-bucket"
    uri = f"s3://{bucket}/some/key.txt"
    calls = {
        "read_bytes": lambda: storage.read_bytes(uri),
        "write_bytes": lambda: storage.write_bytes(uri, b"x"),
        "walk_files": lambda: list(storage.walk_files(uri)),
        "walk_files_bare": lambda: list(storage.walk_files(f"s3://{bucket}")),
        "list_dir": lambda: storage.list_dir(f"s3://{bucket}"),
        "file_info": lambda: storage.file_info(f"s3://{bucket}"),
    }

    with pytest.raises(FileNotFoundError) as info:
        calls[operation]()

    assert f"s3://{bucket}" in str(info.value)
    assert "herbray-no-such-bucket" not in [
        b["Name"] for b in s3_server.client().list_buckets()["Buckets"]
    ]


def test_missing_bucket_does_not_exist(s3_server):
    assert not storage.exists("s3://herbray-no-such-bucket")
    assert not storage.exists("s3://herbray-no-such-bucket/key.txt")


@pytest.mark.parametrize("wrong", ["secret_key", "access_key"])
def test_wrong_credentials_fail_fast(s3_server, s3_bucket, monkeypatch, fresh_settings, wrong):
    uri = f"s3://{s3_bucket}/protected.txt"
    storage.write_bytes(uri, b"secret data")
    wrong_secret = "wrong-secret-" + "x" * 20
    if wrong == "secret_key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "HERBRAYNOSUCHKEY")
    storage.reset_settings()

    for operation in (
        lambda: storage.read_bytes(uri),
        lambda: list(storage.walk_files(f"s3://{s3_bucket}")),
        lambda: storage.write_bytes(uri, b"overwrite"),
    ):
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as info:
            operation()
        elapsed = time.monotonic() - started

        message = str(info.value)
        assert f"s3://{s3_bucket}" in message
        assert "credentials" in message
        assert elapsed < REJECTED_CREDENTIALS_MAX_S
        whole_traceback = "".join(traceback.format_exception(info.value))
        assert s3_server.secret_key not in whole_traceback
        assert wrong_secret not in whole_traceback

    # The object is unchanged: the rejected write did not go through.
    assert (
        s3_server.client().get_object(Bucket=s3_bucket, Key="protected.txt")["Body"].read()
        == b"secret data"
    )


def test_server_rejects_wrong_credentials(s3_server, s3_bucket):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3_server.client(secret_key="not-the-secret").list_objects_v2(Bucket=s3_bucket)
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        s3_server.client(access_key="HERBRAYNOSUCHKEY").list_objects_v2(Bucket=s3_bucket)


def test_unreachable_endpoint_fails_in_bounded_time(tmp_path, monkeypatch, fresh_settings):
    (closed_port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "HERBRAYUNUSED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.reset_settings()
    uri = "s3://some-bucket/scans/a.jpg"

    for operation in (lambda: storage.read_bytes(uri), lambda: list(storage.walk_files(uri))):
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as info:
            operation()
        elapsed = time.monotonic() - started

        assert uri in str(info.value)
        assert elapsed < UNREACHABLE_ENDPOINT_MAX_S
        assert "unused-secret-value" not in "".join(traceback.format_exception(info.value))


# Secrets


def test_settings_repr_hides_secrets(s3_server):
    settings = storage.s3_settings()

    assert settings.secret_key == s3_server.secret_key
    assert s3_server.secret_key not in repr(settings)
    assert s3_server.secret_key not in str(settings)
    assert s3_server.access_key not in repr(settings)


def test_redact_presigned_url(s3_server, s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/scan 1.jpg", b"pixels")
    url = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "scan 1.jpg"}, ExpiresIn=300
    )
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)

    redacted = storage.redact(url)

    # The URL is real: the server accepts its signature.
    assert storage.read_bytes(url) == b"pixels"
    assert query["X-Amz-Signature"][0] not in redacted
    assert query["X-Amz-Credential"][0] not in urllib.parse.unquote(redacted)
    assert s3_server.access_key not in urllib.parse.unquote(redacted)
    assert redacted.startswith(url.split("?", 1)[0] + "?")
    assert storage.redact(f"failed to read {url} (timed out)").endswith(" (timed out)")


@pytest.mark.parametrize("signature_version", ["s3v4", "s3"])
def test_redact_session_token(s3_server, s3_bucket, signature_version):
    import boto3
    from botocore.config import Config

    token = "FQoGZXIvYXdzEXAMPLETOKEN" + "t" * 40
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        aws_session_token=token,
        region_name="us-east-1",
        config=Config(signature_version=signature_version),
    )
    url = client.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "k"})
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    signature = (query.get("X-Amz-Signature") or query["Signature"])[0]

    redacted = urllib.parse.unquote(storage.redact(url))

    assert token in urllib.parse.unquote(url)
    assert token not in redacted
    assert signature not in redacted
    assert s3_server.access_key not in redacted


def test_presigned_url_error_is_redacted(s3_server, s3_bucket):
    url = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "missing.jpg"}, ExpiresIn=300
    )
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Signature"][0]

    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(url)

    assert "missing.jpg" in str(info.value)
    assert signature not in str(info.value)


def test_basename_drops_url_query():
    url = "https://host.example/scans/sheet%201.jpg?X-Amz-Signature=abc#frag"

    assert storage.basename(url) == "sheet%201.jpg"
    assert storage.basename("s3://bucket/odd?name#1.jpg") == "odd?name#1.jpg"


def test_filesystem_pickles_for_ray_workers(s3_bucket):
    # Ray ships the filesystem to workers by pickling it; the copy must still work.
    storage.write_bytes(f"s3://{s3_bucket}/p.txt", b"pickled")
    filesystem, path = storage.filesystem_and_path(f"s3://{s3_bucket}/p.txt")

    copy = pickle.loads(pickle.dumps(filesystem))

    with copy.open_input_stream(path) as stream:
        assert stream.read() == b"pickled"


# http(s)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/site over http on 127.0.0.1; yields (folder, base URL)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = lambda *args, **kwargs: QuietHandler(*args, directory=str(site), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_read_bytes(http_root):
    site, base = http_root
    (site / "sheet 1 é.jpg").write_bytes(b"\xff\xd8jpeg bytes")
    url = f"{base}/{urllib.parse.quote('sheet 1 é.jpg')}"

    assert storage.read_bytes(url) == b"\xff\xd8jpeg bytes"
    assert storage.is_http(url)
    assert storage.is_remote(url)


def test_http_404_raises_file_not_found(http_root):
    _, base = http_root
    url = f"{base}/missing.jpg?token=abc123"

    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(url)

    assert f"{base}/missing.jpg" in str(info.value)
    assert "404" in str(info.value)
    assert "abc123" not in str(info.value)


def test_http_closed_port_raises_storage_error():
    (closed_port,) = free_ports(1)
    url = f"http://127.0.0.1:{closed_port}/a.jpg"

    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="a.jpg"):
        storage.read_bytes(url, timeout=5)

    assert time.monotonic() - started < 10


def test_http_cannot_be_written_or_listed(http_root):
    _, base = http_root

    with pytest.raises(storage.StorageError, match="http"):
        storage.write_bytes(f"{base}/new.txt", b"x")
    with pytest.raises(storage.StorageError, match="http"):
        list(storage.walk_files(base))


def test_local_or_download_http_strips_query(http_root, tmp_path):
    site, base = http_root
    (site / "scan.jpg").write_bytes(b"scan")
    workdir = tmp_path / "work"
    workdir.mkdir()

    local = storage.local_or_download(f"{base}/scan.jpg?X-Amz-Signature=deadbeef", str(workdir))

    assert Path(local) == workdir / "scan.jpg"
    assert Path(local).read_bytes() == b"scan"


# The server itself


def listening_addresses(pid: int) -> list[str]:
    """Return 'address:port' for every TCP socket of a process in LISTEN state (Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A is TCP_LISTEN
                    host_hex, port_hex = local.split(":")
                    addresses.append(f"{host_hex}:{int(port_hex, 16)}")
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_s3_server_listens_only_on_loopback(s3_server):
    addresses = listening_addresses(s3_server.process.pid)

    assert addresses, "weed has no listening TCP sockets"
    # 127.0.0.1 in /proc/net/tcp is little-endian hex 0100007F.
    assert all(address.startswith("0100007F:") for address in addresses), addresses
    assert f"0100007F:{s3_server.ports['s3.port']}" in addresses


def test_s3_server_reports_failed_start(tmp_path):
    fake_weed = tmp_path / "weed"
    fake_weed.write_text("#!/bin/sh\necho 'flag provided but not defined: -x' >&2\nexit 2\n")
    fake_weed.chmod(0o755)
    server = S3Server(weed=str(fake_weed))

    with pytest.raises(S3ServerError) as info:
        server.start()

    assert "exited with code 2" in str(info.value)
    assert "flag provided but not defined: -x" in str(info.value)
    assert server.process is None
    assert server.workdir is None


# Ray workers


def test_ray_workers_reach_s3(ray_local, s3_bucket):
    # ray_local comes first on purpose: it must start the S3 server before Ray,
    # or the workers would not inherit the AWS_* variables.
    uri = f"s3://{s3_bucket}/from driver #1.txt"
    storage.write_bytes(uri, b"driver wrote this")

    @ray_local.remote
    def read_in_worker(uri: str) -> bytes:
        from herbray import storage

        return storage.read_bytes(uri)

    assert ray_local.get(read_in_worker.remote(uri), timeout=120) == b"driver wrote this"


@pytest.mark.slow
def test_ray_data_reads_parquet_from_s3(ray_local, s3_bucket):
    import ray.data

    filesystem, path = storage.filesystem_and_path(f"s3://{s3_bucket}/shards")
    for index in range(2):
        table = pa.table({"specimen_id": [f"s{index}-{i}" for i in range(3)]})
        pq.write_table(table, f"{path}/part-{index}.parquet", filesystem=filesystem)

    dataset = ray.data.read_parquet(path, filesystem=filesystem)

    ids = sorted(row["specimen_id"] for row in dataset.take_all())
    assert ids == sorted(f"s{index}-{i}" for index in range(2) for i in range(3))
