"""The whole pipeline against a real S3 server (SeaweedFS on 127.0.0.1), and its faults.

Object keys contain spaces, ``+``, ``%``, ``#`` and non-ASCII characters, and
every listing is checked against boto3's ListObjectsV2, so a key that pyarrow,
Ray or herbray encoded, decoded or normalised on the way shows up as a mismatch.
The fault tests stop the driver or a training worker with SIGKILL, delete
objects between listing and reading, and point jobs at missing buckets, wrong
credentials and closed ports. The two SIGKILL tests are marked slow: each took
about 100 s on a 2-core machine.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from processes import kill_when_ready
from s3server import free_ports

from herbray import storage
from herbray.catalog import read_catalog
from herbray.label import LABELS_DIR, LabelConfig, label, read_output
from herbray.prepare import PrepareConfig, prepare
from herbray.taxonomy import LabelMap
from herbray.train import TrainConfig, read_history, train

REPO = Path(__file__).resolve().parent.parent

# Species folders of the uploaded collection: the synthetic names become keys
# with the characters that URL encoders, S3 signers and Unicode normalisers
# tend to change.
SPECIES_RENAMES = {
    "Carex fictiva Herbray": "Acer × freemanii",
    "Quercus demoensis Herbray": "Carex flava+viridula 100%",
    "Salix synthetica Herbray": "Salix #3 caprea rosé",
}
COLLECTION_PREFIX = "herbarium set/collection/"
ARCHIVE_PREFIX = "herbarium set/archive #2/box 01/"

# Upper bound for a job that fails on a storage fault: a missing bucket, rejected
# credentials and a closed port all fail without minutes of retries.
FAULT_MAX_S = 30.0

# Small training runs: the test model at 64 px, one worker.
TINY_TRAIN = dict(
    model="test_tiny", weights="none", batch_size=8, input_size=64, num_workers=1, num_cpus=2
)


def sheet_name(number: int, suffix: str) -> str:
    """Return a file name with a space, '+', a literal '%20', '#' and an accented e.

    Odd numbers use the composed e-acute and even numbers the decomposed form
    (e + combining accent): S3 keeps both as different keys, and so must herbray.
    """
    accent = "\u00e9" if number % 2 else "e\u0301"
    return f"sheet +{number} %20 #a {accent}{suffix}"


def s3_keys(server, bucket: str, prefix: str = "") -> list[str]:
    """List keys with boto3's ListObjectsV2, without pyarrow in the path."""
    paginator = server.client().get_paginator("list_objects_v2")
    keys = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)


def upload_file(server, bucket: str, path: Path, key: str) -> None:
    server.client().put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


@dataclass
class S3Collection:
    """The tiny collection and archive uploaded under special-character keys."""

    bucket: str
    species: list[str]
    image_keys: list[str] = field(default_factory=list)
    archive_keys: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{COLLECTION_PREFIX}"

    @property
    def archive(self) -> str:
        return f"s3://{self.bucket}/{ARCHIVE_PREFIX}"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def upload_collection(server, bucket: str, tiny_collection: Path) -> S3Collection:
    """Upload tiny_collection with boto3, renaming folders and files on the way."""
    uploaded = S3Collection(bucket=bucket, species=sorted(SPECIES_RENAMES.values()))
    for folder, species in SPECIES_RENAMES.items():
        images = sorted((tiny_collection / "collection" / folder).glob("*.jpg"))
        for number, image in enumerate(images, start=1):
            key = f"{COLLECTION_PREFIX}{species}/{sheet_name(number, '.jpg')}"
            upload_file(server, bucket, image, key)
            # The sidecar keeps its image's stem, so the reader pairs them.
            sidecar = image.with_suffix(".xml")
            upload_file(server, bucket, sidecar, key[: -len(".jpg")] + ".xml")
            uploaded.image_keys.append(key)
    archive = sorted((tiny_collection / "archive").rglob("*.jpg"))
    for number, image in enumerate(archive, start=1):
        key = f"{ARCHIVE_PREFIX}scan +{number} %41 é.jpg"
        upload_file(server, bucket, image, key)
        uploaded.archive_keys.append(key)
    uploaded.image_keys.sort()
    uploaded.archive_keys.sort()
    return uploaded


