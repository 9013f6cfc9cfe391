"""SaltStack's event bus as one pure-stdlib module: ``salt.utils.event`` without ZeroMQ.

Wire format.  A bus (sock_dir, node, minion id) is one AF_UNIX stream socket,
``<sock_dir>/saltevent-master.sock`` or ``saltevent-minion-<idhash>.sock``, plus the
election lock ``<same name>.lock``; Salt's own ``*.ipc`` names are never used.  One
frame is one UTF-8 JSON object followed by ``b"\\n"``, at most ``MAX_FRAME_BYTES``.
An event is ``{"tag": str, "data": dict}``; anything else is a control frame
``{"ctl": name, ...}``: the broker greets each connection with ``hello`` (``pid``),
or ``bye`` when it is handing off; clients send ``sub`` (become a listener:
``backlog``, ``resume``) and ``stats``; the broker answers ``ok`` (``gap``) and
``stats``, and sends ``drop`` (``n`` events lost) and ``bye`` (hand-off: go to the
next broker).  Event frames are relayed byte for byte.

Usage::

    import saltevent
    event = saltevent.MasterEvent('/var/run/salt/master')
    data = event.get_event(wait=10, tag='auth')
    event.fire_event({'sample-msg': 'this is a test'}, 'tag')

Choices where Salt is silent are noted where they are made; saltevent's own opts
keys are ``saltevent_backlog_bytes`` (per-listener backlog in the broker, default
``DEFAULT_BACKLOG_BYTES``) and ``master_sock_dir`` (default: the minion's sock_dir).
License: Apache-2.0.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    # Constants
    "DEFAULT_BACKLOG_BYTES", "DEFAULT_MAX_EVENT_SIZE", "DEFAULT_WAIT", "MAX_FRAME_BYTES",
    "SALT", "SUB_EVENT", "TAGEND", "TAGPARTER", "TAGS",
    # Exceptions
    "SaltEventError", "EventTimeout", "BusClosedError", "FrameError",
    # Tags
    "tagify",
    # Broker
    "Broker",
    # Clients
    "SaltEvent", "MasterEvent", "LocalClientEvent", "MinionEvent", "NamespacedEvent",
    # Module-level functions
    "get_event", "get_master_event", "fire_args", "main",
]

import atexit
import collections
import errno
import itertools
import json
import os
import select
import selectors
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Mapping

_TYPE_CHECKING = False    # typing costs an import a firing process does not need
if _TYPE_CHECKING:
    from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, and no AF_UNIX in older builds
    fcntl = None


class _Log:
    """The ``saltevent`` logger, imported on first use: a process that only fires
    events never logs, and ``logging`` is the largest import it would pay for."""

    def __getattr__(self, name: str) -> Any:
        global log
        import logging
        log = logging.getLogger("saltevent")
        return getattr(log, name)


log = _Log()

# -- Constants ----------------------------------------------------------------

#: Salt's names, kept for code written against ``salt.utils.event``.
TAGEND = "\n\n"
TAGPARTER = "/"
SALT = "salt"
TAGS = {
    "auth": "auth",
    "job": "job",
    "key": "key",
    "minion": "minion",
    "syndic": "syndic",
    "run": "run",
    "wheel": "wheel",
    "cloud": "cloud",
    "fileserver": "fileserver",
    "queue": "queue",
}
SUB_EVENT = ("state.highstate", "state.sls")

#: Tags a salt-master does not fire when a minion forwards them in an ``events``
#: list (salt.daemons.masterapi.MINION_EVENT_BLACKLIST, fnmatch patterns).
_MINION_EVENT_BLACKLIST = (
    "salt/job/*/publish",
    "salt/job/*/new",
    "salt/job/*/return",
    "salt/key",
    "salt/cloud/*",
    "salt/run/*",
    "salt/cluster/*",
    "salt/wheel/*/new",
    "salt/wheel/*/return",
)

DEFAULT_WAIT = 5.0                     # seconds, get_event()
DEFAULT_MAX_EVENT_SIZE = 1 << 20       # bytes of encoded data before trimming (Salt's default)
DEFAULT_BACKLOG_BYTES = 32 << 20       # bytes queued in the broker for one listener
MAX_FRAME_BYTES = 16 << 20             # bytes, one frame on the wire

_CONNECT_TIMEOUT = 5.0                 # seconds, a constructor's connect_pub()
_RECONNECT_TIMEOUT = 2.0               # seconds, one transparent reconnect after a hand-off
_HANDOFF_QUIET = 0.1                   # seconds of silence that end a broker's final drain
_HANDOFF_TIMEOUT = 1.0                 # seconds, hard limit of a broker's final drain
_REPLAY_SECONDS = 3.0                  # seconds a new broker keeps events for resuming listeners
_BYE_CHECK_INTERVAL = 0.02             # seconds between a firer's checks for a hand-off
_RECV_BYTES = 256 << 10                # bytes per recv()
_IOV_MAX = 512                         # buffers per sendmsg()

_SOCK_PREFIX = "saltevent-"
_MAX_SOCK_PATH = 107 if sys.platform.startswith("linux") else 103   # bytes: sun_path less its NUL
_SOCK_SUFFIX = ".sock"
_LOCK_SUFFIX = ".lock"
_SALT_SOCK_DIRS = {"master": "/var/run/salt/master", "minion": "/var/run/salt/minion"}
_ENV_SOCK_DIR = "SALTEVENT_SOCK_DIR"

_DEFAULT_OPTS = {
    "hash_type": "sha256",
    "event_match_type": "startswith",
    "max_event_size": DEFAULT_MAX_EVENT_SIZE,
    "saltevent_backlog_bytes": DEFAULT_BACKLOG_BYTES,
}

# -- Exceptions ---------------------------------------------------------------


class SaltEventError(Exception):
    """Base class of saltevent's errors."""


class EventTimeout(SaltEventError, TimeoutError):
    """No bus could be reached, or an event sent, within the timeout."""

    def __init__(self, path: str, timeout: float | None):
        super().__init__(path, timeout)
        self.path = path
        self.timeout = timeout

    def __str__(self) -> str:
        return f"no event bus at {self.path} within {self.timeout} s"


class BusClosedError(SaltEventError, ConnectionError):
    """The bus connection is closed or broken."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"event bus {self.path}: {self.reason}"


class FrameError(SaltEventError, ValueError):
    """A frame on the wire is malformed, oversized or not UTF-8 JSON."""

    def __init__(self, reason: str, frame: bytes = b""):
        super().__init__(reason, frame)
        self.reason = reason
        self.frame = frame

    def __str__(self) -> str:
        if self.frame:
            return f"{self.reason}: {self.frame[:60]!r}"
        return self.reason


# -- Framing ------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_json_str = json.encoder.encode_basestring          # str -> JSON string, non-ASCII kept
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    # One reusable C encoder, without the circular-reference markers that cost a
    # fresh encoder per call; recursion is caught where events are encoded.
    _c_encode = _c_make_encoder(None, _json_default, _json_str, None, ":", ",",
                                False, False, True)

    def _json_encode(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))
else:  # pragma: no cover - interpreters without the C accelerator
    _json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                    check_circular=False).encode
_json_decode = json.JSONDecoder().decode


def _encode(obj: dict) -> bytes:
    """Return one frame: *obj* as compact UTF-8 JSON and a newline."""
    return (_json_encode(obj) + "\n").encode()


def _decode(block: bytes) -> list:
    """Return the objects of *block*, complete newline-terminated frames.

    Raises FrameError naming the first bad frame.  All frames are decoded with one
    ``json`` call; only a failure falls back to decoding frame by frame.
    """
    try:
        text = block.decode()
        objs = _json_decode("[" + text[:-1].replace("\n", ",") + "]")
        if len(objs) == block.count(b"\n"):
            return objs
    except ValueError:
        pass
    return [_decode_one(line) for line in block.split(b"\n")[:-1]]


def _decode_one(line: bytes) -> Any:
    try:
        return _json_decode(line.decode())
    except UnicodeDecodeError:
        raise FrameError("frame is not valid UTF-8", line) from None
    except ValueError:
        raise FrameError("frame is not a JSON object", line) from None


def _decode_lenient(block: bytes) -> list:
    """Like _decode(), but skip and log bad frames instead of raising."""
    try:
        return _decode(block)
    except FrameError:
        pass
    objs = []
    for line in block.split(b"\n")[:-1]:
        try:
            objs.append(_decode_one(line))
        except FrameError as exc:
            log.warning("skipping undecodable frame: %s", exc)
    return objs


class _FrameBuffer:
    """Cut a byte stream into blocks of whole frames."""

    __slots__ = ("_partial", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES):
        self._partial = b""
        self.max_frame = max_frame

    def feed(self, chunk: bytes) -> bytes:
        """Return the whole frames completed by *chunk* (possibly ``b""``).

        Raises FrameError when a frame grows past ``max_frame``; whole frames in one
        chunk are bounded by the chunk, so only the frames at its edges are measured.
        """
        end = chunk.rfind(b"\n") + 1
        if end == 0:
            self._partial += chunk
            if len(self._partial) > self.max_frame:
                self._oversize(len(self._partial))
            return b""
        if self._partial:
            first = len(self._partial) + chunk.find(b"\n") + 1
            if first > self.max_frame:
                self._oversize(first)
            block, self._partial = self._partial + chunk[:end], chunk[end:]
        else:
            block, self._partial = chunk[:end], chunk[end:]
        if len(self._partial) > self.max_frame:
            self._oversize(len(self._partial))
        return block

    def _oversize(self, size: int) -> None:
        self._partial = b""
        raise FrameError(f"frame exceeds {self.max_frame} bytes ({size} bytes)")

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame."""
        return len(self._partial)


def _is_event(obj: Any) -> bool:
    return (obj.__class__ is dict and len(obj) == 2 and obj.get("tag").__class__ is str
            and obj.get("data").__class__ is dict)


_stamp_second = (-1, "")   # (second, its formatted prefix), replaced as a whole


def _stamp() -> str:
    """Return the time now as Salt 3008 stamps events:
    ``datetime.now(timezone.utc).isoformat()``, e.g. ``2026-11-30T05:10:45.553007+00:00``
    (no fraction when the microseconds are 0)."""
    global _stamp_second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached = _stamp_second
    if cached[0] != second:
        cached = _stamp_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                        time.gmtime(second)))
    micros = nanos // 1000
    return f"{cached[1]}.{micros:06d}+00:00" if micros else cached[1] + "+00:00"


