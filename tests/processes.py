"""Run a command in its own process group and kill it part-way, as a crash would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kill_when_ready(
    command: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float = 240.0
) -> None:
    """Start ``command`` and SIGKILL its whole process group once ``ready()`` is true.

    The kill also happens after ``timeout`` seconds without ``ready()``. The
    calling test fails if the command ended on its own before the kill.
    """
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if ready():
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