@pytest.fixture(scope="module")
def s3_collection(s3_server, tiny_collection) -> S3Collection:
    """A bucket of this module holding the renamed tiny collection and archive."""
    import uuid

    bucket = s3_server.create_bucket(f"pipeline-{uuid.uuid4().hex[:12]}")
    return upload_collection(s3_server, bucket, tiny_collection)


@pytest.fixture(scope="module")
def s3_prepared(ray_local, s3_collection) -> tuple[str, object]:
    """Shards prepared from the S3 collection into an S3 folder (URI, PrepareResult)."""
    output = f"s3://{s3_collection.bucket}/prepared run"
    result = prepare(
        PrepareConfig(input=s3_collection.root, output=output, short_side=96, num_cpus=2)
    )
    return output, result


# ---------------------------------------------------------------------------
# End to end


def test_catalog_s3_folder_keys_exact(s3_server, s3_collection):
    catalog = read_catalog(s3_collection.root)
    table = catalog.images()
    listed = [
        key
        for key in s3_keys(s3_server, s3_collection.bucket, COLLECTION_PREFIX)
        if key.endswith(".jpg")
    ]

    assert listed == s3_collection.image_keys
    assert sorted(table.column("image_uri").to_pylist()) == [s3_collection.uri(k) for k in listed]
    assert sorted(set(table.column("scientific_name").to_pylist())) == s3_collection.species
    # Every sidecar was read from its special-character key.
    assert table.column("recorded_by").null_count == 0
    assert not catalog.skipped


def test_catalog_s3_manifest_keys_exact(s3_server, s3_collection):
    absolute = io.StringIO()
    writer = csv.writer(absolute)
    writer.writerow(["image_uri", "scientific_name"])
    relative = io.StringIO()
    relative_writer = csv.writer(relative)
    relative_writer.writerow(["path", "scientific_name"])
    for key in s3_collection.image_keys:
        species = key.split("/")[-2]
        writer.writerow([s3_collection.uri(key), species])
        # Relative to the manifest's folder, "herbarium set/".
        relative_writer.writerow([key.removeprefix("herbarium set/"), species])
    manifest = f"s3://{s3_collection.bucket}/herbarium set/absolute #1.csv"
    storage.write_text(manifest, absolute.getvalue())
    relative_manifest = f"s3://{s3_collection.bucket}/herbarium set/relative +1.csv"
    storage.write_text(relative_manifest, relative.getvalue())
    expected = [s3_collection.uri(k) for k in s3_collection.image_keys]

    for source in (manifest, relative_manifest):
        table = read_catalog(source).images()

        assert sorted(table.column("image_uri").to_pylist()) == expected, source
        assert sorted(set(table.column("scientific_name").to_pylist())) == s3_collection.species
    assert s3_keys(s3_server, s3_collection.bucket, "herbarium set/") == sorted(
        [*s3_collection.image_keys, *s3_collection.archive_keys]
        + [k[: -len(".jpg")] + ".xml" for k in s3_collection.image_keys]
        + ["herbarium set/absolute #1.csv", "herbarium set/relative +1.csv"]
    )


def test_prepare_writes_shards_to_s3(s3_server, s3_collection, s3_prepared):
    output, result = s3_prepared
    fs, path = storage.filesystem_and_path(output)
    shards = pads.dataset(f"{path}/shards", filesystem=fs, format="parquet").to_table()
    keys = s3_keys(s3_server, s3_collection.bucket, "prepared run/")

    assert result.images == 18
    assert result.errors == 0
    assert shards.num_rows == 18
    assert sorted(shards.column("image_uri").to_pylist()) == [
        s3_collection.uri(k) for k in s3_collection.image_keys
    ]
    assert set(shards.column("split").to_pylist()) <= {"train", "val", "test"}
    for name in ("prepare.json", "labels.json", "report.json", "config.yaml", "errors.parquet"):
        assert f"prepared run/{name}" in keys
    assert any(k.startswith("prepared run/shards/train/") for k in keys)
    assert not [k for k in keys if "/.staging-" in k]
    assert sorted(LabelMap.load(f"{output}/labels.json").names) == s3_collection.species