def _json_path_error(data: Any, path: str = "") -> str | None:
    """Return the path of the first value in *data* that JSON cannot carry."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"{path}[{key!r}] (key of type {type(key).__name__})"
            found = _json_path_error(value, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            found = _json_path_error(value, f"{path}[{index}]")
            if found:
                return found
        return None
    if data is None or isinstance(data, (str, int, float, bool)):
        return None
    return f"{path} (type {type(data).__name__})"


def _encode_event(tag: str, data: Any) -> bytes:
    """Return the frame of one event; TypeError names a value JSON cannot carry."""
    try:
        return ('{"tag":' + _json_str(tag) + ',"data":' + _json_encode(data) + "}\n").encode()
    except TypeError:
        where = _json_path_error(data) or ""
        raise TypeError(f"event data{where} is not JSON serializable "
                        "(events carry dicts, lists, str, numbers, bool and None)") from None
    except RecursionError:
        raise ValueError("event data contains a circular reference") from None


def _trim(data: dict, max_size: int) -> list:
    """Trim *data* in place the way Salt does; return the trimmed keys.

    While the encoded dict is over *max_size* bytes, replace each top-level value
    larger than 50%, 40%, ... 10% of *max_size* by ``'VALUE_TRIMMED'``.
    """
    trimmed = []
    percent = 50
    while percent > 0:
        limit = max_size * percent / 100
        for key, value in data.items():
            if value != "VALUE_TRIMMED" and len(_json_encode(value).encode()) > limit:
                data[key] = "VALUE_TRIMMED"
                trimmed.append(key)
        percent -= 10
        if len(_json_encode(data).encode()) < max_size:
            break
    return trimmed


# -- Tag matching & tagify ----------------------------------------------------

_regex_cache: dict = {}


def _match_startswith(event_tag: str, search_tag: str) -> bool:
    return event_tag.startswith(search_tag)


def _match_endswith(event_tag: str, search_tag: str) -> bool:
    return event_tag.endswith(search_tag)


def _match_find(event_tag: str, search_tag: str) -> bool:
    return event_tag.find(search_tag) >= 0


def _match_regex(event_tag: str, search_tag: str) -> bool:
    pattern = _regex_cache.get(search_tag)
    if pattern is None:
        import re
        if len(_regex_cache) >= 256:
            _regex_cache.clear()
        pattern = _regex_cache[search_tag] = re.compile("^" + search_tag)
    return pattern.search(event_tag) is not None


def _match_fnmatch(event_tag: str, search_tag: str) -> bool:
    import fnmatch
    return fnmatch.fnmatch(event_tag, search_tag)


_MATCHERS = {
    "startswith": _match_startswith,
    "endswith": _match_endswith,
    "find": _match_find,
    "regex": _match_regex,
    "fnmatch": _match_fnmatch,
}


def _get_matcher(match_type: str) -> Callable[[str, str], bool]:
    try:
        return _MATCHERS[match_type]
    except (KeyError, TypeError):
        raise ValueError(f"match_type must be one of {sorted(_MATCHERS)}, not {match_type!r}") from None


def tagify(suffix: Any = "", prefix: str = "", base: str = SALT) -> str:
    """Return a tag: *base*, ``TAGS[prefix]`` (or *prefix*) and *suffix* joined by ``/``.

    *suffix* is a string or a list (any iterable) of parts.  Every part becomes a
    str first, then empty ones are left out, as Salt does (so ``0`` stays ``'0'``).
    """
    parts = [base, TAGS.get(prefix, prefix)]
    if isinstance(suffix, (str, bytes)) or not hasattr(suffix, "__iter__"):
        parts.append(suffix)
    else:
        parts.extend(suffix)
    strs = [part.decode() if isinstance(part, bytes) else str(part) for part in parts]
    return TAGPARTER.join(part for part in strs if part)


# -- Socket helpers: paths, peers, election -----------------------------------


class _Bus(tuple):
    """Where one bus lives: (path, lock_path, name)."""

    __slots__ = ()

    def __new__(cls, sock_dir: str, name: str):
        path = os.path.join(sock_dir, _SOCK_PREFIX + name + _SOCK_SUFFIX)
        lock_path = os.path.join(sock_dir, _SOCK_PREFIX + name + _LOCK_SUFFIX)
        return tuple.__new__(cls, (path, lock_path, name))

    path = property(lambda self: self[0])
    lock_path = property(lambda self: self[1])
    name = property(lambda self: self[2])


def _bus_id(opts: Mapping) -> str | bytes:
    """Return the minion id a minion bus is named after, as Salt 3008 picks it:
    ``opts['hash_id']`` when the key is there, else ``opts['id']``, else ``''``."""
    minion_id = opts["hash_id"] if "hash_id" in opts else opts.get("id", "")
    if not isinstance(minion_id, (str, bytes, bytearray)):
        raise TypeError(f"minion id (opts['hash_id'] or opts['id']) must be a str, "
                        f"not {type(minion_id).__name__}")
    return minion_id


def _bus_name(node: str, opts: Mapping) -> str:
    """Return the bus name of *node*: ``master``, or ``minion-<10 hex of the id hash>``."""
    if node == "master":
        return "master"
    import hashlib
    hash_type = opts.get("hash_type") or "sha256"
    hasher = getattr(hashlib, hash_type, None)
    if not callable(hasher):
        raise ValueError(f"unknown hash_type {hash_type!r}")
    minion_id = _bus_id(opts)
    key = minion_id.encode() if isinstance(minion_id, str) else bytes(minion_id)
    return "minion-" + hasher(key).hexdigest()[:10]


def _private_sock_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return os.path.join(runtime, "saltevent")
    import tempfile
    return os.path.join(tempfile.gettempdir(), f"saltevent-{os.getuid()}")


def _resolve_sock_dir(sock_dir: str | None, node: str) -> str:
    """Return the sock_dir to use: the argument, $SALTEVENT_SOCK_DIR, Salt's, or a private one."""
    if sock_dir:
        return os.fspath(sock_dir)
    env = os.environ.get(_ENV_SOCK_DIR)
    if env:
        log.debug("sock_dir %s (from $%s)", env, _ENV_SOCK_DIR)
        return env
    salt_dir = _SALT_SOCK_DIRS["master" if node == "master" else "minion"]
    if os.path.isdir(salt_dir) and os.access(salt_dir, os.W_OK | os.X_OK):
        log.info("sock_dir %s (Salt's default)", salt_dir)
        return salt_dir
    private = _private_sock_dir()
    log.info("sock_dir %s (private: %s is not usable)", private, salt_dir)
    return private


