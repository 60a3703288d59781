"""Run one S3 storage operation in a process of its own, for tests/test_s3_crashpoints.py.

    python tests/s3_crash_driver.py ENDPOINT STORAGE_URL OPERATION

It builds an S3Store over STORAGE_URL at ENDPOINT (the AWS credentials come from the
environment), prints "ready", waits for a line on stdin (the test attaches strace in
between, so that only the operation's own calls are counted), runs the operation and
prints its result. Not a test module.
"""

import hashlib
import random
import sys

import file_relay

SIZE = 10 << 20  # two parts of a multipart upload
HALF = SIZE // 2
BLOCK = 256 << 10
OPERATIONS = ("put", "put-small", "last-chunk", "download", "delete")


def content(seed: int = 0, size: int = SIZE) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def config(endpoint: str, storage: str) -> file_relay.RelayConfig:
    return file_relay.RelayConfig(server_id="s3-crash-point-driver", storage=storage, s3_endpoint=endpoint)


def blocks(data: bytes):
    for start in range(0, len(data), BLOCK):
        yield data[start : start + BLOCK]


def run(store: file_relay.S3Store, operation: str):
    data, oid = content()
    limits = file_relay.Limits(max_downloads=2)
    if operation == "put":
        return store.put_stream(oid, blocks(data), len(data), limits)
    if operation == "put-small":
        small, small_oid = content(5, 100_000)
        return store.put_stream(small_oid, blocks(small), len(small), limits)
    if operation == "last-chunk":
        return file_relay.status_of(store.put_chunk(oid, HALF, SIZE - 1, SIZE, blocks(data[HALF:]), None, limits))
    if operation == "download":
        reader = store.open(oid)
        try:
            store.reserve_download(reader)
            while reader.read(1 << 20):
                pass
        finally:
            reader.close()
        return reader.finished
    if operation == "delete":
        return store.delete(oid)
    raise SystemExit(f"unknown operation {operation!r}")


def main() -> None:
    endpoint, storage, operation = sys.argv[1:4]
    store = file_relay.S3Store(config(endpoint, storage))
    store.lookup("0" * 64)  # the client's set-up and first connection are not the operation's
    print("ready", flush=True)
    sys.stdin.readline()
    print(run(store, operation), flush=True)


if __name__ == "__main__":
    main()