@pytest.fixture(scope="module")
def s3_trained(s3_collection, s3_prepared) -> dict:
    """Train one epoch with checkpoints on S3, then run again with two epochs."""
    shards, _ = s3_prepared
    output = f"s3://{s3_collection.bucket}/model out"
    history_uri = f"{output}/runs/tiny run/metrics.jsonl"
    common = dict(shards=shards, output=output, name="tiny run", **TINY_TRAIN)

    first = train(TrainConfig(epochs=1, **common))
    history_after_first = read_history(history_uri)
    second = train(TrainConfig(epochs=2, **common))
    return {
        "output": output,
        "history_uri": history_uri,
        "first": first,
        "history_after_first": history_after_first,
        "second": second,
    }


def test_train_checkpoints_and_resumes_on_s3(s3_server, s3_collection, s3_trained):
    after_first = s3_trained["history_after_first"]
    history = read_history(s3_trained["history_uri"])
    keys = s3_keys(s3_server, s3_collection.bucket, "model out/")

    assert [row["epoch"] for row in after_first] == [1]
    assert [row["epoch"] for row in history] == [1, 2]
    # The second run continued after the first run's checkpoint: epoch 1 was not run again.
    assert history[0] == after_first[0]
    assert s3_trained["second"].metrics["epoch"] == 2
    assert [row["epoch"] for row in s3_trained["second"].history] == [1, 2]
    assert [k for k in keys if k.startswith("model out/runs/tiny run/checkpoint")]
    for name in ("bundle.json", "model.safetensors", "labels.json", "metrics.jsonl"):
        assert f"model out/{name}" in keys


def test_load_bundle_from_s3(s3_collection, s3_trained):
    import numpy as np

    from herbray.bundle import load_bundle

    bundle = load_bundle(s3_trained["output"])
    shape = bundle.input_shape
    logits = bundle.predict_logits(np.zeros((2, shape.height, shape.width, 3), dtype=np.uint8))

    assert sorted(bundle.labels.names) == s3_collection.species
    assert logits.shape == (2, 3)
    assert bundle.info["weights_sha256"] in storage.read_text(f"{s3_trained['output']}/bundle.json")


def test_label_s3_archive_into_s3(s3_server, s3_collection, s3_trained):
    output = f"s3://{s3_collection.bucket}/labels out #1"
    result = label(
        LabelConfig(model=s3_trained["output"], input=s3_collection.archive, output=output)
    )
    table = read_output(output)
    keys = s3_keys(s3_server, s3_collection.bucket, "labels out #1/")

    assert result.images == table.num_rows == len(s3_collection.archive_keys) == 6
    assert sorted(table.column("image_uri").to_pylist()) == [
        s3_collection.uri(k) for k in s3_collection.archive_keys
    ]
    assert set(table.column("status").to_pylist()) <= {"ok", "uncertain"}
    assert len(set(table.column("specimen_id").to_pylist())) == 6
    parts = [k for k in keys if k.startswith(f"labels out #1/{LABELS_DIR}/")]
    assert parts
    assert all(k.rsplit("/", 1)[-1].startswith("part-") for k in parts)
    assert "labels out #1/run.json" in keys
    assert "labels out #1/summary.json" in keys


# ---------------------------------------------------------------------------
# Faults: missing objects, rejected credentials, unreachable endpoint


@pytest.fixture
def aws_env(monkeypatch):
    """Change AWS_* variables for one test; storage's cached settings follow them.

    The change applies to this process only, because Ray workers keep the
    variables they started with, so tests that use it must fail in the driver.
    """

    def set_env(**variables: str | None) -> None:
        for name, value in variables.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        storage.reset_settings()

    yield set_env
    monkeypatch.undo()
    storage.reset_settings()


def test_refreshing_credentials_resolved_by_pyarrow(s3_server, s3_bucket, aws_env, tmp_path):
    # credential_process gives temporary credentials that botocore would refresh, like an
    # instance or container role; pyarrow must resolve them itself, not get a frozen copy.
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    document = {
        "Version": 1,
        "AccessKeyId": s3_server.access_key,
        "SecretAccessKey": s3_server.secret_key,
        "Expiration": expiry,
    }
    process = tmp_path / "credentials.json"
    process.write_text(json.dumps(document))
    config = tmp_path / "aws-config"
    config.write_text(f"[profile herbray-process]\ncredential_process = cat {process}\n")
    aws_env(
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
        AWS_CONFIG_FILE=str(config),
        AWS_PROFILE="herbray-process",
    )
    uri = f"s3://{s3_bucket}/process credentials/sheet +1 é.jpg"

    settings = storage.s3_settings()
    storage.write_bytes(uri, b"pixels")

    assert settings.credential_source == "custom-process"
    assert settings.access_key is None
    assert settings.secret_key is None
    assert storage.read_bytes(uri) == b"pixels"
    assert list(storage.walk_files(f"s3://{s3_bucket}/process credentials")) == [
        ("sheet +1 é.jpg", 6)
    ]
    # Ray ships the filesystem to workers pickled; without frozen keys it carries none.
    assert s3_server.secret_key.encode() not in pickle.dumps(storage.s3_filesystem())