def _ensure_sock_dir(sock_dir: str) -> None:
    """Create *sock_dir* 0700 when missing; refuse a directory another user owns."""
    if not hasattr(socket, "AF_UNIX") or fcntl is None:
        raise OSError(errno.ENOSYS, "saltevent needs AF_UNIX sockets and fcntl.flock "
                                    "(Linux, macOS, the BSDs)")
    try:
        os.makedirs(sock_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise BusClosedError(sock_dir, f"cannot create sock_dir: {exc.strerror}") from exc
    info = os.stat(sock_dir)
    if not stat.S_ISDIR(info.st_mode):
        raise BusClosedError(sock_dir, "sock_dir is not a directory")
    if info.st_uid not in (os.getuid(), 0):
        raise BusClosedError(sock_dir, f"sock_dir is owned by uid {info.st_uid}, not by us")


def _peer_creds(sock: socket.socket) -> tuple:
    """Return (pid, uid) of the peer; pid is 0 where the platform does not tell it."""
    if hasattr(socket, "SO_PEERCRED"):
        import struct
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
        return pid, uid
    if hasattr(os, "getpeereid"):  # not in the stdlib today; kept for platforms that add it
        return 0, os.getpeereid(sock.fileno())[0]
    if sys.platform == "darwin" or "bsd" in sys.platform:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
        if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
            raise OSError(ctypes.get_errno(), "getpeereid failed")
        return 0, uid.value
    raise OSError(errno.ENOSYS, "cannot tell a unix socket peer's uid on this platform")


def _connect(path: str) -> socket.socket:
    """Return a non-blocking socket connected to *path*; OSError if nobody serves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _wait_fd(sock: socket.socket, write: bool, timeout: float | None) -> bool:
    """Wait until *sock* is readable (or writable); False on timeout."""
    fd = sock.fileno()
    if fd < 0:               # closed by another thread: let the caller's I/O say so
        return True
    if not hasattr(select, "poll"):     # builds without poll(): select() will do
        ready = select.select([], [fd], [], timeout) if write else select.select(
            [fd], [], [], timeout)
        return bool(ready[0] or ready[1])
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))




def _elect(bus: _Bus) -> tuple | None:
    """Take *bus*'s election lock and bind its socket; None if another process holds it.

    Returns (listening socket, lock fd, successor): *successor* is True when an
    earlier broker ran (each broker writes its pid into the lock file).
    """
    if fcntl is None:
        raise OSError(errno.ENOSYS, "saltevent needs fcntl.flock (a POSIX system)")
    lock_fd = os.open(bus.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            successor = os.fstat(lock_fd).st_size > 0
            os.ftruncate(lock_fd, 0)
            os.write(lock_fd, f"{os.getpid()}\n".encode())
            try:
                os.unlink(bus.path)
                log.debug("removed stale socket %s", bus.path)
            except FileNotFoundError:
                pass
            sock.bind(bus.path)
            os.chmod(bus.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        try:
            os.close(lock_fd)
        except OSError:
            pass
        raise
    log.debug("elected broker of %s (pid %d)", bus.path, os.getpid())
    return sock, lock_fd, successor


# -- Broker -------------------------------------------------------------------


class _Peer:
    """One connection as the broker sees it.  Used on the broker thread only."""

    __slots__ = ("sock", "fd", "pid", "frames", "listener", "out", "out_bytes", "backlog",
                 "notice", "dropped", "events_in", "events_out", "bytes_in", "bytes_out",
                 "writing", "done", "last_in", "warn_after")

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = pid
        self.frames = _FrameBuffer()
        self.listener = False
        self.out = collections.deque()   # [buffer, frames]; the head may be partly sent
        self.out_bytes = 0               # bytes queued, not counting a drop notice
        self.backlog = DEFAULT_BACKLOG_BYTES
        self.notice = None               # [buffer, 0, count] of the pending drop notice
        self.dropped = 0
        self.events_in = self.events_out = self.bytes_in = self.bytes_out = 0
        self.writing = False
        self.done = False                # sent EOF during a hand-off
        self.last_in = 0.0
        self.warn_after = 0.0            # monotonic time before which drops are not logged


class Broker:
    """Relay every event frame from any client to every listener of one bus.

    The broker owns the listening socket and the election lock.  ``start()`` runs
    ``_serve()`` on a daemon thread named ``saltevent-broker``; ``serve_forever()``
    runs it on the calling thread.  ``close()`` hands off: it gives up the lock and
    the socket so another process can take over, tells every client ``bye``,
    delivers what it still holds, then closes.  A *successor* of an earlier broker
    keeps what it receives in its first ``_REPLAY_SECONDS`` for listeners that
    resume after the hand-off.  Methods marked so run on the broker
    thread; the others may be called from any thread.
    """

    def __init__(self, bus: _Bus, sock: socket.socket, lock_fd: int, successor: bool = False):
        self.bus = bus
        self._listen_sock = sock
        self._lock_fd = lock_fd
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._peers: dict = {}
        self._listeners: dict = {}
        self._stopping = threading.Event()
        self._thread = None
        self._error = None
        self._born = time.monotonic()
        self._replay = collections.deque()   # [buffer, frames] kept for resuming listeners
        self._replay_bytes = 0
        self._replay_open = successor       # a fresh bus has nobody to resume
        self._started_at = time.time()
        self._hello = _encode({"ctl": "hello", "pid": os.getpid()})
        self._bye = _encode({"ctl": "bye"})
        self.events_in = self.events_out = self.bytes_in = self.bytes_out = 0
        self._drops = 0
        try:
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        except BaseException:
            self._close_fds()
            raise

    # -- introspection (any thread)

    @property
    def address(self) -> str:
        return self.bus.path

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def client_count(self) -> int:
        return len(self._peers)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<Broker path={self.bus.path} clients={len(self._peers)} {state}>"

    # -- lifecycle (any thread)

    def start(self) -> None:
        """Run the broker on a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="saltevent-broker",
                                        daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve until close(); then hand off.  Runs on the broker thread."""
        try:
            self._serve()
            self._handoff()
        except BaseException as exc:
            self._error = exc
            log.exception("broker of %s stopped on an unexpected error", self.bus.path)
        finally:
            self._close_fds()

    def stop(self) -> None:
        """Ask the broker to hand off and stop; do not wait."""
        self._stopping.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Hand off and stop the broker; idempotent.

        Raises RuntimeError if the thread does not stop within *timeout* seconds,
        and re-raises an error that stopped the broker thread.
        """
        self.stop()
        thread = self._thread
        if thread is None:
            self._close_fds()
        elif thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("broker thread did not stop")
        error, self._error = self._error, None
        if error is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise RuntimeError(f"broker of {self.bus.path} failed") from error

    def _close_fds(self) -> None:
        for peer in list(self._peers.values()):
            peer.sock.close()
        self._peers.clear()
        self._listeners.clear()
        sock, self._listen_sock = self._listen_sock, None
        if sock is not None:
            sock.close()
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop (broker thread)

    def _serve(self) -> None:
        """Dispatch readiness until stop().  Runs on the broker thread."""
        select_ = self._selector.select
        dirty = set()
        while not self._stopping.is_set():
            timeout = None
            if self._replay_open:
                timeout = max(0.0, self._born + _REPLAY_SECONDS - time.monotonic())
            ready = select_(timeout)
            for key, mask in ready:
                peer = key.data
                if peer is None:
                    self._accept()
                elif peer is self._wake_r:
                    self._drain_wake()
                else:
                    if mask & selectors.EVENT_READ and self._peers.get(peer.fd) is peer:
                        self._on_readable(peer, dirty)
                    if mask & selectors.EVENT_WRITE and self._peers.get(peer.fd) is peer:
                        dirty.add(peer)
            if dirty:
                for peer in dirty:
                    if self._peers.get(peer.fd) is peer:
                        self._flush(peer)
                dirty.clear()
            if self._replay_open and time.monotonic() - self._born > _REPLAY_SECONDS:
                self._close_replay()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        """Accept pending connections; refuse other users.  Runs on the broker thread."""
        while True:
            try:
                sock, _ = self._listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("broker of %s cannot accept: %s", self.bus.path, exc)
                return
            try:
                pid, uid = _peer_creds(sock)
            except OSError as exc:
                log.warning("refused a client of %s: %s", self.bus.path, exc)
                sock.close()
                continue
            if uid != os.getuid() and uid != 0:
                log.warning("refused a client of %s: uid %d is not ours", self.bus.path, uid)
                sock.close()
                continue
            sock.setblocking(False)
            peer = _Peer(sock, pid)
            self._peers[peer.fd] = peer
            self._selector.register(sock, selectors.EVENT_READ, peer)
            leaving = self._stopping.is_set()
            self._enqueue(peer, self._bye if leaving else self._hello, 0)
            peer.last_in = time.monotonic()
            self._flush(peer)
            log.debug("client connected to %s (pid %d)%s", self.bus.path, pid,
                      "; told it to go to the next broker" if leaving else "")

    def _on_readable(self, peer: _Peer, dirty: set) -> None:
        """Read what *peer* sent and relay it.  Runs on the broker thread."""
        try:
            chunk = peer.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:       # closed with our data unread: a normal close
            chunk = b""
        except OSError as exc:
            self._drop(peer, f"read failed: {exc}")
            return
        if not chunk:
            if peer.frames.pending:
                log.warning("client of %s closed mid-frame; dropped %d bytes",
                            self.bus.path, peer.frames.pending)
            if self._stopping.is_set() and peer.listener:
                peer.done = True           # acknowledged the hand-off; still reading
                self._watch(peer)
            else:
                self._drop(peer, "")
            return
        peer.last_in = time.monotonic()
        try:
            block = peer.frames.feed(chunk)
            if not block:
                return
            objs = _decode(block)
        except FrameError as exc:
            self._drop(peer, str(exc))
            return
        nframes = len(objs)
        for obj in objs:
            if not _is_event(obj):
                block, nframes = self._split_control(peer, block, objs, dirty)
                if self._peers.get(peer.fd) is not peer:
                    return
                break
        if nframes:
            peer.events_in += nframes
            peer.bytes_in += len(block)
            self._publish(block, nframes, dirty)

    def _split_control(self, peer: _Peer, block: bytes, objs: list, dirty: set) -> tuple:
        """Handle control frames in *block*; return the event frames left and their count."""
        lines = block.split(b"\n")[:-1]
        events = []
        for line, obj in zip(lines, objs):
            if _is_event(obj):
                events.append(line)
            elif obj.__class__ is dict and obj.get("ctl").__class__ is str:
                self._control(peer, obj, dirty)
            else:
                self._drop(peer, f"not an event or control frame: {line[:60]!r}")
                return b"", 0
        if not events:
            return b"", 0
        events.append(b"")
        return b"\n".join(events), len(events) - 1

    def _control(self, peer: _Peer, msg: dict, dirty: set) -> None:
        """Answer one control frame.  Runs on the broker thread."""
        ctl = msg["ctl"]
        if ctl == "sub":
            backlog = msg.get("backlog")
            if isinstance(backlog, int) and backlog > 0:
                peer.backlog = backlog
            gap = False
            replay = ()
            if msg.get("resume"):
                if self._replay_open:
                    replay = list(self._replay)
                else:
                    gap = True
            self._enqueue(peer, _encode({"ctl": "ok", "gap": gap, "pid": os.getpid()}), 0)
            for buffer, nframes in replay:
                self._enqueue(peer, buffer, nframes)
            peer.listener = True
            self._listeners[peer.fd] = peer
            dirty.add(peer)
            log.debug("listener registered on %s (pid %d)", self.bus.path, peer.pid)
        elif ctl == "stats":
            self._enqueue(peer, _encode({"ctl": "stats", "stats": self.stats()}), 0)
            dirty.add(peer)
        else:
            log.warning("client of %s sent unknown control %r; ignored", self.bus.path, ctl)

    def _publish(self, block: bytes, nframes: int, dirty: set) -> None:
        """Queue *block* for every listener.  Runs on the broker thread."""
        self.events_in += nframes
        self.bytes_in += len(block)
        for peer in self._listeners.values():
            self._enqueue(peer, block, nframes)
            if not peer.writing:           # else its socket is full: EVENT_WRITE flushes
                dirty.add(peer)
        if self._replay_open:
            self._replay.append((block, nframes))
            self._replay_bytes += len(block)
            if self._replay_bytes > DEFAULT_BACKLOG_BYTES:
                self._close_replay()

    def _close_replay(self) -> None:
        self._replay_open = False
        self._replay.clear()
        self._replay_bytes = 0

    def _enqueue(self, peer: _Peer, buffer: bytes, nframes: int) -> None:
        """Queue *buffer* for *peer*, dropping its oldest events past its backlog.

        The head may be partly sent and is never dropped, nor are control frames;
        the dropped events are replaced by one ``drop`` notice where they were.
        """
        out = peer.out
        out.append([buffer, nframes])
        peer.out_bytes += len(buffer)
        if peer.out_bytes <= peer.backlog or not nframes:
            return
        notice = peer.notice
        reuse = len(out) > 1 and out[1] is notice
        index = 2 if reuse else 1
        lost = 0
        while peer.out_bytes > peer.backlog and index < len(out) - 1:
            victim = out[index]
            if not victim[1]:
                index += 1
                continue
            del out[index]
            peer.out_bytes -= len(victim[0])
            lost += victim[1]
        if not lost:
            return
        peer.dropped += lost
        self._drops += lost
        if not reuse:
            notice = peer.notice = [b"", 0, 0]
            out.insert(1, notice)
        notice[2] += lost
        size = len(notice[0])
        notice[0] = _encode({"ctl": "drop", "n": notice[2]})
        peer.out_bytes += len(notice[0]) - size
        now = time.monotonic()
        if now >= peer.warn_after:         # at most one warning a second per listener
            peer.warn_after = now + 1.0
            log.warning("listener of %s (pid %d) is %d bytes behind: dropped its oldest "
                        "events, %d so far", self.bus.path, peer.pid, peer.out_bytes,
                        peer.dropped)

    def _flush(self, peer: _Peer) -> None:
        """Send what *peer* has queued, without blocking.  Runs on the broker thread."""
        out = peer.out
        sock = peer.sock
        while out:
            if len(out) == 1:
                bufs = [out[0][0]]
            else:
                bufs = [item[0] for item in itertools.islice(out, _IOV_MAX)]
            try:
                sent = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                break
            except (BrokenPipeError, ConnectionResetError):
                self._drop(peer, "")       # the client closed first: nothing to report
                return
            except OSError as exc:
                self._drop(peer, f"write failed: {exc}")
                return
            peer.bytes_out += sent
            self.bytes_out += sent
            while sent:
                item = out[0]
                size = len(item[0])
                if sent >= size:
                    sent -= size
                    out.popleft()
                    peer.out_bytes -= size
                    peer.events_out += item[1]
                    self.events_out += item[1]
                    if item is peer.notice:
                        peer.notice = None
                else:
                    item[0] = memoryview(item[0])[sent:]
                    peer.out_bytes -= sent
                    sent = 0
        if bool(out) != peer.writing:
            self._watch(peer)

    def _watch(self, peer: _Peer) -> None:
        """Select *peer* for reading unless it is done, and for writing while it has output."""
        peer.writing = bool(peer.out)
        events = (0 if peer.done else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if peer.writing else 0)
        registered = peer.sock in self._selector.get_map()
        if not events:
            if registered:
                self._selector.unregister(peer.sock)
        elif registered:
            self._selector.modify(peer.sock, events, peer)
        else:
            self._selector.register(peer.sock, events, peer)

    def _drop(self, peer: _Peer, reason: str) -> None:
        """Close *peer*; log *reason* when it is an error.  Runs on the broker thread."""
        if self._peers.get(peer.fd) is not peer:    # already dropped (its fd may be reused)
            return
        del self._peers[peer.fd]
        if self._listeners.get(peer.fd) is peer:
            del self._listeners[peer.fd]
        if reason:
            log.warning("dropped a client of %s (pid %d): %s", self.bus.path, peer.pid, reason)
        else:
            log.debug("client of %s closed (pid %d)", self.bus.path, peer.pid)
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()

    def _handoff(self) -> None:
        """Give up the bus, tell every client, deliver what is held, close.

        The socket's path and the lock go first, so a new broker can be elected at
        once; connections still queued on the old socket are accepted and told
        ``bye``.  Clients get ``bye``; firers move to the new broker, listeners
        half-close and read on.  Frames still arriving are relayed until every
        client is done or quiet for ``_HANDOFF_QUIET``, output is flushed (at most
        ``_HANDOFF_TIMEOUT`` in all), then every connection is closed.  Runs on the
        broker thread.
        """
        try:
            os.unlink(self.bus.path)       # we still hold the lock: newcomers elect anew
        except FileNotFoundError:
            pass
        lock_fd, self._lock_fd = self._lock_fd, None
        os.close(lock_fd)                  # releases the flock: another process may take over
        bye = self._bye
        dirty = set()
        now = time.monotonic()
        for peer in list(self._peers.values()):
            self._enqueue(peer, bye, 0)
            peer.last_in = now
            dirty.add(peer)
        deadline = now + _HANDOFF_TIMEOUT
        while self._peers:
            for peer in dirty:
                if self._peers.get(peer.fd) is peer:
                    self._flush(peer)
            dirty.clear()
            now = time.monotonic()
            quiet_at = max((p.last_in for p in self._peers.values() if not p.done),
                           default=now - _HANDOFF_QUIET) + _HANDOFF_QUIET
            flushed = not any(p.out for p in self._peers.values())
            if (now >= quiet_at and flushed) or now >= deadline:
                break
            wait = min(deadline, quiet_at if quiet_at > now else deadline) - now
            for key, mask in self._selector.select(wait):
                peer = key.data
                if peer is None:
                    self._accept()         # queued before the unlink: they get bye
                    continue
                if peer is self._wake_r:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_READ and self._peers.get(peer.fd) is peer:
                    self._on_readable(peer, dirty)
                if mask & selectors.EVENT_WRITE and self._peers.get(peer.fd) is peer:
                    dirty.add(peer)
        log.debug("broker of %s handed off (%d clients)", self.bus.path, len(self._peers))
        sock, self._listen_sock = self._listen_sock, None
        self._selector.unregister(sock)
        sock.close()
        for peer in list(self._peers.values()):
            self._drop(peer, "")

    def stats(self) -> dict:
        """Return the broker's counters (a snapshot; read on the broker thread)."""
        listeners = []
        for peer in self._listeners.values():
            listeners.append({
                "pid": peer.pid, "events_out": peer.events_out, "bytes_out": peer.bytes_out,
                "queued_bytes": peer.out_bytes, "dropped": peer.dropped, "backlog": peer.backlog,
            })
        return {
            "bus": self.bus.path, "pid": os.getpid(), "uptime": time.time() - self._started_at,
            "clients": len(self._peers), "listeners": len(self._listeners),
            "events_in": self.events_in, "events_out": self.events_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "dropped": self._drops, "per_listener": listeners,
        }


# Brokers this process runs, and how many live event objects use each bus here.
_registry_lock = threading.Lock()
_brokers: dict = {}
_users: dict = {}


def _start_broker(bus: _Bus) -> bool:
    """Run *bus*'s broker in this process if no process does; True if one runs here now."""
    with _registry_lock:
        broker = _brokers.get(bus.path)
        if broker is not None and broker.is_running and not broker._stopping.is_set():
            return True
        elected = _elect(bus)
        if elected is None:
            return False
        broker = Broker(bus, *elected)
        broker.start()
        _brokers[bus.path] = broker
        return True


def _attach(bus: _Bus) -> None:
    with _registry_lock:
        _users[bus.path] = _users.get(bus.path, 0) + 1


def _detach(bus: _Bus, wait: bool = True) -> None:
    """Forget one user of *bus*; hand off the broker here when it was the last."""
    with _registry_lock:
        count = _users.get(bus.path, 0) - 1
        if count > 0:
            _users[bus.path] = count
            return
        _users.pop(bus.path, None)
        broker = _brokers.pop(bus.path, None)
    if broker is not None:
        if wait:
            broker.close()
        else:
            broker.stop()


@atexit.register
def _stop_brokers() -> None:
    with _registry_lock:
        brokers = list(_brokers.values())
        _brokers.clear()
    for broker in brokers:
        try:
            broker.close()
        except RuntimeError as exc:
            log.warning("%s", exc)


def _forget_brokers_after_fork() -> None:
    """In a forked child, forget the parent's brokers without touching their peers."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for broker in _brokers.values():
        broker._thread = None
        broker._close_fds()
    _brokers.clear()
    _users.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_brokers_after_fork)


# -- Client classes -----------------------------------------------------------
#
# The client's I/O is written once, as generators of "steps": a step is a float
# (sleep that many seconds) or ``(sock, write, timeout)`` (wait until the socket is
# readable or writable; the generator is sent True, or False on timeout).  The
# sync API runs them with _drive(); the asyncio face with _drive_async().


def _drive(steps: Iterator) -> Any:
    """Run a steps generator, blocking the calling thread; return its value."""
    try:
        step = next(steps)
        while True:
            if step.__class__ is float:
                time.sleep(step)
                step = steps.send(None)
            else:
                step = steps.send(_wait_fd(*step))
    except StopIteration as stop:
        return stop.value


def _connect_steps(bus: _Bus, deadline: float | None) -> Iterator:
    """Return a socket connected to *bus*, electing this process its broker if none runs.

    Race: processes that find no broker compete for ``flock(lock_path)``; the winner
    unlinks a stale socket file, binds, and keeps the lock for the broker's life; the
    losers retry the connect until the winner listens.  Only the lock holder unlinks,
    so a live broker's socket is never removed.  Raises EventTimeout at *deadline*.
    """
    delay = 0.001
    while True:
        try:
            return _connect(bus.path)
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
            pass          # nobody serves the path, or its listen queue is full
        except OSError as exc:
            raise BusClosedError(bus.path, f"cannot connect: {exc.strerror}") from exc
        if _start_broker(bus):
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise EventTimeout(bus.path, None)
        yield delay
        delay = min(delay * 2, 0.02)


def _bind_or_connect(bus: _Bus, deadline: float | None) -> socket.socket:
    """Blocking form of _connect_steps()."""
    return _drive(_connect_steps(bus, deadline))


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _control_steps(conn: "_Conn", ctl: str, deadline: float | None,
                   events: collections.deque, path: str) -> Iterator:
    """Wait for the control frame *ctl* on *conn*; return it, or None if the
    connection ends or the broker says bye first.  Events read meanwhile go to
    *events*.  Raises EventTimeout at *deadline*."""
    while not (conn.eof or conn.bye):
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise EventTimeout(path, None)
        if not (yield (conn.sock, False, remaining)):
            continue
        try:
            controls = conn.recv_into(events)
        except BlockingIOError:
            continue
        for msg in controls:
            if msg.get("ctl") == ctl:
                return msg
    return None


class _Conn:
    """One client connection: framing, control frames and hand-off, no policy.

    Shared by the sync API and the asyncio face.  Not thread-safe.
    """

    __slots__ = ("sock", "frames", "bye", "eof", "gap", "dropped")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.frames = _FrameBuffer()
        self.bye = False          # the broker announced a hand-off
        self.eof = False          # the broker closed the connection
        self.gap = False          # events may have been missed
        self.dropped = 0          # events the broker dropped for us, not yet counted

    def feed(self, chunk: bytes, events: collections.deque) -> list:
        """Decode *chunk*; append events to *events*; return other control frames."""
        if not chunk:
            self.eof = True
            if not self.bye:
                self.gap = True
            return []
        try:
            block = self.frames.feed(chunk)
        except FrameError as exc:
            log.warning("skipping an oversized frame from the broker: %s", exc)
            return []
        if not block:
            return []
        controls = []
        for obj in _decode_lenient(block):
            if obj.__class__ is dict and "ctl" not in obj:
                events.append(obj)
                continue
            if obj.__class__ is not dict:
                log.warning("skipping a frame that is not a JSON object: %.60r", obj)
                continue
            ctl = obj.get("ctl")
            if ctl == "drop":
                self.dropped += int(obj.get("n", 0))
            elif ctl == "bye":
                self.bye = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)   # tells the broker we are done
                except OSError:
                    pass
            else:
                controls.append(obj)
        return controls

    def recv_into(self, events: collections.deque) -> list:
        """Read once without blocking; return control frames (BlockingIOError if none)."""
        try:
            chunk = self.sock.recv(_RECV_BYTES)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        return self.feed(chunk, events)

    def handed_off(self) -> bool:
        """Return True if the broker said bye or went away (a firing connection)."""
        try:
            while not (self.eof or self.bye):
                self.recv_into(collections.deque())
        except BlockingIOError:
            pass
        except OSError:
            return True
        return self.eof or self.bye

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _asyncio_loop(io_loop: Any) -> Any:
    """Return the asyncio loop of *io_loop*: an asyncio loop itself, or a Tornado
    IOLoop's ``asyncio_loop`` (what Salt code passes); None stays None."""
    if io_loop is None:
        return None
    import asyncio
    if isinstance(io_loop, asyncio.AbstractEventLoop):
        return io_loop
    loop = getattr(io_loop, "asyncio_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop):
        return loop
    raise TypeError("io_loop must be an asyncio event loop or a Tornado IOLoop running on "
                    f"asyncio, not {type(io_loop).__module__}.{type(io_loop).__qualname__}")


class SaltEvent:
    """Listen to and fire events on one bus, with ``salt.utils.event.SaltEvent``'s API.

    *node* ``'master'`` is the master bus of *sock_dir*; any other node is the minion
    bus of ``opts['hash_id']``, else ``opts['id']``, else ``''`` there (as in Salt).
    With *listen* the object registers as a listener before the constructor returns,
    so it sees every event fired after that.

    A SaltEvent is not thread-safe: use one per thread.  ``fire_event`` and
    ``destroy`` may be called from any thread; ``destroy`` ends a blocked
    ``get_event`` or ``iter_events`` in another thread.  Do not share one across
    ``fork()``.  With *io_loop* (an asyncio loop, or a Tornado IOLoop, whose asyncio
    loop is used, as in Salt) the asyncio methods are available too; they share
    this class's core (see the asyncio section).

    :ivar dropped: events the broker dropped because this listener fell behind.
    :ivar gaps: hand-offs after which events may have been missed.
    """

    def __init__(self, node: str, sock_dir: str | None = None, opts: Mapping | None = None,
                 listen: bool = True, io_loop: Any = None, keep_loop: bool = False,
                 raise_errors: bool = False):
        self._attached = None
        self._pub = None
        self._pull = None
        self._closed = True                    # until the bus is attached below
        self._generation = 0                   # destroy() calls so far: ends waits begun before
        self._lock = threading.Lock()          # guards the firing connection
        self._state_lock = threading.Lock()    # guards _closed, _attached and the 3 below
        self._waiting = 0                      # waits in progress, in any thread
        self._retired = []                     # listening conns destroy() left them to close
        self.node = node
        self.opts = dict(_DEFAULT_OPTS)
        if opts:
            self.opts.update(opts)
        self.raise_errors = raise_errors
        self.io_loop = _asyncio_loop(io_loop)
        self.keep_loop = keep_loop
        self._own_loop = False
        self._waiters = {}                     # asyncio futures waiting on our sockets
        self._tasks = set()                    # asyncio tasks we started
        self._handler = None
        self._handler_fd = None                # the fd the handler's loop reader watches
        self.pending_tags = []
        self.pending_events = []
        self.dropped = 0
        self.gaps = 0
        self._events = collections.deque()
        self._bye_checked = 0.0
        self._warn_after = 0.0
        self._match_type = self.opts.get("event_match_type") or "startswith"
        _get_matcher(self._match_type)
        self._max_event_size = self.opts.get("max_event_size") or 0
        self._backlog = int(self.opts.get("saltevent_backlog_bytes") or DEFAULT_BACKLOG_BYTES)
        given_dir = sock_dir or self.opts.get("sock_dir")
        self._master_sock_dir = self.opts.get("master_sock_dir") or given_dir
        self.sock_dir = _resolve_sock_dir(given_dir, node)
        self._bus = _Bus(self.sock_dir, _bus_name(node, self.opts))
        self.puburi = self.pulluri = self._bus.path
        size = len(os.fsencode(self._bus.path))
        if size > _MAX_SOCK_PATH:
            raise ValueError(f"socket path too long for AF_UNIX ({size} bytes, at most "
                             f"{_MAX_SOCK_PATH} on {sys.platform}): {self._bus.path}")
        _ensure_sock_dir(self.sock_dir)
        _attach(self._bus)
        self._attached = self._bus
        self._closed = False
        try:
            if listen:
                self.connect_pub(timeout=_CONNECT_TIMEOUT)
        except BaseException:
            self.destroy()
            raise

    # -- state derived from the connections (Salt's cpub / cpush flags)

    @property
    def cpub(self) -> bool:
        """True while the listening side is connected."""
        return self._pub is not None

    @property
    def cpush(self) -> bool:
        """True while the firing side is connected."""
        return self._pull is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._pub else "idle")
        return f"<{type(self).__name__} bus={self._bus.path} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosedError(self._bus.path, "the event object is closed")

    def _reopen(self) -> int:
        """Re-attach to the bus after destroy(), as Salt's objects stay usable;
        return the generation that the next destroy() ends."""
        if self._closed:
            with self._state_lock:
                if self._closed:
                    _attach(self._bus)
                    self._attached = self._bus
                    self._closed = False
                    if self._own_loop and self.io_loop is not None and self.io_loop.is_closed():
                        self.io_loop, self._own_loop = None, False
        return self._generation

    def _while_current(self, steps: Iterator, generation: int) -> Iterator:
        """Run *steps*, but return None once destroy() has ended *generation*.

        The last wait to finish closes the connections destroy() retired under it.
        """
        with self._state_lock:
            self._waiting += 1
        try:
            step = next(steps)
            while self._generation == generation:
                step = steps.send((yield step))
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()
            with self._state_lock:
                self._waiting -= 1
                retired = [] if self._waiting else self._retired
                if retired:
                    self._retired = []
            for conn in retired:
                conn.close()
        return None

    def _retire_pub(self) -> None:
        """Close the listening side for destroy().

        If a wait is in progress (in another thread, or a task), only shut the
        socket down, which wakes it: that wait closes it, so the fd number cannot
        be reused by a new socket while it is being polled.
        """
        conn, self._pub = self._pub, None
        if conn is None:
            return
        self._forget_fd(conn.sock)
        with self._state_lock:
            if self._waiting:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._retired.append(conn)
                return
        conn.close()

    # -- connections (steps shared by both faces)

    def _subscribe_steps(self, deadline: float | None, resume: bool) -> Iterator:
        """Return a connection registered as a listener (``resume`` after a hand-off).

        A connection closed before the broker's ``ok`` (it landed in a dying broker's
        listen queue) is retried until *deadline*.
        """
        hello = _encode({"ctl": "sub", "backlog": self._backlog, "resume": resume})
        while True:
            conn = _Conn((yield from _connect_steps(self._bus, deadline)))
            try:
                conn.sock.sendall(hello)
                msg = yield from _control_steps(conn, "ok", deadline, self._events,
                                                 self._bus.path)
                if msg is not None:
                    if msg.get("gap"):
                        self._note_gap("the new broker no longer holds the events")
                    return conn
            except (BrokenPipeError, ConnectionResetError):
                pass
            except BaseException:
                conn.close()
                raise
            conn.close()
            log.debug("broker of %s closed before registering us; retrying", self._bus.path)
            if deadline is not None and time.monotonic() >= deadline:
                raise EventTimeout(self._bus.path, None)
            yield 0.001

    def _listen_steps(self, deadline: float | None, auto_reconnect: bool) -> Iterator:
        """Read one batch of events into the queue; return False at the deadline.

        Re-subscribes transparently after a hand-off (counting a gap after a crash).
        Raises BusClosedError if the bus is broken (and auto_reconnect gave up).
        """
        delay = 0.01
        while True:
            if self._closed:
                return False
            if self._events:                   # e.g. replayed with a broker's ok
                return True
            conn = self._pub
            try:
                if conn is None:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        return False
                    self._pub = yield from self._subscribe_steps(deadline, resume=False)
                    continue
                if conn.eof:
                    yield from self._resume_steps(deadline)
                    continue
                try:
                    conn.recv_into(self._events)
                except BlockingIOError:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        return False
                    yield (conn.sock, False, remaining)
                    continue
                self._account(conn)
                if self._events:
                    return True
            except (SaltEventError, OSError) as exc:
                if self._closed:
                    return False
                if not auto_reconnect:
                    raise BusClosedError(self._bus.path, str(exc)) from exc
                self.close_pub()
                if deadline is not None and time.monotonic() + delay >= deadline:
                    return False
                yield delay
                delay = min(delay * 2, 0.5)

    def _resume_steps(self, deadline: float | None) -> Iterator:
        """Replace a finished listening connection after a hand-off or a crash."""
        conn = self._pub
        if conn is not None:
            if conn.gap:
                self._note_gap("the broker's process died")
            self.close_pub()
        retry_by = time.monotonic() + _RECONNECT_TIMEOUT
        if deadline is not None:
            retry_by = max(min(retry_by, deadline), time.monotonic() + 0.05)
        self._pub = yield from self._subscribe_steps(retry_by, resume=True)
        log.debug("listener on %s resumed after a hand-off", self._bus.path)

    def _account(self, conn: _Conn) -> None:
        """Count the events the broker told *conn* it dropped (warn at most once a second)."""
        if conn.dropped:
            lost, conn.dropped = conn.dropped, 0
            self.dropped += lost
            now = time.monotonic()
            if now >= self._warn_after:
                self._warn_after = now + 1.0
                log.warning("listener on %s fell behind: the broker dropped %d events "
                            "(%d in all)", self._bus.path, lost, self.dropped)

    def _pull_steps(self, deadline: float | None) -> Iterator:
        """Return the firing connection, connecting (and electing) if needed.

        A new connection is used only once the broker greeted it: a connection
        that landed on a broker about to leave is told ``bye`` (or reset) instead.
        """
        while self._pull is None:
            conn = _Conn((yield from _connect_steps(self._bus, deadline)))
            try:
                msg = yield from _control_steps(conn, "hello", deadline, collections.deque(),
                                                 self._bus.path)
                if msg is not None:
                    self._pull = conn
                    self._bye_checked = time.monotonic()
            except BaseException:
                conn.close()
                raise
            if self._pull is None:
                conn.close()
                log.debug("broker of %s is leaving; firing at the next one", self._bus.path)
        return self._pull

    def _send_steps(self, frame: bytes, sent: int, deadline: float | None) -> Iterator:
        """Send *frame* from offset *sent*, moving to the new broker after a hand-off.

        A frame is only ever restarted from its beginning on a new connection.
        """
        attempts = 0
        conn = self._pull
        while True:
            self._check_open()
            if conn is None or sent == 0:
                conn = yield from self._pull_steps(deadline)
                now = time.monotonic()
                if now - self._bye_checked >= _BYE_CHECK_INTERVAL:
                    self._bye_checked = now
                    if conn.handed_off():
                        self._drop_pull(conn)
                        conn = None
                        continue
            try:
                sent += conn.sock.send(memoryview(frame)[sent:] if sent else frame)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                if sent:
                    self._drop_pull(conn)
                    raise BusClosedError(self._bus.path, "the broker went away mid-event")
                self._drop_pull(conn)          # the broker went away: on to the next one
                conn = None
                attempts += 1
                if attempts > 3:
                    if deadline is None or time.monotonic() >= deadline:
                        raise BusClosedError(self._bus.path,
                                             "the broker keeps closing the connection")
                    yield 0.01
                continue
            if sent == len(frame):
                return True
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0 or not (
                    yield (conn.sock, True, remaining)):
                self._drop_pull(conn)          # the broker discards the unfinished frame
                raise EventTimeout(self._bus.path, None)

    def _drop_pull(self, conn: _Conn) -> None:
        if self._pull is conn:
            self._pull = None
        conn.close()

    # -- connections (sync API)

    def connect_pub(self, timeout: float | None = None) -> bool:
        """Connect the listening side and register with the broker.

        Returns True once the broker has registered this listener, False if no bus
        could be reached within *timeout* seconds (None: wait as long as it takes).
        With ``raise_errors`` a failure raises instead.
        """
        self._reopen()
        if self._pub is not None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._pub = _drive(self._subscribe_steps(deadline, resume=False))
        except (SaltEventError, OSError) as exc:
            return self._failed("cannot listen", exc)
        return True

    def _failed(self, what: str, exc: BaseException) -> bool:
        """Report a failure as Salt's boolean API does: log it and return False, or
        raise it with ``raise_errors``."""
        if self.raise_errors:
            raise exc
        log.warning("%s on %s: %s", what, self._bus.path, exc)
        return False

    def close_pub(self) -> None:
        """Close the listening side; events already received stay queued."""
        conn, self._pub = self._pub, None
        if conn is not None:
            self._forget_fd(conn.sock)
            conn.close()

    def connect_pull(self, timeout: float | None = 1) -> bool:
        """Connect the firing side; True on success, False after *timeout* seconds."""
        self._reopen()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            try:
                _drive(self._pull_steps(deadline))
            except (SaltEventError, OSError) as exc:
                return self._failed("cannot fire", exc)
            return True

    def close_pull(self) -> None:
        """Close the firing side."""
        with self._lock:
            conn, self._pull = self._pull, None
        if conn is not None:
            self._forget_fd(conn.sock)
            conn.close()

    def destroy(self) -> None:
        """Close everything; idempotent.

        A get_event() blocked in another thread returns, and an iter_events()
        or aiter_events() begun before ends.  As in Salt, received events not yet
        taken are dropped, subscriptions stay, and the object stays usable: a later
        fire_event(), get_event() or connect_pub() connects again.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._generation += 1
            bus, self._attached = self._attached, None
        self._close_async()
        self._handler = None
        self._retire_pub()
        self.close_pull()
        self.pending_events = []
        self._events.clear()
        if bus is not None:
            _detach(bus)

    close = destroy

    def __enter__(self) -> SaltEvent:
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
        self._closed = True
        for conn in (self._pub, self._pull, *self._retired):
            if conn is not None:
                conn.sock.close()
        bus, self._attached = self._attached, None
        if bus is not None:
            _detach(bus, wait=False)

    # -- listening

    def _note_gap(self, why: str) -> None:
        self.gaps += 1
        log.warning("listener on %s may have missed events: %s", self._bus.path, why)

    def _check_pending(self, tag: str, match: Callable) -> dict | None:
        """Return the first cached event matching *tag*.

        As Salt does, later events that match *tag* or a subscription stay cached;
        the others are dropped.
        """
        if not self.pending_events:
            return None
        old, self.pending_events = self.pending_events, []
        found = None
        for event in old:
            if match(event["tag"], tag):
                if found is None:
                    found = event
                else:
                    self.pending_events.append(event)
            elif any(pmatch(event["tag"], ptag) for ptag, pmatch in self.pending_tags):
                self.pending_events.append(event)
        return found

    def _take(self, tag: str, match: Callable) -> dict | None:
        """Return the first queued event matching *tag*; cache subscribed ones on the way."""
        events = self._events
        pending_tags = self.pending_tags
        while events:
            event = events.popleft()
            etag = event["tag"]
            if match(etag, tag):
                return event
            if pending_tags and any(pmatch(etag, ptag) for ptag, pmatch in pending_tags):
                self.pending_events.append(event)
        return None

    def _get_event_steps(self, timeout: float | None, tag: str, match: Callable,
                         auto_reconnect: bool) -> Iterator:
        """Return the next event matching *tag*, or None at the deadline or when closed."""
        event = self._check_pending(tag, match)
        if event is not None:
            return event
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self._take(tag, match)
            if event is not None:
                return event
            if deadline is not None and time.monotonic() >= deadline and timeout > 0:
                return None
            try:
                if not (yield from self._listen_steps(deadline, auto_reconnect)):
                    return None
            except BusClosedError as exc:
                if self.raise_errors:
                    raise
                log.warning("%s", exc)
                return None

    @staticmethod
    def _timeout(wait: float | None, no_block: bool = False) -> float | None:
        """Translate Salt's ``wait`` (seconds, 0 = for ever) to a timeout."""
        if no_block:
            return 0.0
        if wait == 0 or wait is None:
            return None
        return float(wait)

    def get_event(self, wait: float = DEFAULT_WAIT, tag: str = "", full: bool = False,
                  match_type: str | None = None, no_block: bool = False,
                  auto_reconnect: bool = False) -> dict | None:
        """Return the data of the next event whose tag matches *tag*, or None.

        :param wait: seconds to wait, a hard deadline however busy the bus is;
            ``0`` waits for ever (Salt's meaning).
        :param tag: what to match event tags against, with *match_type*
            (``startswith`` by default, or ``opts['event_match_type']``).
        :param full: return ``{'tag': ..., 'data': ...}`` instead of the data.
        :param no_block: return at once if no matching event is already here.
        :param auto_reconnect: when the bus is broken, keep reconnecting until *wait*
            runs out instead of returning None.
        :raises BusClosedError: on a broken bus with ``raise_errors``.
        :raises ValueError: for an unknown *match_type*.
        """
        match = _get_matcher(match_type or self._match_type)
        event = self._next_event(self._reopen(), self._timeout(wait, no_block), tag, match,
                                 auto_reconnect)
        if event is None or full:
            return event
        return event["data"]

    def _next_event(self, generation: int, timeout: float | None, tag: str, match: Callable,
                    auto_reconnect: bool) -> dict | None:
        """Return the next matching event, or None at the deadline or on destroy()."""
        event = None
        if self._events and not self.pending_events:     # the fast path: one queued
            event = self._take(tag, match)
        if event is None:
            event = _drive(self._while_current(
                self._get_event_steps(timeout, tag, match, auto_reconnect), generation))
        return event

    def iter_events(self, tag: str = "", full: bool = False, match_type: str | None = None,
                    auto_reconnect: bool = False) -> Iterator[dict]:
        """Yield matching events for ever; the iterator ends when destroy() is called.

        It always reconnects (as with *auto_reconnect*): an endless iterator has no
        deadline at which to give up.
        """
        match = _get_matcher(match_type or self._match_type)
        generation = self._reopen()
        while self._generation == generation:
            event = self._next_event(generation, None, tag, match, True)
            if event is not None:
                yield event if full else event["data"]

    def _raw_event(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        generation = self._reopen()
        try:
            if self._events or _drive(self._while_current(self._listen_steps(deadline, False),
                                                          generation)):
                return self._events.popleft()
        except BusClosedError:
            if self.raise_errors:
                raise
        return None

    def get_event_noblock(self) -> dict | None:
        """Return the next raw event ``{'data', 'tag'}`` if one is here, else None."""
        return self._raw_event(0.0)

    def get_event_block(self) -> dict | None:
        """Return the next raw event ``{'data', 'tag'}``, waiting as long as it takes."""
        return self._raw_event(None)

    def subscribe(self, tag: str | None = None, match_type: str | None = None) -> None:
        """Keep events whose tag matches *tag* for a later get_event()."""
        if tag is None:
            return
        self.pending_tags.append([tag, _get_matcher(match_type or self._match_type)])

    def unsubscribe(self, tag: str | None, match_type: str | None = None) -> None:
        """Stop keeping *tag*'s events; drop cached events no subscription still wants.

        As in Salt 3008, a *tag* not subscribed with that match type is ignored, and
        the cached events are filtered all the same.

        :raises ValueError: for an unknown *match_type*.
        """
        if tag is None:
            return
        entry = [tag, _get_matcher(match_type or self._match_type)]
        if entry in self.pending_tags:
            self.pending_tags.remove(entry)
        self.pending_events = [
            event for event in self.pending_events
            if any(pmatch(event["tag"], ptag) for ptag, pmatch in self.pending_tags)
        ]

    # -- firing

    @classmethod
    def pack(cls, tag: str, data: Any, max_size: int | None = None) -> bytes:
        """Return the wire frame of one event; with *max_size*, trim *data* as Salt does."""
        frame = _encode_event(tag, data)
        if max_size and isinstance(data, dict) and len(frame) > max_size:
            data = dict(data)
            _trim(data, max_size)
            frame = _encode_event(tag, data)
        return frame

    @classmethod
    def unpack(cls, raw: bytes | str) -> tuple:
        """Return ``(tag, data)`` from one frame made by pack()."""
        if isinstance(raw, str):
            raw = raw.encode()
        obj = _decode_one(raw.rstrip(b"\n"))
        if obj.__class__ is not dict or "tag" not in obj:
            raise FrameError("frame is not an event", raw)
        return obj["tag"], obj.get("data")

    def _frame(self, data: Mapping, tag: str) -> bytes:
        """Validate, stamp, trim and encode one event (the caller's dict is not changed)."""
        if not isinstance(tag, str):
            raise TypeError(f"tag must be a str, not {type(tag).__name__}")
        if not tag:
            raise ValueError("Empty tag.")
        if data.__class__ is not dict and not isinstance(data, Mapping):
            raise ValueError(f"Dict object expected, not '{data}'.")
        data = dict(data)
        data["_stamp"] = _stamp()
        frame = _encode_event(tag, data)
        limit = self._max_event_size
        if limit and len(frame) - len(tag) > limit:
            trimmed = _trim(data, limit)
            log.warning("event %s is over max_event_size (%d bytes): trimmed %s",
                        tag, limit, ", ".join(map(str, trimmed)) or "nothing")
            frame = _encode_event(tag, data)
        if len(frame) > MAX_FRAME_BYTES:
            raise ValueError(f"event {tag!r} is {len(frame)} bytes; the bus carries at most "
                             f"{MAX_FRAME_BYTES}")
        return frame

    def _send(self, frame: bytes, timeout: float | None) -> bool:
        """Send one frame; False (or raise with raise_errors) if not within *timeout*."""
        with self._lock:
            conn = self._pull
            sent = 0
            if conn is not None and time.monotonic() - self._bye_checked < _BYE_CHECK_INTERVAL:
                try:                            # the fast path: one send() on a fresh check
                    sent = conn.sock.send(frame)
                    if sent == len(frame):
                        return True
                except OSError:
                    sent = 0
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
            try:
                return _drive(self._send_steps(frame, sent, deadline))
            except (SaltEventError, OSError) as exc:
                return self._failed("event not sent", exc)

    def fire_event(self, data: Mapping, tag: str, timeout: float | None = 1000) -> bool:
        """Fire *data* under *tag* on this bus.

        On a minion bus, an event whose tag starts with ``fire_master`` is then
        forwarded to the master bus, as salt-minion does (see fire_master()).

        :param timeout: milliseconds to wait for the bus (Salt's unit); None waits.
        :returns: True once the bus (and the master bus, when forwarding) has the
            event, False if it could not be reached.
        :raises ValueError: empty tag, data not a mapping, or an event too large.
        :raises TypeError: a value JSON cannot carry (the message names its key).
        """
        frame = self._frame(data, tag)
        self._reopen()
        ok = self._send(frame, None if timeout is None else timeout / 1000.0)
        if ok and self.node != "master" and tag.startswith("fire_master"):
            ok = self._forward_to_master(data, timeout)
        return ok

    def fire_master(self, data: Mapping, tag: str, timeout: float | None = 1000) -> bool:
        """Fire an event for the master: tag ``fire_master`` here, forwarded from a minion bus.

        Fires ``{'tag': tag, 'data': data, 'events': None, 'pretag': None}`` under
        ``fire_master``, as Salt does.  On a minion bus the master bus
        (``opts['master_sock_dir']``, else the sock_dir this object was given, else
        the master bus's default) then gets what a salt-master fires for it: under
        *tag*, ``{'id': <minion id>, 'cmd': '_minion_event', 'pretag': None,
        'data': data, 'tag': tag, 'ts': <unix time>, '_stamp': ...}``.
        """
        msg = {"tag": tag, "data": data, "events": None, "pretag": None}
        return self.fire_event(msg, "fire_master", timeout)

    def _master_events(self, msg: Mapping) -> list:
        """Return the (tag, data) events a salt-master fires on its bus when this
        minion forwards the ``fire_master`` event *msg*.

        salt-minion sends ``events`` if any, else ``data`` and ``tag`` with its id;
        the master fires the whole load under ``tag``, or each of the ``events``
        (first under ``<pretag>/<tag>`` when there is a pretag), leaving out the
        tags of _MINION_EVENT_BLACKLIST.
        """
        try:
            data, tag, events, pretag = msg["data"], msg["tag"], msg["events"], msg["pretag"]
        except KeyError as exc:
            log.warning("fire_master event without %s: not forwarded to the master", exc)
            return []
        if not events:
            if not tag:
                return []
            minion_id = _bus_id(self.opts)      # the id of the minion that owns this bus
            if not isinstance(minion_id, str):
                minion_id = bytes(minion_id).decode(errors="replace")
            return [(tag, {"id": minion_id, "cmd": "_minion_event", "pretag": pretag,
                           "data": data or {}, "tag": tag, "ts": int(time.time())})]
        import fnmatch
        fired = []
        for event in events:
            event_data = event["data"] if "data" in event else event
            if pretag is not None:
                fired.append((tagify(event["tag"], base=pretag), event_data))
            if any(fnmatch.fnmatch(event["tag"], black) for black in _MINION_EVENT_BLACKLIST):
                log.warning("Filtering blacklisted event tag %s", event["tag"])
                continue
            fired.append((event["tag"], event_data))
        return fired

    def _master_bus(self, io_loop: Any = None) -> SaltEvent:
        """Return a firing object for the master bus that this minion bus forwards to."""
        opts = {key: self.opts[key] for key in ("max_event_size", "hash_type") if key in self.opts}
        return SaltEvent("master", self._master_sock_dir, opts=opts, listen=False,
                         io_loop=io_loop, raise_errors=self.raise_errors)

    def _forward_to_master(self, msg: Mapping, timeout: float | None) -> bool:
        events = self._master_events(msg)
        if not events:
            return True
        with self._master_bus() as master:
            return all([master.fire_event(data, tag, timeout) for tag, data in events])

    async def _forward_to_master_async(self, msg: Mapping, timeout: float | None) -> bool:
        events = self._master_events(msg)
        if not events:
            return True
        with self._master_bus(self._loop()) as master:
            return all([await master.fire_event_async(data, tag, timeout=timeout)
                        for tag, data in events])

    def fire_ret_load(self, load: Mapping) -> None:
        """Fire Salt's error events for a failed ``state.sls``/``state.highstate`` return.

        As in Salt 3008: for each failed state of a function in ``SUB_EVENT`` whose
        retcode is non-zero, fire the state's data under ``<module>.<function>``,
        then with ``jid``, ``id``, ``success``, ``return``, ``fun`` (and ``user``
        when the load has one) under ``salt/job/<jid>/sub/<id>/error/<fun>``.  The
        state dicts in *load* are updated in place, as Salt does; a return that is
        not a dict, or an error while firing, is logged, not raised.
        """
        if not (load.get("retcode") and load.get("fun")):
            return
        funs, retcodes = load["fun"], load["retcode"]
        if not isinstance(funs, list):
            if funs in SUB_EVENT:
                self._fire_ret_load_specific_fun(load)
            return
        for index, fun in enumerate(funs):
            if isinstance(retcodes, list):
                failed = len(retcodes) > index and retcodes[index]
            else:
                failed = retcodes.get(fun, 0)
            if failed and fun in SUB_EVENT:
                self._fire_ret_load_specific_fun(load, index)

    def _fire_ret_load_specific_fun(self, load: Mapping, fun_index: int = 0) -> None:
        if isinstance(load["fun"], list):
            fun = load["fun"][fun_index]
            if isinstance(load["retcode"], list):
                ret = load.get("return")
                ret = ret[fun_index] if isinstance(ret, list) and len(ret) > fun_index else {}
                retcode = load["retcode"][fun_index]
            else:
                ret = load.get("return", {}).get(fun, {})
                retcode = load["retcode"][fun]
        else:
            fun = load["fun"]
            ret = load.get("return", {})
            retcode = load["retcode"]
        if not isinstance(ret, dict):
            log.error("Event with bad payload received from '%s': %s", load.get("id", "UNKNOWN"),
                      "".join(ret) if isinstance(ret, list) else ret)
            return
        try:
            for state_tag, data in ret.items():
                data["retcode"] = retcode
                parts = state_tag.split("_|-")
                if data.get("result") is False:
                    self.fire_event(data, f"{parts[0]}.{parts[-1]}")
                    data["jid"] = load["jid"]
                    data["id"] = load["id"]
                    data["success"] = False
                    data["return"] = f"Error: {parts[0]}.{parts[-1]}"
                    data["fun"] = fun
                    if "user" in load:
                        data["user"] = load["user"]
                    self.fire_event(data, tagify([load["jid"], "sub", load["id"], "error", fun],
                                                 "job"))
        except Exception as exc:    # Salt logs any failure here, whatever it is
            import logging
            log.error("Event from '%s' iteration failed with exception: %s",
                      load.get("id", "UNKNOWN"), exc, exc_info=log.isEnabledFor(logging.DEBUG))

    # -- asyncio face: the same steps, driven by the event loop

    def _loop(self) -> Any:
        """Return the asyncio loop: io_loop, else the running one, else a new one we own."""
        if self.io_loop is None:
            import asyncio
            try:
                self.io_loop = asyncio.get_running_loop()
            except RuntimeError:
                self.io_loop = asyncio.new_event_loop()
                self._own_loop = True
        return self.io_loop

    async def _drive_async(self, steps: Iterator) -> Any:
        """Run a steps generator on the event loop; return its value."""
        import asyncio
        try:
            step = next(steps)
            while True:
                if step.__class__ is float:
                    await asyncio.sleep(step)
                    step = steps.send(None)
                else:
                    step = steps.send(await self._wait_fd_async(*step))
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()

    async def _wait_fd_async(self, sock: socket.socket, write: bool,
                             timeout: float | None) -> bool:
        """Wait on the loop until *sock* is ready; False on timeout.  destroy() wakes it."""
        loop = self._loop()
        fd = sock.fileno()
        if fd < 0 or self._closed:
            return True
        future = loop.create_future()

        def wake(value: bool) -> None:
            if not future.done():
                future.set_result(value)

        (loop.add_writer if write else loop.add_reader)(fd, wake, True)
        timer = None if timeout is None else loop.call_later(max(timeout, 0.0), wake, False)
        self._waiters[future] = (fd, write)
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiters.pop(future, None) is not None:
                (loop.remove_writer if write else loop.remove_reader)(fd)

    def _forget_fd(self, sock: socket.socket) -> None:
        """Stop the loop watching *sock* before it is closed."""
        fd = sock.fileno()
        if fd >= 0:
            self._release_loop(fd)

    def _release_loop(self, fd: int | None = None) -> None:
        """Wake the waiters on *fd* (on every fd if None) and drop the handler's reader."""
        loop = self.io_loop
        if loop is None or loop.is_closed():
            return
        for future, (wfd, write) in list(self._waiters.items()):
            if fd is None or wfd == fd:
                del self._waiters[future]
                self._call_in_loop(self._wake_waiter, future, wfd, write)
        handler_fd = self._handler_fd
        if handler_fd is not None and (fd is None or fd == handler_fd):
            self._handler_fd = None
            self._call_in_loop(loop.remove_reader, handler_fd)

    def _wake_waiter(self, future: Any, fd: int, write: bool) -> None:
        (self.io_loop.remove_writer if write else self.io_loop.remove_reader)(fd)
        if not future.done():
            future.set_result(True)

    def _call_in_loop(self, func: Callable, *args: Any) -> None:
        """Call *func* now if on the loop's thread (or the loop is idle), else soon, safely."""
        import asyncio
        loop = self.io_loop
        if asyncio._get_running_loop() is loop or not loop.is_running():
            func(*args)
        else:
            loop.call_soon_threadsafe(func, *args)

    def _close_async(self) -> None:
        """Wake every waiter, cancel our tasks, close the loop if we made it."""
        loop = self.io_loop
        if loop is None or loop.is_closed():
            return
        self._release_loop()
        for task in list(self._tasks):
            self._call_in_loop(task.cancel)
        if self._own_loop and not self.keep_loop and not loop.is_running():
            loop.close()

    def _spawn(self, coro: Any) -> None:
        task = self._loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: Any) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("event handler on %s raised", self._bus.path,
                      exc_info=(type(exc), exc, exc.__traceback__))

    def set_event_handler(self, handler: Callable) -> None:
        """Call ``handler(raw)`` on the loop for every event on the bus.

        As in Salt, *raw* is the event's wire frame: ``tag, data = event.unpack(raw)``.
        *handler* may be a plain function or a coroutine function; an exception it
        raises is logged with its traceback and later events still come.
        """
        self._reopen()
        loop = self._loop()
        if self._pub is None and not self.connect_pub(timeout=_CONNECT_TIMEOUT):
            raise BusClosedError(self._bus.path, "cannot listen")
        self._handler = handler
        self._watch_for_handler(loop)
        if self._events:
            loop.call_soon(self._dispatch)

    def _watch_for_handler(self, loop: Any) -> None:
        self._handler_fd = self._pub.sock.fileno()
        loop.add_reader(self._handler_fd, self._on_handler_readable)

    def _on_handler_readable(self) -> None:
        conn = self._pub
        if conn is None or self._closed:
            return
        try:
            conn.recv_into(self._events)
        except BlockingIOError:
            return
        except OSError:
            conn.eof = True
        self._account(conn)
        if conn.eof:
            self._release_loop(self._handler_fd)
            self._spawn(self._handler_resume())
        self._dispatch()

    def _dispatch(self) -> None:
        import inspect
        events = self._events
        while events and self._handler is not None and not self._closed:
            event = events.popleft()
            raw = _encode(event)
            try:
                result = self._handler(raw)
            except Exception:
                log.exception("event handler on %s raised on %s", self._bus.path, event["tag"])
                continue
            if inspect.isawaitable(result):
                self._spawn(result)

    async def _handler_resume(self) -> None:
        """Re-subscribe the handler's connection after a hand-off."""
        import asyncio
        delay = 0.01
        while not self._closed:
            try:
                await self._drive_async(self._resume_steps(None))
            except (SaltEventError, OSError) as exc:
                log.warning("listener on %s cannot resume yet: %s", self._bus.path, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if not self._closed:
                self._watch_for_handler(self.io_loop)
                self._dispatch()
            return

    async def fire_event_async(self, data: Mapping, tag: str, cb: Callable | None = None,
                               timeout: float | None = 1000) -> bool:
        """Fire like fire_event(), without blocking the loop.

        *cb* is accepted for compatibility and not called, as in Salt.
        """
        frame = self._frame(data, tag)
        self._reopen()
        deadline = None if timeout is None else time.monotonic() + max(timeout / 1000.0, 0.0)
        try:
            ok = await self._drive_async(self._send_steps(frame, 0, deadline))
        except (SaltEventError, OSError) as exc:
            return self._failed("event not sent", exc)
        if ok and self.node != "master" and tag.startswith("fire_master"):
            ok = await self._forward_to_master_async(data, timeout)
        return ok

    def _check_no_handler(self) -> None:
        if self._handler is not None:
            raise RuntimeError("set_event_handler() already consumes this object's events")

    async def get_event_async(self, wait: float = DEFAULT_WAIT, tag: str = "", full: bool = False,
                              match_type: str | None = None) -> dict | None:
        """Return like get_event(), awaiting on the loop; ``wait`` is the same hard deadline."""
        self._check_no_handler()
        match = _get_matcher(match_type or self._match_type)
        generation = self._reopen()
        event = await self._drive_async(self._while_current(
            self._get_event_steps(self._timeout(wait), tag, match, False), generation))
        if event is None or full:
            return event
        return event["data"]

    async def aiter_events(self, tag: str = "", full: bool = False,
                           match_type: str | None = None) -> Any:
        """Yield matching events as an async iterator; it ends when destroy() is called."""
        self._check_no_handler()
        match = _get_matcher(match_type or self._match_type)
        generation = self._reopen()
        while self._generation == generation:
            event = await self._drive_async(self._while_current(
                self._get_event_steps(None, tag, match, True), generation))
            if event is not None:
                yield event if full else event["data"]


class MasterEvent(SaltEvent):
    """The master bus of *sock_dir*."""

    def __init__(self, sock_dir: str | None, opts: Mapping | None = None, listen: bool = True,
                 io_loop: Any = None, keep_loop: bool = False, raise_errors: bool = False):
        super().__init__("master", sock_dir, opts, listen=listen, io_loop=io_loop,
                         keep_loop=keep_loop, raise_errors=raise_errors)


class LocalClientEvent(MasterEvent):
    """The master bus, as Salt's LocalClient uses it (the same as MasterEvent)."""


class MinionEvent(SaltEvent):
    """The minion bus of ``opts['id']`` in ``opts['sock_dir']``."""

    def __init__(self, opts: Mapping, listen: bool = True, io_loop: Any = None,
                 raise_errors: bool = False):
        super().__init__("minion", sock_dir=opts.get("sock_dir"), opts=opts, listen=listen,
                         io_loop=io_loop, raise_errors=raise_errors)


class NamespacedEvent:
    """Fire events under a fixed tag base: ``tagify(tag, base=base)``."""

    def __init__(self, event: SaltEvent, base: str, print_func: Callable | None = None):
        self.event = event
        self.base = base
        self.print_func = print_func

    def fire_event(self, data: Mapping, tag: str) -> bool:
        """Fire *data* at ``tagify(tag, base=self.base)``; call print_func(tag, data)."""
        ok = self.event.fire_event(data, tagify(tag, base=self.base))
        if self.print_func is not None:
            self.print_func(tag, data)
        return ok

    def destroy(self) -> None:
        self.event.destroy()

    def __enter__(self) -> NamespacedEvent:
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()


# -- Module-level functions ---------------------------------------------------


def get_event(node: str, sock_dir: str | None = None, opts: Mapping | None = None,
              listen: bool = True, io_loop: Any = None, keep_loop: bool = False,
              raise_errors: bool = False) -> SaltEvent:
    """Return a MasterEvent for node ``'master'``, else a SaltEvent for *node*."""
    sock_dir = sock_dir or (opts or {}).get("sock_dir")
    if node == "master":
        return MasterEvent(sock_dir, opts, listen=listen, io_loop=io_loop, keep_loop=keep_loop,
                           raise_errors=raise_errors)
    return SaltEvent(node, sock_dir, opts, listen=listen, io_loop=io_loop, keep_loop=keep_loop,
                     raise_errors=raise_errors)


def get_master_event(opts: Mapping, sock_dir: str | None, listen: bool = True,
                     io_loop: Any = None, raise_errors: bool = False,
                     keep_loop: bool = False) -> MasterEvent:
    """Return a MasterEvent for *sock_dir*."""
    return MasterEvent(sock_dir, opts, listen=listen, io_loop=io_loop, raise_errors=raise_errors,
                       keep_loop=keep_loop)


def fire_args(opts: Mapping, jid: str, tag_data: Mapping, prefix: str = "") -> None:
    """Fire *tag_data* at ``tagify([jid, 'args'], prefix)`` on the master bus; never raises."""
    tag = tagify([jid, "args"], prefix)
    try:
        with get_master_event(opts, opts.get("sock_dir"), listen=False) as event:
            event.fire_event(tag_data, tag)
    except (SaltEventError, OSError, ValueError, TypeError) as exc:
        log.warning("Failed to fire args event %s with data %s: %s", tag, tag_data, exc)


# -- CLI ----------------------------------------------------------------------

_EXAMPLES = {
    "fire": """examples:
  saltevent fire '{"data": "message to be sent in the event"}' mytag
  saltevent fire user=alice ok=true count=3 myco/deploy/done""",
    "fire-master": """examples:
  saltevent fire-master '{"data": "message for the master"}' mytag
  saltevent fire-master --id web1 status=ok myco/web1/health""",
    "listen": """examples:
  saltevent listen                          # every event, as salt-run state.event
  saltevent listen 'salt/job/*/ret/*' --pretty
  saltevent listen 'myco/.*' --count 1 --quiet && echo done
  saltevent listen | while IFS=$'\\t' read -r tag data; do echo "$tag"; done""",
    "bus": """examples:
  saltevent bus -v                          # until SIGTERM or Ctrl-C
  saltevent bus --sock-dir /var/run/salt/master""",
    "stats": """examples:
  saltevent stats
  saltevent stats --json""",
}


class _Terminated(BaseException):
    """SIGTERM arrived: unwind, closing (and handing off) what we hold."""


class _UsageError(Exception):
    """Wrong arguments that argparse cannot see."""


def _build_parser() -> Any:
    import argparse
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sock-dir", help="directory of the bus sockets (default: "
                        "$SALTEVENT_SOCK_DIR, Salt's, or a private one)")
    common.add_argument("--node", choices=("master", "minion"),
                        help="which bus: the master's or a minion's")
    common.add_argument("--id", help="minion id of a minion bus (default: the host name)")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-vv for debug)")
    parser = argparse.ArgumentParser(
        prog="saltevent", description="SaltStack's event bus on this host: fire, listen, "
        "run a broker, read its figures.")
    parser.add_argument("--version", action="version", version=f"saltevent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, help_: str) -> Any:
        return commands.add_parser(name, parents=[common], help=help_, description=help_,
                                   epilog=_EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    for name, help_ in (("fire", "fire an event on a bus (salt-call event.fire)"),
                        ("fire-master", "fire an event on the minion bus, forwarded to the "
                                        "master bus (salt-call event.fire_master)")):
        sub = command(name, help_)
        sub.add_argument("args", nargs="+", metavar="DATA... TAG",
                         help="a JSON object, or key=value pairs (values parsed as JSON when "
                              "they parse), then the tag")
    sub = command("listen", "print events as salt-run state.event does: tag, TAB, JSON data")
    sub.add_argument("tagmatch", nargs="?", metavar="TAGMATCH",
                     help="glob, else whole-string regex, on the tag (default: everything)")
    sub.add_argument("--match-type", choices=sorted(_MATCHERS),
                     help="match TAGMATCH with this API match type instead")
    sub.add_argument("--pretty", action="store_true", help="sorted keys, indented JSON")
    sub.add_argument("--count", type=int, default=-1, metavar="N",
                     help="exit 0 after N matching events")
    sub.add_argument("--quiet", action="store_true", help="print nothing")
    command("bus", "run a standalone broker in the foreground until SIGTERM/SIGINT")
    sub = command("stats", "print the running broker's figures")
    sub.add_argument("--json", action="store_true", help="one JSON object, for machines")
    return parser


def _cli_opts(args: Any) -> dict:
    opts = {}
    if args.sock_dir:
        opts["sock_dir"] = args.sock_dir
    opts["id"] = args.id or socket.gethostname()   # salt-call's id defaults to the host's
    return opts


def _cli_bus(args: Any, node: str) -> _Bus:
    opts = _cli_opts(args)
    sock_dir = _resolve_sock_dir(opts.get("sock_dir"), node)
    return _Bus(sock_dir, _bus_name(node, opts))


def _parse_data(items: list) -> dict:
    """Return the event data of the CLI's DATA words; ValueError if not an object."""
    if len(items) == 1:
        try:
            data = json.loads(items[0])
        except ValueError:
            data = None
        else:
            if not isinstance(data, dict):
                raise ValueError(f"DATA must be a JSON object, not {items[0]!r}")
            return data
    data = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"DATA must be a JSON object or key=value pairs, not {item!r}")
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    return data


def _cmd_fire(args: Any, node: str, master: bool) -> int:
    if len(args.args) < 2:
        raise _UsageError("DATA and TAG are both required")
    data, tag = _parse_data(args.args[:-1]), args.args[-1]
    with SaltEvent(node, args.sock_dir, _cli_opts(args), listen=False,
                   raise_errors=True) as event:
        if master:
            event.fire_master(data, tag)
        else:
            event.fire_event(data, tag)
    return 0


def _tag_filter(args: Any) -> Callable[[str], bool]:
    """Return the listen command's test of a tag, as Salt's state.event does it."""
    if args.match_type:
        match, pattern = _get_matcher(args.match_type), args.tagmatch or ""
        return lambda tag: match(tag, pattern)
    pattern = args.tagmatch or "*"
    import fnmatch
    import re
    try:
        regex = re.compile(r"\A(?:" + pattern + r")\Z")
    except re.error:
        regex = None
    return lambda tag: fnmatch.fnmatch(tag, pattern) or bool(regex and regex.match(tag))


def _cmd_listen(args: Any, node: str) -> int:
    wanted = _tag_filter(args)
    if args.pretty:
        dump = lambda data: json.dumps(data, ensure_ascii=False, sort_keys=True, indent=4)  # noqa: E731
    else:
        dump = lambda data: json.dumps(data, ensure_ascii=False)  # noqa: E731
    out = sys.stdout
    count = 0
    with SaltEvent(node, args.sock_dir, _cli_opts(args), raise_errors=True) as event:
        if args.count == 0:
            return 0
        for found in event.iter_events(full=True):
            tag = found["tag"]
            if not wanted(tag):
                continue
            if not args.quiet:
                try:
                    out.write(f"{tag}\t{dump(found['data'])}\n")
                    out.flush()
                except BrokenPipeError:
                    # The reader left (| head -1): stop quietly, and keep the
                    # interpreter from failing to flush stdout again at exit.
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, out.fileno())
                    os.close(devnull)
                    return 0
            count += 1
            if count == args.count:
                return 0
    return 0


def _cmd_bus(args: Any, node: str) -> int:
    import signal
    bus = _cli_bus(args, node)
    _ensure_sock_dir(os.path.dirname(bus.path))
    elected = _elect(bus)
    if elected is None:
        raise SaltEventError(f"a broker already runs for {bus.path}")
    broker = Broker(bus, *elected)
    log.info("serving %s (pid %d); SIGTERM or Ctrl-C hands off and stops", bus.path,
             os.getpid())
    previous = {sig: signal.signal(sig, lambda *_: broker.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        broker.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if broker._error is not None:
        raise SaltEventError(f"the broker stopped on an error: {broker._error}")
    log.info("handed off %s", bus.path)
    return 0


def _cmd_stats(args: Any, node: str) -> int:
    bus = _cli_bus(args, node)
    try:
        conn = _Conn(_connect(bus.path))
    except OSError:
        raise SaltEventError(f"no broker runs for {bus.path}") from None
    try:
        conn.sock.sendall(_encode({"ctl": "stats"}))
        deadline = time.monotonic() + _CONNECT_TIMEOUT
        msg = _drive(_control_steps(conn, "stats", deadline, collections.deque(), bus.path))
    except EventTimeout:
        msg = None
    finally:
        conn.close()
    if msg is None:
        raise SaltEventError(f"the broker of {bus.path} did not answer")
    stats = msg["stats"]
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return 0
    rows = [("bus", stats["bus"]), ("broker pid", stats["pid"]),
            ("uptime", f"{stats['uptime']:.1f} s"), ("clients", stats["clients"]),
            ("listeners", stats["listeners"]), ("events in", stats["events_in"]),
            ("events out", stats["events_out"]), ("bytes in", stats["bytes_in"]),
            ("bytes out", stats["bytes_out"]), ("dropped", stats["dropped"])]
    for name, value in rows:
        print(f"{name:<11} {value}")
    for item in stats["per_listener"]:
        print(f"listener    pid {item['pid']}: {item['events_out']} events out, "
              f"{item['dropped']} dropped, {item['queued_bytes']} bytes queued")
    return 0


def main(argv: list | None = None) -> int:
    """Run the command line; return the exit code (2: usage, 1: runtime error)."""
    import signal
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose > 1
                            else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = args.node or ("minion" if args.command == "fire-master" else "master")

    def terminate(*_: Any) -> None:
        raise _Terminated()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main else None
    try:
        if args.command in ("fire", "fire-master"):
            return _cmd_fire(args, node, args.command == "fire-master")
        if args.command == "listen":
            return _cmd_listen(args, node)
        if args.command == "bus":
            return _cmd_bus(args, node)
        return _cmd_stats(args, node)
    except _UsageError as exc:
        parser.error(str(exc))
    except (SaltEventError, OSError, ValueError, TypeError) as exc:
        print(f"saltevent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 143
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.modules.setdefault("saltevent", sys.modules["__main__"])
    sys.exit(main())
