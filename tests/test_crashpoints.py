"""Every crash point: each storage operation killed at each of its file-system calls.

For each operation (plain PUT, PUT of unknown length, a first chunk, the completing
chunk, a name-less PUT, the completing chunk of a name-less upload, DELETE, a counted
download, the sweep), tests/crash_driver.py runs it once under
strace to list its file-system calls, then once per call with the process killed by
SIGKILL on entering exactly that call (`-e inject=SYSCALL:signal=SIGKILL:when=N`). After
each kill the relay restarts (a fresh store and its startup sweep) and must hold:

- every hash-named file hashes to its name;
- everything acknowledged before the operation is intact, with its limits;
- the operation, retried, succeeds, and leaves the object with the limits asked for;
- nothing is left over that the sweeper does not remove.

In CI a sample of the crash points runs (every call that renames, links, unlinks,
syncs, creates or removes a directory or sets a time, and a spread of the opens and
writes); RELAY_CRASH_POINTS=all runs every one.
"""

import hashlib
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_until
from invariants import orphaned_limits, partials, traced_by, verify_objects

import file_relay

sys.path.insert(0, str(Path(__file__).parent))
import crash_driver

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian's strace package)")

FILE_SYSTEM_CALLS = [
    "open",
    "openat",
    "creat",
    "write",
    "pwrite64",
    "writev",
    "fsync",
    "fdatasync",
    "link",
    "linkat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "ftruncate",
    "utimensat",
]
ALWAYS_TRIED = {"fsync", "fdatasync", "link", "linkat", "rename", "renameat", "renameat2", "unlink", "unlinkat"}
ALWAYS_TRIED |= {"mkdir", "mkdirat", "rmdir", "ftruncate", "utimensat"}
SAMPLED_OTHERS = 6  # opens and writes tried per operation in the sampled run

DATA, OID = crash_driver.content(0)
BYSTANDER, BYSTANDER_OID = crash_driver.content(1)  # stored before, with limits: must stay intact
OTHER, OTHER_OID = crash_driver.content(2)  # a partial upload of another object


def store_of(files: Path) -> file_relay.Store:
    store = file_relay.Store(crash_driver.config(files))
    store.prepare()
    return store


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def download_whole(store: file_relay.Store, oid: str) -> bool:
    """One counted download through the storage layer; False if there is none to have."""
    reader = store.open(oid)
    if reader is None:
        return False
    try:
        ticket = store.reserve_download(reader)
        if ticket is not None:
            ticket.complete()
        return True
    except file_relay.StorageError:
        return False
    finally:
        reader.close()


# -- what each operation starts from, and what must hold after a crash in it ------------


def set_up(files: Path, operation: str) -> None:
    store = store_of(files)
    assert store.put_stream(BYSTANDER_OID, [BYSTANDER], len(BYSTANDER), file_relay.Limits(max_downloads=3))
    half = crash_driver.HALF
    store.put_chunk(OTHER_OID, 0, half - 1, len(OTHER), [OTHER[:half]], None, file_relay.Limits())
    if operation == "last-chunk":
        assert (
            file_relay.status_of(
                store.put_chunk(OID, 0, half - 1, len(DATA), [DATA[:half]], None, file_relay.Limits(max_downloads=2))
            )
            == 202
        )
    if operation in ("delete", "download"):
        assert store.put_stream(OID, [DATA], len(DATA), file_relay.Limits(max_downloads=2))
    if operation == "last-unnamed-chunk":
        token = store.start_unnamed(len(DATA), file_relay.Limits(max_downloads=2), "data.bin")
        progress = store.put_unnamed_chunk(token, 0, half - 1, len(DATA), [DATA[:half]], None)
        assert file_relay.status_of(progress) == 202
        crash_driver.token_file(files).write_text(token)
    if operation == "sweep":
        assert store.put_stream(OID, [DATA], len(DATA), file_relay.Limits())
        age(files / OID, 3 * 3600)  # expired (the relay's --ttl is 2 hours)
        spent, spent_oid = crash_driver.content(3)
        assert store.put_stream(spent_oid, [spent], len(spent), file_relay.Limits(max_downloads=1))
        (files / ".relay" / "meta" / f"{spent_oid}.count").write_bytes(b".")  # its download, counted
        age(files / ".relay" / "partial" / OTHER_OID, 0)
        stale, stale_oid = crash_driver.content(4)
        store.put_chunk(stale_oid, 0, 99, len(stale), [stale[:100]], None, file_relay.Limits())
        for path in (files / ".relay" / "partial" / stale_oid).iterdir():
            age(path, 3 * 86400)
        age(files / ".relay" / "partial" / stale_oid, 3 * 86400)
        # What a crash right after publishing the bystander left: its partial, linked.
        leftover = files / ".relay" / "partial" / BYSTANDER_OID
        leftover.mkdir()
        os.link(files / BYSTANDER_OID, leftover / "data")
        (leftover / "info").write_text('{"mode": "stream", "length": 1048576, "created": 0}')
        (files / ".relay" / "partial" / ".trash-0123456789abcdef").mkdir()