def run_cli(argv: list[str], capfd) -> tuple[int, str, str, float]:
    """Run ``herbray.cli.main`` and return its exit code, stdout, stderr and seconds."""
    from herbray.cli import build_parser, main

    build_parser()  # imports every job module first, so the timing is the job's own
    capfd.readouterr()
    root = logging.getLogger()
    handlers = list(root.handlers)
    started = time.monotonic()
    try:
        code = main(argv)
    finally:
        seconds = time.monotonic() - started
        # main() may add a handler on this test's captured stderr; later tests close it.
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
    out, err = capfd.readouterr()
    return code, out, err, seconds


def job_error_lines(err: str) -> list[str]:
    """The lines of stderr that are herbray's own error messages, not Ray's log lines."""
    return [line for line in err.splitlines() if line.startswith("herbray ")]


@pytest.mark.parametrize(
    "case",
    ["missing_bucket", "missing_prefix", "missing_manifest", "wrong_secret", "wrong_key_id"]
    + ["unreachable_endpoint"],
)
def test_catalog_cli_storage_fault_one_line(case, s3_server, s3_bucket, aws_env, capfd):
    storage.write_bytes(f"s3://{s3_bucket}/scans/sheet 1.jpg", b"not read")
    source = {
        "missing_bucket": "s3://herbray-no-such-bucket/scans/",
        "missing_prefix": f"s3://{s3_bucket}/no such folder/",
        "missing_manifest": f"s3://{s3_bucket}/no such manifest #1.csv",
    }.get(case, f"s3://{s3_bucket}/scans/")
    wrong_secret = "wrong-secret-" + "w" * 24
    if case == "wrong_secret":
        aws_env(AWS_SECRET_ACCESS_KEY=wrong_secret)
    elif case == "wrong_key_id":
        aws_env(AWS_ACCESS_KEY_ID="HERBRAYNOSUCHKEY")
    elif case == "unreachable_endpoint":
        (closed_port,) = free_ports(1)
        aws_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port}")

    code, out, err, seconds = run_cli(["catalog", source], capfd)

    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("herbray catalog: error: ")
    assert source.rstrip("/") in err
    assert seconds < FAULT_MAX_S
    assert s3_server.secret_key not in err
    assert wrong_secret not in err
    if case.startswith("wrong_"):
        assert "credentials" in err
    if case == "missing_bucket":
        assert "bucket not found: 'herbray-no-such-bucket'" in err


def test_label_input_missing_bucket_raises(s3_server, tiny_bundle, tmp_path):
    source = "s3://herbray-no-such-bucket/archive #1/"
    started = time.monotonic()

    with pytest.raises(FileNotFoundError, match="bucket not found: 'herbray-no-such-bucket'"):
        label(LabelConfig(model=str(tiny_bundle), input=source, output=str(tmp_path / "out")))

    assert time.monotonic() - started < FAULT_MAX_S
    assert not (tmp_path / "out").exists()


def test_label_input_wrong_credentials_raises(s3_server, s3_bucket, tiny_bundle, tmp_path, aws_env):
    storage.write_bytes(f"s3://{s3_bucket}/archive/sheet 1.jpg", b"not read")
    aws_env(AWS_SECRET_ACCESS_KEY="wrong-secret-" + "w" * 24)
    started = time.monotonic()

    with pytest.raises(storage.StorageError) as info:
        label(
            LabelConfig(
                model=str(tiny_bundle),
                input=f"s3://{s3_bucket}/archive/",
                output=str(tmp_path / "out"),
            )
        )

    assert time.monotonic() - started < FAULT_MAX_S
    assert f"s3://{s3_bucket}/archive" in str(info.value)
    assert "credentials" in str(info.value)
    assert s3_server.secret_key not in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("job", ["prepare", "label", "train", "train_storage_path"])
