"""The cluster configs in cluster/, .rayignore, and a real `ray job submit` to a local head.

The cluster-launcher YAMLs go through Ray's own validation, offline. The
KubeRay RayJob and every job command line in cluster/ go through herbray's
parser. jobs/prepare.py runs as a Ray job on a head started here, with token
auth on and every server on 127.0.0.1.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import socket
import urllib.error
import zipfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from PIL import Image
from rayhead import RayHead, process_alive

from herbray.cli import build_parser
from herbray.config import resolve

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "local.yaml"]
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
# The cluster image must run the Ray that submits to it.
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


class ClusterConfigError(ValueError):
    """Ray's validation rejected a cluster-launcher config."""


def validate_cluster_config(config: dict) -> dict:
    """Run the checks `ray up` makes before it contacts a cloud; return the filled config.

    NOTE: prepare_config and validate_config are private Ray APIs
    (ray.autoscaler._private.util, Ray 2.60). `ray up` calls both, then the
    provider's bootstrap, which for AWS calls the AWS APIs (IAM role, subnets,
    key pair) and is skipped here. prepare_config fills defaults from the YAML
    files inside the ray package, so nothing here uses the network.
    """
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except (click.ClickException, jsonschema.ValidationError, ValueError) as exc:
        message = exc.message if isinstance(exc, click.ClickException) else str(exc)
        raise ClusterConfigError(message) from exc
    return prepared


