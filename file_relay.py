#!/usr/bin/env python3
"""file-relay: an ad-hoc HTTP relay for machines that cannot reach each other.

Start a relay on a host both machines can reach, then move files with plain curl:

    PUT    /<server_id>/<sha256>   upload; stored only if the content hashes to the name
    PUT    /<server_id>/<sha256>?pipe   pass it to the GETs of the name, verified, never stored
    GET    /<server_id>/<sha256>   download (also HEAD and Range); follows an upload in progress
    DELETE /<server_id>/<sha256>   remove a file (or cancel its partial upload)
    GET    /<server_id>            status (JSON, or Prometheus text)
    DELETE /<server_id>            drain, then shut the relay down

SECURITY WARNING: the server ID is a bearer secret carried in every URL. Anyone who knows
it and a file's SHA-256 can fetch that file; anyone who knows it can upload, delete and
shut the relay down. Generate it (the default), serve over TLS on public networks, and
keep it out of shell history and process listings (RELAY_SERVER_ID). The relay never
logs it. The relay is a transient, single-purpose transfer point: it is not a file
server, has no users or listings, and stores nothing but content-addressed blobs.

Storage invariant: a file under a hash name always holds exactly the content with that
hash. Uploads are written under a private directory, hashed as they arrive, fsynced, and
only then hard-linked to their public name, which is never overwritten. Everything that
matters lives on the filesystem and is coordinated with open-file-description locks, so
several workers (and several relays on one directory) behave like one. On an object store
(--storage s3://BUCKET/PREFIX) the same holds through create-only writes (If-None-Match: *)
made only once the content verified, and compare-and-swap (If-Match) on download counts,
so relays on any number of hosts can share one bucket.

Architecture: bannered sections, each using only those above it. Constants and helpers;
storage: the Storage protocol, the one seam (readers, named refusals such as NotFound or
Busy, outcomes such as Stored.CREATED), and Store, its backend over a local directory,
with its pipes (the Pipes capability: a bounded ring in a file the workers map, passed
from a sender to its receivers and never stored); S3Store, its backend over an S3 bucket
(boto3, imported only there); the counters shared by the workers; every use of
gunicorn's and Bottle's internals; the web application: RelayHandler's routes over any
Storage, whose refusals one table (_REFUSALS) maps to HTTP statuses; logging; the server
(gunicorn embedded, a draining master); then the client and the command line, which
reach a relay only over HTTP.
Storage knows nothing of HTTP, the web layer nothing of files, descriptors or paths.

The relay runs on Linux (it relies on open-file-description locks). The built-in client
(`file_relay.py send` / `get`) needs only the Python standard library.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import enum
import errno
import fcntl
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import mmap
import os
import queue
import random
import re
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import typing
import unicodedata
import urllib.parse
from pathlib import Path

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

__version__ = "1.0.0"

BLOCK_SIZE = 128 << 10  # unit of body reads, file writes and streamed reads
OBJECT_ID_RE = re.compile(r"[0-9a-fA-F]{64}")
LONGEST_TTL = 100 * 366 * 86400.0  # seconds: no object outlives a century (HTTP dates end at 9999)
WEAK_SERVER_ID_LENGTH = 16  # shorter given IDs get a warning: they can be guessed
SERVER_ID_RE = re.compile(r"[A-Za-z0-9._~-]+")  # URL-safe, needs no escaping
CLIENT_COMMANDS = ("send", "get")  # reserved first words of the command line


# ---------------------------------------------------------------------------
# Small helpers: sizes, durations, HTTP field values
# ---------------------------------------------------------------------------

log = logging.getLogger("file_relay")  # both configured by configure_logging (Logging)
access_log = logging.getLogger("file_relay.access")


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Parse '512', '100M', '1.5G', '2TiB' (binary units) into bytes."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G or T suffix)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.upper()])


def typed_size(size: int) -> str:
    """A byte count as one would type it: '16M', '1G', '1536' (the largest exact unit)."""
    for unit in "PTGMK":
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def format_size(size: float) -> str:
    """Render a byte count for people: '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def sha256_field(digest: bytes) -> str:
    """An RFC 9530 Repr-Digest / Content-Digest value for a SHA-256 digest."""
    return "sha-256=:" + base64.b64encode(digest).decode("ascii") + ":"


def parse_digest_field(value: str) -> bytes | None:
    """The SHA-256 digest named in a Content-Digest field, or None if it names none.

    Raises ValueError when the sha-256 member is present but malformed.
    """
    members = [member.strip().partition("=") for member in value.split(",")]
    members = [rest for name, _, rest in members if name.strip().lower() == "sha-256"]
    if len(members) > 1:
        raise ValueError("more than one sha-256 digest")
    for rest in members:
        rest = rest.strip()
        if len(rest) < 2 or rest[0] != ":" or rest[-1] != ":":
            raise ValueError("sha-256 digest must be a byte sequence (:base64:)")
        try:
            digest = base64.b64decode(rest[1:-1], validate=True)
        except ValueError:
            raise ValueError("sha-256 digest is not valid base64") from None
        if len(digest) != 32:
            raise ValueError("sha-256 digest must be 32 bytes")
        return digest
    return None


def parse_object_id(text: str) -> str | None:
    """The canonical (lowercase) object ID, or None when *text* is not 64 hex digits."""
    return text.lower() if OBJECT_ID_RE.fullmatch(text) else None


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Merge inclusive byte ranges into sorted, disjoint, non-adjacent ones."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def format_ranges(ranges) -> str:
    return ", ".join(f"{first}-{last}" for first, last in ranges)


def contiguous_prefix(ranges) -> int:
    """How many bytes from offset 0 the (merged) ranges cover without a gap."""
    return ranges[0][1] + 1 if ranges and ranges[0][0] == 0 else 0


DOWNLOAD_NAME_LIMIT = 255  # bytes of UTF-8: the longest name most file systems take
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")  # controls, invisible formatting, line breaks
_DISPOSITION_SAFE = "!#$&+^`|"  # RFC 8187 attr-chars that urllib.parse.quote would escape


def download_name_problem(name: str) -> str | None:
    """Why *name* cannot be a downloaded file's name (a path, a control character, ...),
    or None if it can."""
    if name in ("", ".", ".."):
        return "name must be a file name, not empty, '.' or '..'"
    if "/" in name or "\\" in name:
        return "name must not hold a path: no / or \\"
    if any(unicodedata.category(char) in _UNSAFE_CATEGORIES for char in name):
        return "name must not hold control characters"
    if len(name.encode()) > DOWNLOAD_NAME_LIMIT:
        return f"name must be at most {DOWNLOAD_NAME_LIMIT} bytes of UTF-8"
    return None


def content_disposition(name: str) -> str:
    """'attachment' with *name* (RFC 6266): as filename= where it is printable ASCII with
    no quote or percent sign, else with an ASCII stand-in there and filename*= in UTF-8."""
    fallback = "".join(char if " " <= char <= "~" and char not in '"%\\' else "_" for char in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += "; filename*=UTF-8''" + urllib.parse.quote(name, safe=_DISPOSITION_SAFE)
    return value


def _write_all(fd: int, data, offset: int | None = None) -> None:
    """Write all of *data*, at *offset* or at the file position."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_trusted_proxies(text: str) -> tuple:
    """'*', or addresses and networks ('127.0.0.1,::1,10.88.0.0/16') as ip_networks."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if "*" in entries:
        return ("*",)
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


# ---------------------------------------------------------------------------
# Options: argparse types with a one-line reason (the relay's and the client's), then
# every setting of the relay declared once, and RelayConfig made from them
# ---------------------------------------------------------------------------


def _option_type(convert, what: str):
    """An argparse type: a one-line error instead of a traceback."""

    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, OSError) as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    parse.__name__ = what
    return parse


class _Parser(argparse.ArgumentParser):
    """Bad options get one line (the reason), not a screenful of usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(limit: int):
    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= limit:
            raise ValueError(f"{value} is not between 1 and {limit}")
        return value

    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a number of seconds >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise ValueError(f"{text!r} is not a number of seconds > 0")
    return value


def _positive_days(text: str) -> float:
    days = float(text)
    if not math.isfinite(days) or days <= 0:
        raise ValueError(f"{text!r} is not a positive number of days")
    return days


def _lifetime(text: str) -> float:
    value = _seconds(text)
    if value > LONGEST_TTL:
        raise ValueError(f"{text!r} is longer than a century")
    return value


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def _bind_address(text: str) -> str:
    """'HOST:PORT', ':PORT' (all interfaces), '[IPv6]:PORT' or 'HOST' (port 8080)."""
    host, port_text = text, "8080"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not HOST:PORT")
            port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{port_text!r} is not a port number (0-65535)")
    host = host or "0.0.0.0"
    return f"[{host}]:{int(port_text)}" if ":" in host else f"{host}:{int(port_text)}"


def _files_directory(text: str) -> Path:
    path = Path(text).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{path} is not writable")
    return path


def _storage_url(text: str) -> str:
    """s3://BUCKET[/PREFIX], or empty for the files directory."""
    if not text:
        return ""
    if not text.startswith("s3://"):
        raise ValueError("must be s3://BUCKET[/PREFIX]")
    bucket = text[len("s3://") :].split("/", 1)[0]
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{bucket!r} is not a bucket name")
    return text


def _endpoint_url(text: str) -> str:
    if text and not re.fullmatch(r"https?://[^/\s]+/?", text):
        raise ValueError("must be http(s)://HOST[:PORT]")
    return text.rstrip("/")


def _server_id(text: str) -> str:
    if not SERVER_ID_RE.fullmatch(text):
        raise ValueError("use only letters, digits and - . _ ~ (it goes into URLs unescaped)")
    return text


def _trusted_proxies(text: str) -> str:
    parse_trusted_proxies(text)  # raises ValueError for what is not an address or network
    return text


_ORIGIN_RE = re.compile(r"(?i)(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")


def _cors_origins(text: str) -> tuple[str, ...]:
    """A comma-separated list of origins (scheme://host[:port]), or '*'; each written as
    browsers send it (lowercase, without the scheme's default port), so that it can match."""
    origins = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        match = _ORIGIN_RE.fullmatch(part)
        if part == "*":
            origins.append(part)
            continue
        if match is None:
            raise ValueError(f"{part!r} is not an origin such as https://example.org:8443")
        scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
        default = {"http": 80, "https": 443}[scheme]
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} has no valid port")
        shown = "" if port is None or int(port) == default else f":{int(port)}"
        origins.append(f"{scheme}://{host}{shown}")
    if "*" in origins and len(origins) > 1:
        raise ValueError("'*' stands alone")
    return tuple(origins)


def _readable_file(text: str) -> str:
    with open(text, "rb"):
        pass
    return text


_ENV_TRUE, _ENV_FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env_flag(parser: argparse.ArgumentParser, env: str, value: str | None) -> bool:
    """A yes/no environment variable; anything else is refused, not taken for yes."""
    if value is None or value.strip().lower() in _ENV_FALSE:
        return False
    if value.strip().lower() in _ENV_TRUE:
        return True
    parser.error(f"{env}: {value!r} is not one of {', '.join(_ENV_TRUE)} or {', '.join(_ENV_FALSE[1:])}")


def _as_typed(value, parse) -> str | None:
    """A default as it would be typed on the command line (None: no default to show)."""
    if value is None or value is dataclasses.MISSING or isinstance(value, bool):
        return None
    if parse in (parse_size, _positive_size):
        return typed_size(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting of the relay, declared once. RelayConfig's fields and defaults, the
    command line (flags, environment fallback, validation, --help) and, checked by a
    test, the README's options table are all made from OPTIONS below."""

    name: str  # RelayConfig's field
    annotation: str  # its type
    default: object  # its value when not given (dataclasses.MISSING: it must be given)
    flags: tuple[str, ...]  # the first one names the option in argparse (its dest) and in --help
    env: str  # read when no flag is given
    help: str
    parse: object = None  # text -> value, raising ValueError or OSError with the reason
    choices: tuple[str, ...] = ()  # or a fixed list of words
    what: str = ""  # how error messages name it; default: the first flag in words
    typed: str | None = None  # the default as typed on the command line; default: derived from it
    unset: str = ""  # what the README says a default of nothing (None, off, empty) means
    secret: bool = False  # never shown in --help, not even when taken from the environment

    def __post_init__(self):
        if not self.what:
            object.__setattr__(self, "what", self.flags[0].lstrip("-").replace("-", " "))
        if self.typed is None:
            object.__setattr__(self, "typed", _as_typed(self.default, self.parse))

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    @property
    def documented_default(self) -> str:
        """The default as the README's options table gives it."""
        return self.typed or self.unset

    def add_to(self, parser: argparse.ArgumentParser, environ: typing.Mapping[str, str]) -> None:
        """Add this option to *parser*, its default taken from *environ* if set there."""
        env_value = environ.get(self.env)
        if isinstance(self.default, bool):
            keywords: dict = {"action": "store_true", "default": _env_flag(parser, self.env, env_value)}
        else:
            keywords = {"default": self.typed if env_value is None else env_value}
            if self.parse is not None:
                keywords["type"] = _option_type(self.parse, self.what)
            if self.choices:
                keywords["choices"] = list(self.choices)
        default = keywords["default"]
        shown = f"; default {default}" if default not in (None, False) and not self.secret else ""
        keywords["help"] = f"{self.help} (env {self.env}{shown})"
        parser.add_argument(*self.flags, **keywords)


OPTIONS = (
    Option(
        "server_id",
        "str",
        dataclasses.MISSING,
        ("--server-id", "--server_id"),
        "RELAY_SERVER_ID",
        "the relay's secret first path segment (default: generate one and print the URL)",
        _server_id,
        what="server ID",
        unset="generated (192 bits), printed once on stdout",
        secret=True,
    ),
    Option(
        "bind",
        "str",
        "0.0.0.0:8080",
        ("--bind", "-b"),
        "RELAY_BIND",
        "HOST:PORT to listen on; ':PORT' means all interfaces",
        _bind_address,
    ),
    Option(
        "files_directory",
        "Path",
        Path("/var/tmp/file-relay"),
        ("--files-directory",),
        "RELAY_FILES_DIRECTORY",
        "where files are stored (created if missing)",
        _files_directory,
    ),
    Option(
        "storage",
        "str",
        "",
        ("--storage",),
        "RELAY_STORAGE",
        "s3://BUCKET[/PREFIX]: keep files in an S3-compatible object store instead of --files-directory",
        _storage_url,
        unset="the files directory",
    ),
    Option(
        "s3_endpoint",
        "str",
        "",
        ("--s3-endpoint",),
        "RELAY_S3_ENDPOINT",
        "the object store's URL (default: AWS's, or the AWS configuration's)",
        _endpoint_url,
        unset="AWS's",
    ),
    Option("workers", "int", 2, ("--workers",), "RELAY_WORKERS", "worker processes", _positive_int(64)),
    Option(
        "threads",  # created as needed: a transfer, a waiting reader or a slow client holds one
        "int",
        256,
        ("--threads",),
        "RELAY_THREADS",
        "threads per worker: a transfer or a waiting reader holds one; at most half may wait",
        _positive_int(4096),
    ),
    Option(
        "max_file_size",
        "int | None",
        None,
        ("--max-file-size",),
        "RELAY_MAX_FILE_SIZE",
        "largest object accepted, e.g. 100G (default: bounded by free space)",
        parse_size,
        unset="unlimited (bounded by free space)",
    ),
    Option(
        "max_disk",
        "int | None",
        None,
        ("--max-disk",),
        "RELAY_MAX_DISK",
        "quota for stored plus in-progress objects, e.g. 500G",
        parse_size,
        unset="none",
    ),
    Option(
        "min_free", "int", 0, ("--min-free",), "RELAY_MIN_FREE", "free space to leave on the filesystem", parse_size
    ),
    Option(
        "ttl",  # counted from the upload's completion
        "float | None",
        None,
        ("--ttl",),
        "RELAY_TTL",
        "seconds a stored object lives after its upload (default: forever)",
        _lifetime,
        unset="never",
    ),
    Option(
        "max_ttl",
        "float | None",
        None,
        ("--max-ttl",),
        "RELAY_MAX_TTL",
        "longest expiry a client may ask for with Max-Days (default: --ttl)",
        _lifetime,
        unset="--ttl",
    ),
    Option(
        "partial_ttl",
        "float",
        24 * 3600.0,
        ("--partial-ttl",),
        "RELAY_PARTIAL_TTL",
        "seconds an untouched partial upload is kept",
        _seconds,
    ),
    Option(
        "pipe_buffer",
        "int",
        64 << 20,
        ("--pipe-buffer",),
        "RELAY_PIPE_BUFFER",
        "bytes a pipe (PUT ...?pipe) holds at most: its sender waits while the slowest receiver is this far behind",
        _positive_size,
    ),
    Option(
        "max_pipes",
        "int",
        8,
        ("--max-pipes",),
        "RELAY_MAX_PIPES",
        "pipes at once; a sender beyond them gets 503 with Retry-After",
        _positive_int(1024),
    ),
    Option(
        "pipe_wait",
        "float",
        300.0,
        ("--pipe-wait",),
        "RELAY_PIPE_WAIT",
        "seconds a pipe's sender waits for its receivers, unless it asks for its own ?wait=",
        _seconds,
    ),
    Option(
        "get_wait_timeout",  # unless the GET asks for its own wait
        "float",
        5.0,
        ("--get-wait-timeout",),
        "RELAY_GET_WAIT_TIMEOUT",
        "seconds a GET waits for an upload to start; 0: answer 404 at once",
        _seconds,
    ),
    Option(
        "max_get_wait",
        "float",
        600.0,
        ("--max-get-wait",),
        "RELAY_MAX_GET_WAIT",
        "upper bound of a request's ?wait=SECONDS",
        _seconds,
    ),
    Option(
        "idle_timeout",  # a peer silent this long is dropped; an upload stalled this long is cut
        "float",
        60.0,
        ("--idle-timeout",),
        "RELAY_IDLE_TIMEOUT",
        "seconds a silent client is kept; also cuts followers of a stalled upload",
        _positive_seconds,
    ),
    Option(
        "worker_timeout",
        "int",
        30,
        ("--worker-timeout",),
        "RELAY_WORKER_TIMEOUT",
        "seconds before the master restarts an unresponsive worker (transfers may last longer)",
        _positive_int(3600),
    ),
    Option(
        "graceful_timeout",
        "float",
        30.0,
        ("--graceful-timeout",),
        "RELAY_GRACEFUL_TIMEOUT",
        "seconds a drain waits for transfers in flight",
        _seconds,
    ),
    Option(
        "sweep_interval",
        "float",
        60.0,
        ("--sweep-interval",),
        "RELAY_SWEEP_INTERVAL",
        "seconds between sweeps for expired objects and abandoned partial uploads",
        _seconds,
    ),
    Option(
        "purge_on_exit",
        "bool",
        False,
        ("--purge-on-exit",),
        "RELAY_PURGE_ON_EXIT",
        "remove every stored and partial object when the relay exits",
        unset="off",
    ),
    Option(
        "linger_time",
        "float",
        30.0,
        ("--linger-time",),
        "RELAY_LINGER_TIME",
        "seconds the body of a refused upload is read and discarded, so the client reads the refusal",
        _seconds,
    ),
    Option(
        "linger_size",
        "int",
        1 << 30,
        ("--linger-size",),
        "RELAY_LINGER_SIZE",
        "bytes of a refused upload's body read and discarded, at most",
        parse_size,
    ),
    Option(
        "cors_origins",  # "*" for any
        "tuple[str, ...]",
        (),
        ("--cors-origin",),
        "RELAY_CORS_ORIGIN",
        "origins (comma-separated, e.g. https://example.org) whose web pages may use the relay; '*': any",
        _cors_origins,
        unset="none",
    ),
    Option(
        "certfile",
        "str | None",
        None,
        ("--certfile",),
        "RELAY_CERTFILE",
        "TLS certificate (PEM): serve HTTPS",
        _readable_file,
        unset="none",
    ),
    Option(
        "keyfile",
        "str | None",
        None,
        ("--keyfile",),
        "RELAY_KEYFILE",
        "TLS private key (PEM)",
        _readable_file,
        unset="none",
    ),
    Option(
        "forwarded_allow_ips",
        "str",
        "127.0.0.1,::1",
        ("--forwarded-allow-ips",),
        "RELAY_FORWARDED_ALLOW_IPS",
        "proxies (addresses, networks) whose X-Forwarded-For names the client in access logs; '*': any",
        _trusted_proxies,
    ),
    Option(
        "log_level",
        "str",
        "info",
        ("--log-level",),
        "RELAY_LOG_LEVEL",
        "log level",
        choices=("debug", "info", "warning", "error", "critical"),
    ),
    Option(
        "log_format",
        "str",
        "text",
        ("--log-format",),
        "RELAY_LOG_FORMAT",
        "access and error log format",
        choices=("text", "json"),
    ),
)


def _declared_fields(cls):
    """Make *cls* a frozen dataclass whose fields are OPTIONS, with their defaults."""
    fields = [
        (option.name, option.annotation)
        if option.default is dataclasses.MISSING
        else (option.name, option.annotation, dataclasses.field(default=option.default))
        for option in OPTIONS
    ]
    namespace = {key: value for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")}
    return dataclasses.make_dataclass(cls.__name__, fields, namespace=namespace, frozen=True)


@_declared_fields
class RelayConfig:
    """Every setting of a relay (OPTIONS), with its default. Tests build these directly."""

    @property
    def ttl_cap(self) -> float | None:
        """The longest lifetime an object may have: --max-ttl, else --ttl."""
        return self.max_ttl if self.max_ttl is not None else self.ttl

    @property
    def waiting_reader_limit(self) -> int:
        """Readers that may wait for an upload at once, per worker: half the threads, so
        waiting never takes the threads that uploads, status and other downloads need."""
        return max(1, self.threads // 2)


# ---------------------------------------------------------------------------
# Storage
#
# <files-directory>/<sha256>                      stored, verified objects (never overwritten)
# <files-directory>/.relay/partial/<sha256>/      one attempt at uploading an object:
#     data            the bytes, each at its offset (sparse while chunks are missing)
#     info            {"mode": "stream" | "chunks", "length": N | null, "created": t,
#                      "attempt": a random token never used again, "limits": {...}}
#     range-A-B       markers of acknowledged bytes A..B (durably written), merged as they pile up
# <files-directory>/.relay/partial/.new-*, .trash-*   being created / being removed
# <files-directory>/.relay/meta/<sha256>          the stored object's limits (JSON)
# <files-directory>/.relay/meta/<sha256>.count    its completed downloads, one byte each
# <files-directory>/.relay/meta/<sha256>.new-*    its limits being written
# <files-directory>/.relay/retired/<sha256>.<token>  removed objects that another host may
#                                                 still be reading, unlinked once none is
# <files-directory>/.relay/usage                  a ledger of stored objects: count, bytes
# <files-directory>/.relay/pipes/<sha256>         a pipe in progress: its header and ring (see
#                                                 "pipes" below); .new-* being created
# <files-directory>/.relay/lock                   lock bytes, below
#
# Coordination uses open-file-description (OFD) locks, which the kernel drops when a
# process dies, so a crash never leaves a lock behind. On a partial's data file:
#   byte _WRITERS   shared by each chunk request for as long as it may write; exclusive
#                   for a plain PUT (which writes the whole object), for DELETE, for the
#                   sweeper and for the request that verifies and publishes the object:
#                   nobody writes to a data file while it becomes the object, and a partial
#                   directory changes only under this lock
#   byte _FINISHER  exclusive while one request verifies and publishes the object
#   bytes A..B      exclusive while one request writes chunk A..B
#   byte _READERS   shared by every download and follower for as long as it reads: a
#                   removed object waits in retired/ until nobody holds it. (On a shared
#                   filesystem, a descriptor open on one host fails once another host
#                   unlinks its file's last name; renaming the file does not.)
# On .relay/lock: byte 0 serialises space reservations and the ledger; for each object
# name, a mutex byte and its download slots (at offsets drawn from the hash) serialise
# what its name, limits and download count mean: publishing, removing, counting.
# Identities are the descriptors a request holds (an inode cannot be reused while open)
# and each attempt's token; never an inode number that outlives its descriptor.
# ---------------------------------------------------------------------------


class StorageError(Exception):
    """Why storage did not do what it was asked, in one line. Each kind below is a
    different answer for the client; the web layer maps kinds to statuses (_REFUSALS)."""

    def __init__(self, reason: str, *, retry_after: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after  # seconds after which trying again may succeed


class NotFound(StorageError):
    """No such object (or it expired, was used up or removed meanwhile)."""


class Busy(StorageError):
    """Another request holds what this one needs: the same request may succeed later."""

    def __init__(self, reason: str, *, retry_after: int):
        super().__init__(reason, retry_after=retry_after)


class Conflict(StorageError):
    """The request contradicts what is stored or being uploaded: sent again unchanged, it
    fails again (or, where the reason says so, it must be sent again whole)."""


class TooLarge(StorageError):
    """Larger than any object the relay may hold."""


class NoSpace(StorageError):
    """Not enough free space or quota for the upload."""


class Mismatch(StorageError):
    """The content does not match its name or its digest: it was not stored."""


class WrongLength(StorageError):
    """The body's length is not the one it was declared to have."""


class Overloaded(StorageError):
    """Too much is in progress at once: try again later."""

    def __init__(self, reason: str, *, retry_after: int):
        super().__init__(reason, retry_after=retry_after)


class Unavailable(StorageError):
    """The storage cannot be reached or failed: the same request may succeed later."""

    def __init__(self, reason: str, *, retry_after: int = 5):
        super().__init__(reason, retry_after=retry_after)


class NotSupported(StorageError):
    """What this storage backend does not do (yet): sent again, it fails again."""


class UploadFailed(Exception):
    """An upload that a reader was following failed, was aborted or stalled."""


_FLOCK = struct.Struct("hhqqi4x")  # struct flock (64-bit Linux)
_WRITERS = 1 << 62
_FINISHER = _WRITERS + 1
_READERS = _WRITERS + 2
_MAX_OBJECT_SIZE = 1 << 60  # 1 EiB: every data byte lies below the lock bytes
_SPACE = 0  # byte of .relay/lock
_DOWNLOAD_SLOTS = 256  # most concurrent counted downloads of one limited object
_OBJECT_LOCK_STRIDE = 512  # lock bytes per object name: its mutex, then its download slots
_SPACE_CHECK_INTERVAL = 64 << 20  # bytes between free-space checks of an upload of unknown size
_LOG_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # kept out of log lines, as %XX
_POLL_MIN, _POLL_MAX = 0.005, 0.1  # seconds between looks at an upload being followed
_FLUSH_INTERVAL = 0.25  # seconds between flushes of a plain upload's data as it arrives
_LOCK_PATIENCE = 10.0  # seconds a request waits for a mutex before it is told to retry
_MAX_FRAGMENTS = 512  # disjoint received ranges one chunked upload may have
_MAX_PARTIALS = 1024  # uploads in progress or resumable at once: each upload weighs them all
_MARKER_SLACK = 64  # range markers beyond the merged ranges before they are merged
_LEGACY_META_RE = re.compile(r"([0-9a-f]{64})\.([0-9]+)(\.count)?")
_LEDGER = struct.Struct("qqq")  # stored objects, their bytes, changes made
_UNNAMED_KEY = "new-"  # a partial upload the relay names: "new-" and its token
_UNNAMED_TOKEN_RE = re.compile(r"[0-9a-f]{32}")


def _unnamed_token(key: str) -> str:
    return key.removeprefix(_UNNAMED_KEY)


def _lock(fd: int, kind: int, start: int, length: int = 1, *, wait: bool = False) -> bool:
    """Take an OFD lock on bytes [start, start+length); False if another holds it."""
    command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_within(fd: int, kind: int, start: int, seconds: float) -> bool:
    """Take an OFD lock, waiting at most *seconds* for others to release it."""
    deadline = time.monotonic() + seconds
    delays = _delays(_POLL_MIN, _POLL_MAX)
    while not _lock(fd, kind, start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(next(delays))
    return True


def _lock_patiently(fd: int, start: int) -> None:
    """Take an exclusive lock of the relay's for a request, waiting _LOCK_PATIENCE at most:
    on a shared filesystem, a host that died keeps its locks until its session expires."""
    if not _lock_within(fd, fcntl.F_WRLCK, start, _LOCK_PATIENCE):
        raise Overloaded("the relay's storage is busy (a lock is held, perhaps by a host that died)", retry_after=10)


def _unlock(fd: int, start: int, length: int = 1) -> None:
    _lock(fd, fcntl.F_UNLCK, start, length)


def _lock_held(fd: int, start: int, length: int = 1) -> bool:
    """Whether another open file description holds any lock on these bytes."""
    result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    return _FLOCK.unpack(result)[0] != fcntl.F_UNLCK


def _write_file(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Create *path* holding *data* (durably, unless told it need not survive a crash)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


_NO_SURPRISES = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never through a link, never a FIFO's wait
_CREATE = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # a link planted at the name is refused, not written through


def _names_nothing_of_ours(exc: OSError) -> bool:
    """Whether opening a name failed because nothing the relay made is there: it is
    missing, or it is a link, a socket, a directory or not one (planted, never followed)."""
    return exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENXIO)


def _name_is_there(path: Path, looks: int = 3) -> bool:
    """Whether *path* names something. A name that a rename is replacing can look missing
    for a moment on some FUSE filesystems (JuiceFS), so it is missing only if it looks
    missing every time."""
    for _look in range(looks):
        try:
            os.lstat(path)
        except FileNotFoundError:
            continue
        return True
    return False


def _read_small_file(path: Path, limit: int = 64 << 10) -> bytes | None:
    """The start of a small regular file the relay keeps (limits, info, the ledger), or
    None if there is none: missing, or anything planted there (a link, a FIFO, a
    directory) is never followed, waited on or read past *limit*.

    These files are replaced by rename. Some FUSE filesystems (JuiceFS) answer ENOENT
    for a name being replaced, or for the replaced file while it is open; such a read is
    tried again while the name is there."""
    for _attempt in range(16):
        try:
            fd = os.open(path, os.O_RDONLY | _NO_SURPRISES)
        except OSError as exc:
            if exc.errno == errno.ENOENT and _name_is_there(path):
                continue
            if _names_nothing_of_ours(exc):
                return None
            raise
        try:
            return os.read(fd, limit) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except FileNotFoundError:
            if not _name_is_there(path):
                return None
        finally:
            os.close(fd)
    raise OSError(errno.ESTALE, "replaced while read, again and again", str(path))


def _is_object_name(name: str) -> bool:
    """Whether *name* is what the relay names an object (and its limits) by: a SHA-256 in
    lower-case hex. Anything else in the files directory is not an object."""
    return parse_object_id(name) == name


def _unlink_if_present(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _blocks_at(fd: int, start: int, end: int | None, size: int = BLOCK_SIZE):
    """The bytes of a file from *start* to *end* (its end if None), in blocks of at most
    *size*; fewer if the file ends sooner."""
    while end is None or start < end:
        block = os.pread(fd, size if end is None else min(size, end - start), start)
        if not block:
            return
        start += len(block)
        yield block


def _delays(first: float, most: float, factor: float = 2.0):
    """Pauses between looks at something awaited: from *first*, growing to *most*."""
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, most)


class _BackgroundHasher:
    """SHA-256 on a thread of its own, so that hashing an upload overlaps receiving and
    writing it (hashlib and write() both release the GIL). At most two blocks wait, so a
    block handed over stays untouched until hashed if its buffer is reused no sooner
    than three blocks later (the socket reader's ring of four buffers)."""

    def __init__(self, hashed=None):
        self._hash = hashed if hashed is not None else hashlib.sha256()
        self._blocks: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._hash.update(block)

    def update(self, block) -> None:
        self._blocks.put(block)

    def finish(self):
        """Wait for the blocks handed over; the hash object, complete."""
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()
        return self._hash


class _TrailingHasher:
    """SHA-256 of a file's bytes from *start* on, read back from the file on a thread of
    its own as the writer writes them: the writer never waits for the hash, which
    catches up at finish(). update(block) is called with each block about to be written
    at the next position, as for _BackgroundHasher: the blocks before it are then in the
    file. The bytes from *start* up to the first block must be in the file already."""

    def __init__(self, fd: int, start: int, first: int, hashed=None):
        self._fd = fd
        self._hash = hashed if hashed is not None else hashlib.sha256()
        self._position = start  # hashed up to here
        self._written = first  # the file holds the bytes up to here
        self._next = first  # and will up to here once the block handed over is written
        self._finished = False
        self._short = False  # the file ended (or failed to read) before a written byte
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256-trailing", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._position >= self._written and not self._finished:
                    self._changed.wait()
                target = self._written
            if self._position >= target:
                return
            while self._position < target:
                try:
                    block = os.pread(self._fd, min(8 * BLOCK_SIZE, target - self._position), self._position)
                except OSError:
                    block = b""
                if not block:
                    self._short = True
                    return
                self._hash.update(block)
                self._position += len(block)

    def update(self, block) -> None:
        with self._changed:
            self._written = self._next
            self._next += len(block)
            self._changed.notify()

    def finish(self):
        """Catch up with every block handed over (all written by now); the hash object,
        or None if the file held fewer bytes than were written."""
        with self._changed:
            self._written = self._next
            self._finished = True
            self._changed.notify()
        self._thread.join()
        return None if self._short else self._hash


class _Flusher:
    """Flushes a file being written every _FLUSH_INTERVAL seconds, on a thread of its own:
    the final fsync then has little left, and on a shared filesystem other hosts see the
    bytes as they arrive rather than when the upload ends. stop() before closing the file."""

    def __init__(self, fd: int):
        self._fd = fd
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(_FLUSH_INTERVAL):
            with contextlib.suppress(OSError):  # the writer meets any error itself
                os.fdatasync(self._fd)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _vanished(exc: OSError) -> bool:
    """Whether an error on a descriptor means its file was removed, which on a shared
    filesystem another host may do under an open descriptor."""
    return exc.errno in (errno.ENOENT, errno.ESTALE)


@contextlib.contextmanager
def _removed_is_failure():
    """A followed upload's descriptor fails (ENOENT, ESTALE) on a shared filesystem once
    another host has removed its file: the upload failed or was cancelled."""
    try:
        yield
    except OSError as exc:
        if _vanished(exc):
            raise UploadFailed("the upload was removed") from None
        raise


@contextlib.contextmanager
def _disk_full_is_no_space():
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace("the relay ran out of disk space while storing the upload") from None
        raise


_PROBE = 1  # byte of .relay/lock taken by the filesystem probe (object names use 512 and up)
_JUICEFS_CACHES = {
    "AttrTimeout": "--attr-cache",
    "EntryTimeout": "--entry-cache",
    "DirEntryTimeout": "--dir-entry-cache",
}
_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "lustre", "gpfs", "9p", "beegfs")


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) of *path*, from /proc/self/mountinfo."""
    found = ("/", "")
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" ")
            point = re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal.group(1), 8)), fields[4])
            fstype = fields[fields.index("-") + 1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(found[0]):
                found = (point, fstype)
    return found


def shared_filesystem(path: Path) -> str | None:
    """The type of the filesystem under *path* if other hosts may mount it too."""
    fstype = _mount_of(path)[1]
    return fstype if fstype in _NETWORK_FILESYSTEMS or fstype.startswith("fuse.") else None


def probe_files_directory(path: Path) -> list[str]:
    """Check that the filesystem under *path* does what the relay relies on: a lock taken
    through one open file blocks another, and link() refuses an existing name. Raises
    OSError with a one-line reason if not; returns warnings for an operator (a shared
    filesystem mounted with caches that several hosts cannot share)."""
    relay = path / ".relay"
    relay.mkdir(mode=0o700, exist_ok=True)
    probe = relay / f".probe-{secrets.token_hex(8)}"
    first = os.open(probe, os.O_RDWR | os.O_EXCL | _CREATE, 0o600)
    try:
        second = os.open(probe, os.O_RDWR | _NO_SURPRISES)
        try:
            _lock(first, fcntl.F_WRLCK, _PROBE)
            if _lock(second, fcntl.F_WRLCK, _PROBE):
                raise OSError(errno.ENOLCK, f"{path}: a lock held through one open file does not block another")
        finally:
            os.close(second)
        os.link(probe, f"{probe}.link")
        try:
            os.link(probe, f"{probe}.link")
        except FileExistsError:
            pass
        else:
            raise OSError(errno.EEXIST, f"{path}: link() replaces an existing name")
        finally:
            _unlink_if_present(Path(f"{probe}.link"))
    finally:
        os.close(first)
        _unlink_if_present(probe)
    point, fstype = _mount_of(path)
    if fstype == "fuse.juicefs":
        return _juicefs_warnings(Path(point))
    if shared_filesystem(path):
        return [
            f"the files directory is on {fstype}: relays on several hosts may share it only if it gives every"
            " host fresh names, sizes and locks (see 'Several hosts' in the README; only JuiceFS is tested)"
        ]
    return []


def _juicefs_warnings(mount_point: Path) -> list[str]:
    try:
        settings = json.loads(_read_small_file(mount_point / ".config") or b"{}")
    except (OSError, ValueError):
        settings = {}
    caches = [f"{flag} {settings.get(key, 0) / 1e9:g}" for key, flag in _JUICEFS_CACHES.items() if settings.get(key, 0)]
    if settings.get("Meta", {}).get("OpenCache"):
        caches.append(f"--open-cache {settings['Meta']['OpenCache'] / 1e9:g}")
    if not settings:
        caches.append("could not read its .config")
    if not caches:
        return []
    return [
        f"the files directory is on JuiceFS mounted with caches ({', '.join(caches)}): relays on several hosts"
        " sharing it need every mount made with --attr-cache 0 --entry-cache 0 --dir-entry-cache 0 (one host alone"
        " is fine)"
    ]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an uploader asked for: expiry after completion, and a download budget."""

    ttl: float | None = None
    max_downloads: int | None = None

    @property
    def any(self) -> bool:
        return self.ttl is not None or self.max_downloads is not None


@dataclasses.dataclass(frozen=True)
class StoredObject:
    oid: str
    size: int
    stored_at: float
    expires_at: float | None
    max_downloads: int | None
    downloads: int

    @property
    def remaining_downloads(self) -> int | None:
        return None if self.max_downloads is None else max(0, self.max_downloads - self.downloads)


class Stored(enum.Enum):
    """The outcome of an upload that is complete: this upload stored the object, or it
    was stored already (by an earlier upload, or by another request meanwhile)."""

    CREATED = "stored"
    ALREADY = "already stored"


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where an upload in progress (or a resumable partial upload) stands."""

    mode: str  # "stream": one plain PUT writing in order; "chunks": Content-Range requests
    length: int | None
    ranges: list  # merged inclusive (first, last) ranges received
    active: bool  # a request is writing to it now

    @property
    def offset(self) -> int:
        return contiguous_prefix(self.ranges)

    @property
    def received(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)


@dataclasses.dataclass(frozen=True)
class Named:
    """How an upload the relay names ended: stored under *oid*, the SHA-256 of what it
    received (CREATED, or ALREADY if that content was stored before), with the file name
    the sender gave, if any."""

    oid: str
    stored: Stored
    name: str | None = None


class Reader(typing.Protocol):
    """What a download reads from storage: the bytes of a stored object or of an upload
    in progress, in order. read() returns b"" at the end and raises UploadFailed when the
    upload being followed fails. close() ends it: a counted download it holds (see
    Storage.reserve_download) counts if every byte was delivered, else is given back.

    A reader of a stored object has .object (else None: it follows an upload, whose
    length is .length, None if unknown, and .progress() where it stands; it waits for
    bytes with .pause(seconds), which the caller may replace with a wait that raises
    UploadFailed when its own client goes). A reader with a file descriptor may also
    offer sendfile: fileno(), and seek(), which socket.sendfile() moves to where it
    stopped."""

    object: StoredObject | None
    sent: int  # bytes delivered so far
    finished: bool  # every byte delivered
    length: int | None  # a follower's: the upload's length, None if unknown
    pause: typing.Callable[[float], None]  # a follower's wait between looks; replaceable

    def progress(self) -> Progress | None:
        """A follower's: where the upload stands (None for a stored object)."""

    def read(self, size: int = -1) -> bytes: ...

    def select(self, first: int, last: int) -> None:
        """Deliver only bytes first..last."""

    def close(self) -> None: ...


class Storage(typing.Protocol):
    """What the web layer asks of storage, and all it knows of it. Refusals are
    StorageErrors (NotFound, Busy, Conflict, TooLarge, NoSpace, Mismatch, WrongLength,
    Overloaded, Unavailable, NotSupported). Store, below, keeps objects in a local
    directory; S3Store, in the next section, in an S3-compatible bucket."""

    def prepare(self) -> None:
        """Make ready to store (create what is missing)."""

    def start_worker(self) -> None:
        """Make ready what each worker process needs of its own, once it has forked."""

    def check_size(self, size: int) -> None:
        """Raise TooLarge if no object of *size* bytes may be stored."""

    def is_stored(self, oid: str) -> bool: ...

    def lookup(self, oid: str) -> StoredObject | None: ...

    def put_stream(self, oid: str, body, length: int | None, limits: Limits) -> bool:
        """Store an object from *body*'s blocks (of *length* bytes, if known), verified
        against its name: True if this stored it, False if it was stored already."""

    def put_chunk(
        self, oid: str, first: int, last: int, total: int, body, digest: bytes | None, limits: Limits
    ) -> Progress | Stored:
        """Store bytes first..last of an object of *total* bytes (checked against
        *digest*, if given): the upload's Progress while incomplete, else how it ended."""

    def progress(self, oid: str) -> Progress | None:
        """Where the upload of *oid* stands, if one is in progress or resumable."""

    def open(self, oid: str) -> Reader | None:
        """A reader of the stored object, or None."""

    def follow(self, oid: str) -> Reader | None:
        """A reader of the upload of *oid* in progress, as its bytes arrive, or None."""

    def reserve_download(self, reader: Reader) -> DownloadTicket | None:
        """Count a download through *reader* if what it reads has a download budget (its
        ticket tells how many remain). Raises NotFound if it is used up, Busy while its
        last downloads are in flight."""

    def delete(self, oid: str) -> bool:
        """Remove the object and cancel its upload; False if there was neither."""

    def usage(self) -> dict:
        """stored_count, stored_bytes, partial_count, reserved_bytes,
        partial_allocated_bytes, disk_total_bytes, disk_used_bytes, disk_free_bytes."""

    def sweep(self, now: float | None = None) -> dict:
        """Remove what expired, was used up or abandoned: how many of each kind."""

    def purge(self) -> None:
        """Remove everything stored."""


@typing.runtime_checkable
class UnnamedUploads(typing.Protocol):
    """A capability a Storage may have: uploads it names by the SHA-256 of what it
    received, whole or in chunks. A resumable one is known by a token until it ends."""

    def put_unnamed(self, body, length: int | None, limits: Limits, expected: str | None = None) -> Named:
        """Store an object from *body*'s blocks, under the hash of what arrived (which
        must be *expected*, the sender's digest, if given: Mismatch otherwise)."""

    def start_unnamed(self, length: int, limits: Limits, name: str | None) -> str:
        """Begin a resumable upload of *length* bytes: its token."""

    def put_unnamed_chunk(
        self, token: str, first: int, last: int, total: int, body, digest: bytes | None
    ) -> Progress | Named:
        """Store bytes first..last of the upload *token* (checked against *digest*, if
        given): its Progress while incomplete, else how it ended. NotFound if unknown."""

    def unnamed_progress(self, token: str) -> Progress | Named | None:
        """Where the upload *token* stands, how it ended, or None if it is unknown."""

    def cancel_unnamed(self, token: str) -> bool:
        """Cancel the upload *token* in progress; False if there is none."""


@typing.runtime_checkable
class Pipes(typing.Protocol):
    """A storage that passes an object from a sender to receivers without storing it,
    verified, holding at most --pipe-buffer bytes of it (see PipeSender, PipeReader)."""

    def open_pipe(self, oid: str, length: int | None, receivers: int) -> PipeSender:
        """Begin a pipe of *oid* that waits for *receivers*. Raises Conflict (a pipe of it
        is in progress, or an upload), Overloaded (--max-pipes), NoSpace (its buffer)."""

    def join_pipe(self, oid: str, *, receive: bool = True) -> PipeReader | None:
        """A receiver of the pipe of *oid* (or, not *receive*, a look at it), None if there
        is none. Raises Conflict once its first bytes have left the buffer."""


class _Partial:
    """One upload attempt, held through open descriptors of its directory and data file.

    Every look inside (info, data, range markers) goes through them, so a request keeps
    working on the attempt it opened even if that attempt is finished, cancelled or
    replaced meanwhile: it can then tell, instead of touching another attempt's files.
    Closing it releases its locks.
    """

    def __init__(self, oid: str, path: Path, dir_fd: int, fd: int, info: dict):
        self.oid = oid
        self.path = path
        self.dir_fd = dir_fd
        self.fd = fd
        self.info = info
        self.attempt = info.get("attempt")  # None for a partial left by an older relay
        self.limits = Limits(**info.get("limits", {}))

    @classmethod
    def open(cls, oid: str, path: Path, *, writable: bool) -> _Partial | None:
        """Open the partial upload at *path*, or None if there is none (or it is being
        removed right now, or is not one the relay made)."""
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if _names_nothing_of_ours(exc):
                return None
            raise
        fd = -1
        try:
            mode = os.O_RDWR if writable else os.O_RDONLY
            fd = os.open("data", mode | _NO_SURPRISES, dir_fd=dir_fd)
            info_fd = os.open("info", os.O_RDONLY | _NO_SURPRISES, dir_fd=dir_fd)
            try:
                if not (stat.S_ISREG(os.fstat(fd).st_mode) and stat.S_ISREG(os.fstat(info_fd).st_mode)):
                    raise ValueError("not a regular file")
                info = json.loads(os.read(info_fd, 64 << 10))
            finally:
                os.close(info_fd)
            return cls(oid, path, dir_fd, fd, info)
        except (OSError, ValueError, TypeError) as exc:
            if fd >= 0:
                os.close(fd)
            os.close(dir_fd)
            if isinstance(exc, OSError) and not _names_nothing_of_ours(exc):
                raise
            return None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.close(dir_fd)
            raise

    def is_current(self) -> bool:
        """Whether this is still the attempt at its public partial path (the directory we
        hold open keeps its inode number from being given to another)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.dir_fd).st_ino
        except FileNotFoundError:
            return False

    def _markers(self) -> list[tuple[int, int]]:
        markers = []
        for name in os.listdir(self.dir_fd):
            if name.startswith("range-"):
                first, _, last = name[6:].partition("-")
                markers.append((int(first), int(last)))
        return markers

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges acknowledged so far (merged)."""
        return merge_ranges(self._markers())

    def record(self, first: int, last: int) -> None:
        """Acknowledge bytes first..last, durably (their data must be synced first), and
        merge the markers once they outnumber the ranges they describe by much.
        Nothing happens if the upload was removed meanwhile: see is_current()."""
        try:
            flags = os.O_WRONLY | _CREATE
            os.close(os.open(f"range-{first}-{last}", flags, 0o600, dir_fd=self.dir_fd))
        except FileNotFoundError:
            return  # the directory is gone
        os.fsync(self.dir_fd)
        markers = self._markers()
        merged = merge_ranges(markers)
        if len(markers) > len(merged) + _MARKER_SLACK:
            self._merge_markers(markers, merged)

    def _merge_markers(self, markers: list, merged: list) -> None:
        """Replace markers by their merged ranges: the merged ones are made durable before
        any marker they cover goes, so every acknowledged byte stays recorded."""
        for first, last in merged:
            os.close(os.open(f"range-{first}-{last}", os.O_WRONLY | _CREATE, 0o600, dir_fd=self.dir_fd))
        os.fsync(self.dir_fd)
        keep = set(merged)
        for marker in markers:
            if marker not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"range-{marker[0]}-{marker[1]}", dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)

    def mark_published(self, published: bool = True) -> None:
        """Note (or take back) that this attempt's data is being linked as the object."""
        if published:
            os.close(os.open("published", os.O_WRONLY | _CREATE, 0o600, dir_fd=self.dir_fd))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("published", dir_fd=self.dir_fd)

    def was_published(self) -> bool:
        try:
            os.stat("published", dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        for name in ("fd", "dir_fd"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


class Store:
    """The relay's files directory: verified objects, partial uploads, their limits."""

    def __init__(self, config: RelayConfig):
        self.config = config
        self.root = Path(config.files_directory)
        self.partials = self.root / ".relay" / "partial"
        self.meta = self.root / ".relay" / "meta"
        self.lock_path = self.root / ".relay" / "lock"
        self.retired = self.root / ".relay" / "retired"
        self.unnamed = self.root / ".relay" / "unnamed"  # how resumable uploads the relay named ended
        self.ledger_path = self.root / ".relay" / "usage"
        self.pipes = self.root / ".relay" / "pipes"
        self._prefix_hashes = _PrefixHashes()

    def start_worker(self) -> None:
        """Nothing: a worker needs nothing of its own."""

    def prepare(self) -> None:
        """Create the directories (private to the relay's user) if they are missing."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (self.root / ".relay", self.partials, self.meta, self.retired, self.unnamed, self.pipes):
            path.mkdir(mode=0o700, exist_ok=True)
        self.lock_path.touch(mode=0o600, exist_ok=True)
        if not self.ledger_path.exists():
            with self._space_lock():
                if not self.ledger_path.exists():
                    count, size = self._count_stored()
                    staging = self.ledger_path.with_name(f".usage-{secrets.token_hex(8)}")
                    _write_file(staging, _LEDGER.pack(count, size, 0))
                    os.rename(staging, self.ledger_path)

    # -- locks ---------------------------------------------------------------

    def _open_lock_file(self) -> int:
        return os.open(self.lock_path, os.O_RDWR | _CREATE, 0o600)

    @staticmethod
    def _object_lock_base(oid: str) -> int:
        return (int(oid[:13], 16) + 1) * _OBJECT_LOCK_STRIDE

    @contextlib.contextmanager
    def _object_lock(self, oid: str, fd: int | None = None, *, patient: bool = False):
        """Hold the mutex of an object name (on *fd*, an open lock file, if given); 503
        after _LOCK_PATIENCE, unless *patient* (a download's end, which must be counted)."""
        own = fd is None
        fd = self._open_lock_file() if own else fd
        base = self._object_lock_base(oid)
        try:
            if patient:
                _lock(fd, fcntl.F_WRLCK, base, wait=True)
            else:
                _lock_patiently(fd, base)
            try:
                yield fd
            finally:
                _unlock(fd, base)
        finally:
            if own:
                os.close(fd)

    @contextlib.contextmanager
    def _space_lock(self):
        """Serialise space reservations and the ledger across workers and relays."""
        fd = self._open_lock_file()
        try:
            _lock_patiently(fd, _SPACE)
            yield
        finally:
            os.close(fd)

    # -- the ledger of stored objects ----------------------------------------

    def _ledger(self) -> tuple[int, int, int]:
        try:
            return _LEDGER.unpack(_read_small_file(self.ledger_path, _LEDGER.size) or b"")
        except struct.error:
            return 0, 0, 0

    def _write_ledger(self, count: int, size: int, changes: int) -> None:
        """Replace the ledger (a rename replaces whatever is there, never writes through it)."""
        staging = self.ledger_path.with_name(f".usage-{secrets.token_hex(8)}")
        _write_file(staging, _LEDGER.pack(max(0, count), max(0, size), changes), durable=False)
        os.rename(staging, self.ledger_path)

    def _account(self, count: int, size: int) -> None:
        """Add to the ledger (under the space lock). It is changed before an object is
        linked and after one is removed, so that a crash can only make it count too much;
        the sweeper recounts."""
        with self._space_lock():
            stored, stored_bytes, changes = self._ledger()
            self._write_ledger(stored + count, stored_bytes + size, changes + 1)

    def _count_stored(self) -> tuple[int, int]:
        count = size = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if _is_object_name(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            count += 1
                            size += st.st_size
        return count, size

    def _recount(self) -> None:
        """Correct the ledger from the directory, unless it changed while we counted."""
        changes_before = self._ledger()[2]
        count, size = self._count_stored()
        with self._space_lock():
            if self._ledger()[2] == changes_before:
                self._write_ledger(count, size, changes_before + 1)

    # -- stored objects ----------------------------------------------------

    def _object_path(self, oid: str) -> Path:
        return self.root / oid

    def _meta_path(self, oid: str) -> Path:
        return self.meta / oid

    def _count_path(self, oid: str) -> Path:
        return self.meta / f"{oid}.count"

    def _read_limits(self, oid: str) -> Limits:
        try:
            return Limits(**json.loads(_read_small_file(self._meta_path(oid)) or b"{}"))
        except (ValueError, TypeError):
            return Limits()

    def _downloads_done(self, oid: str) -> int:
        try:
            st = os.lstat(self._count_path(oid))
        except FileNotFoundError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0  # a planted entry counts nothing

    def _count_download(self, oid: str, change: int) -> int:
        """Count a download of *oid* (+1), or give one back (-1), durably; under the
        object's mutex. Returns the downloads counted. Anything but a regular file at
        the count's name was planted: it goes, and counting starts again."""
        path = self._count_path(oid)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                log.warning("removing .relay/meta/%s.count: not a regular file", oid)
                os.rename(path, self.partials / f".trash-{secrets.token_hex(8)}")
        counter = os.open(path, os.O_RDWR | os.O_APPEND | _CREATE, 0o600)
        try:
            if change > 0:
                os.write(counter, b".")
            else:
                os.ftruncate(counter, max(0, os.fstat(counter).st_size - 1))
            os.fsync(counter)
            return os.fstat(counter).st_size
        finally:
            os.close(counter)

    def _describe(self, oid: str, st: os.stat_result) -> StoredObject:
        """An object's state: its lifetime is what its uploader asked for (Max-Days), or
        --ttl, and never more than the relay allows now (--max-ttl, else --ttl)."""
        limits = self._read_limits(oid)
        ttl = limits.ttl if limits.ttl is not None else self.config.ttl
        cap = self.config.ttl_cap
        if cap is not None and ttl is not None:
            ttl = min(ttl, cap)
        if ttl is not None:
            ttl = min(ttl, LONGEST_TTL)
        return StoredObject(
            oid=oid,
            size=st.st_size,
            stored_at=st.st_mtime,
            expires_at=None if ttl is None else st.st_mtime + ttl,
            max_downloads=limits.max_downloads,
            downloads=self._downloads_done(oid) if limits.max_downloads is not None else 0,
        )

    @staticmethod
    def _is_expired(obj: StoredObject, now: float) -> bool:
        return obj.expires_at is not None and now >= obj.expires_at

    @classmethod
    def _is_spent(cls, obj: StoredObject, now: float) -> bool:
        return cls._is_expired(obj, now) or obj.remaining_downloads == 0

    def _in_flight(self, oid: str) -> bool:
        """Whether any download of *oid* holds a slot now."""
        fd = self._open_lock_file()
        try:
            return _lock_held(fd, self._object_lock_base(oid) + 1, _OBJECT_LOCK_STRIDE - 1)
        finally:
            os.close(fd)

    def _stat_object(self, oid: str) -> os.stat_result | None:
        """The object's metadata, or None if there is none. Anything but a regular file
        under an object's name was not made by the relay: it is never served."""
        try:
            st = os.lstat(self._object_path(oid))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            log.warning("ignoring %s in the files directory: not a regular file", oid)
            return None
        return st

    def lookup(self, oid: str) -> StoredObject | None:
        """The stored object, or None; an expired or used-up object is removed on sight."""
        st = self._stat_object(oid)
        if st is None:
            return None
        obj = self._describe(oid, st)
        if self._is_spent(obj, time.time()) and self._remove_object(oid, only_if_spent=True):
            return None
        return obj

    def open(self, oid: str) -> ObjectReader | None:
        """A reader of a stored object (all of it, until told a range), or None if it is
        not there."""
        try:
            fd = os.open(self._object_path(oid), os.O_RDONLY | _NO_SURPRISES)
        except OSError as exc:
            if not _names_nothing_of_ours(exc):
                raise
            if exc.errno != errno.ENOENT:
                log.warning("ignoring %s in the files directory: not a regular file", oid)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                log.warning("ignoring %s in the files directory: not a regular file", oid)
                os.close(fd)
                return None
            obj = self._describe(oid, st)
            _lock(fd, fcntl.F_RDLCK, _READERS)  # before the name is judged: see _retire
            # Limits go after the name: if the name still means this file, they were its.
            if not self._is_our_object(oid, fd):
                os.close(fd)
                return None
        except OSError as exc:
            os.close(fd)
            if _vanished(exc):  # removed by another host since it was opened
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        if self._is_spent(obj, time.time()) and self._remove_object(oid, only_if_spent=True):
            os.close(fd)
            return None
        return ObjectReader(fd, obj)

    def _is_our_object(self, oid: str, fd: int) -> bool:
        """Whether the object's name refers to the file open as *fd* (held open, its inode
        number cannot have been given to another file)."""
        try:
            named, held = os.lstat(self._object_path(oid)), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _remove_object(self, oid: str, *, only_if_spent: bool = False, lock_fd: int | None = None) -> bool:
        """Remove the object and its limits (if it is spent, when told so: judged again
        under the object's mutex, on what the name means now)."""
        with self._object_lock(oid, lock_fd):
            return self._remove_object_locked(oid, only_if_spent=only_if_spent)

    def _remove_object_locked(self, oid: str, *, only_if_spent: bool = False) -> bool:
        st = self._stat_object(oid)
        if st is None or (only_if_spent and not self._is_spent(self._describe(oid, st), time.time())):
            return False
        if only_if_spent and not self._is_expired(self._describe(oid, st), time.time()) and self._in_flight(oid):
            return False  # its last downloads are counted but still going: the last one removes it
        if not self._retire(oid):
            return False
        self._account(-1, -st.st_size)
        _unlink_if_present(self._count_path(oid))
        _unlink_if_present(self._meta_path(oid))
        return True

    def _retire(self, oid: str) -> bool:
        """Take an object's name away: False if it had none. Its file is unlinked now if
        nobody reads it, else by a later sweep. A reader takes its lock before it judges
        the name, so either it holds the lock by the time the file is looked at, or it
        finds the name gone and reads nothing."""
        retired = self.retired / f"{oid}.{secrets.token_hex(8)}"
        try:
            os.rename(self._object_path(oid), retired)
        except FileNotFoundError:
            return False
        self._unlink_if_unread(retired)
        return True

    def _is_retired_object(self, oid: str, fd: int) -> bool:
        """Whether the file open as *fd* is a removed object of that name, waiting in
        retired/ for its readers."""
        held = os.fstat(fd)
        with os.scandir(self.retired) as entries:
            for entry in entries:
                if entry.name.startswith(f"{oid}."):
                    with contextlib.suppress(FileNotFoundError):
                        named = entry.stat(follow_symlinks=False)
                        if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                            return True
        return False

    @staticmethod
    def _unlink_if_unread(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | _NO_SURPRISES)
        except FileNotFoundError:
            return False
        try:
            if _lock_held(fd, _READERS):
                return False
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def delete(self, oid: str) -> bool:
        """Remove a stored object and cancel its partial upload; False if neither existed.

        Raises Busy when a request is writing to the partial upload right now.
        """
        removed = self._remove_object(oid)
        try:
            partial = self._open_partial(oid, exclusive=True)
        except Busy:
            if removed:
                return True
            raise Busy("an upload of this object is in progress", retry_after=5) from None
        if partial is not None:
            self._discard(partial)
            removed = True
        return removed

    def reserve_download(self, reader: ObjectReader | UploadReader) -> DownloadTicket | None:
        """A slot for one counted download through *reader*, if what it reads has a
        download budget; the reader holds it, and counts the download when closed after
        it delivered every byte, or gives the slot back.

        Downloads in flight hold their slot, so concurrent downloads of the last allowed
        copy cannot all go through. Everything is judged under the object's mutex, on the
        descriptor being served. Raises NotFound if the object went since it was opened,
        Busy while its remaining downloads are in flight.
        """
        max_downloads = reader.max_downloads
        if max_downloads is None:
            return None
        oid, fd = reader.oid, reader._served_fd
        following = isinstance(reader, UploadReader)
        lock_fd = self._open_lock_file()
        try:
            with self._object_lock(oid, lock_fd):
                if self._is_our_object(oid, fd):
                    done = self._downloads_done(oid)
                    max_downloads = self._read_limits(oid).max_downloads or max_downloads
                elif following and reader.unpublished():
                    done = 0  # an upload in progress: not stored yet, so never downloaded
                else:  # removed, perhaps used up, since it was opened
                    raise NotFound("no such object")
                # Stored downloads are counted when they start (and given back if they
                # fail), so that a crash can only count one too many; a follower's, once
                # its object exists. Each kind holds slots of its own while in flight.
                base = self._object_lock_base(oid)
                slots = min(max_downloads, _DOWNLOAD_SLOTS - 1)
                followers = range(base + 1, base + 1 + slots)
                counted = range(base + _DOWNLOAD_SLOTS, base + _DOWNLOAD_SLOTS + slots)
                followers_in_flight = sum(_lock_held(lock_fd, slot) for slot in followers)
                any_in_flight = followers_in_flight or _lock_held(lock_fd, counted.start, slots)
                if done >= max_downloads and not any_in_flight:
                    self._remove_object_locked(oid)
                    raise NotFound("no such object")
                if done + followers_in_flight < max_downloads:
                    for slot in followers if following else counted:
                        if _lock(lock_fd, fcntl.F_WRLCK, slot):
                            if not following:
                                self._count_download(oid, +1)
                            remaining = max_downloads - done - followers_in_flight - 1
                            reader.ticket = DownloadTicket(self, oid, fd, lock_fd, remaining, counted=not following)
                            return reader.ticket
                raise Busy("the remaining downloads of this object are in progress", retry_after=5)
        except BaseException:
            os.close(lock_fd)
            raise

    # -- uploads -------------------------------------------------------------

    def check_size(self, size: int) -> None:
        limit = self.config.max_file_size
        if size > _MAX_OBJECT_SIZE:  # byte offsets beyond it are the lock bytes
            raise TooLarge(f"larger than any object the relay can hold ({_MAX_OBJECT_SIZE} bytes)")
        if limit is not None and size > limit:
            raise TooLarge(f"larger than the relay's limit of {format_size(limit)} ({limit} bytes)")

    def is_stored(self, oid: str) -> bool:
        return self.lookup(oid) is not None

    def put_stream(self, oid: str, body, length: int | None, limits: Limits) -> bool:
        """Store a whole object sent in one request: True if created, False if it was
        already stored. *body* yields the request body's blocks."""
        if self.is_stored(oid):
            self._drain_for_stored(oid, body)
            return False
        return self._receive_whole(oid, oid, body, length, limits).stored is Stored.CREATED

    def _receive_whole(self, key: str, expected: str | None, body, length: int | None, limits: Limits) -> Named:
        """Receive a whole object as the partial upload *key*, hashing it as it arrives,
        and publish it under its hash (which must be *expected*, if given)."""
        if length is not None:
            self.check_size(length)
        partial = self._create_partial(key, "stream", length, limits)
        hasher = _BackgroundHasher()  # each block on a thread of its own, while it goes into the ring
        flusher = _Flusher(partial.fd)
        try:
            received = 0
            next_space_check = BLOCK_SIZE
            with _disk_full_is_no_space():
                for block in body:
                    received += len(block)
                    if length is None:
                        self.check_size(received)
                        if received >= next_space_check:
                            # The upload's own bytes count as reserved: look again sooner
                            # the less room is left, and once more before publishing.
                            with self._space_lock():
                                room = self._check_space(0)
                            next_space_check = received + min(_SPACE_CHECK_INTERVAL, max(BLOCK_SIZE, room // 2))
                    hasher.update(block)
                    _write_all(partial.fd, block)
                if length is not None and received != length:
                    raise WrongLength(f"body has {received} bytes, Content-Length says {length}")
                oid = self._verify(expected, hasher.finish())
                if length is None:
                    with self._space_lock():
                        self._check_space(0)
                flusher.stop()
                return Named(oid, Stored.CREATED if self._publish(partial, oid) else Stored.ALREADY)
        finally:
            hasher.finish()
            flusher.stop()
            self._discard(partial)

    def put_chunk(
        self, oid: str, first: int, last: int, total: int, body, digest: bytes | None, limits: Limits
    ) -> Progress | Stored:
        """Store bytes first..last of an object of *total* bytes.

        Returns the upload's Progress while it is incomplete, Stored.CREATED when this
        chunk completed an object that verified, Stored.ALREADY if it was stored before.
        """
        partial = None
        if not self.is_stored(oid):
            self.check_size(total)
            partial = self._join_partial(oid, total, limits, done=lambda: self.is_stored(oid))
        if partial is None:  # stored before, or meanwhile
            self._drain_for_stored(oid, body)
            return Stored.ALREADY
        outcome = self._write_chunk(partial, oid, first, last, total, body, digest)
        return outcome.stored if isinstance(outcome, Named) else outcome

    def _write_chunk(
        self, partial: _Partial, expected: str | None, first: int, last: int, total: int, body, digest: bytes | None
    ) -> Progress | Named:
        """Write a chunk into *partial* (joined as a writer) and, if that completed it,
        verify and publish it (its hash must be *expected*, if given). Closes *partial*."""
        try:
            if partial.info["length"] != total:
                raise Conflict(f"this upload is {partial.info['length']} bytes long, not {total}")
            if not _lock(partial.fd, fcntl.F_WRLCK, first, last - first + 1):
                raise Busy(f"bytes {first}-{last} are being written by another request", retry_after=1)
            recorded = partial.ranges()
            if len(merge_ranges([*recorded, (first, last)])) > _MAX_FRAGMENTS:
                raise Conflict(
                    f"this upload would be in more than {_MAX_FRAGMENTS} pieces: send the missing ranges first"
                )
            prefix, hashed_to = self._prefix_hashes.continuing(partial, first, recorded)
            try:
                with _disk_full_is_no_space():
                    self._receive_chunk(partial, first, last, body, digest, prefix, recorded)
                    os.fdatasync(partial.fd)
                    partial.record(first, last)
            finally:
                hashed = prefix.finish() if prefix is not None else None
            if hashed is not None:
                self._prefix_hashes.extended(partial, hashed_to, last + 1, hashed)
            ranges = partial.ranges()
            if contiguous_prefix(ranges) >= total:
                return self._finish_chunks(partial, expected)
            return Progress("chunks", total, ranges, True)
        except BaseException:
            if expected is not None:  # one the relay names was begun on its own, and stays
                self._drop_if_empty(partial)
            raise
        finally:
            partial.close()

    def _drain_for_stored(self, oid: str, body) -> None:
        """Read and discard the body of an upload of an object already stored; refuse if
        the stored copy went meanwhile (it expired or was used up), rather than answer for
        an object that is not there."""
        for _ in body:
            pass
        if not self.is_stored(oid):
            raise Conflict("the stored copy expired or was removed while this upload arrived: send it again")

    def _drop_if_empty(self, partial: _Partial) -> None:
        """Remove a chunked upload with nothing acknowledged that no other request is
        writing to (a refused first chunk), rather than let it hold its reservation."""
        try:
            if partial.is_current() and not partial.ranges() and _lock(partial.fd, fcntl.F_WRLCK, _WRITERS):
                self._discard(partial)
        except OSError:
            pass  # it stays for the sweeper

    def _receive_chunk(self, partial: _Partial, first, last, body, digest: bytes | None, prefix, recorded) -> None:
        """Write a chunk's bytes at their offsets. Bytes of ranges already acknowledged
        are compared instead of written: a retried chunk is fine, a different one is not.
        *prefix*, if given, is the running hash of the object up to *first* (a
        _BackgroundHasher): it goes on."""
        hasher = hashlib.sha256() if digest is not None else None
        position = first
        for block in body:
            if position + len(block) > last + 1:
                raise WrongLength(f"body is longer than its Content-Range ({last - first + 1} bytes)")
            if hasher is not None:
                hasher.update(block)
            if prefix is not None:
                prefix.update(block)
            self._write_or_compare(partial.fd, position, memoryview(block), recorded)
            position += len(block)
        if position != last + 1:
            raise WrongLength(f"body has {position - first} bytes, Content-Range says {last - first + 1}")
        if hasher is not None and hasher.digest() != digest:
            raise Mismatch("chunk does not match its Content-Digest; it was not stored")

    @staticmethod
    def _write_or_compare(fd: int, position: int, block: memoryview, recorded: list) -> None:
        end = position + len(block)
        cursor = position
        for first, last in recorded:
            if last < cursor:
                continue
            if first >= end:
                break
            if first > cursor:
                _write_all(fd, block[cursor - position : first - position], cursor)
                cursor = first
            stop = min(last + 1, end)
            if os.pread(fd, stop - cursor, cursor) != block[cursor - position : stop - position]:
                raise Conflict(f"bytes {cursor}-{stop - 1} differ from those already received")
            cursor = stop
        if cursor < end:
            _write_all(fd, block[cursor - position :], cursor)

    def _finish_chunks(self, partial: _Partial, expected: str | None) -> Named:
        """Verify a fully received chunked upload and publish it under its hash (which
        must be *expected*, if given), or discard it (Mismatch).

        The finisher waits until no other request is writing to the upload and holds
        every writer off until the data is published and the partial removed."""
        if not _lock(partial.fd, fcntl.F_WRLCK, _FINISHER):
            # Another request is verifying it: let it exclude writers, and take its verdict.
            _unlock(partial.fd, _WRITERS)
            _lock(partial.fd, fcntl.F_WRLCK, _FINISHER, wait=True)
            return self._verdict(partial, expected)
        if not _lock_within(partial.fd, fcntl.F_WRLCK, _WRITERS, self.config.idle_timeout):
            raise Busy("other chunks of this upload are still being written", retry_after=1)
        if not partial.is_current():
            return self._verdict(partial, expected)
        hasher, position = self._prefix_hashes.take(partial)
        for block in _blocks_at(partial.fd, position, None):
            hasher.update(block)
        try:
            oid = self._verify(expected, hasher, discarded=True)
            with _disk_full_is_no_space():
                created = self._publish(partial, oid)
                named = Named(oid, Stored.CREATED if created else Stored.ALREADY, partial.info.get("name"))
                if expected is None:  # the sender learns the name from this record if it missed the answer
                    self._record_unnamed(_unnamed_token(partial.oid), named)
        except Mismatch:
            self._discard(partial)  # decided: anything else leaves it, to be completed again
            raise
        self._discard(partial)
        return named

    def _verdict(self, partial: _Partial, expected: str | None) -> Named:
        """The outcome of an upload completed by another request: ALREADY if it is stored."""
        if expected is not None and self.is_stored(expected):
            return Named(expected, Stored.ALREADY)
        named = self._unnamed_result(_unnamed_token(partial.oid)) if expected is None else None
        if named is not None:
            return dataclasses.replace(named, stored=Stored.ALREADY)
        raise Conflict("another request completed this upload but it was not stored: send it again")

    @staticmethod
    def _verify(oid: str | None, hasher, discarded: bool = False) -> str:
        """The content's name: its hash, which must be *oid* if that is given."""
        actual = hasher.hexdigest()
        if oid is not None and actual != oid:
            note = "; the partial upload was discarded" if discarded else ""
            raise Mismatch(f"content does not match its name: expected sha256 {oid}, got {actual}{note}")
        return actual

    def _publish(self, partial: _Partial, oid: str) -> bool:
        """Make verified data public under its hash name, durably, never overwriting: its
        limits first, then the name, under the object's mutex. False if already stored."""
        os.utime(partial.fd)  # the object's mtime is its completion time (expiry counts from it)
        os.fsync(partial.fd)
        size = os.fstat(partial.fd).st_size
        with self._object_lock(oid):
            if self._stat_object(oid) is not None:
                return False
            self._clear_name(oid)
            self._write_limits(oid, partial.limits)
            self._account(1, size)
            partial.mark_published()
            try:
                os.link("data", self._object_path(oid), src_dir_fd=partial.dir_fd)
            except FileExistsError:
                partial.mark_published(False)
                self._account(-1, -size)
                return False
            _fsync_dir(self.root)
        return True

    def _clear_name(self, oid: str) -> None:
        """Move aside whatever occupies an object's name but is not a regular file."""
        path = self._object_path(oid)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        log.warning("removing %s from the files directory: not a regular file", oid)
        if stat.S_ISDIR(st.st_mode):
            os.rename(path, self.partials / f".trash-{secrets.token_hex(8)}")
        else:
            os.unlink(path)

    def _write_limits(self, oid: str, limits: Limits) -> None:
        """Make *limits* the stored object's, durably (none: remove any left behind)."""
        changed = _unlink_if_present(self._count_path(oid))
        if limits.any:
            staging = self.meta / f"{oid}.new-{secrets.token_hex(8)}"
            _write_file(staging, json.dumps(dataclasses.asdict(limits)).encode())
            os.rename(staging, self._meta_path(oid))
            changed = True
        else:
            changed = _unlink_if_present(self._meta_path(oid)) or changed
        if changed:
            _fsync_dir(self.meta)

    def progress(self, oid: str) -> Progress | None:
        """The state of an upload in progress or a resumable partial, or None."""
        partial = _Partial.open(oid, self.partials / oid, writable=False)
        if partial is None:
            return None
        try:
            return self._progress_of(partial)
        except OSError as exc:
            if _vanished(exc):  # removed by another host as it was opened
                return None
            raise
        finally:
            partial.close()

    @staticmethod
    def _progress_of(partial: _Partial) -> Progress | None:
        active = _lock_held(partial.fd, _WRITERS)
        if partial.info["mode"] == "stream":
            if not active:
                return None  # left by a crashed plain upload; never resumable
            size = os.fstat(partial.fd).st_size
            ranges = [(0, size - 1)] if size else []
        else:
            ranges = partial.ranges()
        return Progress(partial.info["mode"], partial.info["length"], ranges, active)

    def follow(self, oid: str) -> UploadReader | None:
        """A reader of the upload of *oid* in progress, as its bytes arrive; None if none."""
        partial = _Partial.open(oid, self.partials / oid, writable=False)
        if partial is None:
            return None
        try:
            if partial.info["mode"] == "stream" and not _lock_held(partial.fd, _WRITERS):
                partial.close()
                return None
            _lock(partial.fd, fcntl.F_RDLCK, _READERS)  # it may become an object that is removed
        except OSError as exc:
            partial.close()
            if _vanished(exc):  # removed by another host as it was opened
                return None
            raise
        return UploadReader(self, partial)

    # -- uploads the relay names -------------------------------------------

    def put_unnamed(self, body, length: int | None, limits: Limits, expected: str | None = None) -> Named:
        try:
            return self._receive_whole(_UNNAMED_KEY + secrets.token_hex(16), expected, body, length, limits)
        except Mismatch as exc:
            raise Mismatch(str(exc).replace("does not match its name", "does not match its digest")) from None

    def start_unnamed(self, length: int, limits: Limits, name: str | None) -> str:
        self.check_size(length)
        token = secrets.token_hex(16)
        self._create_partial(_UNNAMED_KEY + token, "chunks", length, limits, name).close()
        return token

    def put_unnamed_chunk(
        self, token: str, first: int, last: int, total: int, body, digest: bytes | None
    ) -> Progress | Named:
        partial = None
        if _UNNAMED_TOKEN_RE.fullmatch(token):
            partial = self._join_partial(
                _UNNAMED_KEY + token, total, None, done=lambda: self._unnamed_result(token) is not None
            )
        named = self._unnamed_result(token) if partial is None else None
        if named is None and partial is None:
            raise NotFound("no such upload: it was cancelled, or expired unfinished")
        if named is not None and not self.is_stored(named.oid):
            raise NotFound(f"this upload was stored as {named.oid}, which is gone since: start a new upload")
        if named is not None:  # finished before, or meanwhile
            self._compare_with_stored(named.oid, first, last, total, body)
            return dataclasses.replace(named, stored=Stored.ALREADY)
        return self._write_chunk(partial, None, first, last, total, body, digest)

    def _compare_with_stored(self, oid: str, first: int, last: int, total: int, body) -> None:
        """Read a chunk sent to an upload stored already, comparing it with the object's
        bytes: Conflict if it is not part of that object."""
        try:
            fd = os.open(self._object_path(oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"this upload was stored as {oid}, which is gone since: start a new upload") from None
        try:
            size = os.fstat(fd).st_size
            if size != total:
                raise Conflict(f"this upload is {size} bytes long, not {total}")
            position = first
            for block in body:
                if position + len(block) > last + 1:
                    raise WrongLength(f"body is longer than its Content-Range ({last - first + 1} bytes)")
                if os.pread(fd, len(block), position) != block:
                    raise Conflict(f"bytes {first}-{last} differ from those stored as {oid}")
                position += len(block)
        finally:
            os.close(fd)

    def unnamed_progress(self, token: str) -> Progress | Named | None:
        if not _UNNAMED_TOKEN_RE.fullmatch(token):
            return None
        # The finisher records the outcome before it removes the upload: look in that order.
        outcome = self.progress(_UNNAMED_KEY + token) or self._unnamed_result(token)
        if isinstance(outcome, Named) and not self.is_stored(outcome.oid):
            return None  # stored, and gone since (expired, used up, deleted)
        return outcome

    def cancel_unnamed(self, token: str) -> bool:
        if not _UNNAMED_TOKEN_RE.fullmatch(token):
            return False
        partial = self._open_partial(_UNNAMED_KEY + token, exclusive=True)
        if partial is None:
            return False
        self._discard(partial)
        return True

    def _record_unnamed(self, token: str, named: Named) -> None:
        staging = self.unnamed / f".{token}.new-{secrets.token_hex(8)}"
        _write_file(staging, json.dumps({"oid": named.oid, "name": named.name}).encode())
        os.rename(staging, self.unnamed / token)
        _fsync_dir(self.unnamed)

    def _unnamed_result(self, token: str) -> Named | None:
        """How the resumable upload *token* ended, if it was stored and that is recent."""
        record = _read_small_file(self.unnamed / token)
        try:
            fields = json.loads(record) if record else None
            oid, name = fields["oid"], fields["name"]
        except (ValueError, TypeError, KeyError):
            return None
        if not _is_object_name(oid) or not (name is None or isinstance(name, str)):
            return None
        return Named(oid, Stored.CREATED, name)

    # -- partial uploads -----------------------------------------------------

    def _open_partial(self, oid: str, *, exclusive: bool) -> _Partial | None:
        """Open the partial upload of *oid* as a writer (shared) or owner (exclusive).

        Returns None if there is none; raises Busy if the lock is held against us.
        """
        for _ in range(5):
            partial = _Partial.open(oid, self.partials / oid, writable=True)
            if partial is None:
                return None
            try:
                locked = _lock(partial.fd, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, _WRITERS)
            except OSError as exc:
                partial.close()
                if _vanished(exc):  # removed by another host as it was opened: look again
                    continue
                raise
            if not locked:
                partial.close()
                raise Busy("another upload of this object is in progress", retry_after=5)
            if partial.is_current():
                return partial
            partial.close()  # finished or replaced before we had it locked: look again
        raise Busy("another upload of this object is in progress", retry_after=5)

    def _create_partial(
        self, oid: str, mode: str, length: int | None, limits: Limits, name: str | None = None
    ) -> _Partial:
        """Start a new partial upload of *oid*. A plain upload ("stream") owns it
        exclusively and replaces an idle partial; chunk requests ("chunks") share it, and
        FileExistsError tells a chunk request that another one created it first.

        The upload is prepared under a private name, then checked against the free space
        and quotas and renamed into place under the space lock, so that two uploads that
        each fit but not together cannot both start."""
        partial = self._stage_partial(oid, mode, length, limits, name)
        try:
            with self._space_lock():
                if mode == "chunks" and (self.partials / oid).exists():
                    raise FileExistsError(oid)
                existing = self._open_partial(oid, exclusive=True)
                if existing is not None:
                    self._discard(existing)
                if len(self._partial_names()) >= _MAX_PARTIALS:
                    raise Overloaded(f"too many uploads in progress ({_MAX_PARTIALS})", retry_after=60)
                self._check_space(length or 0)
                os.rename(partial.path, self.partials / oid)
        except BaseException:
            shutil.rmtree(partial.path, ignore_errors=True)
            partial.close()
            raise
        partial.path = self.partials / oid
        if mode == "chunks":
            _fsync_dir(self.partials)
        return partial

    def _stage_partial(self, oid: str, mode: str, length: int | None, limits: Limits, name: str | None) -> _Partial:
        """A new partial upload under a private name: data and info, locked."""
        staging = self.partials / f".new-{secrets.token_hex(8)}"
        try:
            with _disk_full_is_no_space():
                return self._stage(oid, staging, mode, length, limits, name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _stage(
        self, oid: str, staging: Path, mode: str, length: int | None, limits: Limits, name: str | None
    ) -> _Partial:
        staging.mkdir(mode=0o700)
        dir_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open("data", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        info = {
            "mode": mode,
            "length": length,
            "created": time.time(),
            "attempt": secrets.token_hex(16),
            "limits": dataclasses.asdict(limits),
        }
        if name is not None:
            info["name"] = name
        partial = _Partial(oid, staging, dir_fd, fd, info)
        try:
            _lock(fd, fcntl.F_WRLCK if mode == "stream" else fcntl.F_RDLCK, _WRITERS)
            # Only a chunked upload is resumed after a crash: only its info must survive one.
            _write_file(staging / "info", json.dumps(info).encode(), durable=mode == "chunks")
            return partial
        except BaseException:
            partial.close()
            raise

    def _join_partial(self, key: str, total: int, limits: Limits | None, *, done) -> _Partial | None:
        """Open the chunked upload *key* to write a chunk, creating it if needed (unless
        *limits* is None: then NotFound). None once done() says it has been stored."""
        for _ in range(5):
            partial = self._open_partial(key, exclusive=False)
            if partial is None:
                if done():
                    return None
                if limits is None:
                    raise NotFound("no such upload: it was cancelled, or expired unfinished")
                with contextlib.suppress(FileExistsError):
                    return self._create_partial(key, "chunks", total, limits)
                continue
            if partial.info["mode"] == "chunks":
                if not _lock_held(partial.fd, _FINISHER):
                    return partial
                # It is complete and being verified: wait for the verdict rather than write,
                # so that a stream of retries cannot keep the finisher from excluding writers.
                _unlock(partial.fd, _WRITERS)
                _lock(partial.fd, fcntl.F_WRLCK, _FINISHER, wait=True)
                partial.close()
                if done():
                    return None
                continue
            # A plain upload's leftover (its writer crashed): no one can resume it.
            if not _lock(partial.fd, fcntl.F_WRLCK, _WRITERS):
                partial.close()
                raise Busy("a plain upload of this object is in progress", retry_after=5)
            self._discard(partial)
        raise Busy("another upload of this object is in progress", retry_after=5)

    def _discard(self, partial: _Partial) -> None:
        """Remove a partial upload we own (its readers see it vanish), then close it."""
        try:
            if partial.is_current():
                trash = self.partials / f".trash-{secrets.token_hex(8)}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(partial.path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
        finally:
            partial.close()

    # -- pipes ---------------------------------------------------------------

    def _pipe_names(self, *, everything: bool = False) -> list[str]:
        try:
            return [name for name in os.listdir(self.pipes) if everything or not name.startswith(".")]
        except FileNotFoundError:
            return []

    def _pipe_files(self) -> dict[str, int | None]:
        """Every file of the pipes directory (pipes, and pipes being created): the bytes
        allocated to it while its sender lives, None once its sender is gone (a crash)."""
        files = {}
        for name in self._pipe_names(everything=True):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self.pipes / name, os.O_RDONLY | _NO_SURPRISES)
                try:
                    files[name] = os.fstat(fd).st_blocks * 512 if _lock_held(fd, _PIPE_SENDER) else None
                finally:
                    os.close(fd)
        return files

    def _live_pipes(self) -> list[str]:
        """The names of the pipes whose sender is alive."""
        return [name for name, size in self._pipe_files().items() if size is not None and not name.startswith(".")]

    def _remove_dead_pipes(self) -> int:
        """Remove the files of pipes whose sender is gone, and those a crash left being
        created; how many. Only under the space lock: a pipe's file is created, locked by
        its sender and named under it, so no live pipe's file takes a name looked at here."""
        removed = 0
        for name in self._pipe_names(everything=True):
            path = self.pipes / name
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY | _NO_SURPRISES)
                try:
                    if _lock_held(fd, _PIPE_SENDER):
                        continue
                    named, ours = os.stat(path), os.fstat(fd)
                    if (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino):
                        os.unlink(path)
                        removed += 1
                finally:
                    os.close(fd)
        return removed

    def open_pipe(self, oid: str, length: int | None, receivers: int) -> PipeSender:
        self.check_size(length or 0)
        progress = self.progress(oid)
        if progress is not None and progress.active:
            raise Conflict("an upload of this object is in progress: receive it with GET")
        wanted = self.config.pipe_buffer if length is None else min(self.config.pipe_buffer, max(1, length))
        capacity = -(-wanted // mmap.PAGESIZE) * mmap.PAGESIZE
        with self._space_lock():
            self._remove_dead_pipes()  # their buffers count no more
            live = self._live_pipes()
            if oid in live:
                raise Conflict("a pipe of this object is in progress: receive it with GET")
            if len(live) >= self.config.max_pipes:
                limit = self.config.max_pipes
                raise Overloaded(f"the relay carries {limit} pipes at once, its limit", retry_after=10)
            self._check_space(_PIPE_DATA_AT + capacity)
            staging = self.pipes / f".new-{secrets.token_hex(8)}"
            fd = os.open(staging, os.O_RDWR | os.O_EXCL | _CREATE, 0o600)
            pipe = None
            try:
                _lock(fd, fcntl.F_WRLCK, _PIPE_SENDER)
                with _disk_full_is_no_space():
                    os.posix_fallocate(fd, 0, _PIPE_DATA_AT + capacity)  # never a SIGBUS for a full disk
                pipe = _PipeFile.initialise(fd, length, capacity, receivers)
                os.rename(staging, self.pipes / oid)
            except BaseException:
                _unlink_if_present(staging)
                if pipe is not None:
                    pipe.close()
                else:
                    os.close(fd)
                raise
        return PipeSender(self, oid, self.pipes / oid, pipe)

    def join_pipe(self, oid: str, *, receive: bool = True) -> PipeReader | None:
        try:
            fd = os.open(self.pipes / oid, os.O_RDWR | _NO_SURPRISES)
        except FileNotFoundError:
            return None
        try:
            pipe = _PipeFile(fd)
        except (ValueError, OSError):
            os.close(fd)
            return None
        try:
            with pipe.mutex():
                state = pipe.state
                over = state in (PipeState.FAILED, PipeState.CLOSED)
                if over or (state is not PipeState.VERIFIED and not pipe.sender_alive()):
                    slot = -1
                elif pipe.claimed > pipe.capacity:
                    raise Conflict(
                        "too late: this pipe's first bytes have left the relay's buffer"
                        " (start receivers before the sender, or ask it to wait for more with ?receivers=N)"
                    )
                else:
                    slot = None
                if receive and slot is None:
                    # Before bytes flow, a receiver that left never was one: its place is free.
                    free = (_Receiver.FREE, _Receiver.GONE) if state is PipeState.WAITING else (_Receiver.FREE,)
                    slot = next((index for index, (status, _) in enumerate(pipe.slots()) if status in free), None)
                    if slot is None:
                        raise Overloaded(f"this pipe has its most receivers ({_PIPE_SLOTS})", retry_after=10)
                    _lock(fd, fcntl.F_WRLCK, _PIPE_RECEIVERS + slot)
                    pipe.set_slot(slot, _Receiver.ACTIVE, 0)
            if slot == -1:  # over, or its sender died before it verified
                pipe.close()
                return None
            return PipeReader(pipe, slot)
        except BaseException:
            pipe.close()
            raise

    # -- space ---------------------------------------------------------------

    def _check_space(self, needed: int) -> int:
        """Refuse (NoSpace) an upload of *needed* bytes that the disk or quota cannot hold,
        counting the bytes promised to uploads in progress as already used. Returns the
        bytes that would be left."""
        usage = self.usage()
        outstanding = usage["reserved_bytes"] - usage["partial_allocated_bytes"]
        available = usage["disk_free_bytes"] - max(0, outstanding) - self.config.min_free
        if needed > available:
            raise NoSpace(f"not enough free space: {needed} bytes needed, {max(0, available)} bytes available")
        quota = self.config.max_disk
        if quota is None:
            return available - needed
        below_quota = quota - usage["stored_bytes"] - usage["reserved_bytes"] - usage["pipe_buffer_bytes"] - needed
        if below_quota < 0:
            raise NoSpace(f"over the relay's disk quota of {format_size(quota)} ({quota} bytes)")
        return min(available - needed, below_quota)

    def usage(self) -> dict:
        """Stored objects (from the ledger), partial uploads (counted from the directory),
        and the filesystem's size, used and free bytes.

        Partials are counted first, and an object enters the ledger before it is linked:
        an upload that finishes meanwhile is counted at least once."""
        partial_count = reserved = allocated = 0
        for name in self._partial_names():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, ValueError, TypeError, KeyError):
                info = json.loads(_read_small_file(self.partials / name / "info") or b"")
                st = os.lstat(self.partials / name / "data")
                on_disk = st.st_blocks * 512
                partial_count += 1
                allocated += on_disk
                reserved += max(info["length"] or 0, on_disk)
        stored_count, stored_bytes, _ = self._ledger()
        live_pipes = {name: size for name, size in self._pipe_files().items() if size is not None}
        pipe_count = sum(not name.startswith(".") for name in live_pipes)
        pipe_bytes = sum(live_pipes.values())
        disk = shutil.disk_usage(self.root)
        return {
            "stored_count": stored_count,
            "stored_bytes": stored_bytes,
            "partial_count": partial_count,
            "reserved_bytes": reserved,
            "partial_allocated_bytes": allocated,
            "pipe_count": pipe_count,
            "pipe_buffer_bytes": pipe_bytes,
            "disk_total_bytes": disk.total,
            "disk_used_bytes": disk.used,
            "disk_free_bytes": disk.free,
        }

    def _partial_names(self) -> list[str]:
        try:
            return [name for name in os.listdir(self.partials) if not name.startswith(".")]
        except FileNotFoundError:
            return []

    # -- housekeeping --------------------------------------------------------

    def sweep(self, now: float | None = None) -> dict:
        """Remove what is expired, used up, abandoned or left over by a crash, and recount
        the ledger.

        Safe to run from several processes and relays at once: everything is removed
        only under the lock its users hold, after looking again.
        """
        now = time.time() if now is None else now
        removed = {"objects": 0, "partials": 0, "leftovers": 0}
        with os.scandir(self.root) as entries:
            names = [entry.name for entry in entries if _is_object_name(entry.name)]
        for oid in names:
            st = self._stat_object(oid)
            if st is None:
                with self._object_lock(oid):
                    if os.path.lexists(self._object_path(oid)) and self._stat_object(oid) is None:
                        self._clear_name(oid)
                        removed["leftovers"] += 1
            elif self._is_spent(self._describe(oid, st), now) and self._remove_object(oid, only_if_spent=True):
                removed["objects"] += 1
        for name in os.listdir(self.partials):
            path = self.partials / name
            if name.startswith((".trash-", ".new-")):
                if self._remove_if_unlocked(path, older_than=now - 60 if name.startswith(".new-") else None):
                    removed["leftovers"] += 1
            elif not name.startswith(".") and self._sweep_partial(name, now):
                removed["partials"] += 1
        removed["leftovers"] += self._sweep_meta(now)
        for name in os.listdir(self.retired):
            self._unlink_if_unread(self.retired / name)
        with self._space_lock():
            removed["leftovers"] += self._remove_dead_pipes()
        for name in os.listdir(self.unnamed):
            with contextlib.suppress(FileNotFoundError):
                ttl = 60 if name.startswith(".") else self.config.partial_ttl
                if now - os.lstat(self.unnamed / name).st_mtime > ttl:
                    os.unlink(self.unnamed / name)
                    removed["leftovers"] += 1
        self._recount()
        return removed

    def _sweep_partial(self, oid: str, now: float) -> bool:
        try:
            partial = self._open_partial(oid, exclusive=True)
        except Busy:
            return False  # in use
        if partial is None:
            if os.path.lexists(self.partials / oid):  # not a partial the relay made
                with contextlib.suppress(OSError):
                    os.rename(self.partials / oid, self.partials / f".trash-{secrets.token_hex(8)}")
                    return True
            return False
        idle_since = max(os.fstat(partial.dir_fd).st_mtime, os.fstat(partial.fd).st_mtime)
        abandoned = partial.info["mode"] == "stream" or self.lookup(oid) is not None
        if abandoned or now - idle_since > self.config.partial_ttl:
            self._discard(partial)
            return True
        partial.close()
        return False

    @staticmethod
    def _remove_if_unlocked(path: Path, older_than: float | None) -> bool:
        try:
            fd = os.open(path / "data", os.O_RDWR | _NO_SURPRISES)
        except OSError:
            fd = None  # an empty leftover directory, or not a directory at all
        try:
            if fd is not None and not _lock(fd, fcntl.F_WRLCK, _WRITERS):
                return False
            st = os.lstat(path)
            if older_than is not None and st.st_mtime > older_than:
                return False
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        finally:
            if fd is not None:
                os.close(fd)

    def _sweep_meta(self, now: float) -> int:
        """Remove limits whose object is gone and limits left half-written by a crash
        (judged under the object's mutex)."""
        removed = 0
        for name in os.listdir(self.meta):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(self.meta / name).st_mode):  # not the relay's
                    log.warning("removing .relay/meta/%s: not a regular file", name)
                    os.rename(self.meta / name, self.partials / f".trash-{secrets.token_hex(8)}")
                    removed += 1
                    continue
            oid, _, suffix = name.partition(".")
            half_written = suffix.startswith("new-")
            if _is_object_name(oid) and (half_written or suffix in ("", "count")):
                with self._object_lock(oid):  # limits are written and removed under it
                    orphaned = half_written or self._stat_object(oid) is None
                    if orphaned and _unlink_if_present(self.meta / name):
                        removed += 1
            elif self._adopt_legacy_limits(name):
                continue
            else:  # a staging file, or limits no object has any more
                with contextlib.suppress(FileNotFoundError):
                    if now - os.lstat(self.meta / name).st_mtime > 60:
                        os.unlink(self.meta / name)
                        removed += 1
        return removed

    def _adopt_legacy_limits(self, name: str) -> bool:
        """Give an object its limits kept by an older relay as meta/<sha256>.<inode>[.count]
        (if that inode is still the object's): done once, at the first sweep."""
        legacy = _LEGACY_META_RE.fullmatch(name)
        if legacy is None:
            return False
        oid, inode, count = legacy.groups()
        target = self._count_path(oid) if count else self._meta_path(oid)
        with self._object_lock(oid):
            st = self._stat_object(oid)
            if st is None or st.st_ino != int(inode) or os.path.lexists(target):
                return False
            os.rename(self.meta / name, target)
        return True

    def purge(self) -> None:
        """Remove every stored object and partial upload (an ephemeral relay's exit)."""
        for oid in os.listdir(self.root):
            if _is_object_name(oid):
                (self.root / oid).unlink(missing_ok=True)
        shutil.rmtree(self.root / ".relay", ignore_errors=True)


class _PrefixHashes:
    """Running SHA-256 of chunked uploads whose chunks came in order.

    Each chunk that starts at or after the end of the prefix hashed in this process, with
    every byte between acknowledged (by this process or another), carries the hash on:
    the bytes between are read back and hashed first, then the chunk's own as they
    arrive, on a thread of their own. The hash is kept once the chunk is durably
    recorded, so a failed chunk changes nothing, and the request that completes the
    object hashes only what the chain did not cover, instead of the whole object again.
    Entries are keyed by the attempt's token, never reused, so a cancelled attempt's hash
    cannot pass for a later one's. hashlib's state cannot leave the process: with
    several workers each keeps its own chain; chunks out of order, or after a restart,
    leave more to hash at the end.
    """

    _LIMIT = 256  # uploads tracked per process; the oldest are forgotten

    def __init__(self):
        self._lock = threading.Lock()
        self._hashes: dict = {}  # attempt token -> (hash of bytes 0..end-1, end)

    def continuing(self, partial: _Partial, first: int, recorded: list):
        """(a hasher of the object's bytes up to *first* that the chunk at *first* carries
        on, where this process's hash ended), or (None, 0) if it cannot carry one on."""
        if partial.attempt is None or contiguous_prefix(recorded) < first:
            return None, 0
        with self._lock:
            hashed, end = self._hashes.get(partial.attempt, (None, 0))
        if end > first:
            return None, 0
        carried = hashed.copy() if hashed is not None else None
        if end == first:
            return _BackgroundHasher(carried), end
        # Bytes end..first-1 (acknowledged: they do not change) came through other workers:
        # read back while this chunk arrives rather than before.
        return _TrailingHasher(partial.fd, end, first, carried), end

    def extended(self, partial: _Partial, start: int, end: int, hashed) -> None:
        """*hashed* covers bytes 0..end-1, carried on from this process's hash to *start*."""
        with self._lock:
            if self._hashes.get(partial.attempt, (None, 0))[1] == start:
                self._hashes.pop(partial.attempt, None)
                self._hashes[partial.attempt] = (hashed, end)
                while len(self._hashes) > self._LIMIT:
                    self._hashes.pop(next(iter(self._hashes)))

    def take(self, partial: _Partial):
        """(hash of the prefix known here, its length): where verification starts."""
        with self._lock:
            hashed, end = self._hashes.pop(partial.attempt, (None, 0))
        return (hashed, end) if hashed is not None else (hashlib.sha256(), 0)


class DownloadTicket:
    """A held download slot: complete() when the download went through whole, release()
    when it did not (a download counted at its start is then given back)."""

    def __init__(self, store: Store, oid: str, fd: int, lock_fd: int, remaining: int, *, counted: bool):
        self.store = store
        self.oid = oid
        self.fd = fd  # the descriptor being served, owned by the download
        self.lock_fd = lock_fd  # holds the slot
        self.remaining = remaining  # downloads left once this one is through
        self.counted = counted

    def complete(self) -> None:
        """The download went through whole: count it if it was not yet, and remove the
        object once its downloads are used up and none is in flight. Nothing is counted
        if the name now means another upload of the content."""
        self._end(whole=True)

    def release(self) -> None:
        self._end(whole=False)

    def _end(self, *, whole: bool) -> None:
        if self.lock_fd < 0:
            return
        store = self.store
        try:
            with store._object_lock(self.oid, self.lock_fd, patient=True):
                if not store._is_our_object(self.oid, self.fd):
                    return
                if whole != self.counted:
                    store._count_download(self.oid, +1 if whole else -1)
                limit = store._read_limits(self.oid).max_downloads
                base = store._object_lock_base(self.oid)
                others = _lock_held(self.lock_fd, base + 1, 2 * _DOWNLOAD_SLOTS - 1)  # not our own slot
                if limit is not None and store._downloads_done(self.oid) >= limit and not others:
                    store._remove_object_locked(self.oid)
        finally:
            os.close(self.lock_fd)
            self.lock_fd = -1


class _Reader:
    """What the two readers share: a range of bytes to deliver, whether all of them were,
    and the counted download (a DownloadTicket) this reader may hold, ended on close."""

    object: StoredObject | None = None  # what a reader of a stored object reads
    max_downloads: int | None = None
    ticket: DownloadTicket | None = None

    def __init__(self, oid: str, fd: int, end: int | None):
        self.oid = oid
        self._fd = fd
        self.start = self.position = 0
        self.end = end  # where to stop; None: at the end of an upload of unknown length
        self.finished = end == 0  # every byte delivered, and asked for more since

    def select(self, first: int, last: int) -> None:
        """Deliver only bytes first..last (a range)."""
        self.start = self.position = first
        self.end = last + 1
        self.finished = False

    @property
    def sent(self) -> int:
        """Bytes delivered."""
        return self.position - self.start

    @property
    def _served_fd(self) -> int:
        return self._fd

    def close(self) -> None:
        """End the reader: a download it holds counts if every byte was delivered."""
        if self._fd < 0:
            return
        try:
            if self.ticket is not None:
                self.ticket.complete() if self.finished else self.ticket.release()
        finally:
            self._release()

    def _release(self) -> None:
        os.close(self._fd)
        self._fd = -1


class ObjectReader(_Reader):
    """A stored object, opened (held open, it is the object even if its name goes).

    It has a file descriptor, so it offers sendfile: fileno() and seek(), which is how
    socket.sendfile() reports where it stopped (the documented file protocol). Either way
    it knows when every byte went out: a read() asked for more after the last block, or
    a sendfile stopped at the end."""

    pause = staticmethod(time.sleep)  # a stored object's bytes are all there: never called

    def __init__(self, fd: int, obj: StoredObject):
        super().__init__(obj.oid, fd, obj.size)
        self.object = obj
        self.max_downloads = obj.max_downloads

    @property
    def length(self) -> int:
        return self.object.size

    def progress(self) -> None:
        """No upload is in progress: the object is stored."""

    def select(self, first: int, last: int) -> None:
        super().select(first, last)
        os.lseek(self._fd, first, os.SEEK_SET)  # where sendfile starts

    def read(self, size: int = -1) -> bytes:
        block = next(_blocks_at(self._fd, self.position, self.end, max(size, BLOCK_SIZE)), b"")
        if not block:
            self.finished = self.position >= self.end
        self.position += len(block)
        return block

    def fileno(self) -> int:
        return self._fd

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = os.lseek(self._fd, offset, whence)
        self.finished = self.position >= self.end
        return self.position


class UploadReader(_Reader):
    """Reads an upload in progress as its bytes arrive, from the start or a range.

    Until the upload has verified, the last byte of a known length is held back, so a
    reader never receives something that looks complete but is not. If the upload fails,
    is cancelled or stalls, read() raises UploadFailed. It has no sendfile: the bytes
    that may be sent grow while it reads.
    """

    def __init__(self, store: Store, partial: _Partial):
        super().__init__(partial.oid, partial.fd, None)
        self.store = store
        self.partial = partial
        self.mode = partial.info["mode"]
        self.length = partial.info["length"]  # the upload's, if known
        self.max_downloads = partial.limits.max_downloads
        # While a request writes to the upload (a plain PUT, a chunk, or the verification
        # of a completed chunked upload) its lock says the upload is alive, and the writer
        # enforces the idle timeout itself. Between the requests of a chunked upload,
        # silence for that long means it stalled.
        self.stall_timeout = store.config.idle_timeout
        # Called with the seconds to wait between looks; the reader's side may replace it
        # with a wait that raises UploadFailed when the reader goes away.
        self.pause = time.sleep
        self._blocks = None
        self._read_fd = partial.fd  # see _reader
        self._fresh_to = 0

    def _published(self) -> bool:
        """Whether the upload became the object: its name means our file, or did until the
        object was removed (only published objects are retired)."""
        oid, fd = self.partial.oid, self.partial.fd
        return self.store._is_our_object(oid, fd) or self.store._is_retired_object(oid, fd)

    def _reader(self, end: int) -> int:
        """The descriptor to read bytes below *end* through. A chunked upload's file keeps
        its size while its holes fill, so a shared filesystem's client may still hold a hole
        it read ahead earlier (zeros) once the hole is filled: a fresh open of the same
        file, as each newly acknowledged range is read, reads what is there now."""
        if self.mode == "chunks" and end > self._fresh_to:
            try:
                fresh = os.open(f"/proc/self/fd/{self.partial.fd}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # no /proc: a local filesystem's cache is never stale
                return self.partial.fd
            self._drop_reader()
            self._read_fd, self._fresh_to = fresh, end
        return self._read_fd

    def _drop_reader(self) -> None:
        if self._read_fd != self.partial.fd:
            os.close(self._read_fd)
        self._read_fd = self.partial.fd

    def unpublished(self) -> bool:
        """Whether the upload is still in progress: never linked as the object (which may
        since have been used up and removed), nor discarded."""
        with _removed_is_failure():  # a removed object keeps a link in retired/: not a test
            return self.partial.is_current() and not self.partial.was_published()

    def progress(self) -> Progress:
        """What the upload holds now, as Store.progress reports it."""
        partial = self.partial
        with _removed_is_failure():
            if self.mode == "stream":
                size = os.fstat(partial.fd).st_size
                ranges = [(0, size - 1)] if size else []
            else:
                ranges = partial.ranges()
            return Progress(self.mode, self.length, ranges, _lock_held(partial.fd, _WRITERS))

    def _available(self) -> tuple[int, bool]:
        """(bytes that may be sent, whether the upload has verified)."""
        with _removed_is_failure():
            return self._available_now()

    def _available_now(self) -> tuple[int, bool]:
        partial = self.partial
        if self._published():
            return os.fstat(partial.fd).st_size, True
        alive = partial.is_current() and (self.mode == "chunks" or _lock_held(partial.fd, _WRITERS))
        if not alive:
            if self._published():  # published between the two looks
                return os.fstat(partial.fd).st_size, True
            raise UploadFailed("the upload failed or was cancelled")
        end = os.fstat(partial.fd).st_size if self.mode == "stream" else contiguous_prefix(partial.ranges())
        if self.length is not None:
            end = min(end, self.length - 1)
        return end, False

    def read(self, size: int = -1) -> bytes:
        """The next bytes to arrive (up to BLOCK_SIZE), waiting for them; b"" at the end."""
        if self._blocks is None:
            self._blocks = self._arriving()
        block = next(self._blocks, b"")
        self.finished = not block
        return block

    def _arriving(self):
        end, verified = self._available()
        last_progress = time.monotonic()
        delays = _delays(_POLL_MIN, _POLL_MAX)
        while True:
            if self.end is not None:
                end = min(end, self.end)
            if self.position < end:
                with _removed_is_failure():
                    block = next(_blocks_at(self._reader(end), self.position, end), b"")
                    if not block and os.fstat(self._fd).st_size <= self.position:
                        raise UploadFailed("the upload's data shrank")
                if block:
                    self.position += len(block)
                    last_progress = time.monotonic()
                    delays = _delays(_POLL_MIN, _POLL_MAX)
                    yield block
                    continue
                # A shared filesystem may report a file's size a moment before its bytes
                # can be read through the same mount: look again shortly.
                if time.monotonic() - last_progress > self.stall_timeout:
                    raise UploadFailed("the upload's data could not be read")
            elif self.position == self.end:
                return
            elif verified:
                if self.end is not None and self.position < self.end:
                    raise UploadFailed("the range asked for ends past the object")
                return
            elif _lock_held(self.partial.fd, _WRITERS):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout:
                raise UploadFailed("the upload stalled")
            self.pause(next(delays))
            end, verified = self._available()

    def _release(self) -> None:
        if self.partial.fd >= 0:
            self._drop_reader()
        self._fd = -1
        self.partial.close()


# -- pipes: verified transfers that are never stored ------------------------------
#
# A pipe's file (.relay/pipes/<sha256>) is a header page, then a ring of at most
# --pipe-buffer bytes, allocated when the pipe begins and mapped by the sender and by
# each receiver, in any worker. The header holds the pipe's state, its length, how many
# bytes the sender has written into the ring and may be writing, and one slot per
# receiver: its status and how far it has read. The sender writes only where every
# receiver has read, so it stops reading its socket (TCP backpressure) while the
# slowest one is a ring behind; while the pipe waits for its receivers, it fills the
# ring once at most, and publishes none of it until they are there. OFD locks on the
# file: the sender's byte says it lives, each receiver holds its slot's byte, and the
# mutex byte makes a receiver's joining and the sender's claim on ring space one
# decision.

# magic, state, length (-1: unknown), capacity, wanted, claimed, written; then, once it failed, its PipeFailure
# and the length of its reason (UTF-8 at _PIPE_REASON_AT)
_PIPE_HEADER = struct.Struct("8sqqqqqqqq")
_PIPE_MAGIC = b"relaypip"
_PIPE_SLOT = struct.Struct("qq")  # status, position
_PIPE_SLOTS = 64  # receivers of one pipe, at most
_PIPE_SLOTS_AT = 128  # offset of the slots in the header
_PIPE_ALL_SLOTS = struct.Struct(f"{2 * _PIPE_SLOTS}q")
_PIPE_REASON_AT = _PIPE_SLOTS_AT + _PIPE_ALL_SLOTS.size
_PIPE_REASON_SIZE = 1024  # bytes of a failed pipe's reason kept, at most (before _PIPE_DATA_AT)
_PIPE_DATA_AT = max(mmap.PAGESIZE, 4096)  # offset of the ring
_PIPE_MUTEX = 1 << 62  # lock bytes of a pipe's file, beyond any data
_PIPE_SENDER = _PIPE_MUTEX + 1
_PIPE_RECEIVERS = _PIPE_MUTEX + 16  # one byte per slot
_PIPE_READ = 4 * BLOCK_SIZE  # bytes a receiver hands over at a time, at most
_PIPE_CLAIM = 8 * BLOCK_SIZE  # bytes the sender writes between two looks at the receivers, at most
_PIPE_POLL_MIN, _PIPE_POLL_MAX = 0.001, 0.02  # seconds between looks at a pipe


class PipeState(enum.IntEnum):
    WAITING = 0  # for its receivers: no bytes flow yet
    FLOWING = 1
    VERIFIED = 2  # every byte is in the ring and hashed to the name: receivers may finish
    FAILED = 3  # mismatch, aborted or stalled sender: every receiver is cut off
    CLOSED = 4  # over: every receiver finished or left


class PipeFailure(enum.IntEnum):
    """Why a pipe failed, as its receivers that have had no byte yet are told."""

    UNTOLD = 0  # none was recorded
    SENDER = 1  # its content did not verify, or its sender stopped or was refused
    TOO_FEW_RECEIVERS = 2  # its sender stopped waiting for the receivers it asked for


class _Receiver(enum.IntEnum):
    FREE = 0
    ACTIVE = 1
    DONE = 2  # got every byte
    GONE = 3  # left (or was cut off) before the end


_ACTIVE = int(_Receiver.ACTIVE)  # compared once a block for each slot: a plain int


class PipeAbandoned(StorageError):
    """Every receiver of a pipe left before the end."""


class PipeFailed(StorageError):
    """A pipe failed (or its sender went away) before any byte reached this receiver."""


class PipeShortOfReceivers(StorageError):
    """A pipe's sender stopped waiting for its receivers before any byte flowed."""


@dataclasses.dataclass(frozen=True)
class PipeOutcome:
    """How a pipe ended that verified: its size, and how many of the receivers that
    joined it got every byte."""

    size: int
    delivered: int
    receivers: int


class _PipeFile:
    """A pipe's file, opened and mapped: its header's fields and its ring."""

    def __init__(self, fd: int):
        self.fd = fd
        self.map = mmap.mmap(fd, 0)
        try:
            magic, _, _, capacity = _PIPE_HEADER.unpack_from(self.map)[:4]
            if magic != _PIPE_MAGIC or len(self.map) != _PIPE_DATA_AT + capacity:
                raise ValueError("not a pipe's file")
        except (ValueError, struct.error):
            self.map.close()
            raise
        self.capacity = capacity

    @classmethod
    def initialise(cls, fd: int, length: int | None, capacity: int, wanted: int) -> _PipeFile:
        header = _PIPE_HEADER.pack(
            _PIPE_MAGIC, PipeState.WAITING, -1 if length is None else length, capacity, wanted, 0, 0, 0, 0
        )
        _write_all(fd, header, 0)
        return cls(fd)

    def _field(self, index: int) -> int:
        return struct.unpack_from("q", self.map, 8 + 8 * (index - 1))[0]

    def _set_field(self, index: int, value: int) -> None:
        struct.pack_into("q", self.map, 8 + 8 * (index - 1), value)

    state = property(lambda self: PipeState(self._field(1)), lambda self, value: self._set_field(1, value))
    length = property(lambda self: None if self._field(2) < 0 else self._field(2))
    wanted = property(lambda self: self._field(4))
    claimed = property(lambda self: self._field(5), lambda self, value: self._set_field(5, value))
    written = property(lambda self: self._field(6), lambda self, value: self._set_field(6, value))

    def record_failure(self, failure: PipeFailure, reason: str) -> None:
        """Keep why the pipe failed (under the mutex, as its state is set to FAILED)."""
        text = reason.encode()[:_PIPE_REASON_SIZE]
        self.map[_PIPE_REASON_AT : _PIPE_REASON_AT + len(text)] = text
        self._set_field(8, len(text))
        self._set_field(7, failure)

    def failure(self) -> tuple[PipeFailure, str]:
        """Why the pipe failed, as recorded (UNTOLD and "" if it was not)."""
        size = min(max(0, self._field(8)), _PIPE_REASON_SIZE)
        try:
            failure = PipeFailure(self._field(7))
        except ValueError:
            failure = PipeFailure.UNTOLD
        return failure, bytes(self.map[_PIPE_REASON_AT : _PIPE_REASON_AT + size]).decode(errors="replace")

    def slot(self, index: int) -> tuple[_Receiver, int]:
        status, position = _PIPE_SLOT.unpack_from(self.map, _PIPE_SLOTS_AT + index * _PIPE_SLOT.size)
        return _Receiver(status), position

    def set_slot(self, index: int, status: _Receiver, position: int) -> None:
        _PIPE_SLOT.pack_into(self.map, _PIPE_SLOTS_AT + index * _PIPE_SLOT.size, status, position)

    def set_position(self, index: int, position: int) -> None:
        struct.pack_into("q", self.map, _PIPE_SLOTS_AT + index * _PIPE_SLOT.size + 8, position)

    def slots(self) -> list[tuple[int, int]]:
        """Every slot's (status, position), read at once: the sender looks once a block."""
        values = _PIPE_ALL_SLOTS.unpack_from(self.map, _PIPE_SLOTS_AT)
        return list(zip(values[::2], values[1::2], strict=True))

    def receiver_alive(self, index: int) -> bool:
        return _lock_held(self.fd, _PIPE_RECEIVERS + index)

    def sender_alive(self) -> bool:
        return _lock_held(self.fd, _PIPE_SENDER)

    @contextlib.contextmanager
    def mutex(self):
        _lock(self.fd, fcntl.F_WRLCK, _PIPE_MUTEX, wait=True)
        try:
            yield
        finally:
            _unlock(self.fd, _PIPE_MUTEX)

    def write(self, position: int, data) -> None:
        """Put *data* (at most the ring's size) into the ring at stream *position*."""
        at = position % self.capacity
        first = min(len(data), self.capacity - at)
        self.map[_PIPE_DATA_AT + at : _PIPE_DATA_AT + at + first] = data[:first]
        if first < len(data):
            self.map[_PIPE_DATA_AT : _PIPE_DATA_AT + len(data) - first] = data[first:]

    def read(self, position: int, size: int) -> bytes:
        """The *size* bytes at stream *position*, which are still in the ring."""
        at = position % self.capacity
        first = min(size, self.capacity - at)
        data = self.map[_PIPE_DATA_AT + at : _PIPE_DATA_AT + at + first]
        if first < size:
            data += self.map[_PIPE_DATA_AT : _PIPE_DATA_AT + size - first]
        return data

    def close(self) -> None:
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1


class PipeSender:
    """The sending side of a pipe (Store.open_pipe): wait for the receivers, send the body
    through the ring as fast as the slowest receiver takes it, verify, wait for the
    receivers to finish. close() ends it, and a pipe that did not verify fails: every
    receiver still reading is cut off."""

    def __init__(self, store: Store, oid: str, path: Path, pipe: _PipeFile):
        self.store = store
        self.oid = oid
        self.path = path
        self.pipe = pipe
        self.allowed = 0  # the stream position the sender may write up to before it asks again
        self.written = 0  # bytes of the body in the ring, taken while the pipe waited
        self.hashed = hashlib.sha256()  # of those bytes
        self.left_over = b""  # of the block that filled the ring, what did not fit
        self.body_ended = False

    def wait_for_receivers(self, body, seconds: float, pause) -> bool:
        """Wait up to *seconds* until as many receivers as the sender asked for have
        joined; whether they have. Meanwhile the blocks the sender sends of *body* go into
        the ring, hashed, as far as it holds them with every byte still there (a receiver
        that joins still gets them all), so that a sender that goes away is seen to go:
        its last bytes are not stuck behind unread ones. send() passes the rest of *body*.
        *pause*(seconds, reading=) waits between looks, and may raise; *reading*, it ends
        when the sender sends and says whether it did."""
        deadline = time.monotonic() + seconds
        delays = _delays(0.01, 0.25)
        while True:
            with self.pipe.mutex():
                if self._active() >= self.pipe.wanted:
                    self.pipe.state = PipeState.FLOWING
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # A body of unknown length comes in chunks read whole, so a slow sender would
            # hold up this loop: it is read only once the bytes may flow.
            sized = self.pipe.length is not None
            room = sized and not self.body_ended and not self.left_over and self.written < self.pipe.capacity
            if pause(min(next(delays), left), reading=room):
                self._take(body)

    def _take(self, body) -> None:
        """Put the next block of *body* into the ring, where no receiver has read yet."""
        block = next(body, None)
        if block is None:
            self.body_ended = True
            return
        self._check_limit(self.written, block)
        fits = block[: self.pipe.capacity - self.written]
        self.pipe.write(self.written, fits)
        self.hashed.update(fits)
        self.written += len(fits)
        self.left_over = bytes(block[len(fits) :])  # a copy: the block's buffer is reused

    def _check_limit(self, written: int, block) -> None:
        limit = self.store.config.max_file_size
        if self.pipe.length is None and limit is not None and written + len(block) > limit:
            raise TooLarge(f"larger than the relay's limit of {format_size(limit)} ({limit} bytes)")

    def receivers_present(self) -> int:
        with self.pipe.mutex():
            return self._active()

    def _active(self) -> int:
        """Receivers reading now (a receiver whose worker died is marked gone)."""
        active = 0
        for index, (status, position) in enumerate(self.pipe.slots()):
            if status == _Receiver.ACTIVE:
                if self.pipe.receiver_alive(index):
                    active += 1
                else:
                    self.pipe.set_slot(index, _Receiver.GONE, position)
        return active

    def send(self, body, length: int | None, pause) -> PipeOutcome:
        """Pass the rest of *body*'s blocks (after those wait_for_receivers took) through
        the ring, hashing them; once the whole has hashed to the name, let the receivers
        finish and wait for them. Raises Mismatch, PipeAbandoned (every receiver left),
        TooLarge (an unsized body over the limit)."""
        hasher = _BackgroundHasher(self.hashed)  # each block on a thread of its own, while it goes into the ring
        written = self.written
        try:
            for block in itertools.chain([self.left_over] if self.left_over else [], body):
                self._check_limit(written, block)
                hasher.update(block)
                offset = 0
                while offset < len(block):
                    if written >= self.allowed:
                        self._room(written, length, pause)
                    piece = block[offset : offset + self.allowed - written]
                    self.pipe.write(written, piece)
                    written += len(piece)
                    offset += len(piece)
        finally:
            digest = hasher.finish().hexdigest()
        if digest != self.oid:
            raise Mismatch(f"content hash {digest} does not match the name {self.oid}")
        with self.pipe.mutex():
            self.pipe.written = written
            self.pipe.state = PipeState.VERIFIED
        delays = _delays(_PIPE_POLL_MIN, _PIPE_POLL_MAX)
        while True:
            with self.pipe.mutex():
                if not self._active():
                    self.pipe.state = PipeState.CLOSED
                    slots = [status for status, _ in self.pipe.slots() if status != _Receiver.FREE]
                    return PipeOutcome(written, slots.count(_Receiver.DONE), len(slots))
            pause(next(delays))

    def _room(self, written: int, length: int | None, pause) -> None:
        """Let the sender write past stream position *written* (up to .allowed, at most
        _PIPE_CLAIM further, and never past *length*), waiting until the slowest receiver
        has read far enough for that; what was written before *written* is published to
        the receivers meanwhile.

        The header is read and written only under the mutex, by the sender and by each
        receiver: taking it orders the ring's bytes and the positions that say they may be
        read or overwritten, whatever the processor's memory model."""
        pipe = self.pipe
        delays = None
        while True:
            with pipe.mutex():
                pipe.written = written
                positions = [position for status, position in pipe.slots() if status == _ACTIVE]
                room = (min(positions) if positions else written) + pipe.capacity - written
                if room > 0 and positions:
                    room = min(room, _PIPE_CLAIM, (length - written) if length is not None else _PIPE_CLAIM)
                    pipe.claimed = self.allowed = written + max(1, room)
                    return
                if not positions or not self._active():
                    raise PipeAbandoned("every receiver left before the end")
            delays = delays or _delays(_PIPE_POLL_MIN, _PIPE_POLL_MAX)
            pause(next(delays))

    def fail(self, reason: str, failure: PipeFailure = PipeFailure.SENDER) -> None:
        """Fail the pipe, unless it verified: receivers that have had no byte yet are told
        *reason*; the others are cut off."""
        with self.pipe.mutex():
            if self.pipe.state in (PipeState.WAITING, PipeState.FLOWING):
                self.pipe.record_failure(failure, reason)
                self.pipe.state = PipeState.FAILED

    def close(self) -> None:
        """End the pipe: one that did not verify fails; its file goes (receivers that
        hold it finish or are cut off)."""
        pipe = self.pipe
        if pipe.fd < 0:
            return
        try:
            with pipe.mutex():
                if pipe.state not in (PipeState.VERIFIED, PipeState.CLOSED):
                    pipe.state = PipeState.FAILED
            with contextlib.suppress(FileNotFoundError):
                named, ours = os.stat(self.path), os.fstat(pipe.fd)
                if (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino):  # ours is open: not reused
                    os.unlink(self.path)
        finally:
            pipe.close()


class PipeReader:
    """A receiver of a pipe (Store.join_pipe): a Reader of the bytes as they pass, the
    last one held back until the whole has verified. read() raises UploadFailed when the
    pipe fails or its sender goes."""

    object = None
    max_downloads = None
    ticket = None

    def __init__(self, pipe: _PipeFile, slot: int | None):
        self.pipe = pipe
        self.slot = slot  # None: a look at the pipe (HEAD), not a receiver
        self.length = pipe.length
        self.position = 0
        self.finished = False
        self.pause = time.sleep

    @property
    def sent(self) -> int:
        return self.position

    def progress(self) -> Progress:
        written = self.pipe.written
        return Progress("pipe", self.length, [(0, written - 1)] if written else [], True)

    def select(self, first: int, last: int) -> None:
        raise Conflict("a pipe is sent whole, from its first byte")

    def wait_for_bytes(self) -> None:
        """Wait until read() has bytes to pass, or the pipe has verified (it may have none);
        raises PipeFailed or PipeShortOfReceivers, with the sender's reason, when it fails
        first, or its sender goes. Waits with .pause, as read() does."""
        pipe = self.pipe
        delays = _delays(_PIPE_POLL_MIN, _PIPE_POLL_MAX)
        while True:
            sender_alive = pipe.sender_alive()  # looked at first: a sender that ended has set the state
            with pipe.mutex():
                state, written = pipe.state, pipe.written
                failure, reason = pipe.failure()
            if state is PipeState.FAILED:
                why = f"the pipe failed before any byte reached this receiver; {reason or 'its sender stopped'}"
                raise (PipeShortOfReceivers if failure is PipeFailure.TOO_FEW_RECEIVERS else PipeFailed)(why)
            if state in (PipeState.VERIFIED, PipeState.CLOSED):
                return
            if not sender_alive:
                raise PipeFailed("the pipe's sender went away before any byte reached this receiver")
            if self.position < written - 1:
                return
            self.pause(next(delays))

    def read(self, size: int = -1) -> bytes:
        """The next bytes to pass (up to _PIPE_READ), waiting for them; b"" at the end."""
        pipe = self.pipe
        delays = _delays(_PIPE_POLL_MIN, _PIPE_POLL_MAX)
        while True:
            with pipe.mutex():  # see PipeSender._room
                pipe.set_position(self.slot, self.position)  # the bytes returned before are sent
                state = pipe.state
                written = pipe.written
                verified = state in (PipeState.VERIFIED, PipeState.CLOSED)
                if verified and self.position == written:
                    self.finished = True
                    pipe.set_slot(self.slot, _Receiver.DONE, self.position)
                    return b""
            end = written if verified else written - 1
            if self.position < end:
                size = min(end - self.position, _PIPE_READ)
                data = pipe.read(self.position, size)
                self.position += size
                return data
            if state is PipeState.FAILED:
                raise UploadFailed("the pipe failed: its content did not verify, or its sender stopped")
            if not pipe.sender_alive():
                raise UploadFailed("the pipe's sender went away")
            self.pause(next(delays))

    def close(self) -> None:
        pipe = self.pipe
        if pipe.fd < 0:
            return
        try:
            if self.slot is not None:
                with pipe.mutex():
                    if pipe.slot(self.slot)[0] is not _Receiver.DONE:
                        pipe.set_slot(self.slot, _Receiver.GONE, self.position)
                _unlock(pipe.fd, _PIPE_RECEIVERS + self.slot)
        finally:
            pipe.close()


# ---------------------------------------------------------------------------
# S3 storage
#
# --storage s3://BUCKET/PREFIX: an S3-compatible object store (AWS S3, MinIO, Ceph RGW,
# SeaweedFS, R2) at --s3-endpoint, with the standard AWS credential sources. Its client
# (boto3, requirements-s3.txt) is imported only here, when this backend is used. Any number
# of relay processes on any hosts may share one bucket and prefix:
#
# PREFIX/objects/<sha256>            a verified object: created only where none is (If-None-Match: *
#                                    on PutObject or CompleteMultipartUpload), never overwritten;
#                                    its user metadata: the upload's token, ttl, max-downloads, and
#                                    stored-at (a multipart upload's: when it began; lifetimes count
#                                    from it)
# PREFIX/downloads/<sha256>.<token>  the downloads of that upload of the object (its followers'
#                                    too, before it is stored): JSON, changed only by
#                                    compare-and-swap (If-Match on its ETag)
# PREFIX/segments/<sha256>/<length>/<first>-<last>.<token>   one chunk of an upload in chunks, stored
#                                    once its bytes are (and match their Content-Digest)
# PREFIX/segments/<sha256>/unsized.<attempt>/<first>-<last>.<token>   one segment of a whole upload
#                                    of unknown length (never an upload in chunks: no length)
# PREFIX/claims/<key>                held while one upload creates, or one removal removes, the
#                                    object <key> (see _claim)
# PREFIX/incoming/<token>            an upload the relay names, until it is copied under its hash
# PREFIX/unnamed/<token>             a resumable upload the relay names: its length, limits, name,
#                                    and once stored, its object's name
# PREFIX/.probe-*                    written and removed at start (the permission to write)
#
# An upload is hashed as it arrives. A small one is sent in one PutObject once verified. A
# larger one, of known length or not, is stored as segments as it arrives (so that
# followers on any host read it), which the store copies into a multipart upload under the
# object's key (UploadPartCopy), completed only once the hash matched (else aborted):
# nothing is visible under the name before. A follower of a whole upload with a budget
# counts on the counter of the upload's token, which its segments carry. An upload in
# chunks is its segments until the chunk that completes it has the object written from
# them. An upload the relay names is staged (PREFIX/incoming/), then copied under its hash;
# a resumable one is recorded in PREFIX/unnamed/<token>. Not done on S3 yet, answered 501:
# following an upload in chunks with a budget, or one being copied from its staged copy.
# ---------------------------------------------------------------------------

# Options whose meaning is a local filesystem's.
_S3_REFUSED_OPTIONS = {
    "files_directory": "--files-directory is where the files directory is; with --storage s3:// there is none",
    "min_free": "--min-free keeps free space on a filesystem; an object store has none to keep (use --max-disk)",
    "purge_on_exit": "--purge-on-exit would remove the files of every relay sharing the bucket",
}
_S3_PART_SIZE = 8 << 20  # bytes per part of a multipart upload of known length (at least)
_S3_UNSIZED_PART_SIZE = 16 << 20  # of an upload of unknown length: 10,000 parts make 156.2 GiB
_S3_MAX_PARTS = 10_000  # parts of a multipart upload, at most
_S3_MAX_PART_SIZE = 64 << 20  # so that an upload holds at most three parts in memory: 625 GiB at most
_S3_UNBOUNDED = 1 << 60  # the space reported for a store without --max-disk: it has no size to tell
_S3_LEASE = 300.0  # seconds a counted download in flight holds its slot unless renewed
_S3_CHANGED_ON_THE_WAY = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch")  # a body that fails its checksum
_S3_FULL_CODES = ("XMinioStorageFull", "InsufficientStorage", "QuotaExceeded", "StorageFull")
_S3_SWAP_ATTEMPTS = 64  # compare-and-swaps of one counter before the request is told to retry
_S3_CLAIM_PATIENCE = 30.0  # seconds a creation or removal of a key waits for another's claim on it
_S3_CLAIM_STALE = 3600.0  # seconds after which a claim whose lease does not read is its dead holder's
_S3_CLOCK_SKEW = 120.0  # seconds a host's clock may be off the store's without harm to claims
_S3_CLAIM_PER_PART = 0.05  # seconds a completion's claim is given for each part or segment
_S3_QUICK_CLAIM = 5.0  # seconds after which a removal's claim is (a small PutObject's: more)
_S3_SLOWEST_RATE = 2 << 20  # bytes per second a small PutObject is given, at least
_S3_COPY_PART_SIZE = 512 << 20  # bytes per UploadPartCopy of a staged upload
_S3_PARTS_IN_FLIGHT = 2  # parts of one upload being sent at once while the next one arrives
_S3_SAFE_IDLE = 0.75  # of --partial-ttl: how long a whole upload may go without storing a segment
_S3_READ_SIZE = 1 << 20  # bytes a download asks of the store's response at once
_S3_SEGMENTED = "segments"  # an object's "layout": its bytes are its upload's segments, which its body lists
# What stands for the length in the key of a segment of a whole upload of unknown length,
# followed by that attempt's own token: never a number, so never one upload in chunks.
_UNSIZED_SEGMENTS = "unsized."
_WHOLE_SEGMENT = ".whole"  # the end of the key of a segment of a whole upload
_REMOVED_SEGMENTS = "removed"  # PREFIX/segments/<oid>/removed/...: notes of a stored object's segments being removed


def parse_storage_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of s3://BUCKET[/PREFIX]."""
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def s3_option_problem(config: RelayConfig) -> str | None:
    """Why options given with an S3 storage make no sense there, or None."""
    defaults = RelayConfig(server_id=config.server_id)
    for name, reason in _S3_REFUSED_OPTIONS.items():
        if getattr(config, name) != getattr(defaults, name):
            return reason
    return None


def _s3_client(config: RelayConfig):
    """A boto3 client of the store: the standard credential sources, bounded timeouts,
    checksums only where the operation needs one (the relay verifies SHA-256 itself). No
    request body is hashed for its signature, on http as on https: each one that carries
    bytes carries their x-amz-checksum-sha256, a signed header the store verifies them by."""
    import boto3
    import botocore.config

    settings = botocore.config.Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path" if config.s3_endpoint else "auto", "payload_signing_enabled": False},
        max_pool_connections=64,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=config.s3_endpoint or None, config=settings)


def _s3_status(exc) -> tuple[int, str]:
    """The HTTP status and error code of a boto3 ClientError."""
    response = getattr(exc, "response", {}) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0), str(response.get("Error", {}).get("Code", ""))


def probe_s3_storage(config: RelayConfig) -> str | None:
    """One line saying why the object store of *config* cannot be used, or None: it is
    reached, accepts the credentials, has the bucket, lets the relay create and remove a
    key under the prefix, and keeps create-only writes (a second If-None-Match: * put of
    a key is refused)."""
    try:
        import botocore.exceptions
    except ImportError:
        return "--storage s3:// needs boto3: pip install -r requirements-s3.txt"
    bucket, prefix = parse_storage_url(config.storage)
    where = config.s3_endpoint or "the AWS endpoint"
    probe = f"{prefix}.probe-{secrets.token_hex(8)}"
    try:
        client = _s3_client(config)
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=probe, Body=b"", IfNoneMatch="*")
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"again", IfNoneMatch="*")
            overwritten = True
        except botocore.exceptions.ClientError as exc:
            if _s3_status(exc)[0] != 412:
                raise
            overwritten = False
        client.delete_object(Bucket=bucket, Key=probe)
        if overwritten:
            return f"{where} ignores If-None-Match: * on PutObject: the relay needs create-only writes"
    except botocore.exceptions.NoCredentialsError:
        return "no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)"
    except botocore.exceptions.ClientError as exc:
        status, code = _s3_status(exc)
        operation = exc.operation_name
        if status == 404 or code == "NoSuchBucket":
            return f"bucket {bucket!r} does not exist at {where}"
        if operation == "HeadBucket" and (status in (400, 401, 403) or "Signature" in code or "AccessKey" in code):
            return f"{where} refused the credentials for bucket {bucket!r} ({code or status})"
        if status == 403 or code == "AccessDenied":
            return f"no permission to write to s3://{bucket}/{prefix} at {where}"
        return f"{where} answered {operation} with {code or status}"
    except botocore.exceptions.BotoCoreError as exc:
        return f"cannot reach the object store at {where}: {exc}"
    return None


def _claim_lease(head: dict) -> float:
    """The seconds a claim (its HeadObject) says its holder needs at most."""
    try:
        return float(head.get("Metadata", {}).get("lease", _S3_CLAIM_STALE))
    except ValueError:
        return _S3_CLAIM_STALE


def _claim_is_stale(head: dict, first_seen: float | None, now: float | None = None) -> bool:
    """Whether the claim *head* (its HeadObject) is its dead holder's: this host has seen it
    for longer than its lease (time.monotonic() since *first_seen*, no clock but its own),
    or the store's clock says it is older than its lease by more than _S3_CLOCK_SKEW."""
    if first_seen is not None and time.monotonic() - first_seen > _claim_lease(head):
        return True
    now = time.time() if now is None else now
    return now - head["LastModified"].timestamp() > _claim_lease(head) + _S3_CLOCK_SKEW


def _s3_checksum(data) -> str:
    """The x-amz-checksum-sha256 of a body: its SHA-256, in base64."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@contextlib.contextmanager
def _held():
    """A claim not needed: held at once, for as long as it takes."""
    yield math.inf


class _S3Parts:
    """The parts of one multipart upload, each sent on a thread of its own as soon as it
    is whole, while the body goes on arriving: at most _S3_PARTS_IN_FLIGHT at once (each
    holds its bytes until the store has them). A part that failed fails the next send."""

    def __init__(self, send_part):
        self.send_part = send_part  # (number, bytes) -> {"PartNumber", "ETag"}
        self.pool = concurrent.futures.ThreadPoolExecutor(_S3_PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
        self.sent: list = []  # futures, in part order
        self.checked = 0  # how many of them are known to have succeeded

    def send(self, data: bytes) -> None:
        running = [future for future in self.sent[self.checked :] if not future.done()]
        if len(running) >= _S3_PARTS_IN_FLIGHT:
            concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        while self.checked < len(self.sent) and self.sent[self.checked].done():
            self.sent[self.checked].result()  # raises what the part's send raised
            self.checked += 1
        self.sent.append(self.pool.submit(self.send_part, len(self.sent) + 1, data))

    def finish(self) -> list[dict]:
        """Every part, once the store has it."""
        return [future.result() for future in self.sent]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Pieces:
    """The bytes of the blocks given to cut(), in pieces of *size* bytes (the last, rest(),
    may be fewer), each a bytearray of its own, filled by one copy of each byte and not
    touched once handed out: botocore sends a bytearray body in one write, where it wraps
    bytes in a BytesIO and sends them 8 KiB at a time."""

    def __init__(self, size: int):
        self.size = size
        self._piece = bytearray()

    def cut(self, block) -> list[bytearray]:
        """The pieces that *block* completes (its bytes are copied: its buffer may be reused)."""
        full = []
        view = memoryview(block)
        while view:
            taken = min(len(view), self.size - len(self._piece))
            self._piece += view[:taken]
            view = view[taken:]
            if len(self._piece) == self.size:
                full.append(self._piece)
                self._piece = bytearray()
        return full

    def rest(self) -> bytearray:
        """The bytes given since the last full piece."""
        return self._piece


class _BlocksBody:
    """read() and close(), as of a response's body, over an iterator of blocks."""

    def __init__(self, blocks):
        self._blocks = blocks
        self._left = b""

    def read(self, size: int = -1) -> bytes:
        if not self._left:
            self._left = next(self._blocks, b"")
        if size < 0 or size >= len(self._left):
            block, self._left = self._left, b""
        else:
            block, self._left = self._left[:size], self._left[size:]
        return block

    def close(self) -> None:
        self._blocks.close()


class S3Store:
    """Objects in an S3-compatible bucket under a prefix, shared by any number of relays.

    Every decision is the store's: an object exists once a create-only write of it
    succeeded, and a download budget changes only by compare-and-swap, so relays on
    several hosts need nothing else in common. The store's failures are Unavailable
    (NoSpace when it says it is full), never half-done work under an object's name."""

    def __init__(self, config: RelayConfig):
        self.config = config
        self.bucket, self.prefix = parse_storage_url(config.storage)
        self._client = None
        self._client_pid = None
        self._client_lock = threading.Lock()
        self._reserved_lock = threading.Lock()
        self._reserved = 0  # bytes of this process's uploads in progress
        self.lease_seconds = _S3_LEASE  # how long a counted download's slot outlives its last renewal
        self.max_parts = _S3_MAX_PARTS  # parts of one multipart upload, at most
        self._segment_lists: dict = {}  # (object key, ETag) -> a segmented object's segments, as read

    # -- the store ---------------------------------------------------------------

    @property
    def client(self):
        """This process's client (one made before a fork is not used after it)."""
        if self._client_pid != os.getpid():
            with self._client_lock:
                if self._client_pid != os.getpid():
                    self._client = _s3_client(self.config)
                    self._client_pid = os.getpid()
        return self._client

    def _call(self, doing: str, operation: str, *, absent=(), **kwargs):
        """client.<operation>(Bucket=..., **kwargs), the store's failures as StorageErrors;
        None if the store answered with a status in *absent*."""
        import botocore.exceptions

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            status, code = _s3_status(exc)
            if status in absent:
                return None
            if status == 507 or code in _S3_FULL_CODES:
                raise NoSpace(f"the object store is full ({code or status}) while trying to {doing}") from None
            if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout"):
                raise Unavailable(f"the object store failed to {doing} ({code or status})") from None
            if code in _S3_CHANGED_ON_THE_WAY:
                raise Unavailable(f"the object store received changed bytes when asked to {doing} ({code})") from None
            if code == "NoSuchUpload":  # a sweeper took it for abandoned (idle for --partial-ttl)
                raise Conflict(f"the store's upload ended before this one did ({code}): send it again") from None
            raise StorageError(f"the object store refused to {doing} ({code or status})") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise Unavailable(f"the object store cannot be reached to {doing} ({exc.__class__.__name__})") from None

    def _object_key(self, oid: str) -> str:
        return f"{self.prefix}objects/{oid}"

    def _counter_key(self, oid: str, token: str) -> str:
        return f"{self.prefix}downloads/{oid}.{token}"

    def _keys(self, under: str):
        """(key, size, last modified) of every key under PREFIX/*under*."""
        token = None
        while True:
            more = {"ContinuationToken": token} if token else {}
            page = self._call("list objects", "list_objects_v2", Prefix=f"{self.prefix}{under}", **more)
            for item in page.get("Contents", ()):
                yield item["Key"], item["Size"], item["LastModified"].timestamp()
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _multipart_uploads(self, key_prefix: str):
        """(key, upload id, initiated at) of the multipart uploads in progress under *key_prefix*."""
        markers: dict = {}
        while True:
            page = self._call("list uploads", "list_multipart_uploads", Prefix=key_prefix, **markers)
            for upload in page.get("Uploads", ()):
                yield upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    def prepare(self) -> None:
        """Nothing to create: the bucket is the operator's (checked at start)."""

    def start_worker(self) -> None:
        """Make this worker's client now, not in its first request (botocore's set-up)."""
        assert self.client is not None

    # -- objects -----------------------------------------------------------------

    def _head(self, oid: str) -> tuple[StoredObject, str] | None:
        """The stored object and the token of the upload that stored it, or None."""
        head = self._call("look up an object", "head_object", absent=(404,), Key=self._object_key(oid))
        if head is None:
            return None
        meta = head.get("Metadata", {})
        token = meta.get("token", "")
        stored_at = float(meta["stored-at"]) if meta.get("stored-at") else head["LastModified"].timestamp()
        ttl = float(meta["ttl"]) if meta.get("ttl") else None
        max_downloads = int(meta["max-downloads"]) if meta.get("max-downloads") else None
        downloads = 0
        if max_downloads is not None:
            state, _ = self._read_counter(oid, token)
            downloads = self._counted(state)
        obj = StoredObject(
            oid=oid,
            size=int(meta["size"]) if meta.get("layout") == _S3_SEGMENTED else head["ContentLength"],
            stored_at=stored_at,
            expires_at=None if ttl is None else stored_at + ttl,
            max_downloads=max_downloads,
            downloads=downloads,
        )
        return obj, token

    @staticmethod
    def _is_spent(obj: StoredObject, now: float) -> bool:
        return Store._is_spent(obj, now)

    def _found(self, oid: str) -> tuple[StoredObject, str] | None:
        """_head(), but an object that expired or was used up is removed on sight."""
        found = self._head(oid)
        if found is None:
            return None
        obj, token = found
        if self._is_spent(obj, time.time()):
            if obj.expires_at is not None and obj.expires_at <= time.time():
                self._remove(oid, token)
                return None
            if self._used_up(oid, token, obj.max_downloads, time.time()):
                self._remove(oid, token)
                return None
        return found

    def _used_up(self, oid: str, token: str, limit: int, now: float) -> bool:
        """Whether the downloads of upload *token* of the object are all done, judged on one
        read of its counter: as many counted as *limit* allows, none in flight. A download
        in flight when _head() looked may have been given back since."""
        state, _ = self._read_counter(oid, token)
        return not self._live_leases(state, now) and self._counted(state) >= limit

    def _remove(self, oid: str, token: str | None = None) -> bool:
        """Remove the object (only the upload *token* of it, if given); False if it was not
        there. Under the key's claim: a copy stored since it was looked at stays. The
        segments of one stored as its segments are named first in a note of their removal
        (_note_removal), removed last: if they outlive the object (its host died, the store
        failed), they are never taken for an upload in progress, and a sweeper removes them."""
        with self._claim(self._object_key(oid), unless_stored=False, lease=self._quick_lease(0)) as until:
            found = self._head(oid)
            if found is None or (token is not None and found[1] != token):
                return False
            segments = [(0, 0, 0, key) for _, _, key in self._segment_list(oid) or ()]
            if segments:
                segments.append((0, 0, 0, self._note_removal(oid, segments)))
            if time.monotonic() > until:
                raise Busy("the object store is slow to answer: remove it again", retry_after=5)
            self._call("remove an object", "delete_object", Key=self._object_key(oid))
        with contextlib.suppress(StorageError):  # else the sweeper removes them, listed by no object
            self._drop_segments(segments)
        return True

    def _note_removal(self, oid: str, segments) -> str:
        """The key of a new note, PREFIX/segments/<oid>/removed/<random>, that names the
        *segments* ((..., key) each) of a stored object as being removed."""
        key = f"{self.prefix}segments/{oid}/{_REMOVED_SEGMENTS}/{secrets.token_hex(8)}"
        body = json.dumps([segment[-1][len(self.prefix) :] for segment in segments]).encode()
        self._call("note a removal", "put_object", Key=key, Body=body, ChecksumSHA256=_s3_checksum(body))
        return key

    def _noted_removal(self, key: str) -> set[str]:
        """The keys of the segments that the note *key* (_note_removal) names."""
        got = self._call("read a note of a removal", "get_object", absent=(404,), Key=key)
        if got is None:
            return set()
        try:
            return {f"{self.prefix}{name}" for name in json.loads(got["Body"].read(64 << 20))}
        except (ValueError, TypeError, OSError) as exc:
            raise Unavailable(f"the object store sent a note of a removal that does not read ({exc})") from None

    def lookup(self, oid: str) -> StoredObject | None:
        found = self._found(oid)
        return found[0] if found else None

    def is_stored(self, oid: str) -> bool:
        return self._found(oid) is not None

    def open(self, oid: str) -> S3ObjectReader | None:
        found = self._found(oid)
        return S3ObjectReader(self, *found) if found else None

    def _stream(self, oid: str, first: int, last: int):
        """A body (read(), close()) of bytes first..last of the object: the store's response,
        or of an object stored as its segments, theirs in turn. Which one is judged on the
        response itself, so that a segment list is never taken for the object's bytes."""
        got = self._call(
            "read an object", "get_object", absent=(404, 416), Key=self._object_key(oid), Range=f"bytes={first}-{last}"
        )
        if got is not None and got.get("Metadata", {}).get("layout") != _S3_SEGMENTED:
            return got["Body"]
        if got is not None:
            got["Body"].close()
        segments = self._segment_list(oid)  # a range past the end of a segment list got 416
        if segments is None:
            raise UploadFailed("the object was removed while it was being read")
        return _BlocksBody(self._listed_bytes(segments, first, last))

    def _listed_bytes(self, segments: list[tuple[int, int, str]], first: int, last: int):
        """Bytes first..last of an object made of *segments* (_segment_list), from each in
        turn; the next one's GET is sent while this one's bytes are read."""
        index = bisect.bisect_right([start for start, _, _ in segments], first) - 1
        wanted = [(key, max(first, start) - start, min(end, last) - start) for start, end, key in segments[index:]]
        wanted = [(key, low, high) for key, low, high in wanted if low <= high]
        ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="s3-read-ahead")
        opening = None
        try:
            for number, (key, low, high) in enumerate(wanted):
                got = opening.result() if opening is not None else self._open_segment(key, low, high)
                opening = ahead.submit(self._open_segment, *wanted[number + 1]) if number + 1 < len(wanted) else None
                try:
                    yield from self._segment_blocks(got, high + 1 - low)
                finally:
                    got["Body"].close()
        finally:
            if opening is not None:
                with contextlib.suppress(Exception):  # its failure is no one's now
                    opening.result()["Body"].close()
            ahead.shutdown(wait=False)

    def _open_segment(self, key: str, low: int, high: int) -> dict:
        """The store's response to a GET of bytes low..high of the segment *key*."""
        got = self._call("read a chunk", "get_object", absent=(404, 416), Key=key, Range=f"bytes={low}-{high}")
        if got is None:
            raise Busy("a segment of the object is gone", retry_after=1)
        return got

    @staticmethod
    def _segment_blocks(got: dict, size: int):
        """The *size* bytes of the response *got*, in blocks; Unavailable if they stop short."""
        import botocore.exceptions
        import urllib3.exceptions

        try:
            while size > 0 and (block := got["Body"].read(min(_S3_READ_SIZE, size))):
                size -= len(block)
                yield block
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"the object store stopped sending a chunk ({exc.__class__.__name__})") from None
        if size > 0:
            raise Unavailable("the object store ended a chunk early")

    def _object_bytes(self, oid: str, first: int, last: int):
        """Bytes first..last of the stored object, in blocks (read once the first is asked for)."""
        stream = self._stream(oid, first, last)
        try:
            yield from iter(functools.partial(stream.read, _S3_READ_SIZE), b"")
        finally:
            stream.close()

    def _segment_list(self, oid: str) -> list[tuple[int, int, str]] | None:
        """(first, last, key) of each segment of the stored object, if it is stored as its
        upload's segments (_store_segmented); else None (stored whole, or not at all). A
        list is read once per object and ETag: it never changes while its object exists."""
        key = self._object_key(oid)
        head = self._call("look up an object", "head_object", absent=(404,), Key=key)
        if head is None or head.get("Metadata", {}).get("layout") != _S3_SEGMENTED:
            return None
        if (key, head["ETag"]) in self._segment_lists:
            return self._segment_lists[key, head["ETag"]]
        got = self._call("read an object's segments", "get_object", absent=(404, 412), Key=key, IfMatch=head["ETag"])
        if got is None or got.get("Metadata", {}).get("layout") != _S3_SEGMENTED:
            return None  # removed (or replaced) meanwhile
        try:
            listed = json.loads(got["Body"].read(64 << 20))
            segments = [(int(first), int(last), f"{self.prefix}{name}") for first, last, name in listed["segments"]]
            size = int(listed["size"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise Unavailable(f"the object store sent an object's segment list that does not read ({exc})") from None
        if [first for first, _, _ in segments] != [0] + [last + 1 for _, last, _ in segments[:-1]] or (
            segments[-1][1] + 1 if segments else 0
        ) != size:
            raise Unavailable("the object store sent an object's segment list that does not cover it")
        if len(self._segment_lists) >= 1024:
            self._segment_lists.clear()
        self._segment_lists[key, head["ETag"]] = segments
        return segments

    def follow(self, oid: str) -> S3UploadReader | None:
        """A reader of the upload of *oid* in segments (in chunks, or whole and larger than
        a segment: its segments, then the object), or None. A follower of a whole upload
        with a download budget counts against it (reserve_download), on the counter of the
        upload's token, which its segments carry. NotSupported for an upload that cannot be
        followed: one in chunks with a budget (its object's token is chosen only when it is
        composed), or one under way without segments (copied from a staged upload)."""
        sized, unsized = self._listed_segments(oid)
        if sized:
            meta = self._segment_metadata(sized[0][3])
            if meta is None:  # the upload ended since: its budget is the object's, if stored
                return self.open(oid)
            if meta.get("max-downloads") and not meta.get("whole"):
                raise NotSupported(
                    "following an upload in chunks with Max-Downloads is not done on S3: retry once stored"
                )
            return S3UploadReader(self, oid, sized[0][2], meta)
        if unsized:  # the attempt furthest along
            attempt, segments = max(unsized.items(), key=lambda item: len(item[1]))
            meta = self._segment_metadata(segments[0][2])
            return self.open(oid) if meta is None else S3UploadReader(self, oid, None, meta, attempt)
        key = self._object_key(oid)
        began = [initiated for found, _, initiated in self._multipart_uploads(key) if found == key]
        if began:
            raise NotSupported(
                f"an upload of this object began {http_date(min(began))} and is being copied into place "
                "without segments to follow: download it once it is stored"
            )
        return None

    def _segment_metadata(self, key: str) -> dict | None:
        """The user metadata of a segment (None once it is gone)."""
        head = self._call("look up a chunk", "head_object", absent=(404,), Key=key)
        return head.get("Metadata", {}) if head is not None else None

    def progress(self, oid: str) -> Progress | None:
        """Where the upload of *oid* in chunks stands, from the segments any host stored;
        with none, where a whole upload of it stands (Progress "stream": not chunks that
        an upload in chunks goes on from)."""
        chunks = self._chunks(oid)
        segments = chunks or self._segments(oid)
        if not segments:
            return None
        ranges = merge_ranges((first, last) for first, last, _, _ in segments)
        return Progress("chunks" if chunks else "stream", segments[0][2], ranges, False)

    def delete(self, oid: str) -> bool:
        """Remove the stored object and the segments of its upload in chunks (a whole
        upload in progress, on any host, is not cancelled: its segments stay)."""
        removed = self._remove(oid)
        chunks = self._chunks(oid)
        self._drop_segments(chunks)
        return removed or bool(chunks)

    # -- download budgets --------------------------------------------------------

    def _read_counter(self, oid: str, token: str) -> tuple[dict, str | None]:
        """The downloads of the upload *token* of the object, and the counter's ETag (None
        if it has none yet: nothing counted)."""
        got = self._call("read a download count", "get_object", absent=(404,), Key=self._counter_key(oid, token))
        if got is None:
            return {"completed": 0, "leases": {}}, None
        try:
            state = json.loads(got["Body"].read(64 << 10))
        except (ValueError, OSError) as exc:
            raise Unavailable(f"the object store sent a download count that does not read ({exc})") from None
        return state, got["ETag"]

    def _swap_counter(self, oid: str, token: str, state: dict, etag: str | None) -> bool:
        """Replace the counter read with *etag* by *state*: False if it changed meanwhile."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        body = json.dumps(state).encode()
        # 412: changed meanwhile; 409: another swap in flight (AWS); 404: gone (AWS's If-Match).
        # The checksum makes the store refuse a body cut short rather than keep what came.
        done = self._call(
            "count a download",
            "put_object",
            absent=(404, 409, 412),
            Key=self._counter_key(oid, token),
            Body=body,
            ChecksumSHA256=_s3_checksum(body),
            **condition,
        )
        return done is not None

    @staticmethod
    def _live_leases(state: dict, now: float) -> dict:
        return {lease: until for lease, until in state.get("leases", {}).items() if until > now}

    @staticmethod
    def _counted(state: dict) -> int:
        """Downloads counted: those completed, in flight, or begun by a relay that stopped
        renewing its lease (it died: counted, as a crash on a file system counts one)."""
        return state.get("completed", 0) + len(state.get("leases", {}))

    def _change_counter(self, oid: str, token: str, change) -> object:
        """Apply change(state, now) -> (new state or None to leave it, result) by
        compare-and-swap until it holds; the result."""
        for _ in range(_S3_SWAP_ATTEMPTS):
            state, etag = self._read_counter(oid, token)
            now = time.time()
            live = self._live_leases(state, now)
            state = {"completed": state.get("completed", 0) + len(state.get("leases", {})) - len(live), "leases": live}
            new, result = change(state, now)
            if new is None or self._swap_counter(oid, token, new, etag):
                return result
            time.sleep(random.uniform(0.005, 0.05))
        raise Busy("too many downloads of this object are being counted at once", retry_after=1)

    def reserve_download(self, reader: S3ObjectReader | S3UploadReader) -> S3DownloadTicket | None:
        """A lease on one counted download, if the object has a budget: counted at once and
        given back if the download does not go through whole (a follower's: on the counter
        of the upload it follows, whose object has that upload's token once stored).
        NotFound once it is used up, Busy while its remaining downloads are in flight."""
        limit = reader.max_downloads
        if limit is None:
            return None
        oid, token, lease = reader.oid, reader.token, secrets.token_hex(8)

        def take(state: dict, now: float):
            if state["completed"] >= limit:
                return None, None
            if state["completed"] + len(state["leases"]) >= limit:
                return None, False
            state["leases"][lease] = now + self.lease_seconds
            return state, limit - state["completed"] - len(state["leases"])

        remaining = self._change_counter(oid, token, take)
        if remaining is None:
            self._remove(oid, token)
            raise NotFound("no such object")
        if remaining is False:
            raise Busy("the remaining downloads of this object are in progress", retry_after=5)
        reader.ticket = S3DownloadTicket(self, oid, token, lease, limit, remaining)
        return reader.ticket

    # -- uploads -----------------------------------------------------------------

    def check_size(self, size: int) -> None:
        limit = self.config.max_file_size
        if size > self.max_parts * _S3_MAX_PART_SIZE:
            most = self.max_parts * _S3_MAX_PART_SIZE
            raise TooLarge(f"larger than the relay stores in S3 ({format_size(most)}: {self.max_parts} parts at most)")
        if limit is not None and size > limit:
            raise TooLarge(f"larger than the relay's limit of {format_size(limit)} ({limit} bytes)")

    def _check_unsized(self, received: int) -> None:
        """Refuse a body of unknown length once it has *received* bytes more than its parts
        of _S3_UNSIZED_PART_SIZE can hold: before a part beyond the last is sent."""
        self.check_size(received)
        most = self.max_parts * _S3_UNSIZED_PART_SIZE
        if received > most:
            raise TooLarge(
                f"larger than the relay stores in S3 without a Content-Length ({format_size(most)}, {most} bytes: "
                f"{self.max_parts} parts of {format_size(_S3_UNSIZED_PART_SIZE)}); send it with one"
            )

    @contextlib.contextmanager
    def _reservation(self, size: int):
        """Hold *size* bytes of --max-disk for an upload: judged against what the prefix
        holds and this process's uploads in progress. Yields a function that takes more
        (for an upload of unknown length, as it grows)."""
        held = 0

        def take(more: int) -> None:
            nonlocal held
            limit = self.config.max_disk
            if limit is not None and more > 0:
                stored = sum(size for under in ("objects/", "segments/") for _, size, _ in self._keys(under))
                with self._reserved_lock:
                    if stored + self._reserved + more > limit:
                        raise NoSpace(
                            f"not enough space: the relay's quota of {format_size(limit)} holds "
                            f"{format_size(stored + self._reserved)}"
                        )
                    self._reserved += more
            else:
                with self._reserved_lock:
                    self._reserved += more
            held += more

        try:
            take(size)
            yield take
        finally:
            with self._reserved_lock:
                self._reserved -= held

    def put_stream(self, oid: str, body, length: int | None, limits: Limits) -> bool:
        """Store a whole object sent in one request: True if this created it, False if it
        was stored already (before, or by another upload meanwhile)."""
        if self.is_stored(oid):
            for _ in body:
                pass
            if not self.is_stored(oid):
                raise Conflict("the stored copy expired or was removed while this upload arrived: send it again")
            return False
        if length is not None:
            self.check_size(length)
        with self._reservation(length or 0) as reserve_more:
            return self._receive(oid, body, length, limits, reserve_more)

    @staticmethod
    def _limits_metadata(limits: Limits) -> dict:
        metadata = {}
        if limits.ttl is not None:
            metadata["ttl"] = repr(limits.ttl)
        if limits.max_downloads is not None:
            metadata["max-downloads"] = str(limits.max_downloads)
        return metadata

    def _receive(self, oid: str, body, length: int | None, limits: Limits, reserve_more) -> bool:
        metadata = {"token": secrets.token_hex(16), **self._limits_metadata(limits)}
        if length is None or length > self._segment_size(length):
            return self._receive_in_segments(oid, body, length, metadata, reserve_more)
        return self._write_verified(self._object_key(oid), oid, body, length, metadata, reserve_more)

    def _segment_size(self, length: int) -> int:
        """Bytes per segment (or part) of a whole upload of *length* bytes (the last may be fewer)."""
        return max(_S3_PART_SIZE, -(-length // self.max_parts))

    def _receive_in_segments(self, oid: str, body, length: int | None, metadata: dict, reserve_more) -> bool:
        """A whole upload larger than a segment (or of unknown length), stored as it arrives
        as segments, which followers on any host read as they appear (S3UploadReader): those
        of an upload in chunks if its length is known, else those of this attempt alone
        (_UNSIZED_SEGMENTS). Once the whole has hashed to *oid*, the object is created as
        the list of those segments (_store_segmented): each byte is written to the store
        once. One of unknown length that ends within its first segment is sent in one
        PutObject instead. True if this created the object; if it did not, its segments
        are removed."""
        size = _S3_UNSIZED_PART_SIZE if length is None else self._segment_size(length)
        total = f"{_UNSIZED_SEGMENTS}{secrets.token_hex(8)}" if length is None else length
        hasher = _BackgroundHasher()
        written: dict[int, tuple[int, int, str]] = {}  # segment number -> (first, last, key)
        stored_at: list[float] = []  # time.monotonic() of each segment's acknowledgement

        def send_segment(number: int, data: bytes) -> None:
            first = (number - 1) * size
            last = first + len(data) - 1
            written[number] = (first, last, self._segment_key(oid, total, first, last, whole=True))
            checksum = _s3_checksum(data)  # never kept cut short
            self._call(
                "store a chunk",
                "put_object",
                Key=written[number][2],
                Body=data,
                Metadata={**metadata, "whole": "1"},  # its token is the object's: followers count there
                ChecksumSHA256=checksum,
            )
            stored_at.append(time.monotonic())
            reserve_more(-len(data))  # counted as stored from now on

        segments = _S3Parts(send_segment)
        pieces = _Pieces(size)
        received = 0
        try:
            for block in body:
                received += len(block)
                if length is None:
                    self._check_unsized(received)
                    reserve_more(len(block))
                hasher.update(block)
                for segment in pieces.cut(block):
                    segments.send(segment)
            if length is not None and received != length:
                raise WrongLength(f"body has {received} bytes, Content-Length says {length}")
            if not segments.sent:  # of unknown length, and smaller than a segment
                digest = hasher.finish()
                Store._verify(oid, digest)
                metadata["stored-at"] = repr(time.time())
                return self._put_whole(self._object_key(oid), pieces.rest(), metadata, digest.digest())
            if rest := pieces.rest():
                segments.send(rest)
            segments.finish()
            Store._verify(oid, hasher.finish())
            moments = [*sorted(stored_at), time.monotonic()]
            if max(later - earlier for earlier, later in itertools.pairwise(moments)) > self._safe_idle():
                raise Conflict("this upload stayed idle for so long that it may be taken for abandoned: send it again")
            mine = [written[number] for number in sorted(written)]
            if not self._store_segmented(oid, received, mine, metadata, quiet_since=moments[-2]):
                return False
            written.clear()  # the object's now; another upload's segments are its own to remove
            return True
        finally:
            hasher.finish()
            segments.close()  # no segment is sent after this
            with contextlib.suppress(StorageError):  # else the sweeper removes them
                self._drop_segments([(0, 0, 0, key) for _, _, key in written.values()])

    def _safe_idle(self) -> float:
        """Seconds a whole upload may go without storing a segment, and still list its
        segments as its object: well short of --partial-ttl, after which a sweeper (on any
        host, by its clock and the store's) may remove them (_sweep_uploads). No one else
        removes an upload's segments."""
        return _S3_SAFE_IDLE * self.config.partial_ttl

    def _store_segmented(
        self, oid: str, size: int, segments: list[tuple[int, int, str]], metadata: dict, quiet_since: float
    ) -> bool:
        """Create the object as the list of the *segments* ((first, last, key) each, in
        order) that hold its *size* bytes, this upload's own, create-only: True if this
        created it. Under the object's claim, as every creation and removal of its key;
        the segments are seen to be there first, and the last was stored (time.monotonic()
        *quiet_since*) no longer than _safe_idle() before the list is created."""
        key = self._object_key(oid)
        listed = {"size": size, "segments": [[first, last, name[len(self.prefix) :]] for first, last, name in segments]}
        body = json.dumps(listed).encode()
        with self._claim(key, unless_stored=True, lease=self._completion_lease(len(segments), len(body))) as until:
            if not until:
                return False
            there = {found for found, _, _ in self._keys(f"segments/{oid}/")}
            if any(name not in there for _, _, name in segments):
                if self._call("look up an object", "head_object", absent=(404,), Key=key) is not None:
                    return False  # another upload stored it meanwhile
                raise Conflict("a segment of this upload was removed meanwhile (taken for abandoned?): send it again")
            if time.monotonic() > until:
                raise Busy("the object store took too long to list the upload's segments", retry_after=5)
            if time.monotonic() - quiet_since > self._safe_idle():
                raise Conflict(
                    "this upload waited so long to be stored that it may be taken for abandoned: send it again"
                )
            listing = {"stored-at": repr(time.time()), "layout": _S3_SEGMENTED, "size": str(size)}
            return self._create(key, body, {**metadata, **listing}, _s3_checksum(body))

    def _write_verified(
        self, key: str, expected: str | None, body, length, metadata: dict, reserve_more, hashed: list | None = None
    ) -> bool:
        """Create *key* from *body*'s blocks only if their SHA-256 is *expected* (when
        given) and nothing is there yet: True if this created it. The SHA-256 and the size
        of what arrived are appended to *hashed*, if given."""
        part_size = _S3_UNSIZED_PART_SIZE if length is None else self._segment_size(length)
        hasher = _BackgroundHasher()
        pieces = _Pieces(part_size)
        parts: _S3Parts | None = None
        upload_id = None
        received = 0
        try:
            for block in body:
                received += len(block)
                if length is None:
                    self._check_unsized(received)
                    reserve_more(len(block))
                hasher.update(block)
                for part in pieces.cut(block):
                    if upload_id is None:
                        metadata["stored-at"] = repr(time.time())
                        upload_id = self._call(
                            "begin an upload",
                            "create_multipart_upload",
                            Key=key,
                            Metadata=metadata,
                            ChecksumAlgorithm="SHA256",
                        )["UploadId"]
                        parts = _S3Parts(functools.partial(self._send_part, key, upload_id))
                    parts.send(part)
            if length is not None and received != length:
                raise WrongLength(f"body has {received} bytes, Content-Length says {length}")
            digest = hasher.finish()
            Store._verify(expected, digest)
            if hashed is not None:
                hashed.append((digest.hexdigest(), received))
            if upload_id is None:
                metadata["stored-at"] = repr(time.time())
                return self._put_whole(key, pieces.rest(), metadata, digest.digest())
            if rest := pieces.rest():
                parts.send(rest)
            if not self._complete_once(key, upload_id, parts.finish()):
                return False
            upload_id = None
            return True
        finally:
            hasher.finish()
            if parts is not None:
                parts.close()  # no part is sent after this
            if upload_id is not None:
                with contextlib.suppress(StorageError):  # else the sweeper aborts it later
                    self._call("abort an upload", "abort_multipart_upload", absent=(404,), Key=key, UploadId=upload_id)

    @contextlib.contextmanager
    def _claim(self, key: str, *, unless_stored: bool, lease: float):
        """Hold the claim on *key*, a create-only PutObject of PREFIX/claims/<key>, while the
        body runs: creations and removals of one object's key take turns through it, so
        that a removal (which looks at what is there, then deletes it) never deletes a copy
        stored in between (an ETag cannot tell two copies of one content apart), and two
        completions never both win (SeaweedFS 4.48 let two racing
        CompleteMultipartUploads with If-None-Match: * both succeed, never two PutObjects).
        Yields, once held, the time.monotonic() until which the holder may still start a
        request that relies on it: half its *lease* (the seconds the holder needs at most,
        in the claim's metadata) after it was asked for; or None, without it, if
        *unless_stored* and the key got stored meanwhile. A claim older than its lease is
        its dead holder's, and is removed (_claim_is_stale): so a holder past its time
        starts nothing more that relies on it (it answers Busy). Each claim's body is random, and a stale one
        is removed, or one's own released, only if its ETag is still the one seen
        (If-Match): no one else's claim goes with it. Busy if it stays held longer than
        _S3_CLAIM_PATIENCE."""
        claim = f"{self.prefix}claims/{key[len(self.prefix) :]}"
        deadline = time.monotonic() + _S3_CLAIM_PATIENCE
        delays = _delays(_POLL_MIN, _POLL_MAX)
        metadata = {"lease": repr(lease)}
        mine = secrets.token_bytes(16)  # its ETag is this claim's alone: no one else's is removed for it
        seen: dict = {}  # the ETag of each claim found in the way -> time.monotonic() when first seen
        while True:
            asked = time.monotonic()
            if taken := self._call(
                "claim a key", "put_object", absent=(409, 412), Key=claim, Body=mine, IfNoneMatch="*", Metadata=metadata
            ):
                break
            if unless_stored and self._call("look up a key", "head_object", absent=(404,), Key=key) is not None:
                yield None  # another upload stored it
                return
            held = self._call("look up a claim", "head_object", absent=(404,), Key=claim)
            if held is not None and _claim_is_stale(held, seen.setdefault(held["ETag"], time.monotonic())):
                self._call("remove a stale claim", "delete_object", absent=(404, 412), Key=claim, IfMatch=held["ETag"])
            elif time.monotonic() > deadline:
                raise Busy("another upload or removal of this object is in progress", retry_after=5)
            time.sleep(next(delays))
        try:
            yield asked + lease / 2
        finally:
            with contextlib.suppress(StorageError):  # else it goes stale; if taken over, it is not ours
                self._call("release a claim", "delete_object", absent=(404, 412), Key=claim, IfMatch=taken["ETag"])

    @staticmethod
    def _quick_lease(size: int) -> float:
        """Seconds a claim for a removal, or a PutObject of *size* bytes, is held at most."""
        return _S3_QUICK_CLAIM + size / _S3_SLOWEST_RATE

    @staticmethod
    def _completion_lease(parts: int, size: int = 0) -> float:
        """Seconds a claim for completing an object of *parts* parts or segments (listed,
        with a list of *size* bytes) is held at most."""
        return _S3_QUICK_CLAIM + parts * _S3_CLAIM_PER_PART + size / _S3_SLOWEST_RATE

    def _complete_once(self, key: str, upload_id: str, parts: list[dict]) -> bool:
        """Complete the multipart upload into *key* unless something is there: True if this
        created it."""
        with self._claim(key, unless_stored=True, lease=self._completion_lease(len(parts))) as held:
            if not held:
                return False
            completed = self._call(
                "complete an upload",
                "complete_multipart_upload",
                absent=(409, 412),  # 412: stored meanwhile by another upload; 409: one in flight (AWS)
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
            return completed is not None

    def _copy_part(self, key: str, upload_id: str, number: int, source: str, byte_range: str | None = None) -> dict:
        """Part *number* of the multipart upload into *key*, copied by the store from the
        object *source* (its *byte_range*, else all of it)."""
        ranged = {"CopySourceRange": byte_range} if byte_range else {}
        copied = self._call(
            "copy a part",
            "upload_part_copy",
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            CopySource={"Bucket": self.bucket, "Key": source},
            **ranged,
        )
        return {"PartNumber": number, "ETag": copied["CopyPartResult"]["ETag"]}

    def _send_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict:
        """Part *number* of a multipart upload begun with ChecksumAlgorithm SHA256."""
        checksum = _s3_checksum(data)
        sent = self._call(
            "store a part",
            "upload_part",
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumSHA256=checksum,
        )
        return {"PartNumber": number, "ETag": sent["ETag"], "ChecksumSHA256": checksum}

    def _put_whole(self, key: str, data: bytes, metadata: dict, digest: bytes) -> bool:
        """Create *key* from *data*, verified by the store against its SHA-256 too: False if
        it exists already. An object's key is created under its claim (see _claim)."""
        claim = self._claim(key, unless_stored=True, lease=self._quick_lease(len(data)))
        with claim if key.startswith(self._object_key("")) else _held() as held:
            if not held:
                return False
            return self._create(key, data, metadata, base64.b64encode(digest).decode())

    def _create(self, key: str, body: bytes, metadata: dict, checksum: str) -> bool:
        """PutObject *key* create-only (If-None-Match: *): False if something is there."""
        done = self._call(
            "store an object",
            "put_object",
            absent=(409, 412),
            Key=key,
            Body=body,
            Metadata=metadata,
            IfNoneMatch="*",
            ChecksumSHA256=checksum,
        )
        return done is not None

    # -- uploads in chunks: segment objects that any host reads --------------------

    def _segment_key(self, oid: str, total: int | str, first: int, last: int, whole: bool = False) -> str:
        """The key of a new segment: *total* is the upload's length, or for a whole upload of
        unknown length _UNSIZED_SEGMENTS and its attempt's token; a *whole* upload's ends in
        _WHOLE_SEGMENT (the listing tells it from a chunk's)."""
        ending = _WHOLE_SEGMENT if whole else ""
        return f"{self.prefix}segments/{oid}/{total}/{first:020d}-{last:020d}.{secrets.token_hex(8)}{ending}"

    def _listed_segments(self, oid: str) -> tuple[list, dict]:
        """From one listing: (first, last, total, key) of each stored segment of an upload
        of *oid* of known length, by first; and of each whole upload of unknown length in
        progress, by its attempt's token, (first, last, key) of each of its segments. None
        that a note of a removal names (the bytes of a removed object)."""
        under = f"{self.prefix}segments/{oid}/"
        sized, unsized, removed = [], {}, set()
        for key, _, _ in self._keys(f"segments/{oid}/"):
            total, _, name = key[len(under) :].partition("/")
            if total == _REMOVED_SEGMENTS:
                removed |= self._noted_removal(key)
                continue
            first, _, last = name.split(".", 1)[0].partition("-")
            if not (first.isdigit() and last.isdigit()):
                continue
            if total.isdigit():
                sized.append((int(first), int(last), int(total), key))
            elif total.startswith(_UNSIZED_SEGMENTS):
                unsized.setdefault(total[len(_UNSIZED_SEGMENTS) :], []).append((int(first), int(last), key))
        if removed:
            sized = [segment for segment in sized if segment[3] not in removed]
            unsized = {attempt: [s for s in found if s[2] not in removed] for attempt, found in unsized.items()}
        return sorted(sized), {attempt: sorted(found) for attempt, found in unsized.items() if found}

    def _segments(self, oid: str) -> list[tuple[int, int, int, str]]:
        """(first, last, total, key) of each stored chunk of the upload of *oid* of known
        length (in chunks, or whole), by first."""
        return self._listed_segments(oid)[0]

    def _chunks(self, upload: str) -> list[tuple[int, int, int, str]]:
        """The _segments() of the upload in chunks *upload*: none of a whole upload's, which
        has not verified yet and may fail, taking its segments with it."""
        return [segment for segment in self._segments(upload) if not segment[3].endswith(_WHOLE_SEGMENT)]

    def _drop_segments(self, segments) -> None:
        """Remove the *segments* ((..., key) each), in order. None of them is, or may yet
        be, one that a stored object is made of: only an upload's own (until its object is
        stored), a removed object's, an upload in chunks' (never listed as an object), and
        those a sweeper finds idle (_sweep_uploads) are removed, so no claim is needed."""
        for segment in segments:
            self._call("remove a chunk", "delete_object", absent=(404,), Key=segment[-1])

    def _segment_bytes(self, segments, first: int, last: int):
        """Bytes first..last of the upload, read from its segments in order."""
        position = first
        while position <= last:
            covering = [segment for segment in segments if segment[0] <= position <= segment[1]]
            if not covering:
                raise Conflict("a part of the upload is missing: send it again")
            start, end, _, key = max(covering, key=lambda segment: segment[1])
            end = min(end, last)
            got = self._call(
                "read a chunk", "get_object", absent=(404,), Key=key, Range=f"bytes={position - start}-{end - start}"
            )
            if got is None:
                raise Busy("the upload's chunks changed meanwhile", retry_after=1)
            try:
                yield from self._segment_blocks(got, end + 1 - position)
            finally:
                got["Body"].close()
            position = end + 1

    def _same_bytes(self, segments, first: int, last: int, blocks) -> bool:
        """Whether *blocks* hold bytes first..last of the upload as its segments do."""
        return self._same_blocks(self._segment_bytes(segments, first, last), blocks)

    @staticmethod
    def _same_blocks(stored, blocks) -> bool:
        """Whether the two iterables of blocks hold the same bytes."""
        hashes = []
        for source in (blocks, stored):
            hasher = hashlib.sha256()
            for block in source:
                hasher.update(block)
            hashes.append(hasher.digest())
        return hashes[0] == hashes[1]

    def put_chunk(
        self, oid: str, first: int, last: int, total: int, body, digest: bytes | None, limits: Limits
    ) -> Progress | Stored:
        """Store bytes first..last of an object of *total* bytes as a segment object, which
        any host can list and read; the chunk that completes the upload has the object
        composed from the segments, verified against its name, then the segments removed.
        A chunk that contradicts what was stored is a Conflict (and is not kept)."""
        if self.is_stored(oid):
            for _ in body:
                pass
            return Stored.ALREADY
        self.check_size(total)
        ranges, segments = self._put_segment(oid, first, last, total, body, digest, limits)
        if ranges == [(0, total - 1)]:
            return self._compose(oid, total, segments, limits)
        return Progress("chunks", total, ranges, False)

    def _put_segment(self, upload: str, first: int, last: int, total: int, body, digest, limits: Limits):
        """Store bytes first..last of the upload in chunks *upload* (an object's name, or
        new-TOKEN) as a segment, unless they are stored already (then compared): the
        upload's merged ranges and its segments."""
        body = self._within(body, first, last)
        segments = self._chunks(upload)
        if any(other != total for _, _, other, _ in segments):
            raise Conflict(f"an upload of this object with another length is in progress (Content-Range says {total})")
        ranges = merge_ranges((start, end) for start, end, _, _ in segments)
        if any(start <= first and last <= end for start, end in ranges):  # a retry of what is stored
            if not self._same_bytes(segments, first, last, self._digested(body, digest)):
                raise Conflict(f"bytes {first}-{last} differ from those received before")
            return ranges, segments
        key = self._segment_key(upload, total, first, last)
        metadata = {"token": secrets.token_hex(16), **self._limits_metadata(limits)}
        with self._reservation(last - first + 1) as reserve_more:
            try:
                self._write_verified(
                    key, digest.hex() if digest else None, body, last - first + 1, metadata, reserve_more
                )
            except Mismatch:
                raise Mismatch("the chunk does not match its Content-Digest: it was not stored") from None
        segments = self._chunks(upload)
        mine = [segment for segment in segments if segment[3] == key]
        others = [segment for segment in segments if segment[3] != key]
        if not mine:  # dropped by another host's completion: discarded, or contradicting
            raise Conflict("the upload changed while this chunk was stored, which was dropped: send it again")
        for start, end in merge_ranges((start, end) for start, end, _, _ in others):
            low, high = max(start, first), min(end, last)
            if low <= high and not self._same_bytes(others, low, high, self._segment_bytes(mine, low, high)):
                self._drop_segments(mine)
                raise Conflict(f"bytes {low}-{high} differ from those received before")
        return merge_ranges((start, end) for start, end, _, _ in segments), segments

    @staticmethod
    def _within(body, first: int, last: int):
        """*body*'s blocks; WrongLength as soon as they run past bytes first..last (a body
        sent without Content-Length may), or if they end short."""
        size, received = last - first + 1, 0
        for block in body:
            received += len(block)
            if received > size:
                raise WrongLength(f"body is longer than its Content-Range ({size} bytes)")
            yield block
        if received != size:
            raise WrongLength(f"body has {received} bytes, Content-Range says {size}")

    @staticmethod
    def _digested(body, digest: bytes | None):
        """*body*'s blocks; Mismatch at its end if they do not hash to *digest*."""
        hasher = hashlib.sha256()
        for block in body:
            hasher.update(block)
            yield block
        if digest is not None and hasher.digest() != digest:
            raise Mismatch("the chunk does not match its Content-Digest")

    def _compose(self, oid: str, total: int, segments, limits: Limits) -> Stored:
        """Make the object from the upload's segments, verified against its name (else the
        upload is discarded), then remove the segments."""
        metadata = {"token": secrets.token_hex(16), **self._limits_metadata(limits)}
        body = self._segment_bytes(segments, 0, total - 1)
        try:
            created = self._write_verified(self._object_key(oid), oid, body, total, metadata, lambda more: None)
        except Mismatch as exc:
            contradicting = self._contradicting(oid, segments)
            if contradicting:  # not the upload's fault: a chunk still being compared, or its host died
                self._drop_segments(contradicting)
                raise Busy(
                    "a chunk that contradicts one stored before was there: it is dropped; send this chunk again",
                    retry_after=1,
                ) from None
            self._drop_segments(segments)
            raise Mismatch(f"{exc.reason}; the partial upload was discarded") from None
        self._drop_segments(segments)
        return Stored.CREATED if created else Stored.ALREADY

    def _contradicting(self, upload: str, segments) -> list:
        """The segments whose bytes differ from an earlier segment's where they overlap: a
        chunk that is compared only once stored (_put_segment), by a request still at it
        or by a host that died at it."""
        stored_at = {key: modified for key, _, modified in self._keys(f"segments/{upload}/")}
        ordered = sorted(segments, key=lambda segment: stored_at.get(segment[3], 0.0))
        found: list = []
        for index, later in enumerate(ordered):
            for earlier in ordered[:index]:
                low, high = max(later[0], earlier[0]), min(later[1], earlier[1])
                if earlier in found or low > high:
                    continue
                if not self._same_bytes([earlier], low, high, self._segment_bytes([later], low, high)):
                    found.append(later)
                    break
        return found

    # -- uploads the relay names: staged, hashed, then copied under their hash ----

    def _record_key(self, token: str) -> str:
        return f"{self.prefix}unnamed/{token}"

    def _read_record(self, token: str) -> dict | None:
        """What start_unnamed recorded of upload *token* (and, once stored, its object)."""
        if not _UNNAMED_TOKEN_RE.fullmatch(token):
            return None
        got = self._call("read an upload's record", "get_object", absent=(404,), Key=self._record_key(token))
        if got is None:
            return None
        try:
            return json.loads(got["Body"].read(64 << 10))
        except (ValueError, OSError) as exc:
            raise Unavailable(f"the object store sent an upload's record that does not read ({exc})") from None

    def _write_record(self, token: str, record: dict, **condition) -> None:
        body = json.dumps(record).encode()
        checksum = _s3_checksum(body)
        self._call(
            "record an upload",
            "put_object",
            Key=self._record_key(token),
            Body=body,
            ChecksumSHA256=checksum,
            **condition,
        )

    def _store_named(
        self, body, length: int | None, limits: Limits, reserve_more, expected: str | None = None
    ) -> tuple[str, bool]:
        """Store *body* under its SHA-256 (which must be *expected*, if given): (the name,
        whether this created it). Up to a part's size it is hashed in memory and put under
        its name at once; a larger one is staged under PREFIX/incoming/, then copied under
        its name (UploadPartCopy)."""
        metadata = {"token": secrets.token_hex(16), **self._limits_metadata(limits)}
        if length is not None and length <= _S3_PART_SIZE:
            data = b"".join(bytes(block) for block in body)
            if len(data) != length:
                raise WrongLength(f"body has {len(data)} bytes, Content-Length says {length}")
            digest = hashlib.sha256(data)
            Store._verify(expected, digest)
            metadata["stored-at"] = repr(time.time())
            return digest.hexdigest(), self._put_whole(
                self._object_key(digest.hexdigest()), data, metadata, digest.digest()
            )
        staged = f"{self.prefix}incoming/{secrets.token_hex(16)}"
        hashed: list = []
        try:
            self._write_verified(staged, expected, body, length, {}, reserve_more, hashed)
            oid, size = hashed[0]
            metadata["stored-at"] = repr(time.time())
            return oid, self._copy_under_name([(staged, size)], oid, metadata)
        finally:
            with contextlib.suppress(StorageError):  # else the sweeper removes it
                self._call("remove a staged upload", "delete_object", absent=(404,), Key=staged)

    def _copy_under_name(self, sources: list[tuple[str, int]], oid: str, metadata: dict) -> bool:
        """Copy the objects *sources* names ((key, size) each, in order), verified together,
        to PREFIX/objects/<oid> in the store (UploadPartCopy), create-only: True if this
        created it."""
        key = self._object_key(oid)
        if self._call("look up an object", "head_object", absent=(404,), Key=key) is not None:
            return False
        if not any(size for _, size in sources):  # no range of it to copy
            return self._put_whole(key, b"", metadata, hashlib.sha256(b"").digest())
        upload_id = self._call("begin an upload", "create_multipart_upload", Key=key, Metadata=metadata)["UploadId"]
        try:
            parts = []
            pieces = [
                (source, start, min(size, start + _S3_COPY_PART_SIZE) - 1)
                for source, size in sources
                for start in range(0, size, _S3_COPY_PART_SIZE)
            ]
            for number, (source, first, last) in enumerate(pieces, start=1):
                parts.append(self._copy_part(key, upload_id, number, source, f"bytes={first}-{last}"))
            created = self._complete_once(key, upload_id, parts)
            if created:
                upload_id = None
            return created
        finally:
            if upload_id is not None:
                with contextlib.suppress(StorageError):
                    self._call("abort an upload", "abort_multipart_upload", absent=(404,), Key=key, UploadId=upload_id)

    def put_unnamed(self, body, length: int | None, limits: Limits, expected: str | None = None) -> Named:
        if length is not None:
            self.check_size(length)
        try:
            with self._reservation(length or 0) as reserve_more:
                oid, created = self._store_named(body, length, limits, reserve_more, expected)
        except Mismatch as exc:
            raise Mismatch(str(exc).replace("does not match its name", "does not match its digest")) from None
        return Named(oid, Stored.CREATED if created else Stored.ALREADY)

    def start_unnamed(self, length: int, limits: Limits, name: str | None) -> str:
        self.check_size(length)
        token = secrets.token_hex(16)
        record = {"length": length, "limits": dataclasses.asdict(limits), "name": name, "created": time.time()}
        self._write_record(token, record, IfNoneMatch="*")
        return token

    def put_unnamed_chunk(
        self, token: str, first: int, last: int, total: int, body, digest: bytes | None
    ) -> Progress | Named:
        record = self._read_record(token)
        if record is None:
            raise NotFound("no such upload: it was cancelled, expired unfinished, or never begun")
        if record.get("oid"):
            obj = self.lookup(record["oid"])
            if obj is None:
                raise NotFound(
                    f"this upload was stored as {record['oid']}, which is gone (expired, used up or removed)"
                )
            if total != obj.size:
                raise Conflict(f"this upload was stored as {obj.oid}, of {obj.size} bytes, not {total}")
            try:
                same = self._same_blocks(self._object_bytes(obj.oid, first, last), self._digested(body, digest))
            except UploadFailed:
                raise NotFound(f"this upload was stored as {obj.oid}, which was removed meanwhile") from None
            if not same:
                raise Conflict(f"bytes {first}-{last} differ from those of {obj.oid}, which this upload stored")
            return Named(obj.oid, Stored.ALREADY, record.get("name"))
        if total != record["length"]:
            raise Conflict(f"this upload is {record['length']} bytes long, Content-Range says {total}")
        limits = Limits(**record["limits"])
        ranges, segments = self._put_segment(f"new-{token}", first, last, total, body, digest, limits)
        if ranges != [(0, total - 1)]:
            return Progress("chunks", total, ranges, False)
        oid, created = self._store_named(self._segment_bytes(segments, 0, total - 1), total, limits, lambda more: None)
        self._write_record(token, {**record, "oid": oid})
        self._drop_segments(segments)
        return Named(oid, Stored.CREATED if created else Stored.ALREADY, record.get("name"))

    def unnamed_progress(self, token: str) -> Progress | Named | None:
        record = self._read_record(token)
        if record is None:
            return None
        if record.get("oid"):
            return Named(record["oid"], Stored.CREATED, record.get("name")) if self.is_stored(record["oid"]) else None
        segments = self._chunks(f"new-{token}")
        return Progress("chunks", record["length"], merge_ranges((a, b) for a, b, _, _ in segments), False)

    def cancel_unnamed(self, token: str) -> bool:
        record = self._read_record(token)
        if record is None or record.get("oid"):
            return False
        self._drop_segments(self._chunks(f"new-{token}"))
        self._call("cancel an upload", "delete_object", absent=(404,), Key=self._record_key(token))
        return True

    # -- housekeeping ------------------------------------------------------------

    def usage(self) -> dict:
        """Stored objects (listed), uploads in progress on any relay, each counted once:
        a whole one (a multipart upload under objects/, and its segments) by what it has
        stored and what this relay reserves for the rest; one in chunks (segments alone)
        reserving its whole length. --max-disk is the store's size (else 1 EiB: unknown),
        used as an upload's reservation judges it: stored objects, segments, and what this
        relay's uploads reserve."""
        stored = {key.rsplit("/", 1)[-1]: size for key, size, _ in self._keys("objects/")}
        whole = {key.rsplit("/", 1)[-1] for key, _, _ in self._multipart_uploads(f"{self.prefix}objects/")}
        listed: dict = {}  # of each object with segments: {key: size}
        for key, size, _ in self._keys("segments/"):
            listed.setdefault(key.split("/")[-3], {})[key] = size
        stored_bytes = sum(stored.values())
        for oid in stored.keys() & listed.keys():  # stored as its segments? Those are its bytes
            made_of = self._segment_list(oid) if _is_object_name(oid) else None
            if made_of:
                stored_bytes += made_of[-1][1] + 1 - stored[oid]
                for _, _, key in made_of:
                    listed[oid].pop(key, None)
        segmented: dict = {}  # of each object with segments: [its length (0: unknown), bytes stored]
        for oid, sizes in listed.items():
            for key, size in sizes.items():
                if key.endswith(_WHOLE_SEGMENT):
                    whole.add(oid)
                length = key.split("/")[-2]
                counted = segmented.setdefault(oid, [0, 0])
                counted[0] = max(counted[0], int(length) if length.isdigit() else 0)
                counted[1] += size
        stored_count = len(stored)
        allocated = sum(size for _, size in segmented.values())
        reserved = self._reserved
        for oid, (length, size) in segmented.items():
            reserved += size if oid in whole else max(length, size)
        used = stored_bytes + allocated + self._reserved
        total = self.config.max_disk if self.config.max_disk is not None else _S3_UNBOUNDED
        return {
            "stored_count": stored_count,
            "stored_bytes": stored_bytes,
            "partial_count": len(whole | segmented.keys()),
            "reserved_bytes": reserved,
            "partial_allocated_bytes": allocated,
            "pipe_count": 0,  # no pipes on S3
            "pipe_buffer_bytes": 0,
            "disk_total_bytes": total,
            "disk_used_bytes": min(total, used),
            "disk_free_bytes": max(0, total - used),
        }

    def sweep(self, now: float | None = None) -> dict:
        """Remove objects that expired or were used up, counters whose object is gone,
        stale completion claims, and uploads abandoned by a relay that died: multipart
        uploads and uploads in chunks untouched longer than --partial-ttl. Safe on
        several hosts at once: each removal is judged on what the store holds then, and
        removing what another host removed first is no harm."""
        now = time.time() if now is None else now
        removed = {"objects": 0, "partials": 0, "leftovers": 0}
        for key, _, _ in list(self._keys("objects/")):
            oid = key.rsplit("/", 1)[-1]
            found = self._head(oid) if _is_object_name(oid) else None
            if found is not None and self._is_spent(found[0], now):
                expired = found[0].expires_at is not None and found[0].expires_at <= now
                used_up = not expired and self._used_up(oid, found[1], found[0].max_downloads, now)
                if (expired or used_up) and self._remove(oid, found[1]):
                    removed["objects"] += 1
        for key, _, _ in list(self._keys("downloads/")):
            if self._remove_counter_left(key):
                removed["leftovers"] += 1
        for key, _, modified in list(self._keys("claims/")):
            if now - modified <= _S3_QUICK_CLAIM:  # held, surely
                continue
            held = self._call("look up a claim", "head_object", absent=(404,), Key=key)
            if held is not None and _claim_is_stale(held, None, now):  # its holder died
                done = self._call(
                    "remove a stale claim", "delete_object", absent=(404, 412), Key=key, IfMatch=held["ETag"]
                )
                removed["leftovers"] += done is not None
        for under in ("unnamed/", "incoming/"):  # records of uploads the relay names; staged uploads
            for key, _, modified in list(self._keys(under)):
                if under == "unnamed/":  # idle since its record was written, or its last chunk stored
                    chunks = self._keys(f"segments/new-{key.rsplit('/', 1)[-1]}/")
                    modified = max([modified, *(stored for _, _, stored in chunks)])
                if now - modified > self.config.partial_ttl:
                    self._call("remove a leftover", "delete_object", absent=(404,), Key=key)
                    removed["leftovers"] += 1
        self._sweep_uploads(now, removed)
        return removed

    def _remove_counter_left(self, key: str) -> bool:
        """Remove the download counter *key* if no object of its upload is stored and none
        is being uploaded: True if removed. The followers of an upload in progress count on
        its counter before its object exists, and an upload stores its object before it
        removes its segments: so the segments are looked at first, then the object, and the
        counter is removed only if it did not change since it was read first."""
        oid, _, token = key.rsplit("/", 1)[-1].partition(".")
        counter = self._call("look up a download count", "head_object", absent=(404,), Key=key)
        if counter is None:
            return False
        if _is_object_name(oid):
            if any(self._keys(f"segments/{oid}/")):
                return False
            found = self._head(oid)
            if found is not None and found[1] == token:
                return False
        done = self._call(
            "remove a download count", "delete_object", absent=(404, 412), Key=key, IfMatch=counter["ETag"]
        )
        return done is not None

    def _last_part_at(self, key: str, upload_id: str) -> float:
        """When the multipart upload into *key* last got a part (0 if it has none)."""
        latest, marker = 0.0, {}
        while True:
            page = self._call("list parts", "list_parts", absent=(404,), Key=key, UploadId=upload_id, **marker)
            if page is None:
                return latest
            for part in page.get("Parts", ()):
                latest = max(latest, part["LastModified"].timestamp())
            if not page.get("IsTruncated") or not page.get("NextPartNumberMarker"):
                return latest
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}

    def _sweep_uploads(self, now: float, removed: dict) -> None:
        """Remove the segments of each object untouched for --partial-ttl, and abort each
        multipart upload idle that long: none of its parts, nor (under objects/) any
        segment of its object, is newer. An upload still arriving is never swept, nor the
        segments a stored object is made of."""
        touched: dict = {}  # of each object: {key of a segment of an upload: when it was stored}
        for key, _, modified in list(self._keys("segments/")):
            touched.setdefault(key.split("/")[-3], {})[key] = modified
        stored = {key.rsplit("/", 1)[-1] for key, _, _ in self._keys("objects/")}
        for oid, segments in touched.items():
            if oid in stored and _is_object_name(oid):
                for _, _, key in self._segment_list(oid) or ():
                    segments.pop(key, None)
            if segments and now - max(segments.values()) > self.config.partial_ttl:
                notes_last = sorted(segments, key=lambda key: f"/{_REMOVED_SEGMENTS}/" in key)
                self._drop_segments([(0, 0, 0, key) for key in notes_last])
                removed["partials"] += 1
        for under, kind in (("segments/", "leftovers"), ("incoming/", "leftovers"), ("objects/", "partials")):
            for key, upload_id, initiated in list(self._multipart_uploads(f"{self.prefix}{under}")):
                segments = touched.get(key.rsplit("/", 1)[-1], {}) if under == "objects/" else {}
                segment_at = max(segments.values(), default=0.0)
                if now - max(initiated, segment_at) <= self.config.partial_ttl:
                    continue
                if now - self._last_part_at(key, upload_id) <= self.config.partial_ttl:
                    continue
                self._call("abort an upload", "abort_multipart_upload", absent=(404,), Key=key, UploadId=upload_id)
                removed[kind] += 1

    def purge(self) -> None:
        """Remove everything under the prefix (and abort its multipart uploads)."""
        for key, upload_id, _ in list(self._multipart_uploads(self.prefix)):
            self._call("abort an upload", "abort_multipart_upload", absent=(404,), Key=key, UploadId=upload_id)
        for key, _, _ in list(self._keys("")):
            self._call("remove an object", "delete_object", Key=key)


class S3DownloadTicket:
    """A counted download's lease on the object's counter: complete() when it went through
    whole, release() when not (it is given back); renew() while it goes on."""

    def __init__(self, store: S3Store, oid: str, token: str, lease: str, limit: int, remaining: int):
        self.store = store
        self.oid = oid
        self.token = token
        self.lease = lease
        self.limit = limit
        self.remaining = remaining  # downloads left once this one is through
        self.renew_at = time.monotonic() + store.lease_seconds / 3
        self.ended = False

    def renew(self) -> None:
        if time.monotonic() < self.renew_at or self.ended:
            return
        self.renew_at = time.monotonic() + self.store.lease_seconds / 3

        def extend(state: dict, now: float):
            if self.lease not in state["leases"]:
                return None, None  # expired meanwhile: counted as done already
            state["leases"][self.lease] = now + self.store.lease_seconds
            return state, None

        self.store._change_counter(self.oid, self.token, extend)

    def complete(self) -> None:
        """Count the download as done; remove the object once its budget is spent and none
        of its downloads is in flight."""
        self._end(whole=True)

    def release(self) -> None:
        self._end(whole=False)

    def _end(self, *, whole: bool) -> None:
        if self.ended:
            return
        self.ended = True

        def end(state: dict, now: float):
            if state["leases"].pop(self.lease, None) is not None and whole:
                state["completed"] += 1
            return state, state["completed"] >= self.limit and not state["leases"]

        if self.store._change_counter(self.oid, self.token, end):
            self.store._remove(self.oid, self.token)


class _S3StreamReader:
    """A reader of the bucket that holds one GET's response body open at a time, and
    the lease on a counted download (.ticket) if it has one."""

    _stream = None
    _closed = False
    ticket = None
    finished = False

    def _close_stream(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):  # the store may have cut it off already
                self._stream.close()
            self._stream = None

    def close(self) -> None:
        """End the reader: a download it holds counts if every byte was delivered."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.ticket is not None:
                with contextlib.suppress(StorageError):  # a lease not given back counts once
                    self.ticket.complete() if self.finished else self.ticket.release()
        finally:
            self._close_stream()


class S3ObjectReader(_S3StreamReader):
    """A stored object in the bucket, read with ranged GETs as the download goes (no
    sendfile). A read that the store cuts off raises UploadFailed: the response is cut
    off too, never passed off as complete."""

    pause = staticmethod(time.sleep)  # a stored object's bytes are all there: never called
    ticket: S3DownloadTicket | None = None

    def __init__(self, store: S3Store, obj: StoredObject, token: str):
        self.store = store
        self.object = obj
        self.oid = obj.oid
        self.token = token
        self.max_downloads = obj.max_downloads
        self.start = self.position = 0
        self.end = obj.size
        self.finished = obj.size == 0
        self._stream = None

    @property
    def length(self) -> int:
        return self.object.size

    @property
    def sent(self) -> int:
        return self.position - self.start

    def progress(self) -> None:
        """No upload is in progress: the object is stored."""

    def select(self, first: int, last: int) -> None:
        self._close_stream()
        self.start = self.position = first
        self.end = last + 1
        self.finished = False

    def read(self, size: int = -1) -> bytes:
        if self.position >= self.end:
            self.finished = True
            return b""
        import botocore.exceptions
        import urllib3.exceptions

        wanted = min(max(size, _S3_READ_SIZE), self.end - self.position)
        try:
            if self._stream is None:
                self._stream = self.store._stream(self.oid, self.position, self.end - 1)
            block = self._stream.read(wanted)
        except (StorageError, botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise UploadFailed(f"the object store stopped sending the object ({exc.__class__.__name__})") from None
        if not block:
            raise UploadFailed("the object store ended the object early")
        self.position += len(block)
        if self.ticket is not None:
            with contextlib.suppress(StorageError):
                self.ticket.renew()
        return block


class S3UploadReader(_S3StreamReader):
    """Reads a whole upload or one in chunks as its segments appear, on any host, then the
    object once it is stored. The last byte is held back until the object verified, so a
    reader never receives something that looks complete but is not; if the upload is
    cancelled, fails or stalls, read() raises UploadFailed. No sendfile.

    Of an upload of unknown length (*attempt* names it), the reader keeps to that attempt's
    segments and never reads the last byte of one unless the next is there: any byte may be
    the last, which comes from the object alone. Its *metadata* (a segment's) gives the
    upload's download budget and the token of the counter a follower counts on."""

    object = None
    ticket: S3DownloadTicket | None = None
    pause = staticmethod(time.sleep)  # the wait between looks; the web layer replaces it

    def __init__(self, store: S3Store, oid: str, length: int | None, metadata: dict, attempt: str | None = None):
        self.store = store
        self.oid = oid
        self.length = length
        self.attempt = attempt
        self.token = metadata.get("token", "")
        self.max_downloads = int(metadata["max-downloads"]) if metadata.get("max-downloads") else None
        self.start = self.position = 0
        self.end = length  # of a whole upload of unknown length: known once it is stored
        self.selected = False
        self.finished = length == 0
        self.stall_timeout = store.config.idle_timeout
        self._stream = None
        self._stream_end = 0  # where what _stream delivers ends
        # What a whole download sent, hashed: the segments read may have been an attempt at
        # the upload that was discarded (by any host) and sent again otherwise since.
        self._sent_hash = hashlib.sha256()

    @property
    def sent(self) -> int:
        return self.position - self.start

    def progress(self) -> Progress:
        if self.length is None:
            segments = self.store._listed_segments(self.oid)[1].get(self.attempt, [])
            return Progress("stream", None, merge_ranges((first, last) for first, last, _ in segments), True)
        return self.store.progress(self.oid) or Progress("chunks", self.length, [(0, self.length - 1)], False)

    def select(self, first: int, last: int) -> None:
        self._close_stream()
        self.start = self.position = first
        self.end = last + 1
        self.selected = True
        self.finished = False
        self._sent_hash = None  # a range of an upload in progress is not verified (Upload-Incomplete)

    def read(self, size: int = -1) -> bytes:
        import botocore.exceptions
        import urllib3.exceptions

        last_progress = time.monotonic()
        delays = _delays(_POLL_MIN, _POLL_MAX)
        while True:
            if self._stream is not None:
                try:
                    block = self._stream.read(min(max(size, _S3_READ_SIZE), self._stream_end - self.position))
                except StorageError as exc:
                    raise UploadFailed(exc.reason) from None
                except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise UploadFailed(f"the object store stopped sending ({exc.__class__.__name__})") from None
                if block:
                    self._check_whole(block)
                    self.position += len(block)
                    self._renew()
                    return block
                self._close_stream()
            if self._done():
                self.finished = True
                return b""
            if self._open_next():
                continue
            if time.monotonic() - last_progress > self.stall_timeout:
                raise UploadFailed("the upload stalled")
            self._renew()
            self.pause(next(delays))

    def _renew(self) -> None:
        if self.ticket is not None:
            with contextlib.suppress(StorageError):
                self.ticket.renew()

    def _done(self) -> bool:
        """Whether every byte asked for went out (the last of the upload only once stored).
        UploadFailed if a whole download's bytes do not hash to the name: they may have been
        an attempt's that went past the end of the object another upload stored since."""
        if self.end is None or self.position < self.end:
            return False
        if self._sent_hash is not None and self._sent_hash.hexdigest() != self.oid:
            raise UploadFailed("the bytes followed were those of an attempt at the upload that was discarded")
        if self.length is None or self.end < self.length:
            return True  # a range of an upload of unknown length, or one short of its end
        return self._stored() is not None

    def _check_whole(self, block: bytes) -> None:
        """Hash *block* into what a whole download sent; before the block that ends it goes
        out, UploadFailed unless everything sent hashes to the name."""
        if self._sent_hash is None:
            return
        self._sent_hash.update(block)
        if self.position + len(block) == self.end and self._sent_hash.hexdigest() != self.oid:
            raise UploadFailed("the bytes followed were those of an attempt at the upload that was discarded")

    def _stored(self) -> StoredObject | None:
        """The object, once stored; UploadFailed if another upload's copy of it is, while
        this download counts against the budget of the upload it followed."""
        try:
            found = self.store._head(self.oid)
        except StorageError as exc:
            raise UploadFailed(exc.reason) from None
        if found is None:
            return None
        if found[1] != self.token and (self.ticket is not None or found[0].max_downloads is not None):
            # Its downloads count on its own counter, which this download did not count on.
            raise UploadFailed("another upload of the object was stored, with a download budget of its own")
        return found[0]

    def _open_next(self) -> bool:
        """Open what holds the next bytes: the object if stored, else a segment (but never
        the last byte from one). False if nothing holds them yet."""
        if self.end is not None and self.position >= self.end:
            return False  # only the verdict is awaited
        try:
            stored = self._stored()
            if stored is not None:
                if self.end is None:
                    self.end = stored.size
                if self.end > stored.size:
                    raise UploadFailed("the object stored ends before the range asked for")
                if self.position >= self.end:
                    return False
                self._stream, self._stream_end = self.store._stream(self.oid, self.position, self.end - 1), self.end
                return True
            for start, stop, key in self._readable():
                if start <= self.position <= stop:
                    got = self.store._call(
                        "read a chunk",
                        "get_object",
                        absent=(404, 416),
                        Key=key,
                        Range=f"bytes={self.position - start}-{stop - start}",
                    )
                    if got is not None:
                        self._stream, self._stream_end = got["Body"], stop + 1
                        return True
        except StorageError as exc:
            raise UploadFailed(exc.reason) from None
        return False

    def _readable(self) -> list[tuple[int, int, str]]:
        """(first, last byte that may be read from it, key) of each segment there is now.
        UploadFailed if none is, and the object was not stored either."""
        if self.length is None:
            segments = self.store._listed_segments(self.oid)[1].get(self.attempt, [])
            starts = {first for first, _, _ in segments}
            limit = self.end - 1 if self.end is not None else None
            readable = [
                (first, min(last if last + 1 in starts else last - 1, limit if limit is not None else last), key)
                for first, last, key in segments
            ]
        else:
            segments = self.store._segments(self.oid)
            readable = [(first, min(last, self.end - 1, self.length - 2), key) for first, last, _, key in segments]
        if not segments and self._stored() is None:  # a look again: stored and cleaned up since?
            raise UploadFailed("the upload was cancelled, or did not verify")
        return readable


def open_storage(config: RelayConfig) -> Storage:
    """The storage *config* asks for: an S3 bucket (--storage s3://...), else the files directory."""
    return S3Store(config) if config.storage else Store(config)


# ---------------------------------------------------------------------------
# Shared counters: one anonymous shared-memory block, created before the workers fork
# ---------------------------------------------------------------------------


_ARRIVALS_KEPT = 32  # keys of the latest transfers begun that each worker keeps (see ArrivalBells)


def _arrival_key(oid: str) -> int:
    """A 60-bit key of an object's name, to tell which waiters a transfer concerns."""
    return int(oid[:15], 16) if len(oid) >= 15 and all(c in "0123456789abcdef" for c in oid[:15]) else -1


class SharedState:
    """Counters, gauges and flags shared by the master and every worker process.

    Row 0 holds flags; each worker writes only its own row (its slot), so rows need no
    lock between processes. A worker's counters outlive it; its gauges are zeroed when
    it exits, so a crashed worker never leaves phantom transfers behind.
    """

    COUNTERS = (
        "requests_1xx",
        "requests_2xx",
        "requests_3xx",
        "requests_4xx",
        "requests_5xx",
        "bytes_in",
        "bytes_out",
        "uploads_completed",
        "downloads_completed",
        "pipes_completed",
    )
    GAUGES = ("uploads_active", "downloads_active", "waiting_readers")
    FIELDS = COUNTERS + GAUGES
    _DRAINING = 0  # position in row 0

    def __init__(self, slots: int = 1):
        self.slots = slots
        self._memory = mmap.mmap(-1, (slots + 1) * len(self.FIELDS) * 8)
        self._values = memoryview(self._memory).cast("q")
        # Per row: how many transfers this worker began, then the keys of the latest ones.
        self._arrivals = memoryview(mmap.mmap(-1, (slots + 1) * (1 + _ARRIVALS_KEPT) * 8)).cast("q")
        self._row = 1
        self._lock = threading.Lock()
        self.started = time.time()

    def use_slot(self, slot: int) -> None:
        """Make this process write to row *slot* (1..slots)."""
        self._row = slot

    def _index(self, row: int, field: str) -> int:
        return row * len(self.FIELDS) + self.FIELDS.index(field)

    def add(self, field: str, amount: int = 1) -> None:
        index = self._index(self._row, field)
        with self._lock:
            self._values[index] += amount

    @contextlib.contextmanager
    def active(self, gauge: str):
        self.add(gauge)
        try:
            yield
        finally:
            self.add(gauge, -1)

    def get(self, field: str) -> int:
        return sum(self._values[self._index(row, field)] for row in range(1, self.slots + 1))

    def totals(self) -> dict:
        return {field: self.get(field) for field in self.FIELDS}

    def note_arrival(self, oid: str) -> None:
        """Record that a transfer of *oid* began in this process (see ArrivalBells)."""
        base = self._row * (1 + _ARRIVALS_KEPT)
        with self._lock:
            count = self._arrivals[base]
            self._arrivals[base + 1 + count % _ARRIVALS_KEPT] = _arrival_key(oid)
            self._arrivals[base] = count + 1  # after its key: a reader that sees the count sees the key

    def arrivals_since(self, seen: list[int]) -> set[int] | None:
        """The keys of the transfers begun since the counts *seen* (one per row, updated
        in place), or None if more began in some worker than it keeps the keys of."""
        keys: set[int] | None = set()
        for row in range(1, self.slots + 1):
            base = row * (1 + _ARRIVALS_KEPT)
            count = self._arrivals[base]
            new = [self._arrivals[base + 1 + index % _ARRIVALS_KEPT] for index in range(seen[row], count)]
            if self._arrivals[base] - seen[row] > _ARRIVALS_KEPT:  # overwritten meanwhile
                keys = None
            elif keys is not None:
                keys.update(new)
            seen[row] = count
        return keys

    def arrival_counts(self) -> list[int]:
        return [self._arrivals[row * (1 + _ARRIVALS_KEPT)] for row in range(self.slots + 1)]

    def reset_gauges(self, slot: int) -> None:
        for gauge in self.GAUGES:
            self._values[self._index(slot, gauge)] = 0

    @property
    def draining(self) -> bool:
        return bool(self._values[self._DRAINING])

    def start_draining(self) -> None:
        """Refuse new uploads from now on. Setting the flag again changes nothing; the
        gunicorn master, if there is one, polls it and exits once transfers finish."""
        self._values[self._DRAINING] = 1


_ARRIVAL_POLL = 0.01  # seconds between looks at the transfers begun, while anyone waits


class ArrivalBells:
    """Wakes this process's waiters for an object (readers waiting for its upload, a pipe
    sender waiting for its receivers) as soon as a transfer of that object begins on the
    relay, in any worker (SharedState.note_arrival). One thread looks at the transfers
    begun every _ARRIVAL_POLL while anyone waits, and rings the bells (eventfds, which a
    waiter polls beside its client's connection) of those waiting for those objects: idle
    waiters cost nothing, and a transfer wakes only the waiters it concerns."""

    def __init__(self, state: SharedState):
        self._state = state
        self._lock = threading.Lock()
        self._bells: dict[int, int] = {}  # eventfd -> the key of the object waited for
        self._watching = False

    @contextlib.contextmanager
    def bell(self, oid: str):
        """An eventfd that becomes readable when a transfer of *oid* begins, while in the block."""
        bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        with self._lock:
            self._bells[bell] = _arrival_key(oid)
            if not self._watching:
                self._watching = True
                threading.Thread(target=self._watch, name="arrivals", daemon=True).start()
        try:
            yield bell
        finally:
            with self._lock:
                del self._bells[bell]  # never rung once closed: rung only under the lock
            os.close(bell)

    def _watch(self) -> None:
        seen = self._state.arrival_counts()
        while True:
            time.sleep(_ARRIVAL_POLL)
            keys = self._state.arrivals_since(seen)
            with self._lock:
                if not self._bells:
                    self._watching = False
                    return
                for bell, key in self._bells.items():
                    if keys is None or key in keys:
                        os.eventfd_write(bell, 1)


# ---------------------------------------------------------------------------
# gunicorn and Bottle: every use of their internals
#
# Only here does the relay reach past gunicorn's and Bottle's documented interfaces;
# each place says what it relies on, and tests/test_internals.py fails when a new
# version changes one of them:
#   connections   the worker's sockets are the relay's classes below: gunicorn's main
#                 loop, parser and app (environ["gunicorn.socket"]) all get them
#   request body  gunicorn's Body over a LengthReader: .buf, .reader.unreader.buf, .length
#   responses     Response.force_close(), reached as start_response.__self__; the file
#                 wrappers' .filelike (gunicorn) and .fp (Bottle)
#   worker        the gthread ThreadWorker's main loop and its connections (TConn)
#   master        the Arbiter's signal handlers and worker management; Logger.error_log
#   Bottle        Bottle.default_error_handler(res), HTTPError.traceback
# ---------------------------------------------------------------------------


HEADER_TIMEOUT = 10.0  # seconds a client has to send a request's head (and over TLS its handshake), in all
_HEAD_LIMIT = 64 << 10  # bytes of a request head received before it is refused (431)
_HEAD_END_RE = re.compile(rb"\n\r?\n")  # the blank line that ends a head (bare LFs too: gunicorn refuses them)
_LINGER_BLOCK = 256 << 10  # bytes a closing connection is read in, at a time
_LINGER_QUIET = 5.0  # seconds of silence that end a lingering close, as nginx's lingering_timeout
_QUIT_GRACE = 1.0  # seconds workers get to quit when a drain cuts its transfers, before SIGKILL
_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1, signal.SIGABRT}


class _HeaderDeadline:
    """A client connection whose request heads are received before any thread takes it.

    The worker's main loop receives each head without blocking (receive_head), from the
    accept or from the first byte of a kept-alive connection's next request, and cuts the
    connection off once HEADER_TIMEOUT has passed; a thread gets the connection only when the
    head has arrived, and recv serves the bytes received early first. A client that stalls
    or trickles its head (slowloris) thus holds neither a thread nor a place in the threads'
    queue. Until the app takes the request (headers_received), a read that would wait is
    bounded by the same deadline.
    """

    _deadline: float | None = None
    _early: bytearray | None = None  # received by the main loop, not yet read by gunicorn
    _scanned = 0  # how much of it was searched for the end of the head
    _oversized = False
    _expired = False
    continue_pending = False  # the client awaits "100 Continue" before sending its body

    def await_head(self, read_ahead: bytes = b"") -> float:
        """Start receiving a request head, without blocking, after *read_ahead* (bytes
        gunicorn read past the previous request); returns the deadline."""
        self.setblocking(False)
        if self._early is None:
            self._early = bytearray()
        self._early[:0] = read_ahead
        self._scanned = 0
        self._oversized = False
        self._deadline = time.monotonic() + HEADER_TIMEOUT
        return self._deadline

    def receive_head(self) -> int:
        """Take what has arrived, without blocking. Returns the selector event to wait for
        before calling again, or 0 once a thread should take the connection: the head has
        ended, the client has ended its side, or the head outgrew _HEAD_LIMIT (gunicorn then
        answers 431). Raises OSError when the connection is broken."""
        early = self._early
        while not _HEAD_END_RE.search(early, max(0, self._scanned - 2)):
            self._scanned = len(early)
            if len(early) >= _HEAD_LIMIT:
                self._oversized = True
                return 0
            try:
                block = super().recv(_HEAD_LIMIT)
            except (BlockingIOError, ssl.SSLWantReadError):
                return selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                return selectors.EVENT_WRITE
            if not block:
                return 0
            early.extend(block)
        return 0

    @property
    def received_early(self) -> int:
        return len(self._early or b"")

    def discard_received(self) -> int:
        """Read and drop what has arrived, without blocking: how many bytes, 0 once the
        client has ended its side. Raises BlockingIOError when nothing has arrived (over
        TLS, also when only part of a record has)."""
        try:
            count = len(super().recv(_LINGER_BLOCK))
            while count and isinstance(self, ssl.SSLSocket) and self.pending():
                count += len(super().recv(_LINGER_BLOCK))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        return count

    def send_continue(self) -> None:
        """Tell a client waiting for "100 Continue" to send its body, once it is wanted."""
        if self.continue_pending:
            self.continue_pending = False
            self.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def headers_received(self, idle_timeout: float) -> None:
        self._deadline = None
        self.settimeout(idle_timeout)

    def _before_deadline(self, operation, *args):
        current = self.gettimeout()
        if self._deadline is None or current == 0.0:  # no head awaited, or a read that never waits
            return operation(*args)
        remaining = self._deadline - time.monotonic()
        self.settimeout(max(0.001, remaining if current is None else min(current, remaining)))
        try:
            if remaining <= 0:
                raise TimeoutError
            return operation(*args)
        except TimeoutError:
            self._expired = True
            # gunicorn ignores a reset connection quietly; a timeout would log a traceback.
            raise ConnectionResetError(errno.ECONNRESET, "request headers took too long") from None

    def _take_early(self, size: int) -> bytes:
        block = bytes(self._early[:size])
        del self._early[:size]
        return block

    def recv(self, size: int = 1024, flags: int = 0) -> bytes:
        if self._early:
            return self._take_early(size)
        if self._oversized:
            from gunicorn.http.errors import LimitRequestHeaders

            self._oversized = False
            raise LimitRequestHeaders(f"request head longer than {_HEAD_LIMIT} bytes")
        return self._before_deadline(super().recv, size, flags)

    def recv_into(self, buffer, *args) -> int:
        if self._early:
            view = memoryview(buffer).cast("B")
            block = self._take_early(args[0] if args and args[0] else len(view))
            view[: len(block)] = block
            return len(block)
        return self._before_deadline(super().recv_into, buffer, *args)

    def shutdown(self, how: int) -> None:
        if self._expired:  # no lingering over a client too slow to send a request
            raise ConnectionResetError(errno.ECONNRESET, "request headers took too long")
        super().shutdown(how)


class _GuardedConnection(_HeaderDeadline, socket.socket):
    """A plain client connection: heads received by the main loop, stored files sent corked."""

    @classmethod
    def adopt(cls, connection: socket.socket) -> _GuardedConnection:
        guarded = cls(connection.family, connection.type, connection.proto, fileno=connection.detach())
        guarded.setblocking(False)
        return guarded

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        """Send a stored file corked, so that the kernel sends only full segments: on
        loopback this took a 1 GiB download from 0.62 s to 0.45 s, nginx's time (nginx
        corks too). Uncorking at the end pushes out the last partial segment."""
        corked = hasattr(socket, "TCP_CORK")
        if corked:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return super().sendfile(file, offset, count)
        finally:
            if corked and self.fileno() >= 0:
                with contextlib.suppress(OSError):  # a client gone; the send's error tells
                    self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


class PlainHTTPOnTLS(ConnectionAbortedError):
    """A client spoke plain HTTP to the TLS port and was answered 400: close it lingering
    (after a shutdown, the TLS socket reads the raw bytes it discards)."""


class _GuardedTLSConnection(_HeaderDeadline, ssl.SSLSocket):
    """A TLS client connection: its handshake too is driven by the main loop, without
    blocking, before its first head."""

    _handshaken = False
    _client_heard = False
    _PLAIN_HTTP_REASON = b"plain HTTP request sent to HTTPS port\n"
    _PLAIN_HTTP_ANSWER = (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_REASON), _PLAIN_HTTP_REASON)
    )

    def _client_spoke_first(self) -> bool:
        """Whether the client's first byte has arrived. If it starts plain HTTP, answer 400,
        as nginx does, instead of an empty reply, and raise PlainHTTPOnTLS for a lingering
        close. The handshake begins only once that byte has been seen, so that it never
        reads (and fails on) plain HTTP that arrived after the look."""
        try:
            first = socket.socket.recv(self, 1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        if first.isalpha():  # a TLS connection starts with a handshake record, 0x16
            with contextlib.suppress(OSError):
                socket.socket.recv(self, _HEAD_LIMIT)
                socket.socket.send(self, self._PLAIN_HTTP_ANSWER)
            raise PlainHTTPOnTLS(errno.ECONNABORTED, "plain HTTP sent to the TLS port")
        self._client_heard = True
        return True

    def receive_head(self) -> int:
        if not self._handshaken:
            if not self._client_heard and not self._client_spoke_first():
                return selectors.EVENT_READ
            try:
                self.do_handshake()
            except ssl.SSLWantReadError:
                return selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                return selectors.EVENT_WRITE
            self._handshaken = True
        return super().receive_head()


def _guarded_tls_context(gunicorn_config, default_context_factory) -> ssl.SSLContext:
    """gunicorn's ssl_context hook: its TLS context, wrapping connections in the guard."""
    context = default_context_factory()
    context.sslsocket_class = _GuardedTLSConnection
    return context


def _log_swept(when: str, swept: dict) -> None:
    if any(swept.values()):
        log.info("%s: removed %s", when, ", ".join(f"{n} {what}" for what, n in swept.items() if n))


class _RelayLogger:
    """gunicorn's own messages, in the relay's format and redacted. serve() mixes it onto
    gunicorn's Logger, whose error_log it relies on."""

    relay_formatter: logging.Formatter  # set by serve()

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(self.relay_formatter)


class _RelayWorker:
    """A gthread worker whose threads only serve requests that have arrived: its main
    loop receives each request head (and does each TLS handshake) and each closing
    connection's last bytes without blocking, so that slow clients hold no thread. It
    leaves Ctrl-C to the master, which drains first. serve() mixes it onto gunicorn's
    gthread ThreadWorker, whose internals it relies on (see tests/test_internals.py).
    """

    relay_config: RelayConfig  # set by serve()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heads_awaited: dict = {}  # connection -> its head's deadline, oldest first
        self.closing: dict = {}  # connection -> [end of its lingering, bytes discarded, end of quiet], oldest first
        self.tls_context: ssl.SSLContext | None = None

    def init_process(self):
        if self.cfg.is_ssl:  # once per worker: a renewed certificate needs a restart
            from gunicorn import sock as gunicorn_sock

            self.tls_context = gunicorn_sock.ssl_context(self.cfg)
        super().init_process()

    def init_signals(self):
        super().init_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)  # see spawn_worker

    def handle_request(self, req, conn):
        """Leave "100 Continue" to the app, which sends it when it starts reading the
        body. gunicorn sends it before the app has seen the request, so a client
        refused at once (403, 412, 413, 507) had already begun sending its body, and
        curl could lose the refusal when the relay closed the connection on it."""
        if isinstance(conn.sock, _HeaderDeadline):
            conn.sock.continue_pending = bool(getattr(req, "_expected_100_continue", False))
            req._expected_100_continue = False
        return super().handle_request(req, conn)

    def enqueue_req(self, conn):
        """Receive the request head of a new or kept-alive connection in the main loop;
        a thread takes the connection once it has arrived."""
        if isinstance(conn.sock, _HeaderDeadline):
            read_ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        else:
            if self.nr_conns >= self.worker_connections and (self.closing or self.heads_awaited):
                # At the limit, gthread would stop accepting: the oldest lingering close
                # (its answer was sent), else the connection that has taken longest over
                # its head, gives its place to the new one instead.
                self.drop(next(iter(self.closing or self.heads_awaited)))
            try:
                conn.sock = self.guard(conn.sock)
            except OSError:  # gone already
                self.nr_conns -= 1
                conn.close()
                return
            read_ahead = b""
        self.heads_awaited[conn] = conn.sock.await_head(read_ahead)
        self.receive_head(conn)

    def guard(self, sock: socket.socket) -> _HeaderDeadline:
        if self.tls_context is None:
            return _GuardedConnection.adopt(sock)
        return self.tls_context.wrap_socket(
            sock,
            server_side=True,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
        )

    def receive_head(self, conn, _fileobj=None):
        if conn not in self.heads_awaited:
            return  # dropped by an earlier event of the same poll
        try:
            wanted = conn.sock.receive_head()
        except PlainHTTPOnTLS:
            del self.heads_awaited[conn]
            return self.close_lingering(conn)  # a client still sending its body reads the 400
        except OSError as exc:  # a reset, or a failed TLS handshake
            self.log.debug("Closing a connection broken before its request: %s", exc)
            return self.drop(conn)
        if wanted:
            return self.watch(conn, wanted, self.receive_head)
        self.unwatch(conn)
        del self.heads_awaited[conn]
        if not conn.sock.received_early:
            return self.drop(conn)  # closed without a request
        if conn.parser is None:  # HTTP/1 over the guard: the relay offers no HTTP/2
            from gunicorn import http as gunicorn_http

            conn.parser = gunicorn_http.get_parser(self.cfg, conn.sock, conn.client)
        conn.data_ready = True  # gthread would otherwise wait for more bytes in the thread
        super().enqueue_req(conn)

    def finish_request(self, conn, fs):
        if fs.cancelled() or fs.exception() is not None:
            return super().finish_request(conn, fs)
        keep_alive = fs.result()
        if keep_alive is False:
            return self.close_lingering(conn)
        if keep_alive is True and conn.sock.received_early:
            return self.enqueue_req(conn)  # pipelined bytes, which no poll would report
        return super().finish_request(conn, fs)

    def close_lingering(self, conn):
        """Close a connection as gunicorn does, but in the main loop: half-close it, then
        read and discard for a while, so the client reads the answer rather than a reset."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            return self.drop(conn)
        now = time.monotonic()
        self.closing[conn] = [now + self.relay_config.linger_time, 0, now + _LINGER_QUIET]
        self.watch(conn, selectors.EVENT_READ, self.discard_received)

    def discard_received(self, conn, _fileobj=None):
        if conn not in self.closing:
            return  # dropped by an earlier event of the same poll
        try:
            count = conn.sock.discard_received()
        except BlockingIOError:
            return
        except OSError:
            count = 0
        lingering = self.closing[conn]
        lingering[1] += count
        lingering[2] = time.monotonic() + _LINGER_QUIET
        if not count or lingering[1] >= self.relay_config.linger_size:
            self.drop(conn)

    def murder_pending(self):
        """gthread's expiry of idle connections, and the relay's: heads past their
        deadline, lingering closes past theirs."""
        super().murder_pending()
        now = time.monotonic()
        while self.heads_awaited and next(iter(self.heads_awaited.values())) <= now:
            self.drop(next(iter(self.heads_awaited)))
        while self.closing and next(iter(self.closing.values()))[0] <= now:
            self.drop(next(iter(self.closing)))
        for conn in [conn for conn, lingering in self.closing.items() if lingering[2] <= now]:
            self.drop(conn)

    def watch(self, conn, events: int, callback):
        try:
            self.poller.modify(conn.sock, events, functools.partial(callback, conn))
        except KeyError:
            self.poller.register(conn.sock, events, functools.partial(callback, conn))

    def unwatch(self, conn):
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(conn.sock)

    def drop(self, conn):
        """Close a connection the main loop holds, at once."""
        self.unwatch(conn)
        self.heads_awaited.pop(conn, None)
        self.closing.pop(conn, None)
        self.nr_conns -= 1
        conn.close()


class _RelayArbiter:
    """The master: SIGTERM and SIGINT start a drain, and a second signal exits at once.
    DELETE /<server_id> only sets the shared drain flag, which this loop checks at
    least every second: a request asked for twice is asked for once, and never cuts
    a transfer. The master also runs the sweeper, once for the whole relay. serve()
    mixes it onto gunicorn's Arbiter, whose internals it relies on."""

    relay_config: RelayConfig  # these three set by serve()
    relay_state: SharedState
    relay_storage: Storage
    drain_deadline: float | None = None
    next_sweep: float = 0.0

    def handle_term(self):
        self.drain_or_quit()

    def handle_int(self):
        self.drain_or_quit()

    def drain_or_quit(self):
        if self.drain_deadline is None:
            self.start_drain()
            return
        log.info("second signal: exiting now")
        self.exit_now()

    def start_drain(self):
        self.relay_state.start_draining()
        self.drain_deadline = time.monotonic() + self.relay_config.graceful_timeout
        log.info("draining: new uploads are refused; exiting when transfers finish")

    def drain(self, now: float) -> None:
        """Exit once transfers are over, or cut them at the graceful timeout."""
        transfers = self.relay_state.get("uploads_active") + self.relay_state.get("downloads_active")
        if transfers and now < self.drain_deadline:
            return
        if transfers:
            log.warning("graceful timeout: cutting %d transfers", transfers)
            self.exit_now()
        raise StopIteration

    def spawn_worker(self):
        """Fork a worker with its signals blocked until it has its own handlers: a
        signal arriving before then would reach the master's handlers, inherited by
        the child, and be lost (a SIGTERM then left that worker running for the
        whole graceful timeout)."""
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        try:
            return super().spawn_worker()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)

    def exit_now(self):
        """Stop the workers within a moment, even those whose threads are blocked in a
        transfer (their interpreter would wait for those threads), then exit."""
        self.kill_workers(signal.SIGQUIT)
        deadline = time.monotonic() + _QUIT_GRACE
        delays = _delays(_POLL_MIN, _POLL_MAX)
        while self.WORKERS and time.monotonic() < deadline:
            time.sleep(next(delays))
            self.reap_workers()
        self.kill_workers(signal.SIGKILL)
        raise StopIteration

    def manage_workers(self):
        super().manage_workers()
        if self.drain_deadline is None and self.relay_state.draining:
            self.start_drain()  # asked for by DELETE /<server_id>
        now = time.monotonic()
        if self.drain_deadline is not None:
            self.drain(now)
        elif now >= self.next_sweep:
            self.next_sweep = now + self.relay_config.sweep_interval
            try:
                _log_swept("sweep", self.relay_storage.sweep())
            except (OSError, StorageError) as exc:  # a lock held elsewhere: the next sweep tries again
                log.error("sweep failed: %s", exc)


_RING_SIZE = 4  # receive buffers per upload: one being filled, the rest being hashed


def _is_length_reader(stream, reader) -> bool:
    return (
        type(reader).__name__ == "LengthReader"
        and hasattr(reader, "length")
        and isinstance(getattr(stream, "buf", None), io.BytesIO)
        and isinstance(getattr(getattr(reader, "unreader", None), "buf", None), io.BytesIO)
    )


def _socket_body(stream, peer, length: int | None):
    """The blocks of a Content-Length body read straight from the client's socket
    (_socket_blocks), or None when wsgi.input is not gunicorn's Body over a LengthReader."""
    reader = getattr(stream, "reader", None)
    if length is None or peer is None or not _is_length_reader(stream, reader):
        return None
    return _socket_blocks(stream, reader, peer, length)


def _socket_blocks(stream, reader, peer, length: int):
    """A Content-Length body straight from the socket: what gunicorn already buffered,
    through gunicorn, then recv_into() one reused buffer, which yields bytes as they
    arrive and copies nothing. gunicorn's count of unread body bytes (its reader's
    length) is kept in step, so it frames the next request on the connection right."""
    remaining = length
    while remaining > 0:
        # gunicorn reads at least 1 KiB from the socket per step: a small read can leave
        # more in its buffers, so drain them until they are empty.
        buffered = len(stream.buf.getvalue()) + len(reader.unreader.buf.getvalue())
        if not buffered:
            break
        block = stream.read(min(buffered, remaining))
        if not block:
            return
        remaining -= len(block)
        yield block
    ring = [memoryview(bytearray(min(BLOCK_SIZE, remaining))) for _ in range(_RING_SIZE if remaining > 0 else 0)]
    turn = 0
    while remaining > 0:
        buffer = ring[turn % _RING_SIZE]
        turn += 1
        count = peer.recv_into(buffer, min(len(buffer), remaining))
        if not count:
            return
        reader.length -= count
        remaining -= count
        yield buffer[:count]


def _client_socket(environ: dict) -> socket.socket | None:
    """The client's connection: gunicorn hands the app its socket (one of the classes
    above, under the relay's worker) as environ["gunicorn.socket"]; other servers, none."""
    return environ.get("gunicorn.socket")


def _close_connection_after(start_response) -> None:
    """Ask gunicorn to close the connection after this response (the app cannot send
    'Connection: close' itself; gunicorn owns hop-by-hop headers). gunicorn's
    start_response is a bound method of its Response, which has force_close()."""
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if force_close is not None:
        force_close()


def _wrapped_body(body):
    """What a file wrapper wraps: a body with read() reaches the server in gunicorn's
    FileWrapper (.filelike) or, when the server offers none, Bottle's WSGIFileWrapper (.fp)."""
    return getattr(body, "filelike", None) or getattr(body, "fp", None)


def _answer_errors_with(app, page) -> None:
    """Make *page*(res) Bottle's answer to any error no route answered: Bottle calls
    self.default_error_handler(res) then (with res.traceback set for an exception)."""
    app.default_error_handler = page


# ---------------------------------------------------------------------------
# Web application
# ---------------------------------------------------------------------------


class RelayError(Exception):
    """A request refused by the web layer itself: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None, headers: dict | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.headers = headers or {}  # of the refusal's answer


# Storage's refusals and outcomes, and the status each is answered with: the one place
# where storage meets HTTP. A refusal's reason and its Retry-After (if any) are its own.
_REFUSALS = {
    NotFound: 404,
    Busy: 409,  # with Retry-After: the same request may succeed then
    Conflict: 409,  # without: it would fail again
    TooLarge: 413,
    NoSpace: 507,
    Mismatch: 400,
    WrongLength: 400,
    Overloaded: 503,
    PipeAbandoned: 502,  # no receiver is left to pass the content to
    PipeFailed: 502,  # to a receiver: the sender's content did not verify, or it stopped or went away
    PipeShortOfReceivers: 504,  # to a receiver: the sender stopped waiting for the others
    Unavailable: 503,  # with Retry-After
    NotSupported: 501,
    StorageError: 500,  # a kind no table entry names: the relay's own fault
}
_OUTCOMES = {Stored.CREATED: 201, Stored.ALREADY: 200}


def status_of(answer: StorageError | Stored | Progress) -> int:
    """The status a storage refusal or outcome is answered with (a Progress: 202)."""
    if isinstance(answer, Progress):
        return 202
    if isinstance(answer, Stored):
        return _OUTCOMES[answer]
    return next(_REFUSALS[kind] for kind in type(answer).__mro__ if kind in _REFUSALS)  # a subclass: its kind's


def _as_refusal(error: RelayError | StorageError) -> RelayError:
    if isinstance(error, RelayError):
        return error
    return RelayError(status_of(error), error.reason, retry_after=error.retry_after)


class ClientGone(Exception):
    """The client stopped sending its body: it disconnected, stalled or broke framing."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status  # 408 for a client silent past the idle timeout


def _hangs_up_within(peer: socket.socket | None, seconds: float) -> bool:
    """Wait up to *seconds* for the client on *peer* (its connection, or None) to hang up;
    whether it did. Polling for its FIN reads nothing: the bytes it sent stay unread, and a
    TLS connection is watched the same way as a plain one. A FIN that follows more bytes
    than the connection's buffers hold never comes while they stay unread."""
    return bool(_watch(peer, seconds, select.POLLRDHUP))


def _watch(peer: socket.socket | None, seconds: float, events: int, bell: int | None = None) -> int:
    """Wait up to *seconds* for *events* (select.POLL*) on the client's connection *peer*,
    or None, or for *bell* (an eventfd) to ring; the events that came on *peer* (a reset
    or an error always comes), 0 for none."""
    watch = select.poll()
    if peer is not None and peer.fileno() >= 0:
        watch.register(peer.fileno(), events)
    elif bell is None:
        time.sleep(seconds)
        return 0
    if bell is not None:
        watch.register(bell, select.POLLIN)
    came = dict(watch.poll(math.ceil(seconds * 1000)))
    if bell is not None and bell in came:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(bell)  # silenced: it rings again for the next arrival
    return came.get(peer.fileno(), 0) if peer is not None and peer.fileno() >= 0 else 0


class _CutOff(ConnectionResetError):
    """Abort a response mid-body: the server closes the connection without finishing it,
    so the client sees an error rather than a short file (gunicorn stays quiet for
    ECONNRESET, which is what the client experiences)."""

    def __init__(self, reason: str):
        super().__init__(errno.ECONNRESET, reason)


class _Exchange:
    """One request/response, measured for the access log and the counters."""

    def __init__(self, environ: dict, state: SharedState, trusted_proxies: tuple):
        self.started = time.monotonic()
        self.state = state
        self.method = environ.get("REQUEST_METHOD", "-")
        self.path = _redacted_path(environ)
        self.client = _client_address(environ, trusted_proxies)
        self.status: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.note = ""
        self.finished = False

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        status = self.status or 500
        self.state.add(f"requests_{status // 100}xx")
        self.state.add("bytes_in", self.bytes_in)
        self.state.add("bytes_out", self.bytes_out)
        access_log.info(
            "access",
            extra={
                "client": self.client,
                "method": self.method,
                "path": self.path,
                "status": status,
                "bytes_out": self.bytes_out,
                "bytes_in": self.bytes_in,
                "duration": time.monotonic() - self.started,
                "note": self.note,
            },
        )


def _redacted_path(environ: dict) -> str:
    """The request path with its first segment (the server ID, or a wrong guess) hidden."""
    path = environ.get("PATH_INFO", "")
    segments = path.split("/", 2)
    if len(segments) > 1 and segments[1]:
        segments[1] = "***"
    query = environ.get("QUERY_STRING")
    text = "/".join(segments) + (f"?{query}" if query else "")
    return _LOG_UNSAFE_RE.sub(lambda match: f"%{ord(match[0]):02X}", text)


def _client_address(environ: dict, trusted_proxies: tuple) -> str:
    """The client for the access log: the peer, or the address a trusted proxy forwarded."""
    peer = environ.get("REMOTE_ADDR", "-")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if not forwarded or not trusted_proxies:
        return peer
    if trusted_proxies != ("*",):
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if not any(address in network for network in trusted_proxies):
            return peer
    return forwarded.split(",")[-1].strip() or peer


class _CountedIterable:
    """Wraps a small response body so its bytes are counted and the exchange is logged
    when the server closes it."""

    def __init__(self, body, exchange: _Exchange):
        self.body = body
        self.exchange = exchange

    def __iter__(self):
        for chunk in self.body:
            self.exchange.bytes_out += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.exchange.finish()


class _Body:
    """A response body read from storage, handed to the server as a file-like object so
    that Bottle passes it through untouched. It counts what the reader delivered for the
    exchange, and ends both when the server closes it; whether the download was whole is
    the reader's to say."""

    def __init__(self, exchange: _Exchange, reader, on_close):
        self.exchange = exchange
        self.reader = reader
        self.on_close = on_close  # called with whether every byte was delivered

    def read(self, size: int = -1) -> bytes:
        try:
            return self.reader.read(size)
        except UploadFailed as exc:
            self.exchange.note = f"cut off: {exc}"
            raise _CutOff(str(exc)) from None

    def close(self) -> None:
        if self.exchange is None:
            return
        exchange, self.exchange = self.exchange, None
        exchange.bytes_out += self.reader.sent
        try:
            self.on_close(self.reader.finished)
        finally:
            self.reader.close()
            if exchange.status is not None:  # the response went out: this is its end
                exchange.finish()


class _SendfileBody(_Body):
    """The body of a reader that offers sendfile: gunicorn sends it with sendfile when it
    has fileno(), and socket.sendfile() tells the reader where it stopped with seek()."""

    def fileno(self) -> int:
        return self.reader.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.reader.seek(offset, whence)


def _request_body(environ: dict, length: int | None, exchange: _Exchange, arriving: str | None = None):
    """Yield the request body in blocks as they arrive (up to BLOCK_SIZE each).

    Raises RelayError(400) if the body ends before its Content-Length, ClientGone if the
    client disconnects, stalls past the idle timeout or breaks the chunked framing. A
    yielded block may be a view into a buffer that is reused _RING_SIZE blocks later.
    """
    stream = environ["wsgi.input"]
    peer = _client_socket(environ)
    if isinstance(peer, _HeaderDeadline):
        peer.send_continue()
    if arriving is not None:  # first read once the storage is ready for it: followable
        exchange.state.note_arrival(arriving)
    blocks = _socket_body(stream, peer, length) or _stream_blocks(stream, length)
    received = 0
    try:
        for block in blocks:
            received += len(block)
            exchange.bytes_in += len(block)
            yield block
    except TimeoutError:
        raise ClientGone("the client sent nothing for the idle timeout", 408) from None
    except (OSError, ValueError) as exc:
        raise ClientGone(f"the client stopped sending: {exc.__class__.__name__}") from None
    except RelayError:
        raise
    except Exception as exc:  # gunicorn's parse errors for a broken chunked body
        raise ClientGone(f"bad chunked body: {exc.__class__.__name__}") from None
    if length is not None and received < length:
        raise RelayError(400, f"body ended after {received} bytes, Content-Length says {length}")


def _stream_blocks(stream, length: int | None):
    """The body through wsgi.input. Its read(n) returns only once n bytes came, so a body
    of unknown length is read in small steps to reach followers as it arrives."""
    remaining = length
    while remaining is None or remaining > 0:
        block = stream.read(_MIN_READ if remaining is None else min(BLOCK_SIZE, remaining))
        if not block:
            return
        if remaining is not None:
            remaining -= len(block)
        yield block


_MIN_READ = 64 << 10


_DIGITS_RE = re.compile(r"[0-9]+")  # str.isdigit() also takes '²' and other digits int() refuses
_BEYOND_ANY_SIZE = 10**30


def _whole_number(digits: str) -> int:
    """The value of decimal *digits* (matched by _DIGITS_RE); one of more than 30 digits,
    past any size or count, is _BEYOND_ANY_SIZE, not converted (Python refuses past 4,300)."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 30 else _BEYOND_ANY_SIZE


_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single byte range a Range header asks for as (first, last), or None to send
    the whole representation. Raises RelayError(416) for an unsatisfiable range."""
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if not match or match.groups() == ("", ""):
        return None  # multiple or malformed ranges: a server may ignore Range
    first_text, last_text = match.groups()
    if first_text:
        first = _whole_number(first_text)
        last = min(_whole_number(last_text), size - 1) if last_text else size - 1
        if last_text and _whole_number(last_text) < first:
            return None
    else:
        first, last = max(0, size - _whole_number(last_text)), size - 1
        if _whole_number(last_text) == 0:
            first = size
    if first >= size:
        raise RelayError(
            416, f"range not satisfiable: the object has {size} bytes", headers={"Content-Range": f"bytes */{size}"}
        )
    return first, last


_CLOSED_RANGE_RE = re.compile(r"\s*bytes\s*=\s*([0-9]{1,19})\s*-\s*([0-9]{1,19})\s*")


def _closed_range(header: str | None) -> tuple[int, int] | None:
    """First and last byte of a Range 'bytes=A-B', or None: the only range of an object of
    unknown length that can be answered before its end is known."""
    match = _CLOSED_RANGE_RE.fullmatch(header or "")
    if match is None or int(match.group(1)) > int(match.group(2)):
        return None
    return int(match.group(1)), int(match.group(2))


def _parse_content_range(header: str) -> tuple[int, int, int]:
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if not match:
        raise RelayError(400, "Content-Range must be 'bytes FIRST-LAST/TOTAL'")
    first, last, total = map(_whole_number, match.groups())
    if last < first:
        raise RelayError(400, f"Content-Range {first}-{last} ends before it starts")
    if last >= total:
        raise RelayError(400, f"Content-Range {first}-{last} does not fit in {total} bytes")
    return first, last, total


def _parse_limits(environ: dict, config: RelayConfig) -> Limits:
    """Max-Days and Max-Downloads (the transfer.sh headers), capped by the relay."""
    ttl = max_downloads = None
    days = environ.get("HTTP_MAX_DAYS")
    if days is not None:
        try:
            ttl = float(days) * 86400
        except ValueError:
            raise RelayError(400, "Max-Days must be a number of days") from None
        if not math.isfinite(ttl) or ttl < 1:
            raise RelayError(400, "Max-Days must be a number of days, at least a second's worth")
        ttl = min(ttl, LONGEST_TTL, config.ttl_cap or LONGEST_TTL)
    downloads = environ.get("HTTP_MAX_DOWNLOADS")
    if downloads is not None:
        if not _DIGITS_RE.fullmatch(downloads.strip()) or _whole_number(downloads.strip()) < 1:
            raise RelayError(400, "Max-Downloads must be a positive whole number")
        max_downloads = _whole_number(downloads.strip())
        if max_downloads >= 10**18:
            raise RelayError(400, "Max-Downloads must be less than 10**18")
    return Limits(ttl=ttl, max_downloads=max_downloads)


def _declared_length(environ: dict) -> int | None:
    """The request body's length: Content-Length, or None for a chunked body."""
    text = environ.get("CONTENT_LENGTH")
    if text:
        if not _DIGITS_RE.fullmatch(text):
            raise RelayError(400, "Content-Length must be a whole number")
        return _whole_number(text)
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    return 0


def _download_name(environ: dict) -> str | None:
    """A download's ?name=, checked; None without one. Raises RelayError(400)."""
    try:
        query = urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise RelayError(400, "name must be UTF-8") from None
    names = [value for key, value in query if key == "name"]
    if not names:
        return None
    problem = "name must be given once" if len(names) > 1 else download_name_problem(names[0])
    if problem:
        raise RelayError(400, problem)
    return names[0]


def _sent_file_name(filename: str | None, environ: dict) -> str | None:
    """The file name a name-less upload's URL ends with (curl -T appends it), checked;
    Bottle drops bytes that are not UTF-8 from the path, so its raw form is checked too."""
    if not filename:
        return None
    try:
        environ.get("bottle.raw_path", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise RelayError(400, "name must be UTF-8") from None
    problem = download_name_problem(filename)
    if problem:
        raise RelayError(400, problem)
    return filename


def _content_digest(environ: dict, field: str = "Content-Digest") -> bytes | None:
    digest_field = environ.get("HTTP_" + field.upper().replace("-", "_"))
    try:
        digest = parse_digest_field(digest_field) if digest_field else None
    except ValueError as exc:
        raise RelayError(400, f"{field}: {exc}") from None
    if digest_field and digest is None:
        raise RelayError(400, f"{field}: only sha-256 is checked, and this one has none")
    return digest


def _whole_body_digest(environ: dict) -> str | None:
    """The SHA-256 (hex) a whole upload's Content-Digest or Repr-Digest gives, if any."""
    given = {digest for field in ("Content-Digest", "Repr-Digest") if (digest := _content_digest(environ, field))}
    if len(given) > 1:
        raise RelayError(400, "Content-Digest and Repr-Digest give different SHA-256 digests")
    return given.pop().hex() if given else None


def _public_url(environ: dict, path: str) -> str:
    """The URL a client reaches *path* (below the server ID) at: as it reached this request."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
    server_id = environ.get("PATH_INFO", "").split("/", 2)[1]
    prefix = urllib.parse.quote(environ.get("SCRIPT_NAME", ""))
    return f"{scheme}://{host}{prefix}/{urllib.parse.quote(server_id, safe='')}/{path}"


def _object_path(named: Named) -> str:
    """An object's path below the server ID, with ?name= if the sender gave one."""
    query = f"?name={urllib.parse.quote(named.name, safe='')}" if named.name else ""
    return f"{named.oid}{query}"


def _preferred_wait(header: str | None) -> int | None:
    """The seconds of a Prefer header's wait preference (RFC 7240), or None. A malformed
    one is ignored, as a preference may be."""
    for preference in (header or "").split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        value = value.strip().strip('"')
        if name.strip().lower() == "wait" and _DIGITS_RE.fullmatch(value):
            return _whole_number(value)
    return None


# The page a browser gets at the relay's URL: HTML, CSS and JavaScript served from here,
# no build step, no framework, nothing from other hosts. It sends each file in chunks to
# the name-less resumable form, and keeps only the upload's token and the digests of its
# acknowledged chunks (never the server ID) in localStorage, to resume after a reload
# with the same file and no other.
_PAGE_STYLE = r"""
:root { color-scheme: light dark; --accent: #2f6fdf; --muted: #6b7280; --line: #d0d5dd; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, sans-serif; }
main { max-width: 46rem; margin: 0 auto; padding: 2rem 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
#status { color: var(--muted); margin: 0 0 1.5rem; min-height: 1.5em; }
.drop { display: block; border: 2px dashed var(--line); border-radius: .75rem; padding: 2.5rem 1rem;
  text-align: center; cursor: pointer; }
.drop.over, .drop:focus-within { border-color: var(--accent); }
.drop input { position: absolute; opacity: 0; width: 1px; height: 1px; }
.button, button { display: inline-block; font: inherit; padding: .3rem .8rem; border-radius: .4rem;
  border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer; }
button.quiet { background: transparent; color: var(--accent); }
button:focus-visible, a:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
progress { width: 100%; height: .75rem; }
.overall { margin: 1.5rem 0 .5rem; }
ul { list-style: none; padding: 0; }
li { border: 1px solid var(--line); border-radius: .6rem; padding: .75rem 1rem; margin: .75rem 0; }
.name { font-weight: 600; overflow-wrap: anywhere; }
.figures { color: var(--muted); font-size: .9rem; font-variant-numeric: tabular-nums; }
.error { color: #c0392b; }
code { display: block; font-size: .85rem; padding: .3rem .5rem; margin: .3rem 0; border-radius: .3rem;
  background: rgba(127, 127, 127, .12); overflow-wrap: anywhere; }
.row { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; margin-top: .4rem; }
"""

_PAGE_SCRIPT = r"""
"use strict";
const base = location.pathname.replace(/\/+$/, "");
const CHUNK = 8 << 20, PARALLEL = 4, MOST_BACKOFF = 30000, RECORD_INTERVAL = 2000, RECORD_DAYS = 7;
const events = [];
window.relayEvents = events;
const $ = (id) => document.getElementById(id);
const all = { total: 0, done: 0, started: 0, active: 0 };

function emit(type, detail) { events.push({ type, time: performance.now(), ...detail }); }

function size(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (bytes >= 1000 && i < units.length - 1) { bytes /= 1000; i++; }
  return `${bytes.toFixed(i && bytes < 100 ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  if (!isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.ceil((seconds % 3600) / 60)} min`;
}

function figures(done, total, started) {
  const seconds = (performance.now() - started) / 1000;
  const rate = seconds > 0.5 ? done / seconds : 0;
  const left = rate ? duration((total - done) / rate) + " left" : "";
  const percent = total ? Math.floor((100 * done) / total) : 100;
  return [`${size(done)} of ${size(total)} (${percent}%)`, rate ? `${size(rate)}/s` : "", left]
    .filter(Boolean).join(", ");
}

async function showStatus() {
  try {
    const answer = await fetch(base, { headers: { Accept: "application/json" }, cache: "no-store" });
    const s = await answer.json();
    const disk = s["disk utilization"];
    const count = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;
    $("status").textContent = `${size(disk.bytes_remaining)} free. ${count(s.uploads_in_progress, "upload")} and ` +
      `${count(s.downloads_in_progress, "download")} in progress; ${count(s.stored_objects, "file")} stored.`;
  } catch (e) {
    $("status").textContent = "The relay does not answer right now.";
  }
}

function request(method, url, headers, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [name, value] of Object.entries(headers || {})) xhr.setRequestHeader(name, value);
    if (onProgress) xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => resolve(xhr);
    xhr.onerror = () => reject(new Error("network error"));
    xhr.ontimeout = () => reject(new Error("timed out"));
    xhr.send(body);
  });
}

function retryable(xhr) {
  return [500, 502, 503, 504, 408].includes(xhr.status) ||
    (xhr.status === 409 && Boolean(xhr.getResponseHeader("Retry-After")));
}

// The name the relay is given for a file: none where the relay would refuse it (as
// download_name_problem does), so that the file is still sent.
function sentName(name) {
  if (["", ".", ".."].includes(name) || /[\/\\\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(name)) return "";
  if (new TextEncoder().encode(name).length > 255 || (name.isWellFormed && !name.isWellFormed())) return "";
  return encodeURIComponent(name);
}

// What localStorage holds of an upload: its token and the Content-Digest of each
// acknowledged chunk ("first-last" -> digest), or null.
function loadRecord(key) {
  try {
    const record = JSON.parse(localStorage.getItem(key));
    return record && typeof record.token === "string" ? { digests: {}, ...record } : null;
  } catch (e) { return null; }
}

// Written at most every few seconds (a lost write only means chunks sent again), and
// never a reason to stop: a full localStorage costs the resume, not the upload.
const lastSaved = new Map(), unsaved = new Map();
function saveRecord(key, record, now = false) {
  unsaved.set(key, record);
  if (!now && performance.now() - (lastSaved.get(key) || 0) < RECORD_INTERVAL) return;
  lastSaved.set(key, performance.now());
  unsaved.delete(key);
  try { localStorage.setItem(key, JSON.stringify({ ...record, saved: Date.now() })); } catch (e) { /* full */ }
}

function forgetRecord(key) {
  unsaved.delete(key);
  localStorage.removeItem(key);
}

addEventListener("pagehide", () => { for (const [key, record] of unsaved) saveRecord(key, record, true); });

// Records of uploads not resumed for RECORD_DAYS are dropped: the relay has let them go.
function sweepRecords() {
  for (const key of Object.keys(localStorage)) {
    if (!key.startsWith("file-relay:")) continue;
    const record = loadRecord(key);
    if (!record || !(Date.now() - (record.saved || 0) < RECORD_DAYS * 86400000)) localStorage.removeItem(key);
  }
}

async function withRetries(what, attempt, note) {
  for (let delay = 1000; ; delay = Math.min(delay * 2, MOST_BACKOFF)) {
    let wait = delay;
    try {
      const xhr = await attempt();
      if (!retryable(xhr)) return xhr;
      wait = Math.max(delay, 1000 * Number(xhr.getResponseHeader("Retry-After") || 0));
      note(`${what}: ${xhr.responseText.trim() || xhr.status}; retrying`);
    } catch (e) {
      note(`${what}: ${e.message}; retrying`);
    }
    await new Promise((done) => setTimeout(done, wait * (0.5 + Math.random() / 2)));
  }
}

function missing(ranges, total) {
  const gaps = [];
  let next = 0;
  for (const [first, last] of ranges) {
    if (first > next) gaps.push([next, first - 1]);
    next = Math.max(next, last + 1);
  }
  if (next < total) gaps.push([next, total - 1]);
  const chunks = [];
  for (const [first, last] of gaps)
    for (let a = first; a <= last; a += CHUNK) chunks.push([a, Math.min(a + CHUNK - 1, last)]);
  return chunks;
}

function parseRanges(text) {
  return (text || "").split(",").filter((r) => r.trim()).map((r) => r.trim().split("-").map(Number));
}

function digestField(buffer) {
  return crypto.subtle.digest("SHA-256", buffer).then((hash) =>
    `sha-256=:${btoa(String.fromCharCode(...new Uint8Array(hash)))}:`);
}

// What the page remembers of a chunk it sent, to know the file again: its Content-Digest
// where WebCrypto exists, else (plain HTTP) a 64-bit checksum, which finds a changed or
// different file (not a forged one: the relay does not see it).
async function fingerprint(buffer) {
  if (window.isSecureContext) return digestField(buffer);
  const words = new Uint32Array(buffer, 0, buffer.byteLength >>> 2);
  let a = 0x811c9dc5, b = 0x9747b28c;
  const mix = (w) => { a = Math.imul(a ^ w, 0x01000193); b = Math.imul(b + w, 0x5bd1e995) ^ (b >>> 15); };
  for (let i = 0; i < words.length; i++) mix(words[i]);
  for (const byte of new Uint8Array(buffer, words.length * 4)) mix(byte);
  return `sum=${(a >>> 0).toString(16)}.${(b >>> 0).toString(16)}`;
}

function quote(text) { return `'${text.replace(/'/g, "'\\''")}'`; }

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, attributes);
  node.append(...children);
  return node;
}

function copyButton(label, text) {
  const button = element("button", { type: "button", className: "quiet", textContent: label });
  button.onclick = async () => {
    try { await navigator.clipboard.writeText(text); } catch (e) {
      const field = element("textarea", { value: text });
      document.body.append(field); field.select(); document.execCommand("copy"); field.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1500);
  };
  return button;
}

function showStored(ui, file, url) {
  const link = element("a", { href: url, textContent: `Download ${file.name}` });
  link.setAttribute("download", file.name);
  const curl = `curl -fo ${quote(file.name)} ${quote(url)}`;
  const get = `python3 file_relay.py get ${quote(url)} -o ${quote(file.name)}`;
  ui.extra.replaceChildren(
    element("div", { className: "row" }, link, copyButton("Copy link", url)),
    element("div", { className: "figures", textContent: "To receive it:" }),
    element("code", { textContent: curl }), element("code", { textContent: get }));
}

async function sendFile(file, ui, fresh = 0) {
  const key = `file-relay:${file.name}:${file.size}:${file.lastModified}`;
  const acked = { bytes: 0 }, inflight = new Map();
  const started = performance.now();
  let failure = null;
  const note = (text) => { if (!failure) ui.figures.textContent = text; };
  const draw = () => {
    if (failure) return;
    let sent = acked.bytes;
    for (const value of inflight.values()) sent += value;
    ui.bar.value = sent;
    ui.figures.textContent = figures(sent, file.size, started);
    drawOverall();
    emit("progress", { file: file.name, sent, total: file.size });
  };
  const fail = (text) => { failure = failure || new Error(text); throw failure; };
  try {
    await file.slice(0, 1).arrayBuffer();
  } catch (e) {
    fail("this cannot be read as a file (a folder? pick the files in it, or an archive of it)");
  }
  const newUrl = `${base}/new/${sentName(file.name)}`;
  if (file.size === 0) {
    const xhr = await withRetries("upload", () => request("PUT", newUrl, {}, new Blob([])), note);
    return finish(xhr);
  }
  let record = loadRecord(key), ranges = [];
  if (record) {
    const xhr = await withRetries("status", () => request("HEAD", `${base}/uploads/${record.token}`), note);
    if (xhr.status === 200 && xhr.getResponseHeader("Location")) {
      // Stored already: only if every byte of it is known to be this file's.
      const whole = [[0, file.size - 1]];
      if (total(recordedSpans(record)) === file.size && await sameFile(record, whole)) return finish(xhr);
      record = null;
    } else if (xhr.status === 200) {
      ranges = parseRanges(xhr.getResponseHeader("Upload-Ranges"));
      if (!await sameFile(record, ranges)) ranges = await startAfresh(record);
    } else {
      record = null;
    }
    if (record) emit("resumed", { file: file.name, ranges });
  }
  if (!record) { ranges = []; record = await start(); }
  // Acknowledged bytes with no recorded digest (the page left before their answer came)
  // are sent again: the relay compares them with what it holds.
  const acknowledged = ranges;
  ranges = recordedSpans(record).filter(([first, last]) => acknowledged.some(([a, b]) => a <= first && last <= b));
  const spans = ranges.map(([first, last]) => `${first}-${last}`);
  record.digests = Object.fromEntries(spans.map((span) => [span, record.digests[span]]));
  acked.bytes = total(ranges);
  const pending = missing(ranges, file.size);
  // The chunk that completes the upload goes last, once the file is seen unchanged.
  const closing = pending.length ? pending.pop() : [file.size - 1, file.size - 1];
  let result = null, changed = false;
  const sendChunk = async (first, last) => {
    const buffer = await readChunk(first, last);
    const headers = { "Content-Range": `bytes ${first}-${last}/${file.size}` };
    const known = await fingerprint(buffer);
    if (window.isSecureContext) headers["Content-Digest"] = known;
    // Remembered before it is sent: a resume trusts only chunks the relay acknowledges.
    record.digests[`${first}-${last}`] = known;
    if (first === closing[0]) saveRecord(key, record, true);
    const token = record.token;
    for (let damaged = 0; ; damaged++) {
      const xhr = await withRetries(`bytes ${first}-${last}`, () => {
        inflight.set(first, 0);
        return request("PUT", `${base}/uploads/${token}`, headers, buffer, (n) => { inflight.set(first, n); draw(); });
      }, note);
      inflight.delete(first);
      emit("chunk", { file: file.name, first, last, status: xhr.status });
      if ([200, 201, 202].includes(xhr.status)) {
        acked.bytes = Math.min(file.size, acked.bytes + last - first + 1);
        saveRecord(key, record);
        draw();
        return xhr;
      }
      // Damaged on the way: the relay kept nothing of it; send it again.
      if (xhr.status === 400 && /Content-Digest/.test(xhr.responseText) && damaged < 3) continue;
      // The relay holds other bytes there (another tab's file, or this one before it
      // changed): this file goes afresh, a few times at most.
      if (xhr.status === 409 && fresh < 2) { changed = true; return null; }
      fail(xhr.responseText.trim() || `status ${xhr.status}`);
    }
  };
  const worker = async () => {
    while (pending.length && !failure && !changed) {
      const [first, last] = pending.shift();
      const xhr = await sendChunk(first, last);
      if (xhr && xhr.status !== 202) result = xhr;
    }
  };
  try {
    await Promise.all(Array.from({ length: PARALLEL }, worker));
    if (!changed && !result) {
      if (!await sameFile(record, [[0, file.size - 1]], true)) {
        const reason = "the file changed while it was sent; nothing of it was stored: pick it again";
        failure = Object.assign(new Error(reason), { unreadable: true });
        throw failure;
      }
      result = await sendChunk(...closing);
    }
  } catch (error) {
    failure = failure || error;
    if (failure.unreadable) await startAfresh(record);
    throw failure;
  }
  saveRecord(key, record, true);
  if (changed) {
    await startAfresh(record);
    return sendFile(file, ui, fresh + 1);
  }
  if (!result || result.status === 202) fail("the upload ended without being stored; pick the file again");
  return finish(result);

  async function readChunk(first, last) {
    try {
      return await file.slice(first, last + 1).arrayBuffer();
    } catch (e) {
      failure = failure || Object.assign(new Error(
        "the file changed or was removed while it was sent (the browser cannot read it again); pick it again"),
      { unreadable: true });
      throw failure;
    }
  }

  async function start() {
    const xhr = await withRetries("start", () => request("POST", newUrl, { "Upload-Length": String(file.size) }), note);
    if (xhr.status !== 201) fail(xhr.responseText.trim() || `status ${xhr.status}`);
    const fresh = { token: xhr.getResponseHeader("Location").split("/").pop(), digests: {} };
    saveRecord(key, fresh, true);
    return fresh;
  }

  // Whether each recorded chunk inside *ranges* still digests as it did when it was
  // acknowledged: another file with the same name, size and time must not be spliced in.
  async function sameFile(old, ranges, closing = false) {
    let checked = 0;
    for (const [span, digest] of Object.entries(old.digests)) {
      const [first, last] = span.split("-").map(Number);
      if (!ranges.some(([a, b]) => a <= first && last <= b)) continue;
      const percent = Math.floor((100 * checked) / file.size);
      note(closing ? `Checking that the file did not change while it was sent (${percent}%)`
        : "Checking that this is the file sent before");
      if (await fingerprint(await readChunk(first, last)) !== digest) return false;
      checked += last - first + 1;
    }
    return true;
  }

  // Cancel the upload of a file that changed since; nothing of it is resumed.
  async function startAfresh(old) {
    await withRetries("cancel", () => request("DELETE", `${base}/uploads/${old.token}`), note);
    emit("changed", { file: file.name });
    forgetRecord(key);
    record = null;
    return [];
  }

  function recordedSpans(old) {
    return Object.keys(old.digests).map((span) => span.split("-").map(Number)).sort((x, y) => x[0] - y[0]);
  }

  function total(spans) { return spans.reduce((sum, [first, last]) => sum + last - first + 1, 0); }

  function finish(xhr) {
    if (xhr.status !== 200 && xhr.status !== 201) fail(xhr.responseText.trim() || `status ${xhr.status}`);
    forgetRecord(key);
    const url = xhr.getResponseHeader("Location");
    const sha = url.split("?")[0].split("/").pop();
    acked.bytes = file.size;
    inflight.clear();
    draw();
    ui.figures.textContent = `Stored, ${size(file.size)}. SHA-256 ${sha}`;
    showStored(ui, file, url);
    emit("stored", { file: file.name, url, sha256: sha });
  }
}

function drawOverall() {
  all.done = [...document.querySelectorAll("li progress.batch")].reduce((sum, bar) => sum + bar.value, 0);
  $("overall-bar").max = Math.max(all.total, 1);
  $("overall-bar").value = all.done;
  $("overall-figures").textContent = figures(all.done, all.total, all.started);
}

function addFiles(files, folders = []) {
  $("overall").hidden = false;
  for (const name of folders) {
    const figures = element("div", { className: "figures error",
      textContent: "Failed: a folder cannot be sent; pick the files in it, or an archive of it" });
    $("files").append(element("li", {}, element("div", { className: "name", textContent: name }), figures));
    emit("failed", { file: name, reason: figures.textContent });
  }
  for (const file of files) {
    if (!all.active) {  // a new batch: its rate counts from now
      all.started = performance.now();
      all.total = all.done = 0;
      for (const bar of document.querySelectorAll("li progress.batch")) bar.classList.remove("batch");
    }
    all.active++;
    all.total += file.size;
    const ui = { bar: element("progress", { max: Math.max(file.size, 1), value: 0, className: "batch" }),
      figures: element("div", { className: "figures", textContent: "waiting" }), extra: element("div") };
    $("files").append(element("li", {}, element("div", { className: "name", textContent: file.name }),
      ui.bar, ui.figures, ui.extra));
    drawOverall();
    sendFile(file, ui).catch((error) => {
      all.total -= file.size;  // a failed file leaves the overall figures
      ui.bar.classList.remove("batch");
      ui.figures.textContent = `Failed: ${error.message}`;
      ui.figures.className = "figures error";
      emit("failed", { file: file.name, reason: error.message });
    }).finally(() => { all.active--; drawOverall(); showStatus(); });
  }
}

const drop = $("drop");
$("pick").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const files = [], folders = [];
  for (const item of e.dataTransfer.items) {
    const entry = item.webkitGetAsEntry && item.webkitGetAsEntry();
    if (entry && entry.isDirectory) folders.push(entry.name);
    else if (item.kind === "file") files.push(item.getAsFile());
  }
  addFiles(files.filter(Boolean), folders);
});
sweepRecords();
showStatus();
setInterval(showStatus, 10000);
"""

_PAGE_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>file-relay</title>
<style>{style}</style>
</head>
<body>
<main>
<h1>file-relay</h1>
<p id="status" aria-live="polite"></p>
<label id="drop" class="drop" for="pick">
  <p>Drop files here, or</p>
  <span class="button">Choose files</span>
  <input id="pick" type="file" multiple>
  <p class="figures">Each file is stored under its SHA-256, sent in chunks that resume after a reload.</p>
</label>
<section id="overall" class="overall" hidden aria-live="polite">
  <progress id="overall-bar" max="1" value="0" aria-label="All files"></progress>
  <div id="overall-figures" class="figures"></div>
</section>
<ul id="files"></ul>
</main>
<script>{script}</script>
</body>
</html>
"""


@functools.cache
def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy, which admits only its own inline style
    and script (by their hashes) and requests to the relay itself."""

    def source_hash(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; style-src {source_hash(_PAGE_STYLE)}; script-src {source_hash(_PAGE_SCRIPT)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return _PAGE_BODY.format(style=_PAGE_STYLE, script=_PAGE_SCRIPT).encode(), policy


def _wants_page(environ: dict, query) -> bool:
    """Whether a GET of the relay's URL comes from a browser (it asks for HTML first)."""
    if query.get("format"):
        return query.get("format") == "html"
    accept = environ.get("HTTP_ACCEPT", "")
    return accept.split(",")[0].split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml")


def _wants_prometheus(environ: dict, query) -> bool:
    if query.get("format"):
        return query.get("format") == "prometheus"
    accept = environ.get("HTTP_ACCEPT", "")
    return "openmetrics-text" in accept or "version=0.0.4" in accept


def _object_headers(obj: StoredObject) -> dict:
    headers = {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{obj.oid}"',
        "Repr-Digest": sha256_field(bytes.fromhex(obj.oid)),
        "Accept-Ranges": "bytes",
        "Last-Modified": http_date(obj.stored_at),
    }
    if obj.expires_at is not None:
        headers["Expires"] = http_date(obj.expires_at)
        headers["X-Remaining-Days"] = f"{max(0.0, obj.expires_at - time.time()) / 86400:.3f}"
    if obj.remaining_downloads is not None:
        headers["X-Remaining-Downloads"] = str(obj.remaining_downloads)
    return headers


def _upload_headers(progress: Progress) -> dict:
    """The headers of GET and HEAD of an upload in progress, but its Content-Length."""
    headers = {"Content-Type": "application/octet-stream", **_progress_headers(progress)}
    if progress.length is not None and progress.mode != "pipe":
        headers["Accept-Ranges"] = "bytes"
    return headers


def _progress_headers(progress: Progress) -> dict:
    headers = {"Upload-Offset": str(progress.offset), "Upload-Incomplete": "?1"}
    if progress.length is not None:
        headers["Upload-Length"] = str(progress.length)
    if progress.mode == "chunks":
        headers["Upload-Ranges"] = format_ranges(progress.ranges)
    return headers


def _not_modified(environ: dict, obj: StoredObject) -> bool:
    """Whether a GET or HEAD of *obj* is answered 304: If-None-Match matches, or, without
    one (RFC 9110 section 13.2.2), If-Modified-Since is no earlier than its Last-Modified."""
    if "HTTP_IF_NONE_MATCH" in environ:
        return _etag_matches(environ["HTTP_IF_NONE_MATCH"], obj.oid)
    try:
        since = email.utils.parsedate_to_datetime(environ.get("HTTP_IF_MODIFIED_SINCE", ""))
    except (TypeError, ValueError):
        return False  # absent or not a date: ignored
    return since.tzinfo is not None and int(obj.stored_at) <= since.timestamp()


def _etag_matches(header: str | None, oid: str) -> bool:
    if not header:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or f'"{oid}"' in tags or f'W/"{oid}"' in tags


_UNSIZED_UPLOAD = object()  # an upload of unknown length, which this reader may not follow


_CORS_ALLOWED_METHODS = "GET, HEAD, PUT, POST, DELETE"
_CORS_ALLOWED_HEADERS = (
    "Content-Type, Content-Range, Content-Digest, Range, If-None-Match, If-Modified-Since, If-Range, "
    "Max-Downloads, Max-Days, Prefer, Upload-Length"
)
_CORS_EXPOSED_HEADERS = (
    "ETag, Content-Range, Content-Length, Content-Disposition, Accept-Ranges, Last-Modified, Location, "
    "Retry-After, Repr-Digest, Upload-Offset, Upload-Ranges, Upload-Length, Upload-Incomplete, Preference-Applied, "
    "X-Remaining-Downloads, X-Remaining-Days"
)


def _cors_headers(environ: dict, origins: tuple[str, ...]) -> list[tuple[str, str]]:
    """The headers that let a page from the request's Origin read this answer: none unless
    that origin is one of *origins* (or they are '*')."""
    if not origins:
        return []
    vary = [] if "*" in origins else [("Vary", "Origin")]  # the answer depends on who asks
    origin = environ.get("HTTP_ORIGIN")
    if origin is None or ("*" not in origins and origin not in origins):
        return vary
    allowed = "*" if "*" in origins else origin
    return [("Access-Control-Allow-Origin", allowed), *vary, ("Access-Control-Expose-Headers", _CORS_EXPOSED_HEADERS)]


def _is_cors_preflight(environ: dict, origins: tuple[str, ...]) -> bool:
    allowed = any(name == "Access-Control-Allow-Origin" for name, _ in _cors_headers(environ, origins))
    return allowed and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ


class _LogWriter:
    """wsgi.errors for the app: what Bottle writes there goes to the (redacting) log."""

    def write(self, text: str) -> None:
        if text.strip():
            log.error("%s", text.rstrip())

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


_WAITING_POLL_FIRST, _WAITING_POLL_MOST = 0.05, 0.5  # seconds between a waiting reader's looks


class RelayHandler:
    """The relay's routes over one Storage, and the WSGI application around them.

    Each route is a method; what the routes share (the storage, the counters and drain
    flag, the slots of readers waiting for an upload) are attributes. GET and HEAD of an
    object take one path (_send_head), as CPython's SimpleHTTPRequestHandler.send_head
    serves both, so their status and headers cannot differ. Storage's refusals are
    answered through _REFUSALS; the handler knows nothing of files.
    """

    def __init__(self, config: RelayConfig, storage: Storage, state: SharedState):
        import bottle

        self.config = config
        self.storage = storage
        self.state = state
        self.request = bottle.request  # the request of the thread, as each route sees it
        self.response_class = bottle.HTTPResponse
        self.app = None  # the Bottle application routing to this handler (make_app)
        self.trusted_proxies = parse_trusted_proxies(config.forwarded_allow_ips)
        self.waiting_slots = threading.BoundedSemaphore(config.waiting_reader_limit)
        self.arrivals = ArrivalBells(state)
        self.expected_id = hashlib.sha256(config.server_id.encode()).digest()

    # -- the WSGI application: every exchange measured and logged --------------

    def __call__(self, environ: dict, start_response):
        exchange = _Exchange(environ, self.state, self.trusted_proxies)
        environ["file_relay.exchange"] = exchange
        environ["wsgi.errors"] = _LogWriter()
        peer = _client_socket(environ)
        if isinstance(peer, _HeaderDeadline):
            peer.headers_received(self.config.idle_timeout)
        elif peer is not None:
            peer.settimeout(self.config.idle_timeout)

        def observed_start_response(status, headers, exc_info=None):
            exchange.status = int(status[:3])
            headers = self._final_headers(environ, exchange.status, headers)
            if environ.get("file_relay.close") or (isinstance(peer, _HeaderDeadline) and peer.continue_pending):
                _close_connection_after(start_response)  # a body not read: not sent, or unwanted
            return start_response(status, headers, exc_info)

        body = self.app(environ, observed_start_response)
        if isinstance(_wrapped_body(body), _Body):
            return body  # left whole for sendfile; the body reports itself
        return _CountedIterable(body, exchange)

    def _final_headers(self, environ: dict, status: int, headers: list) -> list:
        if environ.get("file_relay.length_unknown"):  # not the 0 Bottle gives empty bodies
            headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
        if "file_relay.disposition" in environ and status in (200, 206):
            headers = [*headers, ("Content-Disposition", environ["file_relay.disposition"])]
        if "file_relay.preference_applied" in environ:
            headers = [*headers, ("Preference-Applied", environ["file_relay.preference_applied"])]
        return [*headers, *_cors_headers(environ, self.config.cors_origins)]

    def error_page(self, res):
        """Bottle's answer to an error no route answered (an exception: 500)."""
        if res.status_code >= 500 and res.traceback:
            log.error("unhandled error: %s", res.traceback.rstrip())
        res.content_type = "text/plain; charset=utf-8"
        return f"{res.body}\n" if res.status_code < 500 else "internal error\n"

    def check_server_id(self, callback):
        """Bottle plugin: every route needs the server ID as its first path segment.

        Both sides are hashed first, so the comparison takes the same time whatever was
        sent, and the refusal is the same whatever the path."""

        def checked(*args, **kwargs):
            if self.request.method == "OPTIONS" and _is_cors_preflight(self.request.environ, self.config.cors_origins):
                return self._cors_preflight()  # the same for every path, so that the page can read a 403
            given = self.request.environ.get("PATH_INFO", "").split("/", 2)[1:2] or [""]
            digest = hashlib.sha256(given[0].encode("latin-1", "replace")).digest()
            if not hmac.compare_digest(digest, self.expected_id):
                return self._reply(403, "forbidden", close=True)
            kwargs.pop("server_id", None)
            return callback(*args, **kwargs)

        return checked

    # -- answers ---------------------------------------------------------------

    def _reply(self, status: int, text: str, headers: dict | None = None, *, close: bool = False):
        if close:
            self.request.environ["file_relay.close"] = True
        response = self.response_class(f"{text}\n", status, headers)
        response.content_type = "text/plain; charset=utf-8"
        return response

    def _refuse(self, error: RelayError | StorageError, *, close: bool = True):
        """Answer a refusal; a request whose body was not read closes its connection, so
        the relay never drains a body it will not store."""
        error = _as_refusal(error)
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
        return self._reply(error.status, error.reason, {**headers, **error.headers}, close=close)

    def _object_id(self, text: str) -> str:
        oid = parse_object_id(text)
        if oid is None:
            raise self._refuse(RelayError(400, "object ID must be 64 hex digits (the SHA-256 of the content)"))
        return oid

    # -- the relay ---------------------------------------------------------------

    def status(self):
        if self.request.method == "HEAD":  # a cheap check of the server ID, without the scan
            return self.response_class(None, 200, {"Content-Type": "application/json"})
        if _wants_page(self.request.environ, self.request.query):
            page, policy = _page()
            headers = {
                "Content-Type": "text/html; charset=utf-8",
                "Content-Security-Policy": policy,
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            }
            return self.response_class(page, 200, headers)
        try:
            report = _status_report(self.config, self.storage.usage(), self.state)
        except StorageError as exc:  # the storage cannot be reached
            return self._refuse(exc, close=False)
        if _wants_prometheus(self.request.environ, self.request.query):
            text_type = "text/plain; version=0.0.4; charset=utf-8"
            return self.response_class(_prometheus_text(report), 200, {"Content-Type": text_type})
        return self.response_class(json.dumps(report, indent=2) + "\n", 200, {"Content-Type": "application/json"})

    def shutdown(self):
        self.state.start_draining()
        limit = self.config.graceful_timeout
        return self._reply(200, f"draining: the relay exits when transfers finish (at most {limit:g} s)")

    def relay_other(self):
        return self._reply(405, "method not allowed", {"Allow": "GET, HEAD, DELETE"}, close=True)

    def object_other(self, oid_text):
        return self._reply(405, "method not allowed", {"Allow": "GET, HEAD, PUT, DELETE"}, close=True)

    def anything_else(self, path=""):
        return self._reply(404, "not found", close=True)

    def _cors_preflight(self):
        """A page's question whether it may send a request: yes, from an allowed origin."""
        headers = {
            "Access-Control-Allow-Methods": _CORS_ALLOWED_METHODS,
            "Access-Control-Allow-Headers": _CORS_ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        }
        return self.response_class(None, 204, headers)

    # -- uploads -----------------------------------------------------------------

    def put_object(self, oid_text):
        oid = self._object_id(oid_text)
        if "pipe" in self.request.query:
            return self.put_pipe(oid)
        exchange = self.request.environ["file_relay.exchange"]
        try:
            length, chunk, limits, digest = self._upload_request(oid)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        body = _request_body(self.request.environ, length, exchange, oid)
        try:
            with self.state.active("uploads_active"):
                if chunk:
                    outcome = self.storage.put_chunk(oid, *chunk, body, digest, limits)
                else:
                    created = self.storage.put_stream(oid, body, length, limits)
                    outcome = Stored.CREATED if created else Stored.ALREADY
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        except ClientGone as exc:
            exchange.note = str(exc)
            return self._reply(exc.status, str(exc), close=True)
        if outcome is Stored.CREATED:  # where nothing could be followed before (a small object on S3)
            self.state.note_arrival(oid)
        return self._upload_answer(oid, outcome)

    def _upload_request(self, oid: str) -> tuple:
        """What a PUT asks for: (its length, the chunk's (first, last, total) or None, the
        limits, the chunk's digest or None). Raises a refusal."""
        environ = self.request.environ
        if self.state.draining and not self.storage.is_stored(oid):  # a stored object needs nothing stored
            raise RelayError(503, "the relay is shutting down", retry_after=5)
        length = _declared_length(environ)
        content_range = environ.get("HTTP_CONTENT_RANGE")
        chunk = _parse_content_range(content_range) if content_range else None
        if chunk and length is not None and length != chunk[1] - chunk[0] + 1:
            raise RelayError(400, "Content-Length does not match Content-Range")
        if environ.get("HTTP_IF_NONE_MATCH", "").strip() == "*" and self.storage.is_stored(oid):
            raise RelayError(412, "already stored")
        limits = _parse_limits(environ, self.config)
        digest = _content_digest(environ)
        self.storage.check_size(chunk[2] if chunk else length or 0)
        return length, chunk, limits, digest

    def _upload_answer(self, oid: str, outcome: Progress | Stored):
        if isinstance(outcome, Progress):
            ranges = format_ranges(outcome.ranges)
            return self._reply(
                202, f"received {outcome.received} of {outcome.length} bytes ({ranges})", _progress_headers(outcome)
            )
        if outcome is Stored.CREATED:
            self.state.add("uploads_completed")
        obj = self.storage.lookup(oid)
        headers = _object_headers(obj) if obj else {}
        headers.pop("Content-Type", None)
        size = f" ({obj.size} bytes)" if obj else ""
        return self._reply(status_of(outcome), f"{outcome.value} {oid}{size}", headers)

    # -- pipes: PUT ...?pipe[&receivers=N] --------------------------------------

    def put_pipe(self, oid: str):
        """Pass the body to the receivers (GETs of the same name) without storing it:
        200 once it verified and at least one receiver got every byte."""
        environ = self.request.environ
        exchange = environ["file_relay.exchange"]
        try:
            if not isinstance(self.storage, Pipes):
                raise RelayError(501, "this relay's storage cannot pipe: PUT without ?pipe")
            if self.storage.is_stored(oid):
                return self._reply(
                    200, f"already stored {oid}: nothing to pipe, receivers get the stored object", close=True
                )
            if self.state.draining:
                raise RelayError(503, "the relay is shutting down", retry_after=5)
            if environ.get("HTTP_CONTENT_RANGE"):
                raise RelayError(400, "a pipe is sent whole, in one request: no Content-Range")
            receivers = self.request.query.get("receivers", "1")
            if not _DIGITS_RE.fullmatch(receivers) or not 1 <= int(receivers) <= _PIPE_SLOTS:
                raise RelayError(400, f"receivers must be a number of receivers from 1 to {_PIPE_SLOTS}")
            length = _declared_length(environ)
            self.storage.check_size(length or 0)
            wait = self._wait(self.config.pipe_wait)
            pipe = self.storage.open_pipe(oid, length, int(receivers))
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        self.state.note_arrival(oid)  # receivers waiting for it may join now
        peer = _client_socket(environ)

        def pause(seconds: float, *, reading: bool = False) -> bool:
            """Wait *seconds* for the sender to hang up or, *reading*, to send; whether it sent."""
            came = self._watch_for_arrivals(oid, peer, seconds, select.POLLRDHUP | (select.POLLIN if reading else 0))
            if came & ~select.POLLIN:
                raise ClientGone("the sender hung up")
            return bool(came)

        try:
            with self.state.active("uploads_active"):
                body = _request_body(environ, length, exchange)  # asks for it ("100 Continue") when first read
                if not pipe.wait_for_receivers(body, wait, self._unless_draining(pause)):
                    came = pipe.receivers_present()
                    reason = f"no receiver came within {wait:g} s: start them (GET of this URL), then send again"
                    if came:
                        reason = f"{came} of {receivers} receivers came within {wait:g} s: start the rest, send again"
                    raise RelayError(504, reason)
                outcome = pipe.send(body, length, pause)
        except (RelayError, StorageError) as exc:
            refusal = _as_refusal(exc)
            too_few = isinstance(exc, RelayError) and refusal.status == 504  # its wait for receivers ran out
            failure = PipeFailure.TOO_FEW_RECEIVERS if too_few else PipeFailure.SENDER
            pipe.fail(f"its sender was answered {refusal.status}: {refusal.reason}", failure)
            return self._refuse(exc)
        except ClientGone as exc:
            pipe.fail(f"its sender was answered {exc.status}: {exc}")
            exchange.note = str(exc)
            return self._reply(exc.status, str(exc), close=True)
        finally:
            pipe.close()
        counts = {"X-Pipe-Delivered": str(outcome.delivered), "X-Pipe-Receivers": str(outcome.receivers)}
        summary = f"{outcome.delivered} of {outcome.receivers} receivers got every byte"
        exchange.note = summary
        if not outcome.delivered:
            return self._reply(502, f"{oid} ({outcome.size} bytes) verified, but {summary}", counts)
        self.state.add("pipes_completed")
        return self._reply(200, f"piped {oid} ({outcome.size} bytes): verified; {summary}", counts)

    def _unless_draining(self, pause):
        def paused(seconds: float, **how) -> bool:
            if self.state.draining:
                raise RelayError(503, "the relay is shutting down", retry_after=5)
            return pause(seconds, **how)

        return paused

    # -- uploads the relay names ----------------------------------------------

    def _unnamed_storage(self) -> UnnamedUploads:
        if not isinstance(self.storage, UnnamedUploads):
            raise RelayError(501, "this relay's storage cannot name uploads: PUT to /<sha256> instead")
        return self.storage

    def put_unnamed(self, filename=None):
        """PUT /new/[NAME]: store the body under the SHA-256 of what arrived."""
        environ = self.request.environ
        exchange = environ["file_relay.exchange"]
        try:
            if "pipe" in self.request.query:
                raise RelayError(400, "a pipe needs the object's name: PUT /<sha256>?pipe")
            storage = self._unnamed_storage()
            name = _sent_file_name(filename, environ)
            if environ.get("HTTP_CONTENT_RANGE"):
                raise RelayError(400, "to send a name-less upload in chunks, start it with POST to the same URL")
            if self.state.draining:
                raise RelayError(503, "the relay is shutting down", retry_after=5)
            length = _declared_length(environ)
            limits = _parse_limits(environ, self.config)
            expected = _whole_body_digest(environ)
            storage.check_size(length or 0)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        body = _request_body(environ, length, exchange)
        try:
            with self.state.active("uploads_active"):
                named = storage.put_unnamed(body, length, limits, expected)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        except ClientGone as exc:
            exchange.note = str(exc)
            return self._reply(exc.status, str(exc), close=True)
        return self._named_answer(dataclasses.replace(named, name=name))

    def start_unnamed(self, filename=None):
        """POST /new/[NAME] with Upload-Length: begin a resumable upload the relay names."""
        environ = self.request.environ
        try:
            storage = self._unnamed_storage()
            name = _sent_file_name(filename, environ)
            if self.state.draining:
                raise RelayError(503, "the relay is shutting down", retry_after=5)
            length_text = environ.get("HTTP_UPLOAD_LENGTH", "").strip()
            if not _DIGITS_RE.fullmatch(length_text):
                raise RelayError(400, "Upload-Length must give the file's size in bytes")
            if _whole_number(length_text) == 0:
                raise RelayError(400, "an empty file has no chunks: PUT it to /new/ instead")
            token = storage.start_unnamed(_whole_number(length_text), _parse_limits(environ, self.config), name)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        url = _public_url(environ, f"uploads/{token}")
        return self._reply(201, url, {"Location": url, "Upload-Length": length_text, "Upload-Offset": "0"})

    def put_unnamed_chunk(self, token):
        """PUT /uploads/TOKEN with Content-Range (and Content-Digest): one chunk."""
        environ = self.request.environ
        exchange = environ["file_relay.exchange"]
        try:
            storage = self._unnamed_storage()
            content_range = environ.get("HTTP_CONTENT_RANGE")
            if not content_range:
                raise RelayError(400, "a chunk needs Content-Range: bytes FIRST-LAST/TOTAL")
            first, last, total = _parse_content_range(content_range)
            length = _declared_length(environ)
            if length is not None and length != last - first + 1:
                raise RelayError(400, "Content-Length does not match Content-Range")
            digest = _content_digest(environ)
            storage.check_size(total)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        body = _request_body(environ, length, exchange)
        try:
            with self.state.active("uploads_active"):
                outcome = storage.put_unnamed_chunk(token, first, last, total, body, digest)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc)
        except ClientGone as exc:
            exchange.note = str(exc)
            return self._reply(exc.status, str(exc), close=True)
        if isinstance(outcome, Progress):
            return self._upload_answer("", outcome)
        return self._named_answer(outcome)

    def unnamed_status(self, token):
        """GET or HEAD /uploads/TOKEN: where the upload stands, or where it was stored."""
        try:
            outcome = self._unnamed_storage().unnamed_progress(token)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc, close=False)
        if outcome is None:
            return self._reply(404, "no such upload: it was cancelled, expired unfinished, or its object is gone")
        if isinstance(outcome, Progress):
            ranges = format_ranges(outcome.ranges)
            return self._reply(
                200, f"received {outcome.received} of {outcome.length} bytes ({ranges})", _progress_headers(outcome)
            )
        url = _public_url(self.request.environ, _object_path(outcome))
        return self._reply(200, f"{url}\nstored {outcome.oid}", {"Location": url, "Upload-Incomplete": "?0"})

    def cancel_unnamed(self, token):
        try:
            if not self._unnamed_storage().cancel_unnamed(token):
                raise NotFound("no such upload in progress")
        except (RelayError, StorageError) as exc:
            return self._refuse(exc, close=False)
        return self._reply(200, "cancelled")

    def _named_answer(self, named: Named):
        """201 (or 200) with the object's URL: in Location and as the body's first line."""
        if named.stored is Stored.CREATED:
            self.state.add("uploads_completed")
        obj = self.storage.lookup(named.oid)
        headers = _object_headers(obj) if obj else {}
        headers.pop("Content-Type", None)
        url = _public_url(self.request.environ, _object_path(named))
        size = f" ({obj.size} bytes)" if obj else ""
        return self._reply(
            status_of(named.stored), f"{url}\n{named.stored.value} {named.oid}{size}", {**headers, "Location": url}
        )

    def delete_object(self, oid_text):
        oid = self._object_id(oid_text)
        try:
            if not self.storage.delete(oid):
                if isinstance(self.storage, Pipes) and self._pipe_in_progress(oid):
                    raise Conflict("a pipe of this object is in progress: its sender ends it by closing its connection")
                raise NotFound("no such object")
        except (RelayError, StorageError) as exc:
            return self._refuse(exc, close=False)
        return self._reply(200, f"deleted {oid}")

    def _pipe_in_progress(self, oid: str) -> bool:
        reader = self.storage.join_pipe(oid, receive=False)
        if reader is None:
            return False
        reader.close()
        return True

    # -- downloads: GET and HEAD -------------------------------------------------

    def get_object(self, oid_text):
        """GET or HEAD of an object, stored or being uploaded."""
        oid = self._object_id(oid_text)
        environ = self.request.environ
        head = self.request.method == "HEAD"
        try:
            named = _download_name(environ)
        except RelayError as exc:
            return self._refuse(exc, close=False)
        if named is not None:
            environ["file_relay.disposition"] = content_disposition(named)
        try:
            # A body of unknown length reaches an HTTP/1.0 client delimited by the close
            # alone, so a cut-off would look like a clean end: such a reader gets the
            # object only once stored, with its Content-Length.
            unsized_ok = head or environ.get("SERVER_PROTOCOL") != "HTTP/1.0"
            found = self._find_or_wait(oid, 0.0 if head else self._wait(), unsized_ok=unsized_ok)
            if found is _UNSIZED_UPLOAD:
                reason = "the upload has no length yet; retry when it has finished, or use HTTP/1.1"
                raise RelayError(503, reason, retry_after=5)
            if found is None:
                raise NotFound("no such object")
            return self._send_head(found, head)
        except (RelayError, StorageError) as exc:
            return self._refuse(exc, close=False)
        except UploadFailed as exc:  # removed, on a shared filesystem, before the answer began
            return self._reply(404, f"no such object: {exc}")
        except ClientGone as exc:
            environ["file_relay.exchange"].note = str(exc)
            return self._reply(400, str(exc), close=True)

    def _wait(self, default: float | None = None) -> float:
        """How long a GET waits for an upload to start (a pipe's sender, for its
        receivers): ?wait=, a Prefer: wait=, or the default."""
        environ = self.request.environ
        preferred = _preferred_wait(environ.get("HTTP_PREFER"))
        if "wait" in self.request.query:
            try:
                return min(max(0.0, float(self.request.query["wait"])), self.config.max_get_wait)
            except ValueError:
                raise RelayError(400, "wait must be a number of seconds") from None
        if preferred is not None:
            wait = min(preferred, self.config.max_get_wait)
            environ["file_relay.preference_applied"] = f"wait={wait:g}"
            return wait
        return self.config.get_wait_timeout if default is None else default

    def _find(self, oid: str, *, unsized_ok: bool):
        """A reader of the stored object, of its pipe or of its upload, _UNSIZED_UPLOAD for
        one of unknown length that may not be followed, or None."""
        reader = self.storage.open(oid)
        if reader is not None:
            return reader
        if isinstance(self.storage, Pipes):
            reader = self.storage.join_pipe(oid, receive=False)  # a look first: joining takes a slot
            if reader is not None and self.request.method != "HEAD" and (reader.length is not None or unsized_ok):
                reader.close()
                reader = self.storage.join_pipe(oid)
                if reader is not None:
                    self.state.note_arrival(oid)  # its sender may be waiting for it
        if reader is None:
            reader = self.storage.follow(oid)
        if reader is not None and reader.length is None and not unsized_ok:
            reader.close()
            return _UNSIZED_UPLOAD
        return reader

    def _unsized_pipe(self, found, oid: str) -> bool:
        """Whether *found* is a pipe of unknown length, which never gets one (an upload may)."""
        if found is not _UNSIZED_UPLOAD or not isinstance(self.storage, Pipes):
            return False
        look = self.storage.join_pipe(oid, receive=False)
        if look is not None:
            look.close()
        return look is not None

    def _watch_for_arrivals(self, oid: str, peer, seconds: float, events: int = select.POLLRDHUP) -> int:
        """_watch(peer, seconds, events), ended early too when a transfer of *oid* begins
        on this relay (in any worker), so that whoever waits for one looks again at once
        rather than at its next poll; hosts sharing the storage are still found by polling."""
        with self.arrivals.bell(oid) as bell:
            return _watch(peer, seconds, events, bell)

    def _find_or_wait(self, oid: str, wait: float, *, unsized_ok: bool):
        """What _find() finds, waiting up to *wait* for a stored object or an upload that
        may be followed. Raises ClientGone as soon as the client hangs up while it waits."""
        found = self._find(oid, unsized_ok=unsized_ok)
        if (found is not None and found is not _UNSIZED_UPLOAD) or wait <= 0 or self._unsized_pipe(found, oid):
            return found
        if not self.waiting_slots.acquire(blocking=False):
            raise RelayError(503, "too many readers are waiting for uploads", retry_after=5)
        peer = _client_socket(self.request.environ)
        try:
            # One bell for the whole wait: an arrival while _find looks (on S3, requests to
            # the store) rings it for the next look.
            with self.state.active("waiting_readers"), self.arrivals.bell(oid) as bell:
                deadline = time.monotonic() + wait
                for delay in _delays(_WAITING_POLL_FIRST, _WAITING_POLL_MOST, 1.5):
                    if time.monotonic() >= deadline:
                        break
                    if self.state.draining:
                        raise RelayError(503, "the relay is shutting down", retry_after=5)
                    seconds = min(delay, max(0.0, deadline - time.monotonic()))
                    if _watch(peer, seconds, select.POLLRDHUP, bell):
                        raise ClientGone("the client hung up while waiting for the upload")
                    found = self._find(oid, unsized_ok=unsized_ok)
                    if found is not None and found is not _UNSIZED_UPLOAD:
                        return found
        finally:
            self.waiting_slots.release()
        return found

    def _send_head(self, reader, head: bool):
        """The answer to GET or HEAD of what *reader* reads. Status and headers are decided
        here for both; a GET of it all also reserves a counted download. Then HEAD closes
        the reader, GET sends its bytes."""
        try:
            if not head and isinstance(reader, PipeReader):
                self._await_first_bytes(reader)
            status, headers = self._head_of(reader)
            if status == 200 and not head:
                status = self._select_range(reader, headers)
            if status == 200 and not head:
                ticket = self.storage.reserve_download(reader)
                if ticket is not None and "X-Remaining-Downloads" in headers:
                    headers["X-Remaining-Downloads"] = str(ticket.remaining)  # once this one is through
        except BaseException:
            reader.close()
            raise
        if head or status == 304:
            reader.close()
            return self.response_class(None, status, headers)
        return self.response_class(self._body(reader, whole=status == 200), status, headers)

    def _await_first_bytes(self, reader: PipeReader) -> None:
        """Wait until a pipe's bytes flow to this receiver (or it verified) before answering
        it: a pipe that fails before gets an answer that says why, not a 200 cut short.
        Raises ClientGone as soon as the receiver hangs up."""
        peer = _client_socket(self.request.environ)

        def pause_unless_gone(seconds: float) -> None:
            if _hangs_up_within(peer, seconds):
                raise ClientGone("the receiver hung up while waiting for the pipe's first bytes")

        reader.pause = pause_unless_gone
        with self.state.active("waiting_readers"):
            reader.wait_for_bytes()

    def _head_of(self, reader) -> tuple[int, dict]:
        """The status (200 or 304) and headers of all of what *reader* reads."""
        environ = self.request.environ
        obj = reader.object
        if obj is not None:
            headers = {**_object_headers(obj), "Content-Length": str(obj.size)}
            return (304 if _not_modified(environ, obj) else 200), headers
        headers = _upload_headers(reader.progress())
        if reader.length is not None:
            headers["Content-Length"] = str(reader.length)
        else:
            environ["file_relay.length_unknown"] = True
        return 200, headers

    def _select_range(self, reader, headers: dict) -> int:
        """206 if the request's Range applies (and narrow *reader* and *headers* to it), else
        200. Raises RelayError(416) for a range that is not there."""
        environ = self.request.environ
        if reader.object is None and reader.progress().mode == "pipe":
            return 200  # a pipe is sent whole: its receivers cannot ask for a part of it
        size = reader.object.size if reader.object is not None else reader.length
        if_range = environ.get("HTTP_IF_RANGE")
        if if_range is not None and "ETag" in headers and if_range.strip() != headers["ETag"]:
            return 200
        if size is None:  # an upload of unknown length: only a closed range can be answered
            wanted = _closed_range(environ.get("HTTP_RANGE"))
        else:
            wanted = _parse_range(environ.get("HTTP_RANGE"), size)
        if wanted is None:
            return 200
        first, last = wanted
        reader.select(first, last)
        headers["Content-Range"] = f"bytes {first}-{last}/{size if size is not None else '*'}"
        headers["Content-Length"] = str(last - first + 1)  # its own length is known, if not the object's
        environ.pop("file_relay.length_unknown", None)
        return 206

    def _body(self, reader, *, whole: bool) -> _Body:
        """The response body of *reader*: counted as a completed download when it sent the
        whole object; following an upload, it stops waiting when the client hangs up."""
        self.state.add("downloads_active")

        def finished(complete: bool) -> None:
            self.state.add("downloads_active", -1)
            if complete and whole:
                self.state.add("downloads_completed")

        if reader.object is None:
            peer = _client_socket(self.request.environ)

            def pause_unless_gone(seconds: float) -> None:
                if _hangs_up_within(peer, seconds):
                    raise UploadFailed("the reader hung up")

            reader.pause = pause_unless_gone
        body_class = _SendfileBody if hasattr(reader, "fileno") else _Body
        return body_class(self.request.environ["file_relay.exchange"], reader, finished)


def make_app(config: RelayConfig, state: SharedState | None = None, storage: Storage | None = None):
    """Build the relay's WSGI application over *storage* (by default, the one *config*
    asks for): a Bottle app routing to a RelayHandler.

    *state* holds the counters and the drain flag; gunicorn shares one between its
    workers, a test may pass its own or let the app make one.
    """
    import bottle

    storage = storage if storage is not None else open_storage(config)
    storage.prepare()
    handler = RelayHandler(config, storage, state if state is not None else SharedState())
    app = bottle.Bottle(catchall=True)
    _answer_errors_with(app, handler.error_page)
    app.install(handler.check_server_id)
    app.get("/<server_id>", callback=handler.status)  # Bottle routes HEAD to GET routes
    app.delete("/<server_id>", callback=handler.shutdown)
    for path in ("/<server_id>/new", "/<server_id>/new/", "/<server_id>/new/<filename:re:[\\s\\S]+>"):
        app.put(path, callback=handler.put_unnamed)
        app.post(path, callback=handler.start_unnamed)
    app.put("/<server_id>/uploads/<token>", callback=handler.put_unnamed_chunk)
    app.get("/<server_id>/uploads/<token>", callback=handler.unnamed_status)
    app.delete("/<server_id>/uploads/<token>", callback=handler.cancel_unnamed)
    app.put("/<server_id>/<oid_text>", callback=handler.put_object)
    app.get("/<server_id>/<oid_text>", callback=handler.get_object)
    app.delete("/<server_id>/<oid_text>", callback=handler.delete_object)
    app.route("/<server_id>/<oid_text>", "ANY", handler.object_other)
    app.route("/<server_id>", "ANY", handler.relay_other)
    app.route("/", "ANY", handler.anything_else)
    app.route("/<path:path>", "ANY", handler.anything_else)
    handler.app = app
    return handler


def _status_report(config: RelayConfig, usage: dict, state: SharedState) -> dict:
    totals = state.totals()
    total, used, free = usage["disk_total_bytes"], usage["disk_used_bytes"], usage["disk_free_bytes"]
    used_percent = 100.0 * used / total if total else 0.0
    return {
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started, 3),
        "disk utilization": {
            "bytes_used": used,
            "bytes_remaining": free,
            "string": f"{used_percent:.1f}% full, {format_size(free)} remaining",
        },
        "stored_objects": usage["stored_count"],
        "stored_bytes": usage["stored_bytes"],
        "partial_uploads": usage["partial_count"],
        "pipes_in_progress": usage["pipe_count"],
        "uploads_in_progress": totals["uploads_active"],
        "downloads_in_progress": totals["downloads_active"],
        "waiting_readers": totals["waiting_readers"],
        "totals": {
            "bytes_in": totals["bytes_in"],
            "bytes_out": totals["bytes_out"],
            "uploads_completed": totals["uploads_completed"],
            "downloads_completed": totals["downloads_completed"],
            "pipes_completed": totals["pipes_completed"],
            "requests": {f"{n}xx": totals[f"requests_{n}xx"] for n in range(1, 6)},
        },
        "limits": {
            "max_file_size": config.max_file_size,
            "max_disk": config.max_disk,
            "min_free": config.min_free,
            "ttl": config.ttl,
            "max_ttl": config.max_ttl,
            "partial_ttl": config.partial_ttl,
            "get_wait_timeout": config.get_wait_timeout,
            "waiting_readers_per_worker": config.waiting_reader_limit,
            "pipe_buffer": config.pipe_buffer,
            "max_pipes": config.max_pipes,
        },
        "draining": state.draining,
    }


def _prometheus_text(report: dict) -> str:
    """The status report in the Prometheus text exposition format (version 0.0.4)."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP file_relay_{name} {help_text}")
        lines.append(f"# TYPE file_relay_{name} {kind}")
        for labels, value in samples:
            lines.append(f"file_relay_{name}{labels} {value}")

    totals = report["totals"]
    disk = report["disk utilization"]
    metric("up", "gauge", "Always 1 while the relay answers.", [("", 1)])
    metric("uptime_seconds", "gauge", "Seconds since the relay started.", [("", report["uptime_seconds"])])
    metric("stored_objects", "gauge", "Verified objects stored.", [("", report["stored_objects"])])
    metric("stored_bytes", "gauge", "Bytes of verified objects stored.", [("", report["stored_bytes"])])
    metric("partial_uploads", "gauge", "Uploads in progress or resumable.", [("", report["partial_uploads"])])
    metric("uploads_active", "gauge", "Upload requests being served.", [("", report["uploads_in_progress"])])
    metric("downloads_active", "gauge", "Download responses being sent.", [("", report["downloads_in_progress"])])
    metric("waiting_readers", "gauge", "Downloads waiting for an upload to start.", [("", report["waiting_readers"])])
    metric("pipes_active", "gauge", "Pipes in progress (their senders alive).", [("", report["pipes_in_progress"])])
    metric("disk_used_bytes", "gauge", "Used bytes of the files directory's filesystem.", [("", disk["bytes_used"])])
    metric(
        "disk_free_bytes", "gauge", "Free bytes of the files directory's filesystem.", [("", disk["bytes_remaining"])]
    )
    metric("received_bytes_total", "counter", "Request body bytes received.", [("", totals["bytes_in"])])
    metric("sent_bytes_total", "counter", "Response body bytes sent.", [("", totals["bytes_out"])])
    metric("uploads_completed_total", "counter", "Objects stored.", [("", totals["uploads_completed"])])
    metric("downloads_completed_total", "counter", "Whole downloads sent.", [("", totals["downloads_completed"])])
    pipes_completed = [("", totals["pipes_completed"])]
    metric("pipes_completed_total", "counter", "Pipes verified and delivered whole to a receiver.", pipes_completed)
    requests_samples = [(f'{{class="{cls}"}}', count) for cls, count in totals["requests"].items()]
    metric("requests_total", "counter", "Requests answered, by status class.", requests_samples)
    limit_samples = [(f'{{limit="{name}"}}', value) for name, value in report["limits"].items() if value is not None]
    metric("limit", "gauge", "Limits in force (bytes or seconds).", limit_samples)
    metric("draining", "gauge", "1 while the relay drains before exiting.", [("", int(report["draining"]))])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Logging: one line per event on stderr, text or JSON, never the server ID
# ---------------------------------------------------------------------------


_LOG_WORD_RE = re.compile(r"[A-Za-z0-9._~%-]+")  # a run of URL-safe characters and escapes
_PERCENT_ESCAPE_RE = re.compile(r"%(?:25)*([0-9A-Fa-f]{2})")  # %5A, and escaped again: %255A, %25255A


def _percent_decoded(text: str) -> str:
    """*text* with each percent-escape decoded to the character of its byte, however often
    its percent sign was itself escaped. Enough to find the server ID, which is ASCII."""
    return _PERCENT_ESCAPE_RE.sub(lambda escape: chr(int(escape.group(1), 16)), text)


def _secret_masker(secret: str):
    """A function that replaces, in a text, every word that holds the secret or ten
    consecutive characters of it, as they are or percent-encoded (any mix of escapes and
    plain characters, either case): the ID itself, and near misses of it (a mistyped or
    truncated ID quoted in a message by gunicorn, say). Each word is searched once, so
    the time it takes grows with the text's length, not its square."""
    size = min(10, len(secret))
    pieces = re.compile("|".join(sorted({re.escape(secret[i : i + size]) for i in range(len(secret) - size + 1)})))

    def mask(word: re.Match) -> str:
        text = word.group()
        holds = pieces.search(text) or ("%" in text and pieces.search(_percent_decoded(text)))
        return "***" if holds else text

    return lambda text: _LOG_WORD_RE.sub(mask, text)


class _LogFormatter(logging.Formatter):
    """One line per record, text or JSON; access records from their fields. Every word
    that holds the server ID or a near miss of it is replaced in the finished line,
    tracebacks included."""

    def __init__(self, as_json: bool, secret: str):
        super().__init__("%(asctime)s [%(levelname)s] %(message)s")
        self.as_json = as_json
        self.redact = _secret_masker(secret)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        access = record.name == "file_relay.access" and hasattr(record, "status")
        if self.as_json:
            fields = {"time": self.formatTime(record), "level": record.levelname.lower()}
            if access:
                fields.update(
                    {
                        key: getattr(record, key)
                        for key in ("client", "method", "path", "status", "bytes_out", "bytes_in")
                    }
                )
                fields["duration"] = round(record.duration, 6)
                if record.note:
                    fields["note"] = record.note
            else:
                fields["message"] = record.getMessage()
                if record.exc_info or record.exc_text:
                    fields["exception"] = record.exc_text or self.formatException(record.exc_info)
            return json.dumps(fields)
        if access:
            note = f" ({record.note})" if record.note else ""
            record.msg = (
                f'{record.client} "{record.method} {record.path}" {record.status} '
                f"{record.bytes_out} {record.bytes_in} {record.duration:.3f}s{note}"
            )
            record.args = ()
        return super().format(record)


def configure_logging(config: RelayConfig, handler: logging.Handler | None = None) -> logging.Handler:
    """Send the relay's log (and access log) to stderr in the configured format."""
    handler = handler or logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(config.log_format == "json", config.server_id))
    for logger in (log, access_log):
        logger.handlers[:] = [handler]
        logger.propagate = False
    log.setLevel(config.log_level.upper())
    access_log.setLevel(logging.INFO)
    return handler


# ---------------------------------------------------------------------------
# Server: gunicorn embedded, threaded workers, a draining master
# ---------------------------------------------------------------------------


def _reachable_host() -> str:
    """A name or address other machines may reach this one by, for the printed URL of a
    relay listening on all interfaces: the host's name if it resolves to something other
    than loopback, else the address of the interface that routes outwards."""
    name = socket.getfqdn()
    try:
        if not ipaddress.ip_address(socket.gethostbyname(name)).is_loopback:
            return name
    except (OSError, ValueError):
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # picks a route; a UDP connect sends nothing
        return probe.getsockname()[0]
    except OSError:
        return name
    finally:
        probe.close()


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Let glibc's malloc use only a few arenas in this process.

    By default glibc gives threads up to eight arenas per core, and a worker's many
    threads each keep freed memory in their own: a 64-client soak grew 30 MiB in two
    minutes (157 MiB RSS), against 12 MiB (124 MiB) with two arenas. MALLOC_ARENA_MAX
    would do the same, but only at process start. Elsewhere than glibc, nothing happens.
    """
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX
    except (AttributeError, OSError):
        pass


class _ServerHooks:
    """gunicorn's server hooks: each worker writes its own row of the shared counters,
    and a generated server ID is printed once the relay listens."""

    def __init__(self, config: RelayConfig, state: SharedState, storage: Storage, generated_id: bool):
        self.config = config
        self.state = state
        self.storage = storage
        self.generated_id = generated_id
        self.free_slots = list(range(1, state.slots + 1))

    def pre_fork(self, server, worker):
        worker.relay_slot = self.free_slots.pop(0)

    def post_fork(self, server, worker):
        self.state.use_slot(worker.relay_slot)
        _limit_malloc_arenas()
        self.storage.start_worker()

    def child_exit(self, server, worker):
        self.state.reset_gauges(worker.relay_slot)
        self.free_slots.append(worker.relay_slot)

    def when_ready(self, server):
        if not self.generated_id:
            return  # the user knows it; stdout may be a log (podman logs, the journal)
        host, port = server.LISTENERS[0].getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = _reachable_host()
        scheme = "https" if self.config.certfile else "http"
        host = f"[{host}]" if ":" in host else host
        print(f"{scheme}://{host}:{port}/{self.config.server_id}", flush=True)

    def on_exit(self, server):
        if self.config.purge_on_exit:
            self.storage.purge()
            log.info("purged every stored and partial object")


def _gunicorn_settings(config: RelayConfig, worker_class, logger_class, hooks: _ServerHooks) -> dict:
    """gunicorn's settings for the relay (only known ones: BaseApplication checks them)."""
    return {
        "bind": [config.bind],
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": worker_class,
        "worker_connections": max(1000, config.threads * 4),
        "timeout": config.worker_timeout,  # a worker's heartbeat, not a request's duration (gthread)
        "graceful_timeout": math.ceil(config.graceful_timeout),
        "keepalive": 5,
        "accesslog": None,  # the app writes its own, redacted
        "errorlog": "-",
        "loglevel": config.log_level,
        "logger_class": logger_class,
        "proc_name": "file-relay",
        "control_socket_disable": True,
        "forwarded_allow_ips": config.forwarded_allow_ips,
        "certfile": config.certfile,
        "keyfile": config.keyfile,
        "ssl_context": _guarded_tls_context,
        "pre_request": lambda worker, req: None,  # its default logs the raw path at debug level
        "pre_fork": hooks.pre_fork,
        "post_fork": hooks.post_fork,
        "child_exit": hooks.child_exit,
        "when_ready": hooks.when_ready,
        "on_exit": hooks.on_exit,
    }


def serve(config: RelayConfig, *, generated_id: bool = False) -> int:
    """Run the relay until it is shut down; returns the exit status. A server ID the
    relay generated is printed once, with the URL, on stdout: nowhere else has it."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.glogging import Logger
    from gunicorn.workers.gthread import ThreadWorker

    storage = open_storage(config)
    storage.prepare()
    formatter = configure_logging(config).formatter
    for warning in [] if config.storage else probe_files_directory(config.files_directory):
        log.warning("%s", warning)
    try:
        _log_swept("startup", storage.sweep())  # leftovers of a crash: partial plain uploads, trash
    except StorageError as exc:  # a lock held elsewhere: the master's sweeps try again
        log.warning("startup sweep skipped: %s", exc.reason)
    state = SharedState(slots=config.workers + 8)  # spare rows for workers restarting
    logger_class = type("RelayLogger", (_RelayLogger, Logger), {"relay_formatter": formatter})
    worker_class = type("RelayWorker", (_RelayWorker, ThreadWorker), {"relay_config": config})
    arbiter_class = type(
        "RelayArbiter",
        (_RelayArbiter, Arbiter),
        {
            "relay_config": config,
            "relay_state": state,
            "relay_storage": storage,
            "next_sweep": time.monotonic() + config.sweep_interval,
        },
    )
    settings = _gunicorn_settings(
        config, worker_class, logger_class, _ServerHooks(config, state, storage, generated_id)
    )

    class RelayApplication(BaseApplication):
        """gunicorn embedded: only the settings above, the app from make_app, the relay's
        master; BaseApplication reads neither sys.argv nor GUNICORN_CMD_ARGS."""

        def load_config(self):
            for key, value in settings.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self):
            return make_app(config, state)

        def run(self):
            arbiter_class(self).run()

    RelayApplication().run()
    return 0


# ---------------------------------------------------------------------------
# Client: `file_relay.py send` and `file_relay.py get`, standard library only
#
# send: a file that fits in a chunk: read it into memory and hash it; HEAD its object URL
#       and skip it if stored, else PUT it whole (If-None-Match: *). A larger one: read it
#       once, hashing it, into Content-Range chunks of a name-less resumable upload (POST
#       /new/NAME), each with its Content-Digest, several at once with --parallel, each
#       retried from memory; then compare the relay's name for it with the hash, and
#       delete it on a mismatch. A record under ~/.cache/file-relay/send lets a rerun
#       resume the upload, or skip a file sent before. --hash-first, or a relay that
#       cannot name uploads: hash first, then send to the verified form.
# get:  download to .<name>.part beside the target, hashing while writing; resume with
#       Range (also into an upload still in progress); move into place only once the
#       SHA-256 in the URL matches. Never write through a .part that is not a regular
#       file of our own, nor past the length the relay announced.
# Retries: exponential backoff with jitter, capped, never sooner than Retry-After; a
# transfer gives up after failing for --retry-for seconds in a row without progress.
# ---------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1  # the content did not verify, the relay refused, no such object
EXIT_USAGE = 2  # a bad command line (argparse's own status)
EXIT_NETWORK = 3  # the relay could not be reached, or kept failing, for --retry-for seconds
EXIT_LOCAL = 4  # a local file could not be read or written, or the output exists
EXIT_INTERRUPTED = 130

_SEND_BLOCK = 256 << 10  # unit of a request body's sends: each must finish within the timeout
_BACKOFF_FIRST, _BACKOFF_CAP = 0.5, 30.0  # seconds before the first retry; the longest wait
_VERIFY_RATE = 50 << 20  # bytes/s: how fast a relay is assumed to re-read an object to verify it
_METER_INTERVAL = 0.2  # seconds between redraws of a progress line


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """Every setting of the built-in client, with its default. Tests build these directly."""

    # send: larger files go in chunks of this size. Small enough that a chunk arrives well
    # within the relay's idle timeout on a slow link: a reader following the upload sees
    # nothing until a chunk is complete, and the relay cuts it after --idle-timeout.
    chunk_size: int = 16 << 20
    parallel: int = 1  # send: chunks in flight at once
    hash_first: bool = False  # send: hash a large file before sending it, so that receivers can follow it
    pipe: bool = False  # send: through the relay to receivers that are waiting, never stored (?pipe)
    receivers: int = 1  # send --pipe: receivers the relay waits for before bytes flow
    pipe_wait: float | None = None  # send --pipe: seconds the relay waits for them (None: the relay's --pipe-wait)
    max_days: float | None = None  # send: ask the relay to drop the object this many days after upload
    max_downloads: int | None = None  # send: ask the relay to drop the object after this many downloads
    timeout: float = 60.0  # seconds for a connect, and for any read or write to make progress
    retry_for: float = 300.0  # give up after failing this long in a row without progress
    limit_rate: int | None = None  # bytes per second for the whole command
    cacert: str | None = None  # CA certificates (PEM) to verify an HTTPS relay with
    insecure: bool = False  # do not verify an HTTPS relay's certificate
    wait: float = 30.0  # get: seconds the relay may wait for an upload to start (asked for in each GET)
    force: bool = False  # get: replace an existing output file
    quiet: bool = False  # no progress and no notes; errors only
    progress: bool | None = None  # progress lines; None: when stderr is a terminal


class ClientError(Exception):
    """A transfer that cannot succeed: the message says why, exit_code how the command ends."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class _Mismatch(ClientError):
    """The downloaded bytes cannot be the object: they do not hash to its name, or there
    are more of them than the relay announced."""


class _Retry(Exception):
    """A failure worth trying again: the network, a 5xx, a busy or draining relay."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class RelayAddress:
    """Where a relay is: 'http(s)://host:port' and the path of its server ID."""

    origin: str
    scheme: str
    host: str
    port: int
    path: str  # "/<server_id>" (or under a proxy's prefix), without a trailing slash

    def object_url(self, oid: str) -> str:
        return f"{self.origin}{self.path}/{oid}"


def _split_url(text: str, *, name_ok: bool = False) -> tuple[RelayAddress, list[str]]:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if name_ok and set(query) == {"name"}:
        query = {}  # the file name send puts in object URLs: for browsers and curl -OJ
    if query or parts.fragment or parts.username is not None:
        raise ValueError("the URL must not have a query (but ?name=), a fragment or credentials")
    port = parts.port or (443 if parts.scheme == "https" else 80)  # .port raises ValueError if bad
    segments = parts.path.rstrip("/").split("/")[1:]
    if not segments or not all(segments):
        raise ValueError("the URL has no server ID (http(s)://HOST:PORT/SERVER_ID)")
    origin = f"{parts.scheme}://{parts.netloc}"
    path = "/" + "/".join(segments[:-1])
    return RelayAddress(origin, parts.scheme, parts.hostname, port, path.rstrip("/")), segments


def parse_relay_url(text: str) -> RelayAddress:
    """The relay of 'http(s)://host:port/<server_id>'."""
    address, segments = _split_url(text)
    if len(segments) > 1 and parse_object_id(segments[-1]):
        raise ValueError("that is an object URL; send wants the relay's URL, http(s)://HOST:PORT/SERVER_ID")
    return dataclasses.replace(address, path=f"{address.path}/{segments[-1]}")


def parse_object_url(text: str) -> tuple[RelayAddress, str]:
    """The relay and object ID of 'http(s)://host:port/<server_id>/<sha256>'."""
    address, segments = _split_url(text, name_ok=True)
    oid = parse_object_id(segments[-1])
    if len(segments) < 2 or oid is None:
        raise ValueError("not an object URL: it must end in /SERVER_ID/SHA256 (64 hex digits)")
    return address, oid


def _missing(ranges, size: int) -> list[tuple[int, int]]:
    """The inclusive byte ranges of 0..size-1 that *ranges* do not cover."""
    gaps, cursor = [], 0
    for first, last in merge_ranges(ranges):
        if first > cursor:
            gaps.append((cursor, min(first, size) - 1))
        cursor = max(cursor, last + 1)
    if cursor < size:
        gaps.append((cursor, size - 1))
    return gaps


def _split(ranges, chunk_size: int) -> list[tuple[int, int]]:
    return [
        (start, min(start + chunk_size, last + 1) - 1)
        for first, last in ranges
        for start in range(first, last + 1, chunk_size)
    ]


def _parse_ranges(text: str | None) -> list[tuple[int, int]]:
    """An Upload-Ranges value ('0-99, 200-299'); nothing if it is absent or malformed."""
    try:
        return [tuple(int(n) for n in part.strip().split("-", 1)) for part in (text or "").split(",") if part.strip()]
    except ValueError:
        return []


def _retry_after(response) -> float | None:
    value = (response.getheader("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def _describe(exc: BaseException) -> str:
    """A network failure in a few words."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the relay's host name ({exc.strerror})"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the relay closed the connection"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection broke off"
    return f"{exc.strerror or exc}" if isinstance(exc, OSError) else f"{exc.__class__.__name__}: {exc}"


def _refusal(response, text: str) -> Exception:
    """The exception for an unexpected answer: a _Retry when it is worth trying again."""
    status, retry_after = response.status, _retry_after(response)
    said = f"the relay answered {status} {response.reason}" + (f": {text}" if text else "")
    if status in (408, 429, 503) or (status >= 500 and status != 507) or (status == 409 and retry_after):
        return _Retry(said, retry_after)
    if status == 403:
        return ClientError("the relay refused the server ID (403 forbidden): check the URL")
    return ClientError(said)


class _Console:
    """Notes and progress on stderr: progress lines only on a terminal, only errors with --quiet."""

    def __init__(self, quiet: bool = False, progress: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.progress = (not quiet and self.stream.isatty()) if progress is None else progress
        self.lock = threading.Lock()
        self.shown = ""  # the progress line on screen

    def note(self, text: str) -> None:
        if not self.quiet:
            self._print(text)

    def error(self, text: str) -> None:
        self._print(f"file_relay.py: error: {text}")

    def _print(self, text: str) -> None:
        with self.lock:
            self.stream.write(("\r\033[K" if self.shown else "") + text + "\n" + self.shown)
            self.stream.flush()

    def draw(self, line: str) -> None:
        """Show *line* as the progress line ('' erases it)."""
        if not self.progress or not (line or self.shown):
            return
        with self.lock:
            width = shutil.get_terminal_size().columns - 1
            self.shown = line[:width]
            self.stream.write("\r\033[K" + self.shown)
            self.stream.flush()

    def meter(self, label: str, total: int | None, done: int = 0) -> _Meter:
        return _Meter(self, label, total, done)


class _Meter:
    """One transfer's progress line: bytes, percentage, rate and time left."""

    def __init__(self, console: _Console, label: str, total: int | None, done: int):
        self.console = console
        self.label = label
        self.total = total
        self.lock = threading.Lock()
        self.started = self.drawn = time.monotonic()
        self.first = self.done = done

    def add(self, amount: int) -> None:
        with self.lock:
            self.done += amount
        self._draw()

    def set(self, done: int, total: int | None = None) -> None:
        """Say where the transfer stands after a retry (the rate counts from here)."""
        with self.lock:
            self.first = self.done = done
            self.started = time.monotonic()
            self.total = self.total if total is None else total
        self._draw(force=True)

    @property
    def rate(self) -> float:
        return (self.done - self.first) / max(time.monotonic() - self.started, 1e-6)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.console.progress or (not force and now - self.drawn < _METER_INTERVAL):
            return
        self.drawn = now
        line = f"{self.label}: {format_size(self.done)}"
        if self.total:
            line += f" of {format_size(self.total)} ({100 * self.done // self.total}%)"
        rate = self.rate
        line += f"  {format_size(rate)}/s"
        if self.total and rate > 0:
            left = int((self.total - self.done) / rate)
            line += f"  ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        self.console.draw(line)

    def close(self) -> None:
        self.console.draw("")


class _RateLimiter:
    """Keeps a command's transfer rate at or under *rate* bytes per second."""

    def __init__(self, rate: int | None):
        self.rate = rate
        self.lock = threading.Lock()
        self.free_at = 0.0

    def block(self, size: int) -> int:
        """A block size that keeps bytes flowing about four times a second under the limit,
        so that a slow rate never looks like a stalled peer to the relay."""
        return size if not self.rate else max(4096, min(size, self.rate // 4))

    def take(self, amount: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.free_at = max(self.free_at, now - 0.1) + amount / self.rate  # bursts of 0.1 s at most
            delay = self.free_at - now
        if delay > 0:
            time.sleep(delay)


class _RetryPolicy:
    """When to try again: exponential backoff with jitter up to a cap, never sooner than
    the relay's Retry-After; give up once failures have gone on for *retry_for* seconds
    without any progress in between."""

    def __init__(self, retry_for: float, console: _Console, what: str):
        self.retry_for = retry_for
        self.console = console
        self.what = what
        self.failures = 0
        self.deadline: float | None = None

    def progressed(self) -> None:
        self.failures = 0
        self.deadline = None

    def wait(self, error: _Retry) -> None:
        """Sleep before the next attempt, or raise ClientError when it is time to give up."""
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.retry_for
        self.failures += 1
        if now >= self.deadline:
            raise ClientError(
                f"{error}; giving up after {self.failures} failed attempts in {self.retry_for:g} s", EXIT_NETWORK
            )
        backoff = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0)
        delay = min(max(backoff, error.retry_after or 0.0), self.deadline - now)
        self.console.note(f"{self.what}: {error}; retrying in {delay:.1f} s")
        time.sleep(delay)


class _Session:
    """What the requests of one command share: the relay, TLS, the rate limit, the console."""

    def __init__(self, address: RelayAddress, options: ClientOptions, console: _Console):
        self.address = address
        self.options = options
        self.console = console
        self.limiter = _RateLimiter(options.limit_rate)
        self.tls = None
        if address.scheme == "https":
            self.tls = ssl.create_default_context(cafile=options.cacert)
            if options.insecure:
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE

    def connect(self) -> http.client.HTTPConnection:
        host, port, timeout = self.address.host, self.address.port, self.options.timeout
        if self.tls is not None:
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(host, port, timeout=timeout)


class _Connection:
    """One kept-alive connection to the relay, reopened after any failure. Network errors
    come out as _Retry, an untrusted certificate as ClientError."""

    def __init__(self, session: _Session):
        self.session = session
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(
        self, method: str, path: str, headers: dict | None = None, body=None, *, wait: float = 0.0, body_wait=0.0
    ):
        """Send a request and return its response, body unread. *body* is a function
        returning the body's blocks, so that a request on a kept-alive connection the relay
        has closed meanwhile can be sent again at once. *wait*: extra seconds the relay may
        take before it answers; *body_wait*, before it reads the body (a pipe's receivers)."""
        headers = {"User-Agent": f"file-relay/{__version__}", **(headers or {})}
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = self.session.connect()
            reused = self.conn.sock is not None
            try:
                return self._exchange(method, path, headers, body, wait, body_wait)
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise ClientError(
                    f"the relay's certificate did not verify ({exc.verify_message}): use --cacert FILE or --insecure",
                    EXIT_NETWORK,
                ) from None
            except ConnectionError as exc:
                self.close()
                if not (reused and attempt == 1):
                    raise _Retry(_describe(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise _Retry(_describe(exc)) from None
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _exchange(self, method: str, path: str, headers: dict, body, wait: float, body_wait: float):
        conn = self.conn
        if isinstance(conn, http.client.HTTPSConnection):  # no peeking at a TLS socket: see _continued
            headers = {name: value for name, value in headers.items() if name != "Expect"}
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        sock = conn.sock
        sock.settimeout(self.session.options.timeout + body_wait)
        broken = None
        if body is not None and headers.get("Expect") == "100-continue" and not _continued(sock):
            body = None  # answered before the body was wanted: read that answer
        if body is not None:
            try:
                for block in body():
                    conn.send(block)
            except OSError as exc:
                broken = exc  # the relay may have refused early and closed: read its answer
        sock.settimeout(None if math.isinf(wait) else self.session.options.timeout + wait)
        try:
            response = conn.getresponse()
        except (OSError, http.client.HTTPException):
            if broken is not None:
                raise broken from None
            raise
        sock.settimeout(self.session.options.timeout)
        return response

    def read_text(self, response) -> str:
        """A short response body, as text; a longer one is cut and its connection closed."""
        try:
            data = response.read(4096)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise _Retry(_describe(exc)) from None
        if not response.isclosed():
            self.close()
        return data.decode("utf-8", "replace").strip()


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _continued(sock: socket.socket) -> bool:
    """Wait for the relay's "100 Continue" (within the socket's timeout) and take it off
    the connection: True. False if it answered otherwise first (left for getresponse(),
    which is why it peeks: a plain socket only)."""
    head = sock.recv(len(_CONTINUE), socket.MSG_PEEK)
    while head and _CONTINUE.startswith(head) and len(head) < len(_CONTINUE):
        head = sock.recv(len(_CONTINUE), socket.MSG_PEEK | socket.MSG_WAITALL)
    if head != _CONTINUE:
        return False
    sock.recv(len(_CONTINUE), socket.MSG_WAITALL)
    return True


def _hash_file(fd: int, size: int, console: _Console, label: str) -> str:
    hasher = hashlib.sha256()
    meter = console.meter(f"{label} (hashing)", size)
    position = 0
    try:
        while block := os.pread(fd, BLOCK_SIZE, position):
            hasher.update(block)
            position += len(block)
            meter.add(len(block))
    except OSError as exc:
        raise ClientError(f"cannot read {label}: {exc.strerror}", EXIT_LOCAL) from None
    finally:
        meter.close()
    if position != size:
        raise ClientError(f"{label} changed size while it was being hashed", EXIT_LOCAL)
    return hasher.hexdigest()


class _Upload:
    """Sends one file to the relay by its SHA-256, hashed first: nothing if it is stored,
    one PUT if it fits in a chunk, else chunks (several at once with --parallel). After
    every failure it asks the relay (HEAD) what it has, and sends only the rest. A file
    that fits in a chunk is read once, into memory; a larger one is read to be hashed,
    then again to be sent."""

    def __init__(self, session: _Session, file: str):
        self.session = session
        self.options = session.options
        self.console = session.console
        self.file = file
        self.label = Path(file).name
        self.fd = -1
        self.size = 0
        self.oid = ""
        self.data: bytes | None = None  # the whole file, when it fits in a chunk
        self.created = False  # whether this run stored the object
        self.meter: _Meter | None = None
        self.sent = 0  # bytes put on the wire by this run, retries included
        self.sent_lock = threading.Lock()
        self.policy = _RetryPolicy(self.options.retry_for, self.console, self.label)
        self.connections = [_Connection(session) for _ in range(self.options.parallel)]

    @property
    def path(self) -> str:
        return f"{self.session.address.path}/{self.oid}"

    @property
    def headers(self) -> dict:
        """Headers of every upload request: the limits asked for (the relay takes them from
        the request that starts the upload)."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.options.max_days is not None:
            headers["Max-Days"] = f"{self.options.max_days:g}"
        if self.options.max_downloads is not None:
            headers["Max-Downloads"] = str(self.options.max_downloads)
        return headers

    def run(self) -> str:
        """Make sure the relay has the file; returns its object URL."""
        try:
            file = open(self.file, "rb")
        except OSError as exc:
            raise ClientError(f"cannot read {self.file}: {exc.strerror or exc}", EXIT_LOCAL) from None
        try:
            with file:
                self.fd = file.fileno()
                self.size = os.fstat(self.fd).st_size
                self._transfer()
                return self.session.address.object_url(self.oid)
        finally:
            for connection in self.connections:
                connection.close()
            if self.meter is not None:
                self.meter.close()

    def _transfer(self) -> None:
        if self.size <= self.options.chunk_size:
            self.data = b"".join(self._read(0, self.size, lambda: BLOCK_SIZE))
            self.oid = hashlib.sha256(self.data).hexdigest()
        else:
            self.oid = _hash_file(self.fd, self.size, self.console, self.label)
            url = _named_url(self.session.address.object_url(self.oid), self.label)
            self.console.note(f"{self.label}: receivers can start now, and follow the upload: {url}")
        self._send()

    def _send(self) -> None:
        started = time.monotonic()
        while True:
            try:
                stored, ranges = self._ask()
                if stored and self.meter is None:
                    limits = self.options.max_days is not None or self.options.max_downloads is not None
                    unchanged = " (its limits stay as they were)" if limits else ""
                    self.console.note(f"{self.label}: already on the relay, nothing to send{unchanged}")
                    return
                if stored:  # it was completed by what we sent, though the answer was lost
                    created = True
                    break
                received = sum(last - first + 1 for first, last in ranges)
                if self.meter is None:
                    self.meter = self.console.meter(self.label, self.size, received)
                    if received:
                        self.console.note(f"{self.label}: the relay has {received} of {self.size} bytes; resuming")
                self.meter.set(received)
                if self.size <= self.options.chunk_size and not ranges:
                    created = self._put_whole()
                else:
                    created = self._put_chunks(ranges)
                break
            except _Retry as exc:
                self.policy.wait(exc)
        self.meter.close()
        self.created = created
        elapsed = time.monotonic() - started
        if created:
            rate = f"{format_size(self.sent / max(elapsed, 1e-6))}/s"
            sent = f"{format_size(self.sent)}" + (f" of {format_size(self.size)}" if self.sent != self.size else "")
            self.console.note(f"{self.label}: stored and verified; sent {sent} in {elapsed:.1f} s ({rate})")
        else:
            self.console.note(f"{self.label}: the relay already had it")

    def _ask(self) -> tuple[bool, list]:
        """(whether the relay has the object, the byte ranges it has of a partial upload)."""
        connection = self.connections[0]
        response = connection.request("HEAD", self.path)
        text = connection.read_text(response)
        if response.status == 404:
            return False, []
        if response.status != 200:
            raise _refusal(response, text)
        if response.getheader("Upload-Incomplete") is None:
            return True, []
        length = response.getheader("Upload-Length")
        if length is not None and length.isdigit() and int(length) != self.size:
            raise self._conflict(f"an upload of this object with {length} bytes, not {self.size}, is in progress")
        return False, _parse_ranges(response.getheader("Upload-Ranges"))

    def _conflict(self, text: str) -> ClientError:
        url = self.session.address.object_url(self.oid)
        return ClientError(f"{text}; to drop the relay's partial upload: curl -X DELETE {shlex.quote(url)}")

    def _read(self, first: int, length: int, block_size):
        """The file's bytes first..first+length-1, in blocks of block_size() at most."""
        position, end = first, first + length
        if self.data is not None:
            view = memoryview(self.data)
            while position < end:
                block = view[position : min(end, position + block_size())]
                position += len(block)
                yield block
            return
        while position < end:
            try:
                block = os.pread(self.fd, min(block_size(), end - position), position)
            except OSError as exc:
                raise ClientError(f"cannot read it: {exc.strerror}", EXIT_LOCAL) from None
            if not block:
                raise ClientError("it shrank while it was being sent (did the file change?)")
            position += len(block)
            yield block

    def _blocks(self, first: int, length: int):
        """The file's bytes first..first+length-1, rate-limited and counted as they go out."""
        limiter = self.session.limiter
        for block in self._read(first, length, lambda: limiter.block(_SEND_BLOCK)):
            limiter.take(len(block))
            yield block
            self.meter.add(len(block))
            with self.sent_lock:
                self.sent += len(block)

    def _put_whole(self) -> bool:
        headers = {**self.headers, "Content-Length": str(self.size), "If-None-Match": "*"}
        connection = self.connections[0]
        response = connection.request("PUT", self.path, headers, lambda: self._blocks(0, self.size))
        text = connection.read_text(response)
        if response.status in (200, 201, 412):
            self.policy.progressed()
            return response.status == 201
        if response.status == 400:
            raise ClientError(f"the relay refused {self.label}: {text} (did the file change after it was hashed?)")
        raise _refusal(response, text)

    def _put_chunks(self, ranges: list) -> bool:
        """Send the chunks missing from *ranges*: True once the relay has stored the object.
        With every byte received but the object not stored (its finisher failed), send the
        last byte again to make the relay verify and store it."""
        pending = _split(_missing(ranges, self.size), self.options.chunk_size) or [(self.size - 1, self.size - 1)]
        pending.reverse()
        lock = threading.Lock()
        outcome: dict = {"created": None, "error": None}

        def work(connection: _Connection) -> None:
            while True:
                with lock:
                    if outcome["created"] is not None or outcome["error"] is not None or not pending:
                        return
                    first, last = pending.pop()
                    final = len(pending) < self.options.parallel  # this one may complete the object
                try:
                    created = self._put_chunk(connection, first, last, final)
                except Exception as exc:
                    with lock:
                        if outcome["error"] is None or isinstance(exc, ClientError):
                            outcome["error"] = exc
                    return
                if created is not None:
                    with lock:
                        outcome["created"] = created

        workers = min(self.options.parallel, len(pending))
        if workers == 1:
            work(self.connections[0])
        else:
            threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in self.connections[:workers]]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if outcome["created"] is not None:
            return outcome["created"]
        if outcome["error"] is not None:
            raise outcome["error"]
        raise _Retry("every chunk was received but the object is not stored yet")

    def _digest(self, first: int, length: int) -> bytes:
        hasher = hashlib.sha256()
        for block in self._read(first, length, lambda: BLOCK_SIZE):
            hasher.update(block)
        return hasher.digest()

    def _put_chunk(self, connection: _Connection, first: int, last: int, final: bool) -> bool | None:
        """Send bytes first..last: None while the object is incomplete, else whether this
        request created it (False: it was already stored)."""
        length = last - first + 1
        headers = {
            **self.headers,
            "Content-Length": str(length),
            "Content-Range": f"bytes {first}-{last}/{self.size}",
            "Content-Digest": sha256_field(self._digest(first, length)),
        }
        wait = self.size / _VERIFY_RATE if final else 0.0  # completing it, the relay hashes it all
        response = connection.request("PUT", self.path, headers, lambda: self._blocks(first, length), wait=wait)
        text = connection.read_text(response)
        if response.status in (200, 201, 202):
            self.policy.progressed()
            return None if response.status == 202 else response.status == 201
        if response.status == 400 and "Content-Digest" in text:
            raise _Retry(f"bytes {first}-{last} arrived damaged")  # the relay did not keep them
        if response.status == 400:
            raise ClientError(f"the relay refused bytes {first}-{last}: {text} (did the file change while being sent?)")
        if response.status == 409 and _retry_after(response) is None:
            raise self._conflict(f"the relay refused bytes {first}-{last}: {text}")
        raise _refusal(response, text)


class _PipeUpload(_Upload):
    """Sends one file through a pipe (send --pipe): hashed first, its URL announced so
    that receivers can start, then one PUT ?pipe that the relay answers once the receivers
    have it all. A pipe cannot resume: only a refusal before any byte passed is retried."""

    def __init__(self, session: _Session, file: str, announce):
        super().__init__(session, file)
        self.announce = announce  # called with the object URL once it is known

    def _transfer(self) -> None:
        self.oid = _hash_file(self.fd, self.size, self.console, self.label)
        self.announce(self.session.address.object_url(self.oid))
        query = f"?pipe&receivers={self.options.receivers}"
        if self.options.pipe_wait is not None:
            query += f"&wait={self.options.pipe_wait:g}"
        wait = self.options.pipe_wait if self.options.pipe_wait is not None else _LONGEST_PIPE_WAIT
        # The body goes only once the relay wants it (its receivers came): else it would sit
        # in the connection's buffers, and a sender that stops would not be seen to go.
        headers = {**self.headers, "Content-Length": str(self.size), "Expect": "100-continue"}
        connection = self.connections[0]
        started = time.monotonic()
        while True:
            self.meter = self.console.meter(self.label, self.size)
            try:
                # The relay answers once every receiver has the last byte or has left: a slow
                # receiver may hold it for as long as it takes to read the ring.
                response = connection.request(
                    "PUT", self.path + query, headers, lambda: self._blocks(0, self.size), wait=math.inf, body_wait=wait
                )
                text = connection.read_text(response)
            except _Retry as exc:
                if self.sent:
                    raise ClientError(f"the pipe broke: {exc}; its receivers were cut off", EXIT_NETWORK) from None
                self.policy.wait(exc)
                continue
            finally:
                self.meter.close()
            if response.status == 503 and not self.sent:
                self.policy.wait(_Retry(f"{response.status}: {text}", _retry_after(response)))
                continue
            break
        if response.status in (200, 201) and response.getheader("X-Pipe-Delivered") is None:
            # stored rather than piped: it was on the relay already, or the relay knows no pipes
            self.console.note(f"{self.label}: not piped, the relay has it stored: {text}")
            return
        if response.status != 200:
            raise ClientError(f"the relay refused the pipe: {response.status} {text}")
        elapsed = time.monotonic() - started
        delivered = text.rpartition("verified; ")[2] or text
        self.console.note(f"{self.label}: piped and verified in {elapsed:.1f} s; {delivered}")


_LONGEST_PIPE_WAIT = 600.0  # seconds a sender may be kept waiting by a relay's default --pipe-wait
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")  # what send takes for the token of a relay's upload


class _NoNamedUploads(Exception):
    """The relay's storage cannot name uploads (501): send hashes first instead."""


def send_records_directory() -> Path:
    """Where send keeps its records: under $XDG_CACHE_HOME, else ~/.cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "file-relay" / "send"


class _SendRecords:
    """What send remembers of a file it sent to a relay, so that a rerun reads nothing it
    need not: the token of an upload in progress (to resume it), or the SHA-256 the relay
    named the file by (to skip it). One small JSON file per version of a file, named by a
    hash of the relay's address, the file's path, inode, size, and modification and
    change times; the address itself is never written. A record lost or unwritable costs only a read, so
    failures to read or write one are ignored."""

    MAX_AGE = 30 * 86400  # seconds: records older than this are pruned

    def __init__(self, directory: Path):
        self.directory = directory
        self.pruned = False

    @staticmethod
    def key(address: RelayAddress, path: str, info: os.stat_result) -> str:
        version = [address.origin, address.path, os.path.realpath(path), info.st_dev, info.st_ino]
        version += [info.st_size, info.st_mtime_ns, info.st_ctime_ns]
        return hashlib.sha256(json.dumps(version).encode()).hexdigest()

    def load(self, key: str) -> dict:
        try:
            with open(self.directory / key, "rb") as file:
                record = json.loads(file.read(4096))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def save(self, key: str, record: dict) -> None:
        staging = self.directory / f".{key}.{secrets.token_hex(4)}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                json.dump(record, file)
            os.replace(staging, self.directory / key)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        self._prune()

    def forget(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.directory / key)

    def _prune(self) -> None:
        if self.pruned:
            return
        self.pruned = True
        cutoff = time.time() - self.MAX_AGE
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)


class _Handoff:
    """Chunks passed from the one thread that reads a file to the threads that send them,
    a chunk at a time, and how the senders ended. The reader ends the handoff with one
    None per sender, behind its last chunk."""

    def __init__(self, poll: float = 0.2):
        self.chunks: queue.Queue = queue.Queue(maxsize=1)
        self.poll = poll  # seconds between looks at the stop flag while waiting
        self.stop = threading.Event()  # a sender failed, or the reader did: stop sending
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.named: tuple[str, bool] | None = None  # (object ID, whether an answer created it)

    def give(self, chunk) -> bool:
        """Hand *chunk* to a sender, once one is free; False if sending has stopped."""
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                self.chunks.put(chunk, timeout=self.poll)
                return True
        return False

    def end(self, senders: int) -> None:
        """No more chunks: each of the *senders* takes a None once the chunks are taken."""
        for _ in range(senders):
            if not self.give(None):
                return

    def take(self):
        """The next chunk to send, or None when there are no more or sending has stopped."""
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                return self.chunks.get(timeout=self.poll)
        return None

    def answered(self, named: tuple[str, bool]) -> None:
        """An answer named the object: created if any answer said it created it (two
        chunks that complete it together get 201 and 200)."""
        with self.lock:
            created = named[1] or (self.named is not None and self.named[1])
            self.named = (named[0], created)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.error = self.error or error
        self.stop.set()


class _OnePassUpload(_Upload):
    """Sends one file reading it once. A file that fits in a chunk goes as _Upload sends
    it (from memory); a larger one goes to the relay's name-less resumable form: one
    thread reads the file from start to end, hashing all of it, and hands each chunk the
    relay lacks to the senders, which send it with its Content-Digest and retry it from
    memory. The relay names the object; send compares that name with its own hash, and
    deletes the object and fails on a mismatch, or if the file changed meanwhile."""

    def __init__(self, session: _Session, file: str, records: _SendRecords):
        super().__init__(session, file)
        self.records = records
        self.key = ""
        self.version: os.stat_result | None = None
        self.uploads = f"{session.address.path}/uploads"
        self.summary = ""  # the note on a one-pass upload, once its name is checked

    def _transfer(self) -> None:
        self.version = os.fstat(self.fd)
        if not stat.S_ISREG(self.version.st_mode):
            raise ClientError(f"{self.label} is not a regular file: send a file, not a pipe or device", EXIT_LOCAL)
        self.key = self.records.key(self.session.address, self.file, self.version)
        record = self.records.load(self.key)
        known = parse_object_id(str(record.get("sha256", "")))
        token = record.get("token")
        token = token if isinstance(token, str) and _TOKEN_RE.fullmatch(token) else None
        if known and self._retrying(lambda: self._stored(known)):
            self.oid = known
            self.console.note(f"{self.label}: already on the relay, nothing to send")
            return
        try:
            if self.size <= self.options.chunk_size or self.options.hash_first:
                super()._transfer()
                digest = self.oid  # of the bytes read, and sent to the name they hash to
            else:
                digest = self._send_once(token)
        except _NoNamedUploads:
            super()._transfer()
            digest = self.oid
        self._check_named(digest, self.created)
        if self.summary:
            self.console.note(self.summary)
        self.records.save(self.key, {"sha256": self.oid})

    def _retrying(self, attempt):
        """attempt()'s result, tried again after each _Retry as the policy allows."""
        while True:
            try:
                return attempt()
            except _Retry as exc:
                self.policy.wait(exc)

    def _on_object(self, method: str, oid: str):
        """A HEAD or DELETE of object *oid*: its response (200 or 404), body read."""
        connection = self.connections[0]
        response = connection.request(method, f"{self.session.address.path}/{oid}")
        text = connection.read_text(response)
        if response.status not in (200, 404):
            raise _refusal(response, text)
        return response

    def _stored(self, oid: str) -> bool:
        response = self._on_object("HEAD", oid)
        return response.status == 200 and response.getheader("Upload-Incomplete") is None

    # -- the one pass ------------------------------------------------------------

    def _send_once(self, token) -> str:
        """Send the file in one pass, resuming upload *token* if the relay has it; the
        SHA-256 of the file as read (self.oid is the relay's name for it)."""
        started = time.monotonic()
        state = self._retrying(lambda: self._upload_state(token)) if isinstance(token, str) else None
        if isinstance(state, str):  # an earlier run completed it, but never heard so
            self.oid = state
            self.summary = f"{self.label}: an earlier run stored it; nothing to send"
            return _hash_file(self.fd, self.size, self.console, self.label)
        if state is None:
            token = self._retrying(self._start)
            self.records.save(self.key, {"token": token})
            state = []
        received = sum(last - first + 1 for first, last in state)
        if received:
            self.console.note(f"{self.label}: the relay has {received} of {self.size} bytes; resuming")
        self.meter = self.console.meter(self.label, self.size, received)
        try:
            digest, named = self._pass(token, state)
            if named is None:  # every chunk was acknowledged, yet no answer named the object
                named = self._retrying(lambda: self._finish(token))
        except ClientError as exc:
            if exc.exit_code != EXIT_NETWORK:  # this upload cannot be completed: drop it
                self._cancel(token)
            raise
        self.meter.close()
        self.oid, self.created = named
        elapsed = time.monotonic() - started
        rate = f"{format_size(self.sent / max(elapsed, 1e-6))}/s"
        sent = f"{format_size(self.sent)}" + (f" of {format_size(self.size)}" if self.sent != self.size else "")
        verdict = "stored and verified" if self.created else "the relay already had it"
        self.summary = f"{self.label}: {verdict}; sent {sent} in {elapsed:.1f} s ({rate})"
        return digest

    def _start(self) -> str:
        """POST /new/NAME: the token of a new resumable upload of the file."""
        name = "" if download_name_problem(self.label) else urllib.parse.quote(self.label, safe="")
        connection = self.connections[0]
        headers = {**self.headers, "Upload-Length": str(self.size), "Content-Length": "0"}
        response = connection.request("POST", f"{self.session.address.path}/new/{name}", headers)
        text = connection.read_text(response)
        if response.status == 501:
            raise _NoNamedUploads(text)
        if response.status != 201:
            raise _refusal(response, text)
        token = urllib.parse.urlsplit(response.getheader("Location") or "").path.rsplit("/", 1)[-1]
        if not _TOKEN_RE.fullmatch(token):
            raise ClientError(f"the relay answered 201 but named no upload: {text}")
        return token

    def _upload_state(self, token: str):
        """What the relay has of upload *token*: None if nothing, the object's ID once it
        was stored, else the byte ranges received."""
        connection = self.connections[0]
        response = connection.request("HEAD", f"{self.uploads}/{token}")
        text = connection.read_text(response)
        if response.status == 501:
            raise _NoNamedUploads(text)
        if response.status == 404:
            return None
        if response.status != 200:
            raise _refusal(response, text)
        if response.getheader("Upload-Incomplete") in (None, "?0"):
            return self._named(response, text)[0]
        length = response.getheader("Upload-Length")
        if length != str(self.size):
            return None  # not an upload of this file: start afresh
        return _parse_ranges(response.getheader("Upload-Ranges"))

    def _named(self, response, text: str) -> tuple[str, bool]:
        """(the object ID in an answer's Location, whether this request created it)."""
        oid = parse_object_id(urllib.parse.urlsplit(response.getheader("Location") or "").path.rsplit("/", 1)[-1])
        if oid is None:
            raise ClientError(f"the relay answered {response.status} but named no object: {text}")
        return oid, response.status == 201

    def _finish(self, token: str) -> tuple[str, bool]:
        """Ask where the upload stands; with every byte received but the object not stored
        (its finisher failed), send the last byte again to make the relay store it."""
        state = self._upload_state(token)
        if state is None:
            raise ClientError("the relay no longer has this upload (cancelled, or expired unfinished)")
        if isinstance(state, str):
            return state, True
        if _missing(state, self.size):
            raise ClientError("the relay lost bytes it had acknowledged; send the file again")
        last_byte = os.pread(self.fd, 1, self.size - 1)
        named = self._put_piece(self.connections[0], token, self.size - 1, last_byte, True)
        if named is None:
            raise _Retry("every byte was sent, but the relay has not stored the object yet")
        return named

    def _pass(self, token: str, ranges: list) -> tuple[str, tuple[str, bool] | None]:
        """Read the file once, start to end: hash it all and hand the chunks missing from
        *ranges* to --parallel senders. Returns (the file's SHA-256, the object's ID and
        whether it was created if an answer named it)."""
        have = [(first, min(last, self.size - 1)) for first, last in merge_ranges(ranges) if first < self.size]
        missing = _split(_missing(have, self.size), self.options.chunk_size)
        pieces = sorted([(first, last, False) for first, last in have] + [(f, la, True) for f, la in missing])
        hasher = hashlib.sha256()
        handoff = _Handoff()
        senders = [
            threading.Thread(target=self._sender, args=(connection, token, handoff), daemon=True)
            for connection in self.connections
        ]
        for sender in senders:
            sender.start()
        try:
            left = len(missing)
            for first, last, send in pieces:
                if not send:
                    for block in self._read(first, last - first + 1, lambda: BLOCK_SIZE):
                        hasher.update(block)
                    continue
                left -= 1
                data = self._read_chunk(first, last - first + 1, hasher)
                if not handoff.give((first, data, left < self.options.parallel)):
                    break
        except ClientError:
            handoff.stop.set()  # the senders finish the chunk in hand and end
            for sender in senders:
                sender.join()
            raise
        except BaseException:
            handoff.stop.set()
            raise
        handoff.end(len(senders))
        for sender in senders:
            sender.join()
        if handoff.error is not None:
            raise handoff.error
        return hasher.hexdigest(), handoff.named

    def _sender(self, connection: _Connection, token: str, handoff: _Handoff) -> None:
        while (chunk := handoff.take()) is not None:
            try:
                named = self._put_piece(connection, token, *chunk)
            except BaseException as exc:
                handoff.fail(exc)
                return
            if named is not None:
                handoff.answered(named)

    def _read_chunk(self, first: int, length: int, hasher) -> bytearray:
        """Bytes first..first+length-1 of the file, read into memory and hashed as read."""
        data = bytearray(length)
        view = memoryview(data)
        done = 0
        try:
            while done < length:
                count = os.preadv(self.fd, [view[done : done + BLOCK_SIZE]], first + done)
                if not count:
                    raise ClientError("it shrank while it was being sent (did the file change?)")
                hasher.update(view[done : done + count])
                done += count
        except OSError as exc:
            raise ClientError(f"cannot read it: {exc.strerror}", EXIT_LOCAL) from None
        return data

    def _from_memory(self, data, counted: list):
        """*data* as a request body: rate-limited blocks, counted as they go out."""
        limiter, view = self.session.limiter, memoryview(data)
        position = 0
        while position < len(view):
            block = view[position : position + limiter.block(_SEND_BLOCK)]
            limiter.take(len(block))
            yield block
            position += len(block)
            counted[0] += len(block)
            self.meter.add(len(block))
            with self.sent_lock:
                self.sent += len(block)

    def _put_piece(self, connection: _Connection, token: str, first: int, data, final: bool):
        """Send *data* as bytes first.. of upload *token*, again after each failure worth
        retrying: None while the object is incomplete, else (its ID, whether this request
        created it)."""
        last = first + len(data) - 1
        headers = {
            **self.headers,
            "Content-Length": str(len(data)),
            "Content-Range": f"bytes {first}-{last}/{self.size}",
            "Content-Digest": sha256_field(hashlib.sha256(data).digest()),
        }
        wait = self.size / _VERIFY_RATE if final else 0.0  # completing it, the relay hashes it all
        policy = _RetryPolicy(self.options.retry_for, self.console, self.label)
        counted = [0]

        def body():
            self.meter.add(-counted[0])  # what an earlier attempt sent is sent again
            counted[0] = 0
            return self._from_memory(data, counted)

        while True:
            try:
                response = connection.request("PUT", f"{self.uploads}/{token}", headers, body, wait=wait)
                text = connection.read_text(response)
                if response.status == 202:
                    return None
                if response.status in (200, 201):
                    return self._named(response, text)
                if response.status == 400 and "Content-Digest" in text:
                    raise _Retry(f"bytes {first}-{last} arrived damaged")  # the relay did not keep them
                if response.status == 404:
                    self.records.forget(self.key)
                    raise ClientError("the relay no longer has this upload (cancelled, or expired unfinished)")
                if response.status == 409 and _retry_after(response) is None:
                    self.records.forget(self.key)
                    raise ClientError(f"the relay refused bytes {first}-{last}: {text}")
                raise _refusal(response, text)
            except _Retry as exc:
                policy.wait(exc)

    def _check_named(self, digest: str, created: bool) -> None:
        """Fail, and delete what this run stored, unless the relay named the object by the
        file's own SHA-256 and the file did not change while it was read."""
        now, before = os.fstat(self.fd), self.version
        changed = (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
            before.st_size,
            before.st_mtime_ns,
            before.st_ctime_ns,
        )
        changed = changed or self._longer_than_read()
        if not changed and digest == self.oid:
            return
        self.records.forget(self.key)
        if created:
            self._retrying(lambda: self._on_object("DELETE", self.oid))
        kept = "deleted it" if created else "kept its copy, which it had before"
        if changed:
            raise ClientError(f"{self.label} changed while it was being sent (did the file change?); the relay {kept}")
        raise ClientError(
            f"the relay named what it received {self.oid}, but the file hashes to {digest}: damaged on the way, "
            f"or changed since an earlier run sent part of it; the relay {kept}"
        )

    def _cancel(self, token: str) -> None:
        """Cancel upload *token* on the relay, if it can be done at once, and forget it."""
        self.records.forget(self.key)
        connection = _Connection(self.session)
        try:
            with contextlib.suppress(_Retry, ClientError):
                connection.read_text(connection.request("DELETE", f"{self.uploads}/{token}"))
        finally:
            connection.close()

    def _longer_than_read(self) -> bool:
        """Whether the file has bytes past its size as read (a file whose size the system
        does not keep, or one that grew without saying so)."""
        try:
            return bool(os.pread(self.fd, 1, self.size))
        except OSError:
            return False


def _named_url(url: str, name: str) -> str:
    """The object *url* with the sender's file *name*, where the relay accepts it."""
    return url if download_name_problem(name) else f"{url}?name={urllib.parse.quote(name, safe='')}"


def _receive_commands(url: str, name: str) -> list[str]:
    """Commands that fetch *url* into *name* and check it, ready to paste."""
    oid = urllib.parse.urlsplit(url).path.rsplit("/", 1)[1]
    quoted_url, quoted_name = shlex.quote(url), shlex.quote(name)
    return [
        f"curl -fo {quoted_name} {quoted_url} && echo {shlex.quote(f'{oid}  {name}')} | sha256sum -c",
        f"python3 file_relay.py get {quoted_url} -o {quoted_name}",
    ]


def _probe(session: _Session) -> None:
    """Check the relay URL before hashing anything: a wrong server ID fails at once."""
    connection = _Connection(session)
    policy = _RetryPolicy(session.options.retry_for, session.console, "relay")
    try:
        while True:
            try:
                response = connection.request("HEAD", session.address.path)
                text = connection.read_text(response)
                if response.status != 200:
                    raise _refusal(response, text)
                return
            except _Retry as exc:
                policy.wait(exc)
    finally:
        connection.close()


def send_files(
    relay_url: str, files: list[str], options: ClientOptions, console: _Console | None = None, out=None
) -> int:
    """Send *files* to the relay; print each one's object URL and receive commands on *out*.

    Returns the exit status: that of the first file that failed, or 0. A file that fails
    does not stop the others, unless the relay cannot be reached."""
    console = console or _Console(options.quiet, options.progress)
    out = out or sys.stdout
    session = _Session(parse_relay_url(relay_url), options, console)
    try:
        _probe(session)
    except ClientError as exc:
        console.error(str(exc))
        return exc.exit_code
    records = _SendRecords(send_records_directory())
    status = EXIT_OK

    def announce(url: str, name: str) -> None:
        url = _named_url(url, name)
        lines = [url] if options.quiet else [f"{url}  {name}", *(f"  {line}" for line in _receive_commands(url, name))]
        print("\n".join(lines), file=out, flush=True)

    for file in files:
        name = Path(file).name
        try:
            if options.pipe:
                _PipeUpload(session, file, lambda url, name=name: announce(url, name)).run()
                continue
            url = _OnePassUpload(session, file, records).run()
        except ClientError as exc:
            console.error(f"{file}: {exc}")
            status = status or exc.exit_code
            if exc.exit_code == EXIT_NETWORK:
                break
            continue
        announce(url, name)
    return status


class _Download:
    """Fetches one object into an open temporary file, from where an earlier attempt
    stopped, following an upload in progress; done only when the bytes hash to the name."""

    def __init__(self, session: _Session, oid: str, fd: int, label: str):
        self.session = session
        self.options = session.options
        self.console = session.console
        self.oid = oid
        self.fd = fd
        self.label = label
        self.path = f"{session.address.path}/{oid}"
        self.path += f"?wait={self.options.wait:g}"
        self.connection = _Connection(session)
        self.policy = _RetryPolicy(self.options.retry_for, self.console, label)
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.pieces = 0  # responses (and an earlier run's bytes) the file was assembled from
        self.meter = self.console.meter(label, None)

    def run(self) -> None:
        try:
            self._check_earlier_bytes()
            started_over = False
            while True:
                if self.hasher.hexdigest() == self.oid and self.pieces:
                    return
                try:
                    if not self._fetch():
                        continue
                except _Retry as exc:
                    self.policy.wait(exc)
                    continue
                if self.hasher.hexdigest() == self.oid:
                    return
                if self.pieces > 1 and not started_over:
                    # Pieces of several attempts (an earlier run's, or an upload that failed
                    # while we followed it): one clean download settles it.
                    self.console.note(f"{self.label}: the assembled download did not verify; starting over")
                    self._start_over()
                    started_over = True
                    continue
                raise _Mismatch(
                    f"the content does not match its SHA-256 (expected {self.oid}, got {self.hasher.hexdigest()}); "
                    "nothing was saved"
                )
        finally:
            self.connection.close()
            self.meter.close()

    def _check_earlier_bytes(self) -> None:
        """Hash what an interrupted earlier run left in the temporary file."""
        size = os.fstat(self.fd).st_size
        if not size:
            return
        meter = self.console.meter(f"{self.label} (checking the partial download)", size)
        try:
            while self.offset < size and (block := os.pread(self.fd, BLOCK_SIZE, self.offset)):
                self.hasher.update(block)
                self.offset += len(block)
                meter.add(len(block))
        finally:
            meter.close()
        self.pieces = 1
        self.console.note(f"{self.label}: resuming after {self.offset} bytes")

    def _start_over(self) -> None:
        os.ftruncate(self.fd, 0)
        self.hasher = hashlib.sha256()
        self.offset = self.pieces = 0
        self.meter.set(0)

    def _fetch(self) -> bool:
        """One GET from the current offset to the end: True if the body came whole, False
        to ask again at once (the relay could not resume from our offset)."""
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        response = self.connection.request("GET", self.path, headers, wait=self.options.wait)
        status = response.status
        if status not in (200, 206):
            text = self.connection.read_text(response)
            if status == 416 and self.offset:
                self.console.note(f"{self.label}: the partial download is longer than the object; starting over")
                self._start_over()
                return False
            if status == 404:
                raise ClientError("no such object on the relay (nor an upload of it starting in time; see --wait)")
            raise _refusal(response, text)
        length = response.getheader("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if status == 206:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.getheader("Content-Range") or "")
            first, last, total = map(int, match.groups()) if match else (-1, -1, 0)
            if first != self.offset or not first <= last < total:
                self.connection.close()
                self._start_over()
                return False
            expected = last - first + 1
        elif self.offset:
            self._start_over()  # the relay sent everything, not the rest
        self.meter.set(self.offset, None if expected is None else self.offset + expected)
        received = 0
        while True:
            try:
                block = response.read1(self.session.limiter.block(BLOCK_SIZE))
            except (OSError, http.client.HTTPException) as exc:
                self.connection.close()
                raise _Retry(f"the download broke off: {_describe(exc)}") from None
            if not block:
                break
            if expected is not None and received + len(block) > expected:
                self.connection.close()
                raise _Mismatch(f"the relay sent more than the {expected} bytes it announced; nothing was saved")
            if not received:
                self.pieces += 1
            try:
                _write_all(self.fd, block, self.offset)
            except OSError as exc:
                raise ClientError(f"cannot write the download: {exc.strerror}", EXIT_LOCAL) from None
            self.hasher.update(block)
            self.offset += len(block)
            received += len(block)
            self.meter.add(len(block))
            self.policy.progressed()
            self.session.limiter.take(len(block))
        if expected is not None and received < expected:
            self.connection.close()
            raise _Retry(f"the download broke off after {received} of {expected} bytes")
        if not received:
            self.pieces += 1
        return True


def _output_path(output: str | None, oid: str) -> Path:
    """Where get saves: -o PATH, or a directory's (default: the current one) SHA-256 name."""
    if output is None:
        return Path(oid)
    path = Path(output)
    return path / oid if path.is_dir() else path


def _move_into_place(part: Path, target: Path, force: bool) -> None:
    """Publish the verified download: never over an existing file unless *force*."""
    if force:
        os.replace(part, target)
    else:
        try:
            try:
                os.link(part, target)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                    raise
                if os.path.lexists(target):  # no hard links here: a check, then a rename
                    raise FileExistsError(errno.EEXIST, "exists") from None
                os.rename(part, target)
            else:
                os.unlink(part)
        except FileExistsError:
            raise ClientError(f"{target} appeared meanwhile; the verified download is in {part}", EXIT_LOCAL) from None
    _fsync_dir(target.parent.absolute())


def _open_part_file(part: Path) -> int:
    """Open a download's temporary file: a new one, or an earlier run's to resume from.
    An existing one that is not a regular file of ours with no other name is refused:
    through a symbolic link, a hard link, a device or a FIFO the bytes would land
    somewhere else, and a file someone else owns could be changed by them once it has
    verified."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block
    refusal = f"refusing to write through {part}: it is %s (remove it, and get starts afresh)"
    try:
        return os.open(part, flags | os.O_EXCL, 0o666)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ClientError(f"cannot write {part}: {exc.strerror}", EXIT_LOCAL) from None
    try:
        fd = os.open(part, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ClientError(refusal % "a symbolic link", EXIT_LOCAL) from None
        raise ClientError(f"cannot write {part}: {exc.strerror}", EXIT_LOCAL) from None
    found = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(found.st_mode):
        problem = "not a regular file"
    elif found.st_nlink != 1:
        problem = "a file with other hard links"
    elif found.st_uid != os.geteuid():
        problem = "another user's file"
    if problem:
        os.close(fd)
        raise ClientError(refusal % problem, EXIT_LOCAL)
    return fd


def get_file(object_url: str, output: str | None, options: ClientOptions, console: _Console | None = None) -> Path:
    """Download an object to *output* and verify it; returns where it is.

    Raises ClientError. Nothing is ever left at the output path unless it verified; an
    interrupted download stays in .<name>.part beside it, for the next run to resume."""
    console = console or _Console(options.quiet, options.progress)
    address, oid = parse_object_url(object_url)
    target = _output_path(output, oid)
    if os.path.lexists(target) and not options.force:
        raise ClientError(f"{target} already exists (--force replaces it)", EXIT_LOCAL)
    part = target.with_name(f".{target.name}.part")
    fd = _open_part_file(part)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClientError(f"another download is writing {part}", EXIT_LOCAL) from None
        try:
            _Download(_Session(address, options, console), oid, fd, target.name).run()
        except BaseException as exc:
            kept = os.fstat(fd).st_size
            if isinstance(exc, _Mismatch) or not kept:
                part.unlink(missing_ok=True)  # keep only bytes worth resuming from
            elif isinstance(exc, ClientError):
                raise ClientError(
                    f"{exc}; {part} keeps {kept} bytes for the next get to resume", exc.exit_code
                ) from None
            raise
        try:
            os.fsync(fd)
            _move_into_place(part, target, options.force)
        except OSError as exc:
            raise ClientError(f"cannot save {target}: {exc.strerror or exc}", EXIT_LOCAL) from None
    finally:
        os.close(fd)
    size = target.stat().st_size
    console.note(f"{target}: {format_size(size)}, SHA-256 verified")
    return target


_CLIENT_EPILOG = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_FAILED}    the content did not verify (nothing is saved), the relay refused, or no such object
  {EXIT_USAGE}    bad command line
  {EXIT_NETWORK}    the relay could not be reached, or kept failing, for --retry-for seconds
  {EXIT_LOCAL}    a local file could not be read or written, or the output exists (see --force)
  {EXIT_INTERRUPTED}  interrupted: run the same command again to resume

'send' and 'get' as the first word select the client, which needs only the Python
standard library; without them, 'file_relay.py [SERVER_ID] [options]' starts a relay.
A relay whose server ID is spelled 'send' or 'get' is started with --server-id or
RELAY_SERVER_ID. Object URLs carry the relay's secret: whoever sees one can fetch it.
"""


_SEND_DESCRIPTION = """\
Send files to a relay, reading each once. A file that fits in a chunk is read into
memory, hashed, skipped if the relay has it, and uploaded in one request. A larger one
is hashed while it goes out in chunks that survive failures (after any failure only
what the relay lacks is sent again, from memory or, after a rerun, from the file); the
relay names it by the SHA-256 of what it received, and send deletes it and fails unless
that is the file's own. A rerun after a success sends nothing: send remembers, under
$XDG_CACHE_HOME/file-relay/send (~/.cache), what it sent. Then each object URL and the
commands that receive it are printed on stdout. Progress goes to stderr when it is a
terminal.
"""

_GET_DESCRIPTION = """\
Get an object from a relay, following its upload if it is still in progress. It is
downloaded to .NAME.part beside PATH (which an interrupted get resumes from), hashed as
it arrives, and moved to PATH only if its SHA-256 matches the URL; otherwise nothing is
left at PATH. Progress goes to stderr when it is a terminal.
"""


def build_client_parser(command: str) -> argparse.ArgumentParser:
    send = command == "send"
    parser = _Parser(
        prog=f"file_relay.py {command}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_CLIENT_EPILOG,
        description=_SEND_DESCRIPTION if send else _GET_DESCRIPTION,
    )
    if send:
        parser.add_argument(
            "relay_url",
            metavar="RELAY_URL",
            type=_option_type(_relay_url, "relay URL"),
            help="http(s)://HOST:PORT/SERVER_ID",
        )
        parser.add_argument(
            "files", metavar="FILE", nargs="+", type=_option_type(_readable_file, "file"), help="files to send"
        )
        parser.add_argument(
            "--chunk-size",
            metavar="SIZE",
            type=_option_type(_positive_size, "chunk size"),
            default=ClientOptions.chunk_size,
            help="upload larger files in chunks of SIZE, each resumable; smaller ones in one request "
            f"(default {typed_size(ClientOptions.chunk_size)})",
        )
        parser.add_argument(
            "--max-days",
            type=_option_type(_positive_days, "max days"),
            metavar="DAYS",
            help="ask the relay to remove the file this many days after its upload (Max-Days; the relay may cap it)",
        )
        parser.add_argument(
            "--max-downloads",
            type=_option_type(_positive_int(1 << 31), "max downloads"),
            metavar="N",
            help="ask the relay to remove the file after N whole downloads (Max-Downloads)",
        )
        parser.add_argument(
            "--parallel",
            type=_option_type(_positive_int(64), "parallel"),
            default=ClientOptions.parallel,
            metavar="N",
            help=f"chunks in flight at once (default {ClientOptions.parallel})",
        )
        parser.add_argument(
            "--hash-first",
            action="store_true",
            help="hash a file larger than a chunk before sending it (reading it twice) and show its URL at once, "
            "so that receivers can start and follow the upload",
        )
        parser.add_argument(
            "--pipe",
            action="store_true",
            help="pass the file through the relay to receivers without storing it (for files larger than its "
            "disk): hashed first, its URL shown; succeeds once receivers got every byte, verified",
        )
        parser.add_argument(
            "--receivers",
            type=_option_type(_positive_int(64), "receivers"),
            metavar="N",
            help="with --pipe: receivers the relay waits for before bytes flow (default 1)",
        )
        parser.add_argument(
            "--wait",
            dest="pipe_wait",
            type=_option_type(_seconds, "wait"),
            metavar="SECONDS",
            help="with --pipe: how long the relay waits for the receivers (default: the relay's --pipe-wait)",
        )
    else:
        parser.add_argument(
            "object_url",
            metavar="OBJECT_URL",
            type=_option_type(_object_url, "object URL"),
            help="http(s)://HOST:PORT/SERVER_ID/SHA256",
        )
        parser.add_argument(
            "-o",
            "--output",
            metavar="PATH",
            help="where to save it; a directory gets the SHA-256 as the name (default: the SHA-256, here)",
        )
        parser.add_argument("--force", action="store_true", help="replace PATH if it exists (default: refuse)")
        parser.add_argument(
            "--wait",
            type=_option_type(_seconds, "wait"),
            metavar="SECONDS",
            default=ClientOptions.wait,
            help=f"how long the relay may wait for the upload to start (default: {ClientOptions.wait:g})",
        )
    parser.add_argument(
        "--timeout",
        type=_option_type(_positive_seconds, "timeout"),
        default=ClientOptions.timeout,
        metavar="SECONDS",
        help=f"for connecting, and for each read or write to make progress (default {ClientOptions.timeout:g})",
    )
    parser.add_argument(
        "--retry-for",
        type=_option_type(_seconds, "retry for"),
        default=ClientOptions.retry_for,
        metavar="SECONDS",
        help="retry failures with backoff until they go on this long without progress "
        f"(default {ClientOptions.retry_for:g})",
    )
    parser.add_argument(
        "--limit-rate",
        type=_option_type(_positive_size, "limit rate"),
        metavar="SIZE",
        help="at most SIZE bytes per second, e.g. 10M",
    )
    parser.add_argument(
        "--cacert",
        metavar="FILE",
        type=_option_type(_readable_file, "cacert"),
        help="verify the relay's HTTPS certificate with these CA certificates (PEM)",
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify the relay's HTTPS certificate")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress or notes, errors only" + ("; print only the object URLs" if send else ""),
    )
    parser.add_argument("--version", action="version", version=f"file-relay {__version__}")
    return parser


def _relay_url(text: str) -> str:
    parse_relay_url(text)
    return text.strip()


def _object_url(text: str) -> str:
    parse_object_url(text)
    return text.strip()


def client_main(command: str, argv: list[str]) -> int:
    """Run 'send' or 'get' with their arguments; returns the exit status."""
    parser = build_client_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "output", None) == "-":
        parser.error("-o - is not supported: the content is verified only once all of it has arrived")
    if command == "send" and not args.pipe and (args.receivers is not None or args.pipe_wait is not None):
        parser.error("--receivers and --wait go with --pipe")
    options = ClientOptions(
        chunk_size=getattr(args, "chunk_size", ClientOptions.chunk_size),
        parallel=getattr(args, "parallel", ClientOptions.parallel),
        max_days=getattr(args, "max_days", None),
        max_downloads=getattr(args, "max_downloads", None),
        hash_first=getattr(args, "hash_first", False),
        pipe=getattr(args, "pipe", False),
        receivers=getattr(args, "receivers", None) or ClientOptions.receivers,
        pipe_wait=getattr(args, "pipe_wait", None),
        timeout=args.timeout,
        retry_for=args.retry_for,
        limit_rate=args.limit_rate,
        cacert=args.cacert,
        insecure=args.insecure,
        wait=getattr(args, "wait", ClientOptions.wait),
        force=getattr(args, "force", False),
        quiet=args.quiet,
    )
    console = _Console(options.quiet, options.progress)
    try:
        if command == "send":
            return send_files(args.relay_url, args.files, options, console)
        get_file(args.object_url, args.output, options, console)
        return EXIT_OK
    except ClientError as exc:
        console.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        console.error("interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser(environ: typing.Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The relay's command line, its defaults taken from *environ* (the process's)."""
    environ = os.environ if environ is None else environ
    parser = _Parser(
        prog="file_relay.py",
        description="Start a file relay: an HTTP relay through which machines that cannot "
        "reach each other exchange files by SHA-256.",
        epilog="Every option can also be set through the environment variable shown "
        "(RELAY_SERVER_ID keeps the secret out of process listings). "
        "'file_relay.py send ...' and 'file_relay.py get ...' are the built-in client (see their --help); "
        "a server ID spelled 'send' or 'get' is given with --server-id or RELAY_SERVER_ID.",
    )
    parser.add_argument(
        "server_id_positional",
        nargs="?",
        metavar="SERVER_ID",
        type=_option_type(_server_id, "server ID"),
        help="same as --server-id",
    )
    for option in OPTIONS:
        option.add_to(parser, environ)
    parser.add_argument("--version", action="version", version=f"file-relay {__version__}")
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RelayConfig:
    server_id = args.server_id_positional or args.server_id
    if args.server_id_positional and args.server_id and args.server_id_positional != args.server_id:
        parser.error("the server ID is given twice, differently")
    if server_id is None:
        server_id = secrets.token_urlsafe(24)  # 192 bits
    elif len(server_id) < WEAK_SERVER_ID_LENGTH:
        print(
            f"file_relay.py: warning: a server ID of {len(server_id)} characters can be guessed; "
            f"use at least {WEAK_SERVER_ID_LENGTH} (or let the relay generate one)",
            file=sys.stderr,
        )
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    values = {option.name: getattr(args, option.dest) for option in OPTIONS}
    return RelayConfig(**{**values, "server_id": server_id})


def _run_again_from_bytecode() -> None:
    """Replace this process by the same relay run from file_relay.py's cached bytecode, if
    this process compiled the file from source to run it (`python file_relay.py`): what
    compiling leaves on the heap would stay in the master and in every worker forked from
    it. The bytecode is written beside the source as an import would; where it cannot
    be, nothing happens and the relay runs on as it is."""
    if __name__ != "__main__" or __spec__ is not None or not sys.executable or not sys.argv:
        return  # imported, or run with -m (from the cached bytecode already)
    import importlib.util
    import py_compile

    source = os.path.abspath(__file__)
    name = Path(source).stem  # imported under this name, as no other module is
    if not name.isidentifier() or name in sys.modules:
        return
    cached = importlib.util.cache_from_source(source)
    try:
        if not os.path.exists(cached) or os.stat(cached).st_mtime < os.stat(source).st_mtime:
            py_compile.compile(source, cfile=cached, doraise=True)
    except (OSError, py_compile.PyCompileError):
        return
    flags = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]  # the interpreter's own, as given
    # As for the script: its directory first on sys.path, in place of -c's current one.
    rerun = (
        "import sys\n"
        "if sys.path[:1] == ['']: del sys.path[0]\n"
        f"sys.path.insert(0, {os.path.dirname(source)!r})\n"
        "del sys.argv[0]\n"
        f"import {name}\n"
        f"sys.exit({name}.main())\n"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *flags, "-c", rerun, sys.argv[0], *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLIENT_COMMANDS:
        return client_main(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server_id_positional in CLIENT_COMMANDS:
        word = args.server_id_positional
        parser.error(f"{word!r} is a client command, not a server ID; to use it as one: --server-id {word}")
    config = config_from_args(args, parser)
    if argv == sys.argv[1:]:
        _run_again_from_bytecode()
    if config.storage:
        default_directory = RelayConfig(server_id=config.server_id).files_directory
        if build_parser(environ={}).parse_args(argv).files_directory == default_directory:
            # Only RELAY_FILES_DIRECTORY names one, as the container image does for its volume.
            config = dataclasses.replace(config, files_directory=default_directory)
        problem = s3_option_problem(config) or probe_s3_storage(config)
        if problem:
            parser.error(f"storage: {problem}")
    else:
        try:
            probe_files_directory(config.files_directory)
        except OSError as exc:
            parser.error(f"files directory: {exc.strerror or exc}")
        if config.purge_on_exit and (fstype := shared_filesystem(config.files_directory)):
            parser.error(f"--purge-on-exit would remove the files of every relay sharing this {fstype} directory")
    generated = not (args.server_id_positional or args.server_id)
    return serve(config, generated_id=True) if generated else serve(config)


if __name__ == "__main__":
    sys.exit(main())