def test_job_output_missing_bucket_one_line(
    job, s3_server, tiny_collection, tiny_bundle, tmp_path, capfd
):
    output = "s3://herbray-no-such-bucket/out put"
    named = output
    if job == "prepare":
        argv = ["prepare", "--input", str(tiny_collection / "collection"), "--output", output]
    elif job == "label":
        argv = ["label", "--model", str(tiny_bundle), "--input", str(tiny_collection / "archive")]
        argv += ["--output", output]
        named = f"{output}/run.json"
    else:
        # The bucket is checked before the shards are opened, so none are needed.
        argv = ["train", "--shards", str(tmp_path / "never prepared")]
        if job == "train":
            argv += ["--output", output]
        else:
            argv += ["--output", str(tmp_path / "model"), "--storage-path", output]
    command = argv[0]

    code, _, err, seconds = run_cli(argv, capfd)

    assert code == 2
    assert job_error_lines(err) == [
        f"herbray {command}: error: bucket not found: 'herbray-no-such-bucket' in {named}; "
        "create it or fix the bucket name"
    ]
    assert seconds < FAULT_MAX_S
    assert not (tmp_path / "model").exists()


def upload_archive(server, bucket: str, tiny_collection: Path, prefix: str) -> list[str]:
    """Upload the tiny archive's 6 sheets under special-character keys; return the URIs."""
    uris = []
    for number, image in enumerate(sorted((tiny_collection / "archive").rglob("*.jpg")), 1):
        key = f"{prefix}{sheet_name(number, '.jpg')}"
        upload_file(server, bucket, image, key)
        uris.append(f"s3://{bucket}/{key}")
    return sorted(uris)


def test_label_object_deleted_after_listing(
    ray_local, s3_server, s3_bucket, tiny_collection, tiny_bundle, monkeypatch
):
    uris = upload_archive(s3_server, s3_bucket, tiny_collection, "archive #1/")
    deleted = uris[2]
    read_source = LabelConfig.read_source

    def read_source_then_delete(self, source):
        # The catalog lists the object; it disappears before the pipeline reads it.
        catalog = read_source(self, source)
        _, key = storage.split_s3(deleted)
        s3_server.client().delete_object(Bucket=s3_bucket, Key=key)
        return catalog

    monkeypatch.setattr(LabelConfig, "read_source", read_source_then_delete)
    output = f"s3://{s3_bucket}/labels"

    result = label(
        LabelConfig(model=str(tiny_bundle), input=f"s3://{s3_bucket}/archive #1/", output=output)
    )
    rows = {row["image_uri"]: row for row in read_output(output).to_pylist()}

    assert sorted(rows) == uris
    assert result.counts["error"] == 1
    assert rows[deleted]["status"] == "error"
    assert rows[deleted]["error"] == "not_found"
    assert deleted in rows[deleted]["error_message"]
    assert rows[deleted]["topk_names"] is None
    for uri in uris:
        if uri != deleted:
            assert rows[uri]["status"] in ("ok", "uncertain"), rows[uri]


def test_label_manifest_missing_keys_error_rows(
    ray_local, s3_server, s3_bucket, tiny_collection, tiny_bundle
):
    uris = upload_archive(s3_server, s3_bucket, tiny_collection, "scans/")[:2]
    missing = [
        f"s3://{s3_bucket}/scans/never uploaded +1 é.jpg",
        "s3://herbray-no-such-bucket/scans/sheet 1.jpg",
    ]
    manifest = f"s3://{s3_bucket}/manifest #1.csv"
    storage.write_text(manifest, "image_uri\n" + "".join(f'"{u}"\n' for u in uris + missing))
    output = f"s3://{s3_bucket}/labels"

    result = label(LabelConfig(model=str(tiny_bundle), input=manifest, output=output))
    rows = {row["image_uri"]: row for row in read_output(output).to_pylist()}

    assert sorted(rows) == sorted(uris + missing)
    assert result.counts["error"] == 2
    for uri in missing:
        assert rows[uri]["status"] == "error"
        assert rows[uri]["error"] == "not_found"
        assert uri in rows[uri]["error_message"]
    for uri in uris:
        assert rows[uri]["status"] in ("ok", "uncertain")


