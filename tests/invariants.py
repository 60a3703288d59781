"""What must hold of a files directory whatever happened to the relay, and what a process
holds, read from /proc. Shared by the fault, fuzz and soak tests (not a test module)."""

import hashlib
import json
import os
import re
from pathlib import Path

OBJECT_NAME = re.compile(r"[0-9a-f]{64}")


def verify_objects(files: Path) -> dict:
    """The storage invariant: every object file hashes to its name. Returns {oid: size}.

    Also: the top level holds nothing but objects (lower-case names) and .relay.
    """
    stored = {}
    for entry in os.scandir(files):
        if entry.name == ".relay":
            continue
        assert OBJECT_NAME.fullmatch(entry.name), f"unexpected entry in the files directory: {entry.name!r}"
        assert entry.is_file(follow_symlinks=False), f"{entry.name} is not a regular file"
        hasher = hashlib.sha256()
        size = 0
        with open(entry.path, "rb") as file:
            while block := file.read(1 << 20):
                hasher.update(block)
                size += len(block)
        assert hasher.hexdigest() == entry.name, f"{entry.name} holds content hashing to {hasher.hexdigest()}"
        stored[entry.name] = size
    return stored


def partials(files: Path) -> dict:
    """What .relay/partial holds, by kind: {"chunks": [oid], "stream": [oid], "staging":
    [.new-*], "trash": [.trash-*], "other": [...]}."""
    kinds = {"chunks": [], "stream": [], "staging": [], "trash": [], "other": []}
    directory = files / ".relay" / "partial"
    for name in sorted(os.listdir(directory)) if directory.exists() else []:
        if name.startswith(".new-"):
            kinds["staging"].append(name)
        elif name.startswith(".trash-"):
            kinds["trash"].append(name)
        elif OBJECT_NAME.fullmatch(name):
            try:
                mode = json.loads((directory / name / "info").read_bytes())["mode"]
            except (FileNotFoundError, ValueError, KeyError):
                mode = "other"
            kinds[mode if mode in ("chunks", "stream") else "other"].append(name)
        else:
            kinds["other"].append(name)
    return kinds


def orphaned_limits(files: Path) -> list:
    """Limit and download-count files (.relay/meta) whose object is gone, and limits left
    half-written there."""
    left = []
    for name in os.listdir(files / ".relay" / "meta"):
        oid = name.removesuffix(".count")
        if not (OBJECT_NAME.fullmatch(oid) and os.path.isfile(files / oid)):
            left.append(name)
    return left


def finisher_waiting(files: Path, oid: str) -> bool:
    """Whether a request holds the finisher lock of the partial upload of *oid* (it is
    verifying the completed upload, or waiting for other writers to finish first)."""
    import file_relay

    try:
        fd = os.open(files / ".relay" / "partial" / oid / "data", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return file_relay._lock_held(fd, file_relay._FINISHER)
    finally:
        os.close(fd)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def memory_kib(pid: int) -> tuple:
    """(RSS, PSS) of a process in KiB; PSS shares pages between the master and its workers."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def process_tree(pid: int) -> list:
    """*pid* and its descendants (a relay's master and its workers)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending.extend(int(child) for child in children.read().split())
        except FileNotFoundError:
            pass
    return tree


def traced_by(pid: int, tracer: int) -> bool:
    """Whether every thread of *pid* is traced by *tracer* (strace has attached to them)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as status:
            line = next(line for line in status if line.startswith("TracerPid:"))
        if int(line.split()[1]) != tracer:
            return False
    return True


def answered(outcome) -> tuple:
    """A storage outcome as the web layer answers it: (status, the Progress of an upload
    still incomplete, else None)."""
    import file_relay

    return file_relay.status_of(outcome), outcome if isinstance(outcome, file_relay.Progress) else None
