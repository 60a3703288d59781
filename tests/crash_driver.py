"""Run one storage operation in a process of its own, for tests/test_crashpoints.py.

    python tests/crash_driver.py FILES_DIRECTORY OPERATION

It builds the store over FILES_DIRECTORY (which the test has set up), prints "ready",
waits for a line on stdin (the test attaches strace in between, so that only the
operation's own system calls are counted), runs the operation and prints its result.
Everything it does is deterministic, so the N-th call of a kind is the same call in
every run. Not a test module.
"""

import hashlib
import json
import random
import sys
import time
from pathlib import Path

import file_relay

SIZE = 1 << 20
HALF = SIZE // 2
BLOCK = 256 << 10
PIPE_BUFFER = 256 << 10  # a pipe's ring: a quarter of the content, so that it wraps


def content(seed: int = 0) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(SIZE)
    return data, hashlib.sha256(data).hexdigest()


def config(files: Path) -> file_relay.RelayConfig:
    """The relay's settings, the same in the driver and in the test that checks on it."""
    return file_relay.RelayConfig(
        server_id="crash-point-driver-id", files_directory=files, ttl=7200.0, max_disk=1 << 30, pipe_buffer=PIPE_BUFFER
    )


def _blocks(data: bytes):
    for start in range(0, len(data), BLOCK):
        yield data[start : start + BLOCK]


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def put(store):
    data, oid = content()
    return store.put_stream(oid, _blocks(data), len(data), file_relay.Limits(max_downloads=2))


def put_unsized(store):
    data, oid = content()
    return store.put_stream(oid, _blocks(data), None, file_relay.Limits(ttl=3600.0))


def first_chunk(store):
    data, oid = content()
    limits = file_relay.Limits(max_downloads=2)
    return file_relay.status_of(
        store.put_chunk(oid, 0, HALF - 1, SIZE, _blocks(data[:HALF]), _digest(data[:HALF]), limits)
    )


def last_chunk(store):
    data, oid = content()
    limits = file_relay.Limits(max_downloads=2)
    return file_relay.status_of(
        store.put_chunk(oid, HALF, SIZE - 1, SIZE, _blocks(data[HALF:]), _digest(data[HALF:]), limits)
    )


def token_file(files: Path) -> Path:
    """Where the test leaves the token of the name-less upload the driver completes."""
    return files.with_name(files.name + ".token")


def put_unnamed(store):
    data, _ = content()
    named = store.put_unnamed(_blocks(data), len(data), file_relay.Limits(max_downloads=2))
    return [named.oid, named.stored.value]


def last_unnamed_chunk(store):
    data, _ = content()
    token = token_file(store.root).read_text()
    outcome = store.put_unnamed_chunk(token, HALF, SIZE - 1, SIZE, _blocks(data[HALF:]), _digest(data[HALF:]))
    return [outcome.oid, outcome.stored.value]


def delete(store):
    return store.delete(content()[1])


def download(store):
    """One counted download, read whole, as a GET does it."""
    oid = content()[1]
    reader = store.open(oid)
    store.reserve_download(reader)
    received = 0
    while block := reader.read(BLOCK):
        received += len(block)
    reader.close()  # every byte delivered: the download counts
    return received


def sweep(store):
    return store.sweep()


OPERATIONS = {
    "put": put,
    "put-unsized": put_unsized,
    "first-chunk": first_chunk,
    "last-chunk": last_chunk,
    "put-unnamed": put_unnamed,
    "last-unnamed-chunk": last_unnamed_chunk,
    "delete": delete,
    "download": download,
    "sweep": sweep,
}


def _pause(seconds: float, *, reading: bool = False) -> bool:
    """A pipe sender's pause, its body all there: read on at once, or sleep."""
    if not reading:
        time.sleep(seconds)
    return reading


def pipe(store):
    """The sending side of a pipe, to one receiver (which the test runs)."""
    data, oid = content()
    sender = store.open_pipe(oid, len(data), 1)
    try:
        body = _blocks(data)
        if not sender.wait_for_receivers(body, 30, _pause):
            return "no receiver"
        outcome = sender.send(body, len(data), _pause)
        return [outcome.delivered, outcome.receivers]
    finally:
        sender.close()


PIPE_OPERATIONS = {"pipe": pipe}  # need a receiver: tests/test_pipe_crashpoints.py


def main() -> None:
    files, operation = Path(sys.argv[1]), sys.argv[2]
    store = file_relay.Store(config(files))
    store.prepare()
    print("ready", flush=True)
    sys.stdin.readline()
    result = {**OPERATIONS, **PIPE_OPERATIONS}[operation](store)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