@pytest.mark.slow
def test_label_killed_driver_resumes_on_s3(
    ray_local, s3_server, s3_bucket, shared_data, tiny_bundle
):
    source_folder = shared_data / "sheets" / "bu-spark"
    for path in sorted(source_folder.iterdir()):
        upload_file(s3_server, s3_bucket, path, f"bu spark #1/{path.name}")
    source = f"s3://{s3_bucket}/bu spark #1/"
    output = f"s3://{s3_bucket}/labels +1"
    parts_prefix = f"labels +1/{LABELS_DIR}/"
    expected_uris = [f"s3://{s3_bucket}/{k}" for k in s3_keys(s3_server, s3_bucket, "bu spark #1/")]
    assert len(expected_uris) == 118

    # The child inherits the AWS_* variables of the S3 server and starts its own Ray.
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "herbray", "label", "--model", str(tiny_bundle)]
    command += ["--input", source, "--output", output, "--rows-per-file", "4"]
    command += ["--batch-size", "4", "--num-cpus", "2"]
    kill_when_ready(command, env, lambda: len(s3_keys(s3_server, s3_bucket, parts_prefix)) >= 2)

    before = set(s3_keys(s3_server, s3_bucket, parts_prefix))
    rows_before = read_output(output).num_rows
    assert before
    assert 0 < rows_before < 118
    # A leftover temporary object is deleted, never read as output.
    storage.write_bytes(f"{output}/{LABELS_DIR}/.tmp-crashed", b"PAR1 partial")

    result = label(LabelConfig(model=str(tiny_bundle), input=source, output=output))
    table = read_output(output)
    ids = table.column("specimen_id").to_pylist()
    after = set(s3_keys(s3_server, s3_bucket, parts_prefix))

    assert len(ids) == len(set(ids)) == 118
    assert sorted(table.column("image_uri").to_pylist()) == expected_uris
    assert before <= after  # finished files were kept
    assert result.labelled_now == 118 - rows_before
    assert f"{parts_prefix}.tmp-crashed" not in after


# ---------------------------------------------------------------------------
# A training worker killed mid-run


