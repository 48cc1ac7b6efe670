"""Shared fixtures: the real data beside the checkout, and a local Ray on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never write ~/.ray/auth_token or require one: Ray's token auth is off for
# the local clusters they start (a real deployment keeps it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Every Ray server a test starts listens on 127.0.0.1 only (see herbray.runtime).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Keep torch from oversubscribing small CI machines when Ray workers start.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real herbarium data set folder; tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only present beside CI checkouts)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local(request):
    """A real local Ray with 2 CPUs on 127.0.0.1, shared by the whole test session."""
    import ray

    from herbray.runtime import init_ray

    # Ray workers copy the environment of the process that starts Ray, so the S3
    # server's AWS variables must be set first when any test of this session uses it.
    if any("s3_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("s3_server")

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 for the whole session.

    The server's endpoint and credentials are set as AWS_* variables in
    os.environ until the session ends, so herbray.storage, boto3 and the Ray
    workers all reach it. Ray workers see them only if Ray starts afterwards:
    ray_local starts this fixture first whenever a collected test uses it, and
    a test that starts Ray some other way must request s3_server before that.
    """
    from s3server import CONFLICTING_ENV, S3Server, S3ServerError

    from herbray import storage

    try:
        server = S3Server()
    except S3ServerError as exc:
        pytest.skip(str(exc))
    server.start()
    variables = server.env()
    saved = {name: os.environ.get(name) for name in (*variables, *CONFLICTING_ENV)}
    for name in CONFLICTING_ENV:
        os.environ.pop(name, None)
    os.environ.update(variables)
    storage.reset_settings()
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage.reset_settings()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """The name of a new, empty bucket on the session's S3 server."""
    import uuid

    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory) -> Path:
    """A small synthetic demo collection: 3 species x 6 sheets, plus a 6-sheet archive."""
    from herbray import synthetic

    out = tmp_path_factory.mktemp("tiny-collection")
    synthetic.generate_collection(
        out, n_species=3, sheets_per_species=6, archive_per_species=2, size=(300, 450), workers=1
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle(ray_local, tiny_collection, tmp_path_factory) -> Path:
    """A model bundle of the tiny test model, trained for 2 epochs on ``tiny_collection``."""
    from herbray.prepare import PrepareConfig, prepare
    from herbray.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-bundle")
    prepare(
        PrepareConfig(
            input=str(tiny_collection / "collection"), output=str(root / "prepared"), short_side=96
        )
    )
    train(
        TrainConfig(
            shards=str(root / "prepared"),
            output=str(root / "model"),
            model="test_tiny",
            weights="none",
            epochs=2,
            batch_size=8,
            input_size=64,
            num_workers=1,
        )
    )
    return root / "model"
