"""Every crash point of a pipe's sender: tests/crash_driver.py sends a pipe (its ring a
quarter of the content, so that it wraps) to a receiver in this process, killed by
SIGKILL at each of its file-system calls in turn, as tests/test_crashpoints.py does for
stored uploads. After each kill:

- the receiver either got every byte, exactly, after the content verified, or was cut
  off (UploadFailed): never a body of the full length that is wrong, never an early end;
- nothing is stored, and once the relay restarts (a fresh store, its sweep) nothing of
  the pipe is left;
- the pipe, sent again, goes through.
"""

import threading
import time

import crash_driver
import pytest
from invariants import verify_objects
from test_crashpoints import FILE_SYSTEM_CALLS, STRACE, calls_of, run_driver

import file_relay

pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian's strace package)")

DATA, OID = crash_driver.content(0)
CALLS = [*FILE_SYSTEM_CALLS, "fallocate", "fcntl"]  # fcntl: the locks taken while bytes pass
SAMPLED_LOCKS = 8  # of those, tried at a spread of points


def store_of(files) -> file_relay.Store:
    store = file_relay.Store(crash_driver.config(files))
    store.prepare()
    return store


class PipeReceiver(threading.Thread):
    """Joins the pipe of OID as soon as there is one (until told to stop looking), and
    reads it to its end: .outcome is "complete" (and .data what it got) or "cut"."""

    def __init__(self, store: file_relay.Store):
        super().__init__(daemon=True)
        self.store = store
        self.stop_looking = threading.Event()
        self.outcome = None
        self.data = bytearray()

    def run(self) -> None:
        reader = None
        while reader is None:
            reader = self.store.join_pipe(OID)
            if reader is None and self.stop_looking.wait(0.005):
                return
        try:
            while block := reader.read():
                self.data += block
            self.outcome = "complete"
        except file_relay.UploadFailed:
            self.outcome = "cut"
        finally:
            reader.close()


def check(files, receiver: PipeReceiver, where: str) -> None:
    assert not receiver.is_alive(), f"{where}: the receiver hangs"
    if receiver.outcome == "complete":
        assert bytes(receiver.data) == DATA, f"{where}: a complete-looking wrong body"
    else:
        assert receiver.outcome in (None, "cut"), f"{where}: {receiver.outcome}"
        assert len(receiver.data) < len(DATA), f"{where}: the whole length, yet cut off"
    assert verify_objects(files) == {}, f"{where}: something was stored"
    store = store_of(files)
    store.sweep()
    left = sorted(path.name for path in (files / ".relay" / "pipes").iterdir())
    assert all(name.startswith(".new-") for name in left), f"{where}: left over {left}"
    store.sweep(time.time() + 120)  # one being created is given a minute
    left = sorted(path.name for path in (files / ".relay" / "pipes").iterdir())
    assert left == [], f"{where}: left over {left}"
    assert list((files / ".relay" / "partial").iterdir()) == [], f"{where}: a partial upload"
    # sent again, it goes through
    again = PipeReceiver(store)
    again.start()
    sender = store.open_pipe(OID, len(DATA), 1)
    try:
        body = iter([DATA])
        assert sender.wait_for_receivers(body, 10, lambda seconds, reading=False: again.join(seconds))
        outcome = sender.send(body, len(DATA), again.join)
    finally:
        sender.close()
    again.join(10)
    assert outcome.delivered == 1 and bytes(again.data) == DATA, f"{where}: sent again, {outcome}"
    assert list((files / ".relay" / "pipes").iterdir()) == []


def run_with_receiver(files, log, kill_at=None) -> tuple[int, PipeReceiver]:
    store_of(files)
    receiver = PipeReceiver(store_of(files))
    receiver.start()
    try:
        status = run_driver(files, "pipe", log, kill_at=kill_at, calls=CALLS)
    finally:
        receiver.stop_looking.set()
    receiver.join(30)
    return status, receiver


def test_every_crash_point_of_a_pipe_cuts_its_receiver_or_delivers_it_verified(tmp_path):
    status, receiver = run_with_receiver(tmp_path / "record", tmp_path / "record.log")
    assert status == 0 and receiver.outcome == "complete"
    check(tmp_path / "record", receiver, "without a crash")
    traced = calls_of(tmp_path / "record.log")
    assert len(traced) >= 3, traced  # the driver was traced
    # How many locks a run takes depends on how often the sender waited for the receiver:
    # the spread is drawn from the first two thirds, which every run reaches.
    locks = [call for call in traced if call[0] == "fcntl"]
    locks = locks[: max(1, len(locks) * 2 // 3)]
    spread = set(locks[:: max(1, len(locks) // SAMPLED_LOCKS)])
    calls = [call for call in traced if call[0] != "fcntl" or call in spread]
    outcomes = set()
    for number, (syscall, nth) in enumerate(calls):
        files = tmp_path / f"crash{number}"
        status, receiver = run_with_receiver(files, tmp_path / f"crash{number}.log", kill_at=(syscall, nth))
        where = f"killed at {syscall} #{nth} ({number + 1} of {len(calls)} calls)"
        if status == 0 and syscall == "fcntl":  # this run took fewer locks: no crash, check it all the same
            assert receiver.outcome == "complete", f"{where}: {receiver.outcome}"
        else:
            assert status == -9, f"{where}: the driver was not killed there (exit {status})"
        check(files, receiver, where)
        outcomes.add(receiver.outcome)
    assert "cut" in outcomes  # some kills came while bytes were passing
    print(f"pipe: {len(calls)} of {len(traced)} crash points tried: {calls}")