def process_children() -> dict[int, list[int]]:
    """Map each process id to its direct children's ids, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # the process exited while we listed
        # The command name in brackets may contain spaces; the fields after it are fixed.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def train_worker_pids() -> list[int]:
    """Process ids of Ray Train workers that descend from this test process.

    Ray started by this process runs its raylet as a child, and the raylet
    starts the workers, so other Ray clusters on the machine are never matched.
    """
    children = process_children()
    found, stack = [], list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::RayTrainWorker"):
            found.append(pid)
    return sorted(found)


class WorkerKiller(threading.Thread):
    """Kill the training worker with SIGKILL once the run's history shows epoch 1.

    The history line is written after the epoch's checkpoint is on storage, so
    the restarted worker group must resume from it.
    """

    def __init__(self, history_uri: str, epochs: int, timeout_s: float = 300):
        super().__init__(daemon=True)
        self.history_uri = history_uri
        self.epochs = epochs
        self.deadline = time.monotonic() + timeout_s
        self.stop = threading.Event()
        self.killed_pid: int | None = None
        self.history_at_kill: list[dict] = []
        self.later_pids: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._kill_after_first_checkpoint()
            # Record the workers of the restarted group.
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                self.later_pids.update(p for p in train_worker_pids() if p != self.killed_pid)
                time.sleep(0.1)
        except BaseException as exc:
            # The test reports it; an exception in a thread would otherwise go unseen.
            self.error = exc

    def _kill_after_first_checkpoint(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            history = read_history(self.history_uri)
            if history and history[-1]["epoch"] >= 1:
                pids = train_worker_pids()
                if len(pids) == 1:
                    self.history_at_kill = history
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed_pid = pids[0]
                    return
            time.sleep(0.05)


@pytest.mark.slow
def test_train_worker_killed_resumes_from_checkpoint(s3_collection, s3_prepared):
    if not os.path.isdir("/proc"):
        pytest.skip("finding the worker process needs Linux /proc")
    shards, _ = s3_prepared
    output = f"s3://{s3_collection.bucket}/killed model"
    epochs = 4
    killer = WorkerKiller(f"{output}/runs/kill run/metrics.jsonl", epochs)
    killer.start()
    try:
        result = train(
            TrainConfig(
                shards=shards,
                output=output,
                name="kill run",
                epochs=epochs,
                max_failures=1,
                **TINY_TRAIN,
            )
        )
    finally:
        killer.stop.set()
        killer.join()
    history = read_history(f"{output}/runs/kill run/metrics.jsonl")

    assert killer.error is None, killer.error
    assert killer.killed_pid is not None, "no training worker was killed"
    last_before_kill = killer.history_at_kill[-1]["epoch"]
    assert last_before_kill < epochs, "the run finished before the worker was killed"
    assert killer.later_pids, "no new training worker started after the kill"
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    assert [row["epoch"] for row in result.history] == list(range(1, epochs + 1))
    # Epochs finished before the kill were not trained again after the restart.
    assert history[:last_before_kill] == killer.history_at_kill
    assert result.metrics["epoch"] == epochs


# ---------------------------------------------------------------------------
# Security: no pickle runs, no secret leaks


class _RunsShellOnUnpickle:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_weights(marker: Path) -> dict[str, bytes]:
    """Weights files whose loading with pickle would create ``marker``."""
    import torch

    payload = _RunsShellOnUnpickle(str(marker))
    buffer = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(1), "payload": payload}, buffer)
    return {
        "torch.save +1.pth": buffer.getvalue(),
        "plain pickle #2.pt": pickle.dumps(payload),
    }


# torch warns that the plain pickle uses a newer protocol than torch.save writes.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_pickle_from_s3_rejected(s3_bucket, tmp_path):
    from herbray import models

    marker = tmp_path / "code-ran"
    for name, data in malicious_weights(marker).items():
        uri = f"s3://{s3_bucket}/weights/{name}"
        storage.write_bytes(uri, data)

        with pytest.raises(ValueError, match="rejected"):
            models.load_state_dict_file(uri)
        with pytest.raises(ValueError, match="rejected"):
            models.create_model("test_tiny", 3, weights=uri)
        assert not marker.exists(), name


def upload_folder(server, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            upload_file(server, bucket, path, f"{prefix}{path.relative_to(folder).as_posix()}")


def test_bundle_with_pickled_weights_rejected(s3_server, s3_bucket, tiny_bundle, tmp_path):
    import hashlib

    import safetensors

    from herbray.bundle import WEIGHTS_FILE, load_bundle

    marker = tmp_path / "code-ran"
    root = f"s3://{s3_bucket}/bundle #1"
    upload_folder(s3_server, s3_bucket, tiny_bundle, "bundle #1/")
    assert load_bundle(root).labels  # the copy loads before the weights are replaced
    evil = malicious_weights(marker)["torch.save +1.pth"]
    storage.write_bytes(f"{root}/{WEIGHTS_FILE}", evil)

    with pytest.raises(ValueError, match="does not match bundle.json"):
        load_bundle(root)
    assert not marker.exists()

    # With a matching hash in bundle.json, the file still is not a safetensors file.
    info = json.loads(storage.read_text(f"{root}/bundle.json"))
    info["weights_sha256"] = hashlib.sha256(evil).hexdigest()
    storage.write_text(f"{root}/bundle.json", json.dumps(info))
    # NOTE: load_bundle passes safetensors' own error through, without the URI.
    with pytest.raises((ValueError, safetensors.SafetensorError)):
        load_bundle(root)
    assert not marker.exists()


def find_secrets(data: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in data]


def leaked_secrets_in_objects(server, bucket: str, secrets: dict[str, str]) -> list[str]:
    """Return 'key: secret name' for each object of the bucket that contains a secret.

    Parquet pages are compressed, so Parquet objects are also searched as
    decoded rows and schema metadata.
    """
    import pyarrow as pa

    client = server.client()
    leaks = []
    for key in s3_keys(server, bucket):
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        found = set(find_secrets(data, secrets))
        if key.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data))
            text = repr(table.to_pylist()) + repr(table.schema.metadata)
            found.update(find_secrets(text.encode(), secrets))
        leaks += [f"{key}: {name}" for name in sorted(found)]
    return leaks


def leaked_secrets_in_ray_logs(secrets: dict[str, str]) -> list[str]:
    """Return 'file: secret name' for each log file of this session's Ray with a secret."""
    import ray

    # Private API: Ray has no public call for the session's log folder.
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = sorted(path for path in logs.rglob("*") if path.is_file())
    assert files, f"no Ray log files in {logs}"
    leaks = []
    for path in files:
        leaks += [f"{path}: {name}" for name in find_secrets(path.read_bytes(), secrets)]
    return leaks