def check_recovered(files: Path, operation: str, where: str) -> None:
    """Restart (a fresh store, its startup sweep), then check and retry the operation."""
    store = store_of(files)
    store.sweep()
    stored = verify_objects(files)
    assert stored.get(BYSTANDER_OID) == len(BYSTANDER), f"{where}: the bystander is gone"
    assert store.lookup(BYSTANDER_OID).remaining_downloads == 3, f"{where}: the bystander lost its limits"
    half = crash_driver.HALF
    limits = file_relay.Limits(max_downloads=2)
    if operation in ("put", "put-unsized"):
        asked = limits if operation == "put" else file_relay.Limits(ttl=3600.0)
        assert store.put_stream(OID, [DATA], None if operation == "put-unsized" else len(DATA), asked) in (True, False)
        obj = store.lookup(OID)
        if operation == "put":
            assert obj.max_downloads == 2 and obj.downloads == 0, f"{where}: limits {obj}"
        else:
            assert obj.expires_at - obj.stored_at == 3600.0, f"{where}: expiry {obj}"
    elif operation in ("first-chunk", "last-chunk"):
        progress = store.progress(OID)
        if operation == "last-chunk" and OID not in stored:
            first, last = progress.ranges[0] if progress and progress.ranges else (None, -1)
            assert first == 0 and last >= half - 1, f"{where}: the acknowledged chunk is lost: {progress}"
        if operation == "first-chunk":
            assert (
                file_relay.status_of(store.put_chunk(OID, 0, half - 1, len(DATA), [DATA[:half]], None, limits)) == 202
            )
        status = file_relay.status_of(store.put_chunk(OID, half, len(DATA) - 1, len(DATA), [DATA[half:]], None, limits))
        assert status in (200, 201), f"{where}: the retried last chunk got {status}"
        assert store.lookup(OID).max_downloads == 2, f"{where}: limits {store.lookup(OID)}"
    elif operation == "put-unnamed":
        named = store.put_unnamed([DATA], len(DATA), limits)
        assert named.oid == OID and store.lookup(OID).max_downloads == 2, f"{where}: {named}, {store.lookup(OID)}"
    elif operation == "last-unnamed-chunk":
        token = crash_driver.token_file(files).read_text()
        state = store.unnamed_progress(token)
        if OID in stored:  # completed before the kill: the sender must be able to learn its name
            named = isinstance(state, file_relay.Named) and state.oid == OID
            whole = isinstance(state, file_relay.Progress) and state.ranges == [(0, len(DATA) - 1)]
            assert named or whole, f"{where}: the upload says {state}"  # whole: any chunk again names it
        else:
            kept = state is not None and any(first == 0 and last >= half - 1 for first, last in state.ranges)
            assert kept, f"{where}: the acknowledged chunk is lost: {state}"
        named = store.put_unnamed_chunk(token, half, len(DATA) - 1, len(DATA), [DATA[half:]], None)
        assert named.oid == OID and store.unnamed_progress(token).oid == OID, f"{where}: {named}"
        assert store.lookup(OID).max_downloads == 2, f"{where}: limits {store.lookup(OID)}"
    elif operation == "delete":
        store.delete(OID)
        assert store.lookup(OID) is None and store.progress(OID) is None
    elif operation == "download":
        obj = store.lookup(OID)
        assert obj is not None and obj.remaining_downloads in (1, 2), f"{where}: {obj}"
        for _ in range(obj.remaining_downloads):
            assert download_whole(store, OID), f"{where}: a download allowed was refused"
        assert not download_whole(store, OID), f"{where}: more downloads than allowed"
    elif operation == "sweep":
        assert OID not in stored, f"{where}: the expired object survived"
        assert store.lookup(BYSTANDER_OID).remaining_downloads == 3
    if operation != "sweep":
        progress = store.progress(OTHER_OID)
        assert progress is not None and progress.ranges == [(0, half - 1)], f"{where}: the other upload: {progress}"
    store.sweep()
    assert verify_objects(files).get(BYSTANDER_OID) == len(BYSTANDER)
    left = partials(files)
    assert not (left["stream"] or left["trash"] or left["other"]), f"{where}: left over {left}"
    assert orphaned_limits(files) == [], f"{where}: orphaned limits {orphaned_limits(files)}"


