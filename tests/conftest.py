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
# Keep torch from oversubscribing small CI machines when Ray workers start.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real herbarium data set folder; tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only present beside CI checkouts)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs on 127.0.0.1, shared by the whole test session."""
    import ray

    from herbray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
