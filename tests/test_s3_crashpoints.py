"""Crash points on S3: each S3 storage operation (a whole PUT in parts, a small PUT, the
chunk that completes an upload in chunks, a counted download, DELETE) killed at each of
the network sends it makes (`strace -e inject=sendto:signal=SIGKILL:when=N`, counted in
the operation's main thread; a part's thread making its own N-th send may die first:
then that is the crash point). After each kill a fresh store on the same bucket must
hold:

- every object in the bucket hashes to its name;
- what was stored before is intact, with its limits;
- an acknowledged chunk is still there (or the object it completed);
- the operation, retried, succeeds, with the limits asked for; a counted download never
  allows more downloads than the budget.

In CI a sample of the points runs; RELAY_CRASH_POINTS=all runs every one.
"""

import hashlib
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_until
from invariants import traced_by

import file_relay

sys.path.insert(0, os.path.dirname(__file__))
import s3_crash_driver as driver
from seaweed import stored_content

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian's strace package)")
SAMPLED = 8  # crash points tried per operation in the sampled run

DATA, OID = driver.content(0)
SMALL, SMALL_OID = driver.content(5, 100_000)
BYSTANDER, BYSTANDER_OID = driver.content(1, 300_000)


def store_of(seaweed, storage: str) -> file_relay.S3Store:
    return file_relay.S3Store(driver.config(seaweed.endpoint, storage))


def set_up(seaweed, storage: str, operation: str) -> None:
    store = store_of(seaweed, storage)
    assert store.put_stream(BYSTANDER_OID, [BYSTANDER], len(BYSTANDER), file_relay.Limits(max_downloads=3))
    limits = file_relay.Limits(max_downloads=2)
    if operation == "last-chunk":
        half = driver.HALF
        assert file_relay.status_of(store.put_chunk(OID, 0, half - 1, len(DATA), [DATA[:half]], None, limits)) == 202
    if operation in ("download", "delete"):
        assert store.put_stream(OID, [DATA], len(DATA), limits)


def verify_objects(seaweed, storage: str) -> dict:
    """{name: size} of every object under the prefix, each checked to hash to its name."""
    bucket, prefix = file_relay.parse_storage_url(storage)
    client = seaweed.client()
    found = {}
    for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}objects/").get("Contents", ()):
        name = item["Key"].rsplit("/", 1)[-1]
        body = stored_content(client, bucket, prefix, item["Key"])
        assert hashlib.sha256(body).hexdigest() == name, f"{item['Key']} does not hash to its name"
        found[name] = len(body)
    return found


def downloads_allowed(store: file_relay.S3Store, oid: str) -> int:
    """Whole counted downloads the store lets through now, one after another."""
    allowed = 0
    while True:
        reader = store.open(oid)
        if reader is None:
            return allowed
        try:
            store.reserve_download(reader)
            while reader.read(1 << 20):
                pass
            allowed += 1
        except (file_relay.NotFound, file_relay.Busy):
            return allowed
        finally:
            reader.close()


