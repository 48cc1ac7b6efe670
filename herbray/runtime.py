"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Runs in every Ray worker process before it takes work, so settings that are
# per process (Pillow's pixel limit) hold in every task and actor.
WORKER_SETUP_HOOK = "herbray.imaging.configure_worker"
LOCAL_WORKER_SETUP_HOOK = "herbray.runtime.configure_local_worker"

# Ray Train's placement-group cleaner polls Ray's state API, which the dashboard
# serves, for the training controller, and it warns once a second when the API
# is missing. A local Ray runs without the dashboard, so there the warning is noise.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

# Ray's switch for multi-machine clusters (named for Windows and macOS, where it
# is off by default); "0" keeps every server of a local Ray on 127.0.0.1.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# glibc malloc settings for processes that train a CNN on CPUs. By default glibc
# returns the memory of large freed tensors to the system and maps it again on
# the next step. A thread other than the main one, where Ray Train runs the
# training loop, does this for even more tensors because its arena is small.
# EfficientNet-Lite0 took 300,000-1,500,000 page faults per step at batch 16-32.
# One arena that keeps up to 4 GiB of freed memory cut that to almost none and
# made training 1.4-1.9x faster on 2 cores (docs/benchmarks.md). The cost is
# that a process keeps that freed memory until it exits. glibc reads these
# variables when a process starts.
CPU_TRAINING_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_TOP_PAD_": str(512 << 20),
}


def malloc_env() -> dict[str, str]:
    """Return :data:`CPU_TRAINING_MALLOC_ENV` without the variables already set here."""
    return {k: v for k, v in CPU_TRAINING_MALLOC_ENV.items() if k not in os.environ}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster, or start a local one bound to 127.0.0.1.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster, which is what a
    job started with ``ray job submit`` does. Without one, a local Ray starts on
    loopback with ``num_cpus`` CPUs (all of them when None). A Ray that is
    already initialised in this process is reused as it is.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray 2.60 replaces a node address of 127.0.0.1 by the machine's network
        # address, so its servers would listen on every interface. With this Ray
        # setting off, a single-machine Ray uses the loopback address for all of
        # them. Ray reads it when first imported, so it is set before the import.
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return
    if not address and os.environ[LOCAL_ONLY_ENV] == "0":
        from ray._private import ray_constants  # private: the value Ray cached at import

        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    logger.info("starting a local Ray on 127.0.0.1 (num_cpus=%s)", num_cpus or "all")
    runtime_env = {"worker_process_setup_hook": LOCAL_WORKER_SETUP_HOOK}
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)


def configure_local_worker() -> None:
    """Set up a worker of a local Ray: herbray's settings, and no cleaner warnings."""
    from herbray.imaging import configure_worker

    configure_worker()
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
