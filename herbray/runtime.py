"""Starting or joining Ray the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Runs in every Ray worker process before it takes work, so settings that are
# per process (Pillow's pixel limit) hold in every task and actor.
WORKER_SETUP_HOOK = "herbray.imaging.configure_worker"

# Ray's switch for multi-machine clusters (named for Windows and macOS, where it
# is off by default); "0" keeps every server of a local Ray on 127.0.0.1.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    logger.info("starting a local Ray on 127.0.0.1 (num_cpus=%s)", num_cpus or "all")
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
