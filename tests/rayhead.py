"""A real single-node Ray head for tests that submit jobs the way users do.

:class:`RayHead` starts ``ray start --head --block`` from the test's Python
environment, so a job's ``python`` is that environment's. Every server listens
on 127.0.0.1, with its own temp dir and ports. Ray's token auth is either on,
with a random token given to the head and to every client command, or off.
Jobs go in through the real ``ray job submit`` CLI, with ``--working-dir``
uploads.

Stopping it never runs ``ray stop``, which stops every Ray of the user on the
machine, including the ``ray_local`` fixture's and other test runs'. Instead
:meth:`RayHead.stop` sends SIGTERM to the ``ray start --block`` process, which
stops the processes of its node, and then kills any process of its tree that is
still alive (job drivers run in process groups of their own).

Linux only: the process tree and listening sockets are read from /proc.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Ray's Unix socket paths (<temp dir>/session_<date>_<pid>/sockets/plasma_store)
# must fit the 107-byte limit of sun_path, so the temp dir lives directly under /tmp.
SHORT_TEMP_ROOT = "/tmp"
# Ray's switch for multi-machine clusters; "0" keeps every server on 127.0.0.1.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


class RayHeadError(RuntimeError):
    """The head did not start, or a job could not be submitted or did not finish."""


@dataclass(frozen=True)
class ListeningSocket:
    """One TCP socket in LISTEN state, with the process that has it open."""

    address: str
    port: int
    pid: int
    process: str

    @property
    def is_loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or bool(mapped and mapped.is_loopback)


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RayHead:
    """A Ray head on 127.0.0.1 with a dashboard (job server), started and stopped by a test.

    ``auth`` is ``"token"`` (a random token on the head and in :attr:`client_env`)
    or ``"disabled"`` (``RAY_AUTH_MODE=disabled`` on both sides). ``python_bin``
    is the folder with the ``ray`` and ``python`` the head uses; by default the
    one of the running interpreter (the project's .venv under pytest).
    """

    def __init__(
        self,
        num_cpus: int = 2,
        auth: str = "token",
        python_bin: Path | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        if auth not in ("token", "disabled"):
            raise ValueError(f"auth must be 'token' or 'disabled', got {auth!r}")
        self.num_cpus = num_cpus
        self.auth = auth
        self.python_bin = Path(python_bin or Path(sys.executable).parent)
        self.ray = self.python_bin / "ray"
        if not self.ray.is_file():
            raise RayHeadError(f"ray CLI not found at {self.ray}; install ray[default] there")
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(32) if auth == "token" else None
        self.temp_dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.gcs_port = self.dashboard_port = 0

    # Environments

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # A stray RAY_ADDRESS would send client commands to another cluster.
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env["PATH"] = f"{self.python_bin}{os.pathsep}{env.get('PATH', '')}"
        env[LOCAL_ONLY_ENV] = "0"
        # On SIGTERM, Ray 2.60's `ray start --block` first drains the node and
        # waits up to 30 s for every lease to return, which Ray Data's detached
        # actors never do. A test head serves nothing that needs draining.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        if self.token:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN"] = self.token
        else:
            env["RAY_AUTH_MODE"] = "disabled"
            env.pop("RAY_AUTH_TOKEN", None)
        return env

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for ``ray job ...`` commands: the head's auth settings and token."""
        return self._base_env()

    @property
    def address(self) -> str:
        """The job server's address, for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # Start and stop

    def start(self) -> RayHead:
        """Start the head and return once its job server responds."""
        self.temp_dir = Path(tempfile.mkdtemp(prefix="hr-", dir=SHORT_TEMP_ROOT))
        (
            self.gcs_port,
            self.dashboard_port,
            client_port,
            agent_port,
            agent_grpc_port,
            runtime_env_port,
            metrics_port,
        ) = free_ports(7)
        # Fixed ports for every server that has a default, so this head cannot
        # collide with another Ray on the machine (52365, 10001, ...).
        command = [
            str(self.ray),
            "start",
            "--head",
            "--block",
            f"--port={self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--dashboard-agent-grpc-port={agent_grpc_port}",
            f"--runtime-env-agent-port={runtime_env_port}",
            f"--metrics-export-port={metrics_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        self._log_path = self.temp_dir / "ray-start.log"
        logger.info("starting Ray head: %s", " ".join(command))
        with open(self._log_path, "wb") as log:
            # A session of its own: signals sent to the test's terminal do not
            # reach it, and its process group contains only this head's processes.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._base_env(),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_log(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RayHeadError(
                    f"ray start exited with code {self.process.returncode}:\n{self._start_log()}"
                )
            try:
                self.get("/api/jobs/")
                return
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.5)
        raise RayHeadError(
            f"job server at {self.address} not ready after {self.start_timeout:.0f} s "
            f"({last_error}):\n{self._start_log()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop this head's processes, and only them."""
        if self.process is None:
            return
        tree = self.process_tree()

        # ray start --block stops its node's processes on SIGTERM.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "ray start (pid %d) still running %.0f s after SIGTERM; sending SIGKILL",
                    self.process.pid,
                    timeout,
                )
                self.process.kill()
                self.process.wait()

        # Whatever is left of the tree (a job driver, a worker that missed the
        # shutdown) gets SIGKILL. Every pid in it descends from this head.
        deadline = time.monotonic() + 5
        survivors = [pid for pid in tree if process_alive(pid)]
        while survivors and time.monotonic() < deadline:
            time.sleep(0.2)
            survivors = [pid for pid in survivors if process_alive(pid)]
        for pid in survivors:
            logger.warning("killing leftover Ray process %d (%s)", pid, _process_name(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        self.process = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Jobs

    def get(self, path: str, headers: dict[str, str] | None = None) -> dict:
        """GET a job server endpoint with the head's token; return its JSON."""
        request = urllib.request.Request(
            self.address + path,
            headers=self.auth_headers if headers is None else headers,
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def run_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` as a user would, with the client environment."""
        return subprocess.run(
            [str(self.ray), *args],
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(
        self,
        entrypoint: list[str],
        working_dir: Path | str,
        runtime_env: dict | None = None,
    ) -> str:
        """Submit ``entrypoint`` with ``ray job submit --working-dir``; return the job id."""
        job_id = f"herbray-test-{uuid.uuid4().hex[:12]}"
        args = [
            "job",
            "submit",
            f"--address={self.address}",
            f"--working-dir={working_dir}",
            f"--submission-id={job_id}",
            "--no-wait",
        ]
        if runtime_env:
            args.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        result = self.run_cli(*args, "--", *entrypoint)
        if result.returncode != 0:
            raise RayHeadError(
                f"ray job submit failed with code {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return job_id

    def status(self, job_id: str) -> dict:
        """The job's record from the job server: status, message, start and end times."""
        return self.get(f"/api/jobs/{job_id}")

    def logs(self, job_id: str) -> str:
        """The job's output, from ``ray job logs``."""
        result = self.run_cli("job", "logs", f"--address={self.address}", job_id)
        return result.stdout + result.stderr

    def wait(self, job_id: str, timeout: float) -> dict:
        """Wait until the job ends; return its record. Raise with its logs if it timed out."""
        deadline = time.monotonic() + timeout
        record: dict = {}
        while time.monotonic() < deadline:
            record = self.status(job_id)
            if record.get("status") in TERMINAL_JOB_STATES:
                return record
            time.sleep(1.0)
        self.run_cli("job", "stop", f"--address={self.address}", job_id)
        raise RayHeadError(
            f"job {job_id} did not finish in {timeout:.0f} s "
            f"(status {record.get('status')}); its logs:\n{self.logs(job_id)}"
        )

    # Processes and sockets

    def process_tree(self) -> list[int]:
        """Pids of ``ray start`` and all its living descendants."""
        if self.process is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            parent = _parent_pid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
        tree, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            tree.append(pid)
            pending.extend(children.get(pid, []))
        return tree

    def listening_sockets(self) -> list[ListeningSocket]:
        """TCP sockets in LISTEN state held by this head's processes (as ``ss -ltnp`` shows)."""
        listening = _listening_inodes()
        found = []
        for pid in self.process_tree():
            try:
                fds = list(Path(f"/proc/{pid}/fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inode = int(target[len("socket:[") : -1])
                    if inode in listening:
                        address, port = listening[inode]
                        found.append(ListeningSocket(address, port, pid, _process_name(pid)))
        return found


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _listening_inodes() -> dict[int, tuple[str, int]]:
    """Map socket inode -> (address, port) for every TCP socket in LISTEN state."""
    listening = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":  # TCP_LISTEN
                continue
            address_hex, port_hex = local.split(":")
            listening[inode] = (_decode_address(address_hex, family), int(port_hex, 16))
    return listening


def _decode_address(hex_text: str, family: int) -> str:
    # The kernel prints each 32-bit word of the address in host byte order.
    raw = bytes.fromhex(hex_text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    words = raw
    return str(ipaddress.IPv4Address(words) if family == 4 else ipaddress.IPv6Address(words))