# -- running the driver under strace -------------------------------------------------------


def run_driver(
    files: Path, operation: str, log: Path, kill_at: tuple[str, int] | None = None, calls=FILE_SYSTEM_CALLS
) -> int:
    """Run *operation* under strace (killed at the given call, if any); its exit status."""
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "crash_driver.py"), str(files), operation],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    tracer = None
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 30)
        assert ready and driver.stdout.readline() == b"ready\n", "the driver did not start"
        command = [STRACE, "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(f"?{c}" for c in calls)]
        if kill_at is not None:
            command += ["-e", f"inject={kill_at[0]}:signal=SIGKILL:when={kill_at[1]}"]
        tracer = subprocess.Popen([*command, "-p", str(driver.pid)], stderr=subprocess.DEVNULL)
        wait_until(lambda: traced_by(driver.pid, tracer.pid), timeout=20, message="strace to attach")
        driver.stdin.write(b"go\n")
        driver.stdin.flush()
        return driver.wait(60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if tracer is not None:
            tracer.wait(20)


def calls_of(log: Path, pid_of_main_thread: int | None = None) -> list[tuple[str, int]]:
    """The file-system calls the main thread made, in order, as (syscall, its number)."""
    seen: dict = {}
    calls = []
    main = None
    for line in log.read_text().splitlines():
        pid, _, rest = line.partition(" ")
        name = rest.lstrip().partition("(")[0]
        if not name or not name.replace("_", "").isalnum():
            continue  # "<... resumed>", "+++ exited +++"
        main = main or pid
        if pid != main:
            continue
        seen[name] = seen.get(name, 0) + 1
        calls.append((name, seen[name]))
    return calls


def sample(calls: list[tuple[str, int]]) -> list[tuple[str, int]]:
    if os.environ.get("RELAY_CRASH_POINTS") == "all":
        return calls
    chosen = [call for call in calls if call[0] in ALWAYS_TRIED]
    others = [call for call in calls if call[0] not in ALWAYS_TRIED]
    step = max(1, len(others) // SAMPLED_OTHERS)
    return sorted(set(chosen + others[::step]), key=calls.index)


@pytest.mark.parametrize("operation", list(crash_driver.OPERATIONS))
def test_every_crash_point_leaves_the_invariant_and_everything_acknowledged(tmp_path, operation):
    record_files = tmp_path / "record"
    set_up(record_files, operation)
    assert run_driver(record_files, operation, tmp_path / "record.log") == 0
    calls = calls_of(tmp_path / "record.log")
    assert len(calls) >= 3, calls  # the driver was traced
    check_recovered(record_files, operation, "without a crash")
    tried = sample(calls)
    for number, (syscall, nth) in enumerate(tried):
        files = tmp_path / f"crash{number}"
        set_up(files, operation)
        status = run_driver(files, operation, tmp_path / f"crash{number}.log", kill_at=(syscall, nth))
        where = f"killed at {syscall} #{nth} ({calls.index((syscall, nth)) + 1} of {len(calls)} calls)"
        assert status == -9, f"{where}: the driver was not killed there (exit {status})"
        check_recovered(files, operation, where)
        shutil.rmtree(files)
    print(f"{operation}: {len(tried)} of {len(calls)} crash points tried")


@pytest.mark.parametrize("operation", ["put", "last-chunk", "download"])
def test_a_request_does_the_same_work_with_thousands_of_objects_stored(tmp_path, operation):
    """Work per request must not grow with the store: the same system calls, in number
    and kind, whether 2 or 2,000 objects are stored (with --max-disk in force)."""
    looks = [*FILE_SYSTEM_CALLS, "getdents64", "newfstatat", "statx", "stat", "lstat", "fstat", "read", "pread64"]
    counted = {}
    for stored in (0, 2000):
        files = tmp_path / f"stored{stored}"
        set_up(files, operation)
        for _ in range(stored):
            small = os.urandom(16)
            (files / hashlib.sha256(small).hexdigest()).write_bytes(small)
        store_of(files).sweep()  # counted in the ledger
        assert run_driver(files, operation, tmp_path / f"{stored}.log", calls=looks) == 0
        calls = calls_of(tmp_path / f"{stored}.log")
        counted[stored] = sorted({name: sum(1 for call, _ in calls if call == name) for name, _ in calls}.items())
    assert counted[0] == counted[2000]