def server_secrets(server) -> dict[str, str]:
    return {"secret key": server.secret_key, "access key id": server.access_key}


def test_jobs_leak_no_credentials(
    ray_local, s3_server, s3_bucket, s3_collection, tiny_bundle, caplog, capfd
):
    from herbray.cli import main

    secrets = server_secrets(s3_server)
    out_root = f"s3://{s3_bucket}"
    root = logging.getLogger()
    handlers = list(root.handlers)
    # DEBUG for every Python logger, botocore's included. The test's own boto3 calls come
    # after the capture, because botocore logs their Authorization headers at DEBUG.
    caplog.set_level(logging.DEBUG)
    storage.reset_settings()  # so boto3 resolves the credentials again, under capture
    try:
        code = main(
            ["--log-level", "DEBUG", "catalog", s3_collection.root, "--split"]
            + ["--output", f"{out_root}/catalog/table.parquet"]
            + ["--labels", f"{out_root}/catalog/labels.json"]
        )
        prepare(
            PrepareConfig(
                input=s3_collection.root, output=f"{out_root}/prepared", short_side=64, num_cpus=2
            )
        )
        label(
            LabelConfig(
                model=str(tiny_bundle), input=s3_collection.archive, output=f"{out_root}/labels"
            )
        )
        with pytest.raises(FileNotFoundError) as missing:
            label(
                LabelConfig(
                    model=str(tiny_bundle),
                    input=f"{out_root}/no such archive/",
                    output=f"{out_root}/labels 2",
                )
            )
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
        logs = caplog.text
        caplog.set_level(logging.WARNING)
    out, err = capfd.readouterr()

    assert code == 0
    assert "Found credentials in environment variables" in logs  # DEBUG logs were captured
    assert find_secrets(logs.encode(), secrets) == []
    assert find_secrets(out.encode(), secrets) == []
    assert find_secrets(err.encode(), secrets) == []
    error_text = "".join(traceback.format_exception(missing.value))
    assert find_secrets(error_text.encode(), secrets) == []
    assert s3_keys(s3_server, s3_bucket, "labels/")
    assert leaked_secrets_in_objects(s3_server, s3_bucket, secrets) == []
    assert leaked_secrets_in_ray_logs(secrets) == []


def test_pipeline_objects_hold_no_credentials(s3_server, s3_collection, s3_trained):
    # Shards, the bundle, Ray Train's checkpoints and run state: nothing stores the
    # S3 filesystem (which pickles with its keys) or the keys themselves.
    keys = s3_keys(s3_server, s3_collection.bucket)
    secrets = server_secrets(s3_server)

    assert [k for k in keys if k.startswith("model out/runs/tiny run/")]
    assert leaked_secrets_in_objects(s3_server, s3_collection.bucket, secrets) == []


def test_presigned_url_redacted_in_error_rows(
    ray_local, s3_server, s3_bucket, tiny_collection, tiny_bundle, tmp_path, caplog, capfd
):
    (uri,) = upload_archive(s3_server, s3_bucket, tiny_collection, "scans/")[:1]
    client = s3_server.client()
    readable = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": storage.split_s3(uri)[1]}
    )
    missing = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "scans/never uploaded #1.jpg"}
    )
    signatures = {
        url: urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Signature"][0]
        for url in (readable, missing)
    }
    manifest = tmp_path / "presigned.csv"
    manifest.write_text(f'image_uri\n"{readable}"\n"{missing}"\n', encoding="utf-8")
    caplog.set_level(logging.DEBUG, logger="herbray")

    label(LabelConfig(model=str(tiny_bundle), input=str(manifest), output=str(tmp_path / "out")))
    rows = {row["image_uri"]: row for row in read_output(str(tmp_path / "out")).to_pylist()}
    out, err = capfd.readouterr()

    # The image URI is the input's identity and stays as given; messages are redacted.
    assert sorted(rows) == sorted([readable, missing])
    assert rows[readable]["status"] in ("ok", "uncertain")
    row = rows[missing]
    assert row["status"] == "error"
    assert row["error"] == "not_found"
    assert "never%20uploaded%20%231.jpg" in row["error_message"]
    assert "<redacted>" in row["error_message"]
    for text in (row["error_message"], row["identificationRemarks"], caplog.text, out, err):
        for signature in signatures.values():
            assert signature not in text
        assert s3_server.access_key not in text