def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a network connection fail the test."""

    def reject_connection(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", reject_connection)


# Cluster-launcher configs


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name, no_network):
    config = load_yaml(CLUSTER / name)
    prepared = validate_cluster_config(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    if config["provider"]["type"] == "local":
        # One node type for the head and the listed workers, all of them kept.
        (node_type,) = prepared["available_node_types"].values()
        assert node_type["min_workers"] == len(config["provider"]["worker_ips"])
        assert node_type["max_workers"] == len(config["provider"]["worker_ips"])
    else:
        head = prepared["available_node_types"][prepared["head_node_type"]]
        assert head["max_workers"] == 0


def test_aws_config_node_types():
    config = load_yaml(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = types["ray.worker.gpu"]
    assert head["resources"] == {"CPU": 0}
    assert config["provider"]["region"] == "us-west-2"
    assert config["docker"]["image"] == RAY_IMAGE
    assert gpu["resources"]["GPU"] == 1
    assert gpu["min_workers"] == 0
    assert "--gpus all" in gpu["docker"]["worker_run_options"]
    # Workers get no IAM role unless the config gives one; they need S3.
    for name, node_type in types.items():
        assert "IamInstanceProfile" in node_type["node_config"], name
    assert config["max_workers"] == sum(
        t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]
    )


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_setup_and_auth(name):
    config = load_yaml(CLUSTER / name)
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*~/herbray", setup)
    assert config["file_mounts"]["~/herbray"] == "."
    assert config["file_mounts"]["~/.ray"] == "~/.ray"
    assert ".rayignore" in config["rsync_filter"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if " ray start " in f" {c} "]
        assert len(start) == 1, key
        assert "RAY_AUTH_MODE=token" in start[0], key
    head_start = next(c for c in config["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start


def test_local_config_rejects_node_types():
    config = load_yaml(CLUSTER / "local.yaml")
    config["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    with pytest.raises(ClusterConfigError, match="available_node_types"):
        validate_cluster_config(config)


def test_local_config_requires_head_ip():
    config = load_yaml(CLUSTER / "local.yaml")
    del config["provider"]["head_ip"]
    with pytest.raises(ClusterConfigError, match="head_ip"):
        validate_cluster_config(config)


def test_aws_config_rejects_unknown_head_type():
    config = load_yaml(CLUSTER / "aws.yaml")
    config["head_node_type"] = "ray.head.missing"
    with pytest.raises(ClusterConfigError, match="head_node_type"):
        validate_cluster_config(config)


def test_aws_config_rejects_node_type_without_resources():
    config = load_yaml(CLUSTER / "aws.yaml")
    del config["available_node_types"]["ray.worker.gpu"]["resources"]
    with pytest.raises(ClusterConfigError, match="resources"):
        validate_cluster_config(config)


def test_aws_config_rejects_unknown_key():
    config = load_yaml(CLUSTER / "aws.yaml")
    config["idle_timeout"] = 10
    with pytest.raises(ClusterConfigError, match="idle_timeout"):
        validate_cluster_config(config)


# Job command lines


def check_job_command(argv: list[str]) -> None:
    """Fail unless ``argv`` (``python jobs/NAME.py ...``) names a job that herbray accepts.

    Skips a job whose file is not written yet. The job's subcommand comes
    from its ``main(["NAME", ...])`` call. The options go through the same
    parser and config validation as a real run, but nothing runs.
    """
    assert argv[0] == "python", argv
    job = REPO / argv[1]
    assert job.parent == REPO / "jobs", f"{argv[1]} is not a job in jobs/"
    if not job.is_file():
        pytest.skip(f"{argv[1]} is not written yet")
    called = re.search(r"""main\(\[\s*["'](\w+)["']""", job.read_text(encoding="utf-8"))
    assert called, f"{argv[1]} does not call herbray.cli.main([COMMAND, ...])"
    command = [called.group(1), *argv[2:]]

    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            args = build_parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"herbray rejects {shlex.join(argv)}:\n{stderr.getvalue()}")
    if hasattr(args, "config_class"):
        resolve(args.config_class, args, args.config)


def documented_job_commands() -> list[tuple[str, list[str]]]:
    """Every ``python jobs/...`` command in cluster/, as (where, argv)."""
    found = []
    for path in sorted(CLUSTER.iterdir()):
        if path.suffix not in (".md", ".yaml"):
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".yaml":
            # Only a RayJob's entrypoint; the launcher configs' commands are comments.
            document = yaml.safe_load(text)
            spec = document.get("spec", {}) if isinstance(document, dict) else {}
            lines = [spec["entrypoint"]] if "entrypoint" in spec else []
        else:
            # One line per command: join shell line continuations.
            lines = text.replace("\\\n", " ").splitlines()
        for line in lines:
            match = re.search(r"\bpython (jobs/\S+\.py)(.*)", line)
            # Commands with "..." in place of options are prose, not examples.
            if match and "..." not in match.group(2):
                argv = shlex.split(match.group(0), comments=True)
                found.append((f"{path.name}: {match.group(1)}", argv))
    return found


def test_cluster_docs_name_job_commands():
    where = [name for name, _ in DOCUMENTED_COMMANDS]
    for job in ("prepare", "train", "label", "evaluate"):
        assert any(f"jobs/{job}.py" in name for name in where), job


DOCUMENTED_COMMANDS = documented_job_commands()


@pytest.mark.parametrize(
    "argv",
    [argv for _, argv in DOCUMENTED_COMMANDS],
    ids=[f"{i}-{where}" for i, (where, _) in enumerate(DOCUMENTED_COMMANDS)],
)
def test_documented_job_command_parses(argv):
    check_job_command(argv)


def test_rayjob_manifest():
    documents = list(yaml.safe_load_all(RAYJOB.read_text(encoding="utf-8")))
    assert len(documents) == 1
    rayjob = documents[0]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == RAY_IMAGE
    workers = cluster["workerGroupSpecs"]
    assert len(workers) == 1
    worker = workers[0]["template"]["spec"]["containers"][0]
    assert worker["image"] == RAY_IMAGE
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert any(p.startswith("herbray") for p in runtime_env["pip"])

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    # One Ray Train worker per GPU pod.
    assert argv[argv.index("--num-workers") + 1] == str(workers[0]["replicas"])
    assert "--use-gpu" in argv
    check_job_command(argv)


def test_check_job_command_rejects_unknown_flag():
    with pytest.raises(pytest.fail.Exception, match="--no-such-flag"):
        check_job_command(["python", "jobs/prepare.py", "--input", "x", "--no-such-flag"])


# What `ray job submit --working-dir` uploads


def package_working_dir(root: Path, output: Path, ray_defaults: bool) -> list[str]:
    """Zip ``root`` the way `ray job submit --working-dir` does; return the names inside.

    NOTE: _zip_files is Ray's private packaging function (Ray 2.60,
    ray._private.runtime_env.packaging). With ``ray_defaults`` False it applies
    only .rayignore: no .gitignore and none of Ray's default excludes.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _zip_files

    excludes = ray_constants.get_runtime_env_default_excludes() if ray_defaults else []
    _zip_files(str(root), excludes, str(output), include_gitignore=ray_defaults)
    with zipfile.ZipFile(output) as archive:
        return archive.namelist()


def test_rayignore_excludes_environment_and_data(tmp_path):
    root = tmp_path / "checkout"
    included = ["herbray/cli.py", "jobs/prepare.py", "cluster/aws.yaml", "pyproject.toml"]
    dropped = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/HEAD",
        "herbray/__pycache__/cli.cpython-311.pyc",
        "demo-output/prepared/shards/train/part-0.parquet",
        "out/bundle/model.safetensors",
        "checkpoints/epoch_3.pt",
        "data/sheets/Viola alba/0001.JPG",
        "data/sheets/Viola alba/0002.tiff",
        ".pytest_cache/v/cache/lastfailed",
    ]
    for name in included + dropped:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / ".rayignore").write_bytes((REPO / ".rayignore").read_bytes())

    names = package_working_dir(root, tmp_path / "package.zip", ray_defaults=False)
    for name in included:
        assert name in names
    for name in dropped:
        assert name not in names


def test_working_dir_upload_of_repository(tmp_path):
    names = package_working_dir(REPO, tmp_path / "package.zip", ray_defaults=True)
    size = (tmp_path / "package.zip").stat().st_size
    assert "jobs/prepare.py" in names
    assert "herbray/cli.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "demo-output/"))]
    # Ray 2.60 warns from 256 MiB and rejects 512 MiB; a few MiB is source code only.
    assert size < 8 * 1024 * 1024, f"working-dir package is {size / 2**20:.1f} MiB"


# A real Ray head and `ray job submit`


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with token auth, 2 CPUs and its own ports and temp dir."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("RayHead reads processes and sockets from Linux /proc")
    head = RayHead(num_cpus=2, auth="token").start()
    try:
        yield head
    finally:
        head.stop()


def make_collection(root: Path, species: list[str], per_species: int) -> int:
    """Write a folder-per-species collection of small real JPEGs; return the image count."""
    rng = np.random.default_rng(7)
    count = 0
    for name in species:
        (root / name).mkdir(parents=True)
        for index in range(per_species):
            height, width = 120 + 10 * index, 90
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"sheet-{index}.jpg", quality=90)
            count += 1
    return count


def test_job_server_requires_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as missing:
        ray_head.get("/api/jobs/", headers={})
    assert missing.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        ray_head.get("/api/jobs/", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.value.code == 403


def test_prepare_job_submission(ray_head, tmp_path):
    species = ["Viola alba", "Viola hirta", "Viola odorata"]
    collection = tmp_path / "collection"
    images = make_collection(collection, species, per_species=4)
    output = tmp_path / "prepared"

    job_id = ray_head.submit(
        [
            "python",
            "jobs/prepare.py",
            "--input",
            str(collection),
            "--output",
            str(output),
            "--short-side",
            "64",
        ],
        working_dir=REPO,
    )
    record = ray_head.wait(job_id, timeout=300)
    if record["status"] != "SUCCEEDED":
        pytest.fail(
            f"job {job_id} ended {record['status']}: {record.get('message')}\n"
            f"ray job logs:\n{ray_head.logs(job_id)}"
        )

    assert (output / "prepare.json").is_file()
    labels = json.loads((output / "labels.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in labels["classes"]] == species
    assert [c["count"] for c in labels["classes"]] == [4, 4, 4]
    shards = [pq.read_table(path) for path in sorted((output / "shards").rglob("*.parquet"))]
    rows = [row for table in shards for row in table.to_pylist()]
    assert len(rows) == images
    assert {row["scientific_name"] for row in rows} == set(species)
    for row in rows:
        with Image.open(io.BytesIO(row["image"])) as image:
            assert min(image.size) == 64
    assert pq.read_table(output / "errors.parquet").num_rows == 0
    assert f"{images} images, 0 errors" in ray_head.logs(job_id)


def test_ray_head_listens_on_loopback_only(ray_head):
    sockets = ray_head.listening_sockets()
    ports = {s.port for s in sockets}
    assert ray_head.gcs_port in ports
    assert ray_head.dashboard_port in ports
    outside = [s for s in sockets if not s.is_loopback]
    assert not outside, f"Ray servers listening beyond 127.0.0.1: {outside}"


def test_head_stop_leaves_other_ray(ray_head, ray_local):
    # Runs last: it stops the module's head, which other tests use.
    tree = ray_head.process_tree()
    assert len(tree) > 3
    ray_head.stop()
    assert [pid for pid in tree if process_alive(pid)] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ray_head.gcs_port), timeout=2).close()

    # The test session's own Ray, started by ray.init in this process, still runs tasks.
    @ray_local.remote
    def add(a, b):
        return a + b

    assert ray_local.get(add.remote(2, 3)) == 5