def check_recovered(seaweed, storage: str, operation: str, where: str) -> None:
    store = store_of(seaweed, storage)
    stored = verify_objects(seaweed, storage)
    assert stored.get(BYSTANDER_OID) == len(BYSTANDER), f"{where}: the bystander is gone"
    assert store.lookup(BYSTANDER_OID).remaining_downloads == 3, f"{where}: the bystander lost its limits"
    limits = file_relay.Limits(max_downloads=2)
    if operation == "put":
        assert store.put_stream(OID, [DATA], len(DATA), limits) in (True, False)
        assert store.lookup(OID).max_downloads == 2, f"{where}: {store.lookup(OID)}"
    elif operation == "put-small":
        assert store.put_stream(SMALL_OID, [SMALL], len(SMALL), limits) in (True, False)
        assert store.lookup(SMALL_OID).max_downloads == 2, f"{where}: {store.lookup(SMALL_OID)}"
    elif operation == "last-chunk":
        half = driver.HALF
        if OID not in stored:
            progress = store.progress(OID)
            kept = progress is not None and any(a == 0 and b >= half - 1 for a, b in progress.ranges)
            assert kept, f"{where}: the acknowledged chunk is lost: {progress}"
        status = file_relay.status_of(store.put_chunk(OID, half, len(DATA) - 1, len(DATA), [DATA[half:]], None, limits))
        assert status in (200, 201), f"{where}: the retried last chunk got {status}"
        assert store.lookup(OID).max_downloads == 2, f"{where}: {store.lookup(OID)}"
        if store.progress(OID) is not None:  # killed once the object was stored, before its chunks went
            store.sweep(now=time.time() + store.config.partial_ttl + 60)
        assert store.progress(OID) is None, f"{where}: segments left: {store.progress(OID)}"
    elif operation == "download":
        obj = store.lookup(OID)
        assert obj is None or obj.remaining_downloads in (0, 1, 2), f"{where}: {obj}"
        done = 2 - (obj.remaining_downloads if obj else 0)
        assert done + downloads_allowed(store, OID) <= 2, f"{where}: more downloads than allowed"
    elif operation == "delete":
        store.delete(OID)
        assert store.lookup(OID) is None
    assert verify_objects(seaweed, storage).get(BYSTANDER_OID) == len(BYSTANDER)


def run_driver(seaweed, storage: str, operation: str, log, kill_at: int | None = None) -> int:
    env = {**os.environ, **seaweed.env, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "s3_crash_driver.py"), seaweed.endpoint, storage, operation],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    tracer = None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready and process.stdout.readline() == b"ready\n", "the driver did not start"
        command = [STRACE, "-f", "-qq", "-o", str(log), "-e", "trace=sendto"]
        if kill_at is not None:
            command += ["-e", f"inject=sendto:signal=SIGKILL:when={kill_at}"]
        tracer = subprocess.Popen([*command, "-p", str(process.pid)], stderr=subprocess.DEVNULL)
        wait_until(lambda: traced_by(process.pid, tracer.pid), timeout=20, message="strace to attach")
        process.stdin.write(b"go\n")
        process.stdin.flush()
        return process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if tracer is not None:
            tracer.wait(20)


def sends_of(log, pid: int) -> int:
    """The sends the operation's main thread made."""
    return sum(1 for line in log.read_text().splitlines() if line.startswith(f"{pid} ") and " sendto(" in f" {line}")


def sample(count: int) -> list[int]:
    if os.environ.get("RELAY_CRASH_POINTS") == "all":
        return list(range(1, count + 1))
    step = max(1, count // SAMPLED)
    return sorted({*range(1, count + 1, step), count})


@pytest.mark.parametrize("operation", driver.OPERATIONS)
def test_every_send_of_an_s3_operation_is_a_safe_place_to_die(seaweed, s3_env, s3_storage_url, tmp_path, operation):
    record = f"{s3_storage_url}/record"
    set_up(seaweed, record, operation)
    log = tmp_path / "record.log"
    assert run_driver(seaweed, record, operation, log) == 0
    main = int(log.read_text().split(" ", 1)[0])
    count = sends_of(log, main)
    assert count >= 1, log.read_text()[:2000]
    check_recovered(seaweed, record, operation, "without a crash")
    tried = sample(count)
    for nth in tried:
        storage = f"{s3_storage_url}/crash{nth}"
        set_up(seaweed, storage, operation)
        status = run_driver(seaweed, storage, operation, tmp_path / f"crash{nth}.log", kill_at=nth)
        where = f"killed at send #{nth} of {count}"
        assert status == -9, f"{where}: the driver was not killed there (exit {status})"
        check_recovered(seaweed, storage, operation, where)
    print(f"{operation}: {len(tried)} of {count} crash points tried")
