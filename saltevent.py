"""SaltStack's event bus as one pure-stdlib module: ``salt.utils.event`` without ZeroMQ.

Wire format.  A bus (sock_dir, node, minion id) is one AF_UNIX stream socket,
``<sock_dir>/saltevent-master.sock`` or ``saltevent-minion-<idhash>.sock``, with its
election lock ``.lock`` and hand-off state ``.state`` beside it (Salt's ``*.ipc``
names are never used).  Every frame is an 8-byte header ``kind:u8 0:u8 taglen:u16
bodylen:u32`` (network order), the tag, then the body; ``MAX_FRAME_BYTES`` at most.
Kind ``E`` is an event: a UTF-8 tag and a UTF-8 JSON object, its data.  Kind ``C`` is
a control frame, a JSON object ``{"ctl": name, ...}`` of at most 64 KiB.  Kind ``S``
(broker to listener only) carries a u64, the sequence number of the next event.
Kind ``B`` (broker to listeners that ask for it in their ``sub``) is a bundle of
events: ``nonce:16 ASCII, count:u32, tagbytes:u32``, the tags as one JSON list, then
the events' data as they came, ``[D1,"nonce",D2,"nonce",...]`` (see ``_bundle``).
Clients send events and the controls ``sub`` and ``stats``; the broker relays
events byte for byte and alone sends ``hello``, ``ok``, ``drop``, ``gap``, ``bye``,
``stats`` and ``refused``, so no client can forge what a listener trusts.

Usage::

    import saltevent
    event = saltevent.MasterEvent('/var/run/salt/master')
    data = event.get_event(wait=10, tag='auth')
    event.fire_event({'sample-msg': 'this is a test'}, 'tag')

saltevent's own opts keys (Salt ignores them) are listed in ``SALTEVENT_OPTS`` with
their defaults; the README explains each.  License: Apache-2.0.
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = [
    # Constants
    "DEFAULT_BACKLOG_BYTES", "DEFAULT_MAX_CLIENTS", "DEFAULT_MAX_EVENT_SIZE",
    "DEFAULT_RING_BYTES", "DEFAULT_RING_EVENTS", "DEFAULT_WAIT", "GAP_TAG", "MAX_FRAME_BYTES",
    "MAX_TAG_BYTES", "SALT", "SALTEVENT_OPTS", "SUB_EVENT", "TAGEND", "TAGPARTER", "TAGS",
    # Exceptions
    "SaltEventError", "EventTimeout", "BusClosedError", "FrameError",
    # Tags
    "tagify",
    # Broker
    "Broker",
    # Clients
    "Gap", "SaltEvent", "MasterEvent", "LocalClientEvent", "MinionEvent", "NamespacedEvent",
    # Module-level functions
    "get_event", "get_master_event", "fire_args", "main",
    # Bridge to Salt
    "BRIDGE_MARK", "Bridge", "BridgeError",
]

import atexit
import collections
import errno
import json
import json.scanner
import os
import select
import selectors
import socket
import stat
import struct
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
    events never logs, and ``logging`` is the largest import it would pay for.
    It stays the module's ``log`` for good, so ``mock.patch.object(saltevent.log, ...)``
    works as it does on ``salt.utils.event.log``."""

    _logger = None

    def __getattr__(self, name: str) -> Any:
        logger = _Log._logger
        if logger is None:
            import logging
            logger = _Log._logger = logging.getLogger("saltevent")
        return getattr(logger, name)


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
DEFAULT_BACKLOG_BYTES = 32 << 20       # bytes the broker queues for one listener, at most
DEFAULT_MAX_CLIENTS = 4096             # connections one broker serves at once
DEFAULT_RING_EVENTS = 10_000           # recent events a broker keeps for replay
DEFAULT_RING_BYTES = 16 << 20          # bytes of those, at most
MAX_FRAME_BYTES = 16 << 20             # bytes, one frame on the wire (header included)
MAX_TAG_BYTES = 0xFFFF                 # bytes of one tag, UTF-8
#: The tag of the in-band notice of missed events (opts ``saltevent_gap_events``).
GAP_TAG = "saltevent/gap"

#: saltevent's own opts keys and their defaults (Salt ignores them).
SALTEVENT_OPTS = {
    "saltevent_backlog_bytes": DEFAULT_BACKLOG_BYTES,   # a listener's backlog (<= the broker's)
    "saltevent_tags": None,              # tag prefixes/globs a listener wants; None: all
    "saltevent_replay_last": None,       # on connect, first replay the last N events
    "saltevent_replay_since": None,      # ... or every event after this sequence number
    "saltevent_replay_epoch": None,      # the epoch that number belongs to (None: current)
    "saltevent_seq": False,              # add 'seq' and 'epoch' to full=True results
    "saltevent_gap_events": False,       # return a GAP_TAG event where events were missed
    "saltevent_ring_events": DEFAULT_RING_EVENTS,      # broker settings, used by the
    "saltevent_ring_bytes": DEFAULT_RING_BYTES,        # process that becomes the broker
    "saltevent_max_clients": DEFAULT_MAX_CLIENTS,
    "saltevent_broker_backlog_bytes": DEFAULT_BACKLOG_BYTES,
    "saltevent_broker": "thread",        # or "process": a broker of its own (see README)
    "saltevent_idle_exit": None,         # seconds a broker with no clients lives on
}

_CONNECT_TIMEOUT = 5.0                 # seconds, a constructor's connect_pub()
_RECONNECT_TIMEOUT = 2.0               # seconds, one transparent reconnect after a hand-off
_HANDOFF_QUIET = 0.1                   # seconds of silence that end a hand-off's input drain
_HANDOFF_TIMEOUT = 1.0                 # seconds, hard limit of that drain
_HANDOFF_GRACE = 10.0                  # seconds a successor keeps the events it was handed
_BYE_CHECK_INTERVAL = 0.02             # seconds between a firer's checks for a hand-off
_PATH_CHECK_INTERVAL = 0.5             # seconds between a broker's checks of its paths
_ACCEPT_BACKOFF = 0.1                  # seconds without accept() after running out of fds
_FRAME_STALL = 10.0                    # seconds a client may leave a frame unfinished
_EVICT_AGE = 1.0                       # seconds before an unfinished frame may be evicted
_WARN_INTERVAL = 10.0                  # seconds between repeats of one broker warning
_RECV_BYTES = 256 << 10                # bytes per recv()
_BIG_FRAME = 64 << 10                  # bytes: a frame this large gets a buffer of its own
_SCRATCH_BYTES = _RECV_BYTES + _BIG_FRAME  # the broker's receive buffer: a read and a head
_IOV_MAX = 512                         # buffers per sendmsg()
_SEND_BYTES = 256 << 10                # bytes offered to one sendmsg(), about a socket's fill
_INPUT_BUDGET = 40 << 20               # bytes of unfinished frames held for all clients
_CONTROL_BUDGET = 8 << 20              # bytes of control replies queued for all clients
_MAX_CONTROL_BYTES = 64 << 10          # bytes, one control frame
_BLOCK_COST = 256                      # bytes an event block costs beyond its own (the
                                       # objects; many tiny blocks must count)
_MAX_SEQ = 1 << 62                     # numbers in a hand-off state stay below: far
                                       # below what a client accepts (2**63), whatever
                                       # number of events comes after
_MAX_STATE_HEAD_BYTES = 4 << 20        # bytes, the head of a hand-off state file (every
                                       # listener's id and drops)
_MAX_TAG_FILTERS = 64                  # tag filters one listener may declare ...
_MAX_TAG_FILTER_CHARS = 4096           # ... and their characters, all together
_FILTER_COST = 128                     # bytes one declared filter holds in the broker
_FILTER_BUDGET = 8 << 20               # bytes all listeners' filters may hold, together,
_FILTER_SHARES = 4                     # and the part of it one client process may use
_GLOB_PIECES = 1024                    # pieces (between '*') of the different globs all
                                       # listeners declared, one with '?' or '[...]' a
                                       # piece per character: what matching a tag may cost
_GLOB_TAG_CHARS = 256                  # a longer tag passes globs on their literal start
                                       # in the broker; the listener matches it in full
_SCAN_SHARE = 0.1                      # of the broker's time, at most, for replays (which
_SCAN_BURST = 0.05                     # may cut ring blocks: for tags, bundles into event
                                       # frames, a start inside a block); and the seconds
                                       # they may take at once (then they wait)
_CACHED_TAG_CHARS = 256                # longer tags are not kept in the tag caches
_BUNDLE_EVENTS = 16                    # the broker bundles (see _bundle) a block of this
_BUNDLE_LISTENERS = 1                  # many events or more, for this many listeners or
_BUNDLE_MIN_AVG = 64                   # more, when its frames are this big on average
_BUNDLE_MAX_AVG = 4 << 10              # (bytes): bigger ones go as they came, tinier ones
                                       # would swell; fewer are batched by the listener
_BATCH_EVENTS = 256                    # queued events a listener decodes in one call ...
_BATCH_BYTES = 64 << 10                # ... and their bytes, at most
_TOTAL_BACKLOG_FACTOR = 4              # all listeners' queues: this many backlogs at most
_STATS_LISTENERS = 100                 # listeners detailed in one stats reply, at most
_SPAWNED_IDLE_EXIT = 5.0               # seconds a spawned broker process outlives its clients

_SOCK_PREFIX = "saltevent-"
_SOCK_SUFFIX = ".sock"
_LOCK_SUFFIX = ".lock"
_STATE_SUFFIX = ".state"
_SALT_SOCK_DIRS = {"master": "/var/run/salt/master", "minion": "/var/run/salt/minion"}
_ENV_SOCK_DIR = "SALTEVENT_SOCK_DIR"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
#: where shutdown(SHUT_RD) makes a peer's later send fail (EPIPE) and keeps what it sent
_SHUT_RD_REFUSES = sys.platform.startswith("linux")
_sched_yield = getattr(os, "sched_yield", None)

_DEFAULT_OPTS = {
    "hash_type": "sha256",
    "event_match_type": "startswith",
    "max_event_size": DEFAULT_MAX_EVENT_SIZE,
}

# -- Exceptions ---------------------------------------------------------------


class SaltEventError(Exception):
    """Base class of saltevent's errors."""


class EventTimeout(SaltEventError, TimeoutError):
    """No bus could be reached, or an event sent, within the timeout."""

    def __init__(self, path: str, timeout: float | None, what: str = "no event bus"):
        super().__init__(path, timeout)
        self.path = path
        self.timeout = timeout
        self.what = what

    def __str__(self) -> str:
        if self.timeout is None:
            return f"{self.what} at {self.path}"
        return f"{self.what} at {self.path} within {self.timeout:g} s"


class BusClosedError(SaltEventError, ConnectionError):
    """The bus connection is closed or broken, or the bus cannot be used."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"event bus {self.path}: {self.reason}"


class FrameError(SaltEventError, ValueError):
    """A frame on the wire is malformed or oversized."""

    def __init__(self, reason: str, frame: bytes = b""):
        super().__init__(reason, frame)
        self.reason = reason
        self.frame = bytes(frame[:60])

    def __str__(self) -> str:
        if self.frame:
            return f"{self.reason}: {self.frame!r}"
        return self.reason


# -- Framing ------------------------------------------------------------------
#
# Every byte that arrives on a socket goes through _FrameReader; every frame sent is
# made by _encode_event, _encode_control or _SEQ_MARK.

_HDR = struct.Struct("!BBHI")          # kind, flags (0), tag length, body length
_HDR_SIZE = _HDR.size
_SEQ_MARK = struct.Struct("!BBHIQ")    # an S frame whole: header and the u64
_SEQ = struct.Struct("!Q")
_EVENT = 0x45                          # b"E"
_CONTROL = 0x43                        # b"C"
_MARK = 0x53                           # b"S"
_BUNDLE = 0x42                         # b"B"
_BUNDLE_HEAD = struct.Struct("!16sII") # a B frame's body begins: nonce, events, tag bytes
_LBRACE = 0x7B
_RBRACE = 0x7D
_RBRACKET = 0x5D
_COMMA = 0x2C
_encode_ascii_str = json.encoder.encode_basestring_ascii


def _json_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    # One reusable C encoder, without the circular-reference markers that cost a fresh
    # encoder per call (recursion is caught where events are encoded).  It writes
    # ASCII: the fastest path of the C encoder and of str.encode, and text UTF-8
    # cannot hold (lone surrogates, as os.fsdecode makes) travels as \udXXX escapes.
    _c_encode = _c_make_encoder(None, _json_default, json.encoder.encode_basestring_ascii,
                                None, ":", ",", False, False, True)

    def _json_encode(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))
else:  # pragma: no cover - interpreters without the C accelerator
    _json_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

_scan_once = json.scanner.make_scanner(json.JSONDecoder())


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


def _encode_body(data: Any) -> bytes:
    """Return *data* as JSON (ASCII); TypeError names a value JSON cannot carry."""
    try:
        return _json_encode(data).encode()
    except TypeError:
        where = _json_path_error(data) or ""
        raise TypeError(f"event data{where} is not JSON serializable "
                        "(events carry dicts, lists, str, numbers, bool and None)") from None
    except (RecursionError, ValueError) as exc:
        raise ValueError(f"event data cannot be encoded: {exc}") from None


def _encode_tag(tag: str) -> bytes:
    try:
        raw = tag.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"tag {tag!r} is not valid text: {exc.reason} at index "
                         f"{exc.start}") from None
    if len(raw) > MAX_TAG_BYTES:
        raise ValueError(f"tag of {len(raw)} bytes; a tag has at most {MAX_TAG_BYTES}")
    return raw


def _encode_event(tag: str, data: Any) -> bytes:
    """Return the E frame of one event."""
    raw_tag = _encode_tag(tag)
    body = _encode_body(data)
    return _HDR.pack(_EVENT, 0, len(raw_tag), len(body)) + raw_tag + body


def _encode_control(msg: dict) -> bytes:
    """Return the C frame of *msg*."""
    body = _json_encode(msg).encode()
    return _HDR.pack(_CONTROL, 0, 0, len(body)) + body


# A bundle (B frame) carries a run of small events from the broker to the listeners that
# get all of them, so that each listener decodes them with two calls of the C scanner
# instead of cutting and checking every frame: the broker does that once, for all.  Its
# body: the ``_BUNDLE_HEAD`` (a nonce, the number of events, the length of the tag list),
# the tags as one JSON list (the broker writes them: ASCII, escaped), then the events'
# data as they came, joined by the nonce: ``[D1,"N",D2,"N",...,Dn,"N"]``.  The broker
# does not parse the data (a firer may have sent anything between the braces), so the
# nonce does what it does in a listener's batch decode (_decode_joined): it is new for
# every bundle, from the OS's random source, and no client sees it before the bundle
# goes out (after its data arrived), so no firer could know it; the data counts only if
# the nonce stands after each body and nowhere else, as many times as there are events.
# Else (or for a listener that filters tags itself) the bodies are cut at the nonces,
# which cannot occur inside them, and decoded one by one as event frames are.
def _bundle(payload: Any, count: int, nonce: bytes, cache: dict) -> bytes:
    """Return the B frame of the *count* event frames *payload*, joined by *nonce*;
    *cache* keeps the JSON text of short tags (raw tag -> text)."""
    tags = []
    bodies = []
    unpack = _HDR.unpack_from
    size = len(payload)
    off = 0
    while off < size:
        _kind, _flags, taglen, bodylen = unpack(payload, off)
        start = off + _HDR_SIZE
        body = start + taglen
        off = body + bodylen
        raw = payload[start:body]
        text = cache.get(raw)
        if text is None:
            text = _encode_ascii_str(raw.decode())      # (checked UTF-8 on the way in)
            if taglen <= _CACHED_TAG_CHARS:
                if len(cache) >= 1024:
                    cache.clear()
                cache[raw] = text
        tags.append(text)
        bodies.append(payload[body:off])
    tag_list = ("[" + ",".join(tags) + "]").encode()
    data = _join_bodies(bodies, nonce)
    head = _BUNDLE_HEAD.pack(nonce, count, len(tag_list))
    return b"".join((_HDR.pack(_BUNDLE, 0, 0, len(head) + len(tag_list) + len(data)),
                     head, tag_list, data))


def _bundle_parts(data: Any, body: int, end: int) -> tuple:
    """Return ``(nonce, tags, bodies)`` of the B frame body ``data[body:end]``: the nonce
    as text, the tags a list of str, the bodies the bytes of the joined data.  Raises
    FrameError for a malformed bundle (only a broker makes them: a broken one)."""
    if end - body < _BUNDLE_HEAD.size:
        raise FrameError("malformed bundle of events", data[body:end])
    nonce, count, tags_len = _BUNDLE_HEAD.unpack_from(data, body)
    at = body + _BUNDLE_HEAD.size
    tags = stop = None
    if count and nonce.isalnum() and at + tags_len <= end:
        try:
            tags, stop = _scan_once(data[at:at + tags_len].decode("ascii"), 0)
        except (ValueError, StopIteration, RecursionError):
            pass
    if (tags.__class__ is not list or stop != tags_len or len(tags) != count
            or set(map(type, tags)) != {str} or not _frame_tags(tags)):
        raise FrameError("malformed bundle of events", data[body:body + 60])
    return nonce.decode(), tags, data[at + tags_len:end]


def _frame_tags(tags: list) -> bool:
    """True if every tag (str) could travel in an event frame: UTF-8 text of 1 to
    ``MAX_TAG_BYTES`` bytes."""
    if "" in tags:
        return False
    try:
        if max(map(len, tags)) * 4 <= MAX_TAG_BYTES:     # (at most 4 bytes a character)
            "".join(tags).encode()
            return True
        return all(len(tag.encode()) <= MAX_TAG_BYTES for tag in tags)
    except UnicodeEncodeError:
        return False


def _join_bodies(bodies: list, nonce: bytes) -> bytes:
    """Return event bodies joined by a *nonce* no sender could know, for one decode:
    ``[B1,"N",B2,"N",...,Bn,"N"]`` (a listener's batch, a broker's bundle)."""
    sep = b',"' + nonce + b'",'
    return b"[" + sep.join(bodies) + sep[:-1] + b"]"


def _decode_joined(joined: Any, nonce: str, count: int) -> list | None:
    """Return the data of *count* bodies joined by _join_bodies, decoded at once; None
    unless every body was exactly one JSON object: the nonce must stand after each
    body and nowhere else (a body that is two values, or opens a string or bracket
    the next one closes, would need the nonce to keep the count)."""
    try:
        text = joined.decode()
        values, stop = _scan_once(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return None
    if (values.__class__ is list and stop == len(text) and len(values) == 2 * count
            and values[1::2] == [nonce] * count):
        datas = values[0::2]
        if set(map(type, datas)) == {dict}:
            return datas
    return None


def _bundle_split(bodies: Any, nonce: str, count: int) -> list:
    """Return a bundle's *count* bodies (bytes), cut at the nonce that follows each."""
    sep = f',"{nonce}"'.encode()
    step = len(sep) + 1                        # and the ',' or ']' after it
    if bodies[:1] != b"[" or not bodies.endswith(sep + b"]"):
        raise FrameError("malformed bundle of events", bodies[:60])
    out = []
    find = bodies.find
    pos = 1
    for _ in range(count):
        stop = find(sep, pos)
        if stop < 0 or bodies[stop + len(sep)] != (_RBRACKET if len(out) == count - 1
                                                   else _COMMA):
            raise FrameError("malformed bundle of events", bodies[pos:pos + 60])
        out.append(bodies[pos:stop])
        pos = stop + step
    if pos != len(bodies):
        raise FrameError("malformed bundle of events", bodies[pos:pos + 60])
    return out


def _unbundle(frame: bytes) -> bytes:
    """Return the event frames of the B frame *frame* (for a hand-off state)."""
    nonce, tags, bodies = _bundle_parts(frame, _HDR_SIZE, len(frame))
    return b"".join(_HDR.pack(_EVENT, 0, len(raw_tag), len(raw)) + raw_tag + raw
                    for raw_tag, raw in zip((tag.encode() for tag in tags),
                                            _bundle_split(bodies, nonce, len(tags))))


def _decode_data(body: Any) -> dict:
    """Return an event's data from its body bytes; FrameError if it is not a JSON object."""
    try:
        text = body.decode() if body.__class__ is bytes else str(body, "utf-8")
        obj, end = _scan_once(text, 0)
    except UnicodeDecodeError:
        raise FrameError("frame body is not valid UTF-8", body) from None
    except (ValueError, StopIteration):
        raise FrameError("frame body is not JSON", body) from None
    except RecursionError:
        raise FrameError("frame body is nested too deeply", body) from None
    if end != len(text) or obj.__class__ is not dict:
        raise FrameError("frame body is not one JSON object", body)
    return obj


def _decode_control(body: Any) -> dict:
    """Return a control frame's message; FrameError unless it is ``{"ctl": str, ...}``."""
    obj = _decode_data(body)
    if obj.get("ctl").__class__ is not str:
        raise FrameError("control frame without a 'ctl' name", body)
    return obj


class _FrameReader:
    """Cut a byte stream into frames: the one door every received byte goes through.

    ``read(sock, limit)`` receives once and returns the frames it completed, each
    ``(kind, tag, data, start, body, end)``: the frame is ``data[start:end]``, its body
    ``data[body:end]``, and *tag* the decoded tag of an event (None otherwise).  A
    frame larger than ``_BIG_FRAME`` is completed in a buffer of its own size, so it is
    never copied; ``need`` is that size while the buffer is still to be made (the
    broker makes it with ``alloc()`` when its budget allows; clients at once).
    Raises FrameError for anything that is not a well-formed frame.
    """

    __slots__ = ("buf", "got", "head", "need", "max_frame", "eof", "since")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES):
        self.buf = None            # bytearray of a big frame being filled
        self.got = 0               # bytes of it received
        self.head = b""            # the start of a frame not yet in a buffer of its own
        self.need = 0              # size of the buffer that head waits for, if any
        self.max_frame = max_frame
        self.eof = False
        self.since = 0.0           # monotonic time the unfinished frame began

    @property
    def held(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self.buf) if self.buf is not None else len(self.head)

    def read(self, sock: socket.socket, limit: int = _RECV_BYTES,
             scratch: bytearray | None = None, sink: Any = None) -> list:
        """Receive at most *limit* bytes once; return the frames completed.

        With *scratch* (a buffer of at least ``_SCRATCH_BYTES``, reused from read to
        read: the caller copies out what it keeps) nothing is allocated per read.
        With *sink* (a client's connection) the frames go to it instead (see _parse).
        """
        buf = self.buf
        if buf is not None:
            n = sock.recv_into(memoryview(buf)[self.got:], min(limit, len(buf) - self.got))
            if not n:
                self.eof = True
                return []
            self.got += n
            if self.got < len(buf):
                return []
            self.buf = None
            self.got = 0
            return self._parse(buf, None, sink)
        if scratch is not None:
            head = self.head
            if head:
                scratch[:len(head)] = head
            n = sock.recv_into(memoryview(scratch)[len(head):], limit)
            if not n:
                self.eof = True
                return []
            return self._parse(scratch, len(head) + n)
        chunk = sock.recv(limit)
        if not chunk:
            self.eof = True
            return []
        if self.head:
            chunk = self.head + chunk
        return self._parse(chunk, None, sink)

    def alloc(self) -> None:
        """Move the unfinished big frame into a buffer of its own size."""
        head, size = self.head, self.need
        buf = bytearray(size)
        buf[:len(head)] = head
        self.buf, self.got, self.head, self.need = buf, len(head), b"", 0

    def _parse(self, data: Any, size: int | None = None, sink: Any = None) -> list:
        """Check and cut ``data[:size]`` into frames; keep an unfinished one's start.

        Without *sink* return the frames.  With one (a client's _Conn) each event goes
        straight to ``sink.append((tag, body, seq))``, numbered from ``sink.seq``, a
        bundle's to ``sink.bundle(data, body, end, seq)``, and every other frame to
        ``sink.control(kind, data, body, end, seq)``; both return the number of the last
        event.  Nothing is returned then.
        """
        frames = []
        if size is None:
            size = len(data)
        off = 0
        unpack = _HDR.unpack_from
        max_frame = self.max_frame
        if sink is not None:
            append, seq = sink.append, sink.seq
            view = data if data.__class__ is bytes else memoryview(data)   # never copy big
        try:
            while size - off >= _HDR_SIZE:
                kind, flags, taglen, bodylen = unpack(data, off)
                body = off + _HDR_SIZE + taglen
                end = body + bodylen
                if kind == _EVENT:
                    if not taglen or bodylen < 2 or flags:
                        raise FrameError("malformed event frame header", data[off:off + 16])
                    if end > size:                 # (a whole frame is no bigger than a read)
                        if end - off > max_frame:
                            raise FrameError(f"frame of {end - off} bytes exceeds the limit of "
                                             f"{max_frame}")
                        break
                    try:
                        tag = data[off + _HDR_SIZE:body].decode()
                    except UnicodeDecodeError:
                        raise FrameError("event tag is not valid UTF-8",
                                         data[off + _HDR_SIZE:body]) from None
                    if sink is not None:           # a client decodes the data itself
                        seq += 1
                        append((tag, view[body:end], seq))
                        off = end
                        continue
                    if data[body] != _LBRACE or data[end - 1] != _RBRACE:
                        raise FrameError("event data is not a JSON object", data[body:body + 40])
                elif kind == _BUNDLE:
                    if sink is None:               # the broker reads clients: not theirs
                        raise FrameError("a bundle of events (only a broker sends them)",
                                         data[off:off + 16])
                    if taglen or flags or bodylen < _BUNDLE_HEAD.size:
                        raise FrameError("malformed bundle frame header", data[off:off + 16])
                    if end > size:
                        if end - off > max_frame:
                            raise FrameError(f"frame of {end - off} bytes exceeds the limit of "
                                             f"{max_frame}")
                        break
                    seq = sink.bundle(data, body, end, seq)
                    off = end
                    continue
                elif kind == _CONTROL or kind == _MARK:
                    if taglen or flags or bodylen > _MAX_CONTROL_BYTES or (
                            kind == _MARK and bodylen != _SEQ.size):
                        raise FrameError("malformed control frame header", data[off:off + 16])
                    if end > size:
                        break
                    if sink is not None:
                        seq = sink.control(kind, data, body, end, seq)
                        off = end
                        continue
                    tag = None
                else:
                    raise FrameError(f"not a saltevent frame (kind byte 0x{kind:02x}; an older "
                                     "or newer saltevent, or not saltevent at all)",
                                     data[off:off + 16])
                frames.append((kind, tag, data, off, body, end))
                off = end
        finally:
            if sink is not None:
                sink.seq = seq             # (events queued before a bad frame count)
        if off == size:
            self.head = b""
            self.need = 0
        else:
            if off or not self.head:       # a new frame begins (not more of the last one)
                self.since = time.monotonic()
            self.head = bytes(memoryview(data)[off:size])
            self.need = 0
            if size - off >= _HDR_SIZE:
                total = end - off
                if total > _BIG_FRAME:
                    self.need = total
        return frames


_stamp_second = (-1, "")   # (second, its formatted prefix), replaced as a whole


def _stamp() -> str:
    """Return the time now as Salt 3008 stamps events:
    ``datetime.now(timezone.utc).isoformat()``."""
    global _stamp_second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached = _stamp_second
    if cached[0] != second:
        cached = _stamp_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                        time.gmtime(second)))
    micros = nanos // 1000
    return f"{cached[1]}.{micros:06d}+00:00" if micros else f"{cached[1]}+00:00"


_BYTES_OVERHEAD = 33                   # sys.getsizeof(b"") on 64-bit CPython: Salt's yardstick


def _too_big(body: bytes, max_size: int) -> bool:
    """True when an encoded event is over *max_size* as Salt measures it
    (``sys.getsizeof`` of the encoded bytes, our JSON standing in for its msgpack)."""
    return len(body) + _BYTES_OVERHEAD > max_size


def _trim(data: dict, max_size: int) -> list:
    """Trim *data* in place the way Salt's ``trim_dict`` does; return what was trimmed.

    Passes at 50%, 40%, ... 10% of *max_size*: a value whose ``sys.getsizeof`` is
    over that becomes ``'VALUE_TRIMMED'``, except dicts, which are trimmed the same
    way inside (copies: the caller's nested dicts are never changed).  It stops once
    the encoded event fits.
    """
    trimmed = []

    def trim(mapping: dict, limit: float, path: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                mapping[key] = value = dict(value)
                trim(value, limit, f"{path}{key}.")
            elif value != "VALUE_TRIMMED" and sys.getsizeof(value) > limit:
                mapping[key] = "VALUE_TRIMMED"
                trimmed.append(f"{path}{key}")

    percent = 50
    while percent > 0:
        trim(data, max_size * percent / 100, "")
        percent -= 10
        if not _too_big(_encode_body(data), max_size - 1):
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
    """``fnmatch.fnmatch`` (POSIX: case-sensitive), in time linear in the tag."""
    glob = _glob_cache.get(search_tag)
    if glob is None:
        glob = _Glob(search_tag)
        if len(_glob_cache) >= 256:
            _glob_cache.clear()
        _glob_cache[search_tag] = glob
    return glob.match(event_tag)


_glob_cache: dict = {}


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


_GLOB_CHARS = "*?["


def _tag_filter(pattern: str) -> tuple:
    """Return ``(literal prefix, compiled glob or None)`` of one declared tag filter.

    A pattern with ``*``, ``?`` or ``[`` is a glob on the whole tag (fnmatch, case
    sensitive); any other pattern is a prefix.
    """
    prefix = _glob_start(pattern)
    return prefix, None if prefix == pattern else _Glob(pattern)


def _glob_start(pattern: str) -> str:
    """The part of a declared tag filter before its first ``*``, ``?`` or ``[``."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=-1)
    return pattern if cut < 0 else pattern[:cut]


class _Glob:
    """One fnmatch pattern, matched in time linear in the tag's length.

    A listener matches its declared globs (and ``match_type='fnmatch'``, and the CLI
    its TAGMATCH) against tags that other clients choose, so a hostile tag must not be
    able to stall it: ``fnmatch.translate`` of ``*a*a*a...b`` backtracks exponentially
    on Python 3.8.  Here the pattern is cut at each ``*`` into pieces
    of fixed length; the first piece must match at the start, the last at the end,
    and each one between at its leftmost place after the one before, which finds a
    match whenever there is one.  A piece of plain characters is matched with str
    methods; one with ``?`` or ``[...]`` with a small regex, shared by every pattern
    that has the same piece.
    """

    __slots__ = ("head", "middle", "tail", "tail_len")

    def __init__(self, pattern: str):
        texts, lengths = _glob_pieces(pattern)
        pieces = [_glob_piece(text) if "?" in text or "[" in text else text
                  for text in texts]
        self.head = pieces[0]
        self.middle = pieces[1:-1]
        self.tail = pieces[-1] if len(pieces) > 1 else None
        self.tail_len = lengths[-1]

    def match(self, tag: str) -> bool:
        head = self.head
        if self.tail is None:                  # no '*': the whole tag
            if head.__class__ is str:
                return tag == head
            return head.fullmatch(tag) is not None
        if head.__class__ is str:
            if not tag.startswith(head):
                return False
            pos = len(head)
        else:
            found = head.match(tag)
            if found is None:
                return False
            pos = found.end()
        for piece in self.middle:
            if piece.__class__ is str:
                at = tag.find(piece, pos)
                if at < 0:
                    return False
                pos = at + len(piece)
            else:
                found = piece.search(tag, pos)
                if found is None:
                    return False
                pos = found.end()
        start = len(tag) - self.tail_len
        if start < pos:
            return False
        tail = self.tail
        if tail.__class__ is str:
            return tag.endswith(tail)
        return tail.fullmatch(tag, start) is not None


def _glob_pieces(pattern: str) -> tuple:
    """Cut *pattern* at each ``*`` outside ``[...]``: the pieces and their lengths in
    characters of a tag."""
    if "[" not in pattern:
        pieces = pattern.split("*")
        return pieces, [len(piece) for piece in pieces]
    pieces, lengths = [], []
    start = length = index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*":
            pieces.append(pattern[start:index - 1])
            lengths.append(length)
            start, length = index, 0
            continue
        if char == "[":                        # as fnmatch finds a set's end
            end = index
            if end < len(pattern) and pattern[end] == "!":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1
            end = pattern.find("]", end)
            if end >= 0:
                index = end + 1
        length += 1
    pieces.append(pattern[start:])
    lengths.append(length)
    return pieces, lengths


def _glob_cost(pattern: str) -> int:
    """What matching *pattern* against a tag may cost, in pieces: a piece between ``*``
    found with str methods counts one; one with ``?`` or ``[...]``, a regex tried at
    each place of the tag, as many as the characters of tag it matches."""
    return sum(max(1, length) if "?" in text or "[" in text else 1
               for text, length in zip(*_glob_pieces(pattern)))


_glob_piece_cache: dict = {}


def _glob_piece(text: str) -> Any:
    """The compiled regex of one piece of a glob (no ``*``), shared; ValueError if it
    cannot compile."""
    compiled = _glob_piece_cache.get(text)
    if compiled is not None:
        return compiled
    import fnmatch
    import re
    inner = re.fullmatch(r"\(\?s:(.*)\)\\[Zz]", fnmatch.translate(text), re.S)
    regex = inner.group(1) if inner is not None else re.escape(text)
    try:
        compiled = re.compile(f"(?s:{regex})")
    except re.error as exc:                    # e.g. a range backwards, on Python 3.8
        raise ValueError(f"bad tag glob piece {text!r}: {exc}") from None
    if len(_glob_piece_cache) >= 4096:
        _glob_piece_cache.clear()
    _glob_piece_cache[text] = compiled
    return compiled


def _literal_prefix(pattern: str) -> str:
    """Return what every tag a glob-or-regex *pattern* matches starts with: the part
    before its first special character, less the character a ``*``, ``?`` or ``{``
    after it makes optional; nothing if the pattern has a ``|``."""
    if "|" in pattern or "(?" in pattern:     # alternatives; flags that may apply to all
        return ""
    for index, char in enumerate(pattern):
        if char in "*?[]\\.^$+{}()|":
            return pattern[:index - 1] if char in "*?{" and index else pattern[:index]
    return pattern


def _glob_only(pattern: str) -> bool:
    """True if *pattern* has no character that means something only in a regex."""
    return not any(char in "\\.^$+{}()|" for char in pattern)


class _TagIndex:
    """Which filtered listeners want a tag: their filters indexed by the length of
    their literal start, then by the start, then by the pattern; each glob compiled and
    matched once per tag however many listeners declared it; answers cached per tag.
    ``glob_pieces`` counts the pieces (_glob_cost) of the different globs held: what
    one tag can cost to match.  Used on the broker thread only."""

    __slots__ = ("_by_len", "_lengths", "_cache", "globs", "glob_pieces")

    def __init__(self):
        self._by_len: dict = {}        # length -> {prefix: {pattern: [glob, (peer, ...)]}}
        self._lengths: list = []
        self._cache: dict = {}
        self.globs: dict = {}          # pattern -> [glob, listeners that declared it]
        self.glob_pieces = 0

    def __bool__(self) -> bool:
        return bool(self._lengths)

    def new_pieces(self, patterns: list) -> int:
        """The glob pieces that declaring *patterns* would add."""
        return sum(_glob_cost(pattern) for pattern in set(patterns)
                   if pattern not in self.globs and _glob_start(pattern) != pattern)

    def add(self, peer: Any, patterns: list) -> list:
        """Register *peer*'s declared *patterns*; return its filters, ``(prefix, glob or
        None)`` (ValueError, and nothing registered, if a glob cannot compile)."""
        filters = []
        fresh = {}
        for pattern in dict.fromkeys(patterns):
            prefix = _glob_start(pattern)
            glob = None
            if prefix != pattern:
                held = self.globs.get(pattern) or fresh.get(pattern)
                glob = held[0] if held else _Glob(pattern)
                fresh.setdefault(pattern, [glob, 0])
            filters.append((prefix, glob, pattern))
        for pattern, item in fresh.items():
            held = self.globs.setdefault(pattern, item)
            if held is item:
                self.glob_pieces += _glob_cost(pattern)
            held[1] += 1
        for prefix, glob, pattern in filters:     # (tuples: a listener's entry is small)
            entry = self._by_len.setdefault(len(prefix), {}).setdefault(prefix, {}).setdefault(
                pattern if glob is not None else "", [glob, ()])
            entry[1] += (peer,)
        self._lengths = sorted(self._by_len)
        self._cache.clear()
        return [(prefix, glob) for prefix, glob, _pattern in filters]

    def remove(self, peer: Any, patterns: list) -> None:
        for pattern in dict.fromkeys(patterns):
            prefix = _glob_start(pattern)
            key = pattern if prefix != pattern else ""
            by_prefix = self._by_len.get(len(prefix), {})
            table = by_prefix.get(prefix, {})
            entry = table.get(key)
            if entry is None or peer not in entry[1]:
                continue
            entry[1] = tuple(other for other in entry[1] if other is not peer)
            if not entry[1]:
                del table[key]
                if not table:
                    del by_prefix[prefix]
                    if not by_prefix:
                        del self._by_len[len(prefix)]
            if key:
                held = self.globs[pattern]
                held[1] -= 1
                if not held[1]:
                    del self.globs[pattern]
                    self.glob_pieces -= _glob_cost(pattern)
        self._lengths = sorted(self._by_len)
        self._cache.clear()

    def match(self, tag: str) -> tuple:
        """Return the peers whose filters match *tag*."""
        hit = self._cache.get(tag)
        if hit is not None:
            return hit
        found = {}                             # (a dict: ordered, no duplicates)
        by_len = self._by_len
        long_tag = len(tag) > _GLOB_TAG_CHARS
        for length in self._lengths:
            if length > len(tag):
                break
            table = by_len[length].get(tag[:length])
            if table:
                for glob, peers in table.values():
                    if glob is None or long_tag or glob.match(tag):
                        found.update(dict.fromkeys(peers))
        hit = tuple(found)
        if len(tag) <= _CACHED_TAG_CHARS:      # bounded: 4096 short tags at most
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[tag] = hit
        return hit


# -- Socket helpers: paths, peers, election -----------------------------------


class _Bus(tuple):
    """Where one bus lives: (path, lock_path, name); the state file sits beside them."""

    __slots__ = ()

    def __new__(cls, sock_dir: str, name: str):
        path = os.path.join(sock_dir, _SOCK_PREFIX + name + _SOCK_SUFFIX)
        lock_path = os.path.join(sock_dir, _SOCK_PREFIX + name + _LOCK_SUFFIX)
        return tuple.__new__(cls, (path, lock_path, name))

    path = property(lambda self: self[0])
    lock_path = property(lambda self: self[1])
    name = property(lambda self: self[2])
    state_path = property(lambda self: self[1][:-len(_LOCK_SUFFIX)] + _STATE_SUFFIX)


def _sun_path_max() -> int:
    """Bytes a socket path may have: ``sun_path`` less its NUL (108 on Linux, 104 elsewhere)."""
    return 107 if sys.platform.startswith("linux") else 103


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
    return os.path.join(tempfile.gettempdir(), f"saltevent-{os.geteuid()}")


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


_WAY_OUT = ("; choose a directory only you can write to, with sock_dir= (opts['sock_dir'], "
            "--sock-dir) or $SALTEVENT_SOCK_DIR")


def _ensure_sock_dir(sock_dir: str) -> None:
    """Create *sock_dir* 0700 when missing; refuse one another user could tamper with.

    The directory (after a symlink owned by us or root) must be ours or root's, and
    not writable by others unless it is sticky (like /tmp): in a sticky directory
    nobody can remove or replace our files, and the files themselves are checked.
    """
    if not hasattr(socket, "AF_UNIX") or fcntl is None:
        raise OSError(errno.ENOSYS, "saltevent needs AF_UNIX sockets and fcntl.flock "
                                    "(Linux, macOS, the BSDs)")
    me = os.geteuid()
    try:
        try:
            link = os.lstat(sock_dir)
        except FileNotFoundError:
            os.makedirs(sock_dir, mode=0o700, exist_ok=True)
            link = os.lstat(sock_dir)
        info = os.stat(sock_dir) if stat.S_ISLNK(link.st_mode) else link
    except OSError as exc:
        raise BusClosedError(sock_dir, f"cannot use sock_dir: {exc.strerror}{_WAY_OUT}") from exc
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
        raise BusClosedError(sock_dir, f"sock_dir is a symbolic link owned by uid "
                                       f"{link.st_uid}, not by you (uid {me}): another user "
                                       f"could redirect your events{_WAY_OUT}")
    if not stat.S_ISDIR(info.st_mode):
        raise BusClosedError(sock_dir, "sock_dir is not a directory")
    if info.st_uid not in (me, 0):
        raise BusClosedError(sock_dir, f"sock_dir is owned by uid {info.st_uid}, not by you "
                                       f"(uid {me}): its owner could intercept your "
                                       f"events{_WAY_OUT}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise BusClosedError(sock_dir, f"sock_dir is writable by other users (mode "
                                       f"{stat.S_IMODE(info.st_mode):o}) and not sticky: they "
                                       f"could replace the bus; chmod go-w it{_WAY_OUT}")


_CREDS = struct.Struct("3i")           # struct ucred: pid, uid, gid


def _peer_creds(sock: socket.socket) -> tuple:
    """Return ``(pid, uid)`` of the process at the other end of a unix socket; the pid
    is 0 where the platform does not tell it."""
    if hasattr(socket, "SO_PEERCRED"):
        pid, uid, _gid = _CREDS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        return pid, uid
    return 0, _peer_uid(sock)


def _peer_uid(sock: socket.socket) -> int:
    """Return the uid of the process at the other end of a unix socket."""
    if hasattr(socket, "SO_PEERCRED"):
        return _peer_creds(sock)[1]
    if hasattr(os, "getpeereid"):  # not in the stdlib today; kept for platforms that add it
        return os.getpeereid(sock.fileno())[0]
    if sys.platform == "darwin" or "bsd" in sys.platform:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
        if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
            raise OSError(ctypes.get_errno(), "getpeereid failed")
        return uid.value
    raise OSError(errno.ENOSYS, "cannot tell a unix socket peer's uid on this platform")


def _trusted(uid: int) -> bool:
    """True for our own uid and root's: the only peers a bus talks to."""
    return uid == os.geteuid() or uid == 0


_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOENT, errno.ECONNREFUSED)


def _connect(path: str) -> socket.socket | None:
    """Return a non-blocking socket connected to a broker of ours at *path*.

    None if nobody serves the path or its listen queue is full (try again); a
    socket served by another user raises BusClosedError, never to be used.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(path)
        if err in _BUSY:
            sock.close()
            return None
        if err == errno.EINPROGRESS:            # BSDs: finish the connect in a blink
            _wait_fd(sock, True, 0.1)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err in _BUSY or err == errno.EINPROGRESS:
                sock.close()
                return None
        if err:
            raise OSError(err, os.strerror(err), path)
        uid = _peer_uid(sock)
        if not _trusted(uid):
            raise BusClosedError(path, f"served by uid {uid}, not by you (uid "
                                       f"{os.geteuid()}): refusing to send or trust a byte"
                                       f"{_WAY_OUT}")
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


def _open_private(path: str, flags: int, what: str) -> int:
    """Open a file of ours in sock_dir without following links; check owner, type, links."""
    try:
        fd = os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BusClosedError(path, f"the {what} is a symbolic link; refusing to follow "
                                       f"it (remove it){_WAY_OUT}") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise BusClosedError(path, f"cannot open the {what}: {exc.strerror}; the "
                                       f"sock_dir belongs to someone else or is read-only"
                                       f"{_WAY_OUT}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BusClosedError(path, f"the {what} is not a regular file")
        if info.st_uid != os.geteuid():
            raise BusClosedError(path, f"the {what} is owned by uid {info.st_uid}, not by you "
                                       f"(uid {os.geteuid()}){_WAY_OUT}")
        if info.st_nlink != 1:
            raise BusClosedError(path, f"the {what} has {info.st_nlink} hard links; "
                                       "refusing a file that may be someone else's")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_stale_socket(path: str) -> None:
    """Unlink what a dead broker left at *path*; only the lock holder calls this."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise BusClosedError(path, "a directory is in the way of the bus socket")
    try:
        os.unlink(path)
    except OSError as exc:
        raise BusClosedError(path, f"cannot replace the stale file at the socket path "
                                   f"(owned by uid {info.st_uid}): {exc.strerror}"
                                   f"{_WAY_OUT}") from None
    log.debug("removed stale socket %s", path)


class _Election(tuple):
    """What winning a bus's election gives: (listening socket, lock fd, its path's
    identity).  The broker reads the predecessor's hand-off state on its own thread."""

    __slots__ = ()
    sock = property(lambda self: self[0])
    lock_fd = property(lambda self: self[1])
    ident = property(lambda self: self[2])

    def give_up(self, path: str) -> None:
        """Release what the election took (a broker could not start): the socket, its
        path if still ours, and the lock, so that another process can be elected."""
        self.sock.close()
        try:
            _unlink_if(path, self.ident)
        finally:
            os.close(self.lock_fd)


def _unlink_if(path: str, ident: Any) -> None:
    """Remove *path* if it still is the file *ident* names (it may vanish meanwhile)."""
    if ident is not None and _ident(path) == ident:
        try:
            os.unlink(path)
        except OSError:
            pass


def _ident(path: str) -> tuple | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _elect(bus: _Bus) -> _Election | None:
    """Take *bus*'s election lock and bind its socket; None if another process holds it.

    Race: processes that find no broker compete for ``flock(lock_path)``; the winner
    removes a stale socket file, binds, and keeps the lock for the broker's life; the
    losers retry their connect until it listens.  Only the lock holder unlinks the
    socket path, so a live broker's socket is never removed by another process.
    """
    if fcntl is None:
        raise OSError(errno.ENOSYS, "saltevent needs fcntl.flock (a POSIX system)")
    lock_fd = _open_private(bus.lock_path, os.O_RDWR | os.O_CREAT, "lock file")
    sock = None
    bound = None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        os.ftruncate(lock_fd, 0)
        os.write(lock_fd, f"{os.getpid()}\n".encode())
        _remove_stale_socket(bus.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(bus.path)
        bound = _ident(bus.path)
        os.chmod(bus.path, 0o600)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        if sock is not None:
            sock.close()
        _unlink_if(bus.path, bound)
        try:
            os.close(lock_fd)
        except OSError:
            pass
        raise
    log.debug("elected broker of %s (pid %d)", bus.path, os.getpid())
    return _Election((sock, lock_fd, bound))


def _load_state(bus: _Bus) -> dict | None:
    """Read and remove the hand-off state a clean predecessor left; None if there is none.

    The file is ours (checked) but is parsed like any input: anything malformed is
    discarded with a warning, and the bus starts a new epoch.
    """
    try:
        fd = _open_private(bus.state_path, os.O_RDONLY, "hand-off state file")
    except FileNotFoundError:
        return None
    except (BusClosedError, OSError) as exc:   # OSError: out of fds, say
        log.warning("ignoring the hand-off state: %s", exc)
        return None
    try:
        limit = (_TOTAL_BACKLOG_FACTOR + 1) * DEFAULT_BACKLOG_BYTES + DEFAULT_RING_BYTES
        chunks = []
        size = 0
        while size <= limit:                   # (it may grow while it is read)
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FrameError(f"more than the {limit} bytes a state file can hold")
        try:
            os.unlink(bus.state_path)
        except FileNotFoundError:
            pass
        return _parse_state(b"".join(chunks))
    except (OSError, FrameError) as exc:
        log.warning("ignoring the hand-off state %s: %s", bus.state_path, exc)
        return None
    finally:
        os.close(fd)


def _parse_state(raw: bytes) -> dict:
    """Return ``{"epoch", "seq", "runs": [(first, last, payload)], "lids", "drops"}``.

    Walks the frames without making an object of each (a state may hold millions of
    small events); checks each as the broker checks a client's.
    """
    size = len(raw)
    if size < _HDR_SIZE:
        raise FrameError("truncated hand-off state")
    kind, flags, taglen, bodylen = _HDR.unpack_from(raw, 0)
    if (kind != _CONTROL or flags or taglen or bodylen > _MAX_STATE_HEAD_BYTES
            or _HDR_SIZE + bodylen > size):
        raise FrameError("truncated hand-off state")
    head = _decode_control(raw[_HDR_SIZE:_HDR_SIZE + bodylen])
    epoch, seq = head.get("epoch"), head.get("seq")
    lids, drops = head.get("lids", []), head.get("drops", {})
    if not (isinstance(epoch, str) and 0 < len(epoch) <= 64 and seq.__class__ is int
            and 0 <= seq < _MAX_SEQ and isinstance(lids, list) and isinstance(drops, dict)):
        raise FrameError("malformed hand-off state header")
    runs = []
    next_seq = last = None
    run = None                       # [first, start, end] of the current run
    unpack = _HDR.unpack_from
    off = _HDR_SIZE + bodylen
    while off < size:
        if size - off < _HDR_SIZE:
            raise FrameError("truncated hand-off state")
        kind, flags, taglen, bodylen = unpack(raw, off)
        body = off + _HDR_SIZE + taglen
        end = body + bodylen
        if end > size:
            raise FrameError("truncated hand-off state")
        if kind == _MARK:
            if flags or taglen or bodylen != _SEQ.size:
                raise FrameError("malformed sequence mark in hand-off state")
            mark = _SEQ.unpack_from(raw, body)[0]
            if (last is not None and mark <= last) or mark > seq:
                raise FrameError("hand-off state events out of order")
            if run:
                runs.append((run[0], last, raw[run[1]:run[2]]))
                run = None
            next_seq = mark
        elif kind == _EVENT:
            if (flags or not taglen or bodylen < 2 or end - off > MAX_FRAME_BYTES
                    or raw[body] != _LBRACE or raw[end - 1] != _RBRACE):
                raise FrameError("malformed event in hand-off state")
            try:
                raw[off + _HDR_SIZE:body].decode()
            except UnicodeDecodeError:
                raise FrameError("event tag in hand-off state is not UTF-8") from None
            if next_seq is None or next_seq > seq:
                raise FrameError("hand-off state event without a valid sequence number")
            if run is None:
                run = [next_seq, off, end]
            else:
                run[2] = end
            last = next_seq
            next_seq += 1
        else:
            raise FrameError("unexpected frame in hand-off state")
        off = end
    if run:
        runs.append((run[0], last, raw[run[1]:run[2]]))
    good_drops = {}
    for lid, drop in drops.items():
        if (isinstance(drop, list) and len(drop) == 3
                and all(item.__class__ is int and 0 <= item < _MAX_SEQ for item in drop)):
            good_drops[lid] = drop
    return {"epoch": epoch, "seq": seq, "runs": runs, "drops": good_drops,
            "lids": {lid for lid in lids if isinstance(lid, str)}}


def _write_state(bus: _Bus, head: dict, runs: list) -> None:
    """Leave the bus's numbering and recent events for the next broker (we hold the lock).

    *runs* are ``(first seq, payload)``: event frames with consecutive numbers, in order.
    """
    tmp = bus.state_path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError:                    # something else sits there (a directory): go around
        tmp = f"{bus.state_path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "hand-off state file")
    try:
        parts = [_encode_control(head)]
        for first, payload in runs:
            parts.append(_SEQ_MARK.pack(_MARK, 0, 0, _SEQ.size, first))
            parts.append(payload)
        with os.fdopen(os.dup(fd), "wb") as out:
            out.writelines(parts)
        os.rename(tmp, bus.state_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


# -- Broker -------------------------------------------------------------------


class _Block:
    """Bytes queued for listeners: events (a sequence mark and their frames, shared by
    every listener that gets them all) or one control frame (``count == 0``)."""

    __slots__ = ("bufs", "size", "cost", "count", "first", "last", "refs", "msg", "runs",
                 "in_ring")

    def __init__(self, bufs: tuple, size: int, count: int = 0, first: int = 0,
                 last: int = 0, msg: Any = None):
        self.bufs = bufs
        self.size = size           # bytes on the wire
        self.cost = size + _BLOCK_COST if count else size   # what bounds count: the
                                   # bytes and the objects that hold them
        self.count = count         # events in it
        self.first = first         # their sequence numbers, first and last
        self.last = last
        self.refs = 0              # queues and the ring that hold it
        self.msg = msg             # a control block's message, when it may change
        self.runs = None           # _event_runs() of it, once a filtered replay needs them
        self.in_ring = False       # the ring holds it (dropping it from a queue frees nothing)

    def frames(self) -> Any:
        """Return the event frames of an event block made of a mark and its events: its
        payload, or a bundle's events cut again into frames (the same bytes each time)."""
        payload = self.bufs[-1]
        return _unbundle(payload) if payload[0] == _BUNDLE else payload

    def for_peer(self, peer: Any) -> "_Block":
        """Return this block as *peer* can take it: a bundle as event frames for a
        listener that did not ask for bundles."""
        if peer.bundles or self.bufs[-1][0] != _BUNDLE:
            return self
        frames = self.frames()
        return _Block((self.bufs[0], frames), len(self.bufs[0]) + len(frames), self.count,
                      self.first, self.last)


_BYE_FRAME = _encode_control({"ctl": "bye"})


def _control_block(msg: dict) -> _Block:
    frame = _encode_control(msg)
    return _Block((frame,), len(frame), msg=msg)


def _is_drop(blk: _Block | None) -> bool:
    """True if *blk* is a queued ``drop`` notice (which later drops may grow)."""
    return blk is not None and blk.msg is not None and blk.msg["ctl"] == "drop"


def _event_runs(payload: Any, first: int) -> list:
    """Return ``(seq, tag, start, end)`` of each event frame in *payload*, numbering them
    from *first* and following the sequence marks among them."""
    out = []
    seq = first
    for kind, tag, _data, start, body, end in _FrameReader()._parse(payload):
        if kind == _MARK:
            seq = _SEQ.unpack_from(payload, body)[0]
        elif kind == _EVENT:
            out.append((seq, tag, start, end))
            seq += 1
    return out


class _Wanted:
    """The events of ring blocks that a listener's filters want, for a replay: each
    block is cut into events once (kept on it), each tag matched once per replay."""

    __slots__ = ("filters", "prefixes", "tags")

    def __init__(self, filters: list | None):
        self.filters = filters
        self.prefixes = None if filters is None else tuple(p for p, _glob in filters)
        self.tags: dict = {}                   # tag -> wanted?

    def items(self, blk: _Block) -> list:
        """``(seq, tag, start, end)`` of the events of *blk* that are wanted."""
        runs = blk.runs
        if runs is None:
            runs = blk.runs = _event_runs(blk.frames(), blk.first)
        filters = self.filters
        if filters is None:
            return runs
        tags = self.tags
        prefixes = self.prefixes
        for tag in {run[1] for run in runs}.difference(tags):
            tags[tag] = tag.startswith(prefixes) and (len(tag) > _GLOB_TAG_CHARS
                                                      or _filters_match(filters, tag))
        return [run for run in runs if tags[run[1]]]


def _sub_block(payload: Any, items: list) -> _Block:
    """Return a block of the event frames *items* (``(seq, tag, start, end)``) of *payload*,
    with a sequence mark before each run of consecutive numbers."""
    parts = []
    expect = None
    for seq, _tag, start, end in items:
        if seq != expect:
            parts.append(_SEQ_MARK.pack(_MARK, 0, 0, _SEQ.size, seq))
        parts.append(payload[start:end])
        expect = seq + 1
    buf = b"".join(parts)
    return _Block((buf,), len(buf), len(items), items[0][0], items[-1][0])


_NO_OUTPUT = ()                        # an idle peer's queue: no deque held for it


class _Peer:
    """One connection as the broker sees it.  Used on the broker thread only."""

    __slots__ = ("sock", "pid", "reader", "alive", "listener", "filters", "lid", "out",
                 "out_bytes", "head_off", "backlog", "stats_pending", "ctl_bytes",
                 "mask", "paused", "dropped", "events_in", "events_out", "bytes_in",
                 "bytes_out", "warn_after", "filter_cost", "deferred", "bundles")

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.pid = pid
        self.reader = _FrameReader()
        self.alive = True
        self.listener = False
        self.filters = None          # the tag patterns a filtered listener declared
        self.lid = None              # the id a listener resumes under
        self.out = _NO_OUTPUT        # _Blocks to send (a deque while there are any); the
                                     # head may be partly sent
        self.out_bytes = 0           # bytes of event blocks queued
        self.head_off = 0            # bytes of out[0] already sent
        self.backlog = DEFAULT_BACKLOG_BYTES
        self.stats_pending = None    # the stats reply still queued, if any
        self.ctl_bytes = 0           # bytes of control frames queued
        self.mask = 0                # selector events registered
        self.paused = False          # not read until the input budget allows
        self.dropped = 0
        self.events_in = self.events_out = self.bytes_in = self.bytes_out = 0
        self.warn_after = 0.0        # monotonic time before which drops are not logged
        self.filter_cost = 0         # bytes its declared filters hold (see _FILTER_BUDGET)
        self.deferred = False        # its subscription waits for the broker's time
        self.bundles = False         # a listener that takes B frames


class _Ring:
    """The broker's recent events, oldest first, for listeners that ask for a replay.

    Bounded in events and bytes; what a predecessor handed over is kept in full until
    ``grace_until``, so that listeners resuming after the hand-off find it.
    """

    __slots__ = ("blocks", "events", "bytes", "max_events", "max_bytes", "extra_events",
                 "extra_bytes", "grace_until")

    def __init__(self, max_events: int, max_bytes: int):
        self.blocks = collections.deque()
        self.events = self.bytes = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.extra_events = self.extra_bytes = 0
        self.grace_until = 0.0

    @property
    def first(self) -> int:
        return self.blocks[0].first if self.blocks else 0

    @property
    def last(self) -> int:
        return self.blocks[-1].last if self.blocks else 0

    def add(self, blk: _Block, release: Callable) -> None:
        """Keep *blk*; let go of the oldest blocks past the bounds (``release`` each)."""
        self.blocks.append(blk)
        blk.refs += 1
        blk.in_ring = True
        self.events += blk.count
        self.bytes += blk.cost
        self.shrink(release)

    def shrink(self, release: Callable) -> None:
        max_events = self.max_events + self.extra_events
        max_bytes = self.max_bytes + self.extra_bytes
        blocks = self.blocks
        while (self.events > max_events or self.bytes > max_bytes) and len(blocks) > 1:
            old = blocks.popleft()
            old.in_ring = False
            self.events -= old.count
            self.bytes -= old.cost
            release(old)

    def end_grace(self, release: Callable) -> None:
        self.extra_events = self.extra_bytes = 0
        self.grace_until = 0.0
        self.shrink(release)


class _Intake:
    """Part of Broker: reading clients, within the input budget, and deciding what each
    frame may do; the one door every byte a client sends goes through.  Runs on the
    broker thread."""

    def _on_readable(self, peer: _Peer) -> None:
        """Read what *peer* sent, within the input budget, and act on its frames.
        Runs on the broker thread."""
        reader = peer.reader
        if reader.need and not self._allot(peer):
            return
        if reader.buf is not None:
            limit = _RECV_BYTES
        else:
            limit = min(_RECV_BYTES, _INPUT_BUDGET - self._in_held)
            if limit < _BIG_FRAME and self._make_room(peer, _BIG_FRAME):
                limit = min(_RECV_BYTES, _INPUT_BUDGET - self._in_held)
            if limit < _HDR_SIZE:
                self._pause(peer)
                return
        held = reader.held
        if not self._read(peer, limit) or not peer.alive:
            return
        if reader.eof:
            if reader.held:
                log.warning("client of %s (pid %d) closed mid-frame; dropped %d bytes",
                            self.bus.path, peer.pid, reader.held)
            self._drop(peer, "")
            return
        if reader.need:
            self._allot(peer)
        if reader.held:
            self._partial.add(peer)
        else:
            self._partial.discard(peer)
            if held:
                self._resume_paused()

    def _read(self, peer: _Peer, limit: int = _RECV_BYTES) -> bool:
        """Receive once from *peer* and act on the frames; False if there was nothing to
        read or the peer was dropped (a malformed frame, a failed read)."""
        reader = peer.reader
        held = reader.held
        try:
            frames = reader.read(peer.sock, limit, self._scratch)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            reader.eof = True
            frames = []
        except FrameError as exc:
            self._drop(peer, str(exc))
            return False
        except OSError as exc:
            self._drop(peer, f"read failed: {exc}")
            return False
        self._in_held += reader.held - held
        if frames:
            self._on_frames(peer, frames)
        return True

    def _allot(self, peer: _Peer) -> bool:
        """Give *peer*'s unfinished big frame a buffer of its own if the input budget
        allows, evicting clients that sit on old unfinished frames; else pause it."""
        reader = peer.reader
        extra = reader.need - reader.held
        if not self._make_room(peer, extra):
            self._pause(peer)
            return False
        reader.alloc()
        self._in_held += extra
        self._partial.add(peer)
        if peer.paused:
            peer.paused = False
            reader.since = time.monotonic()    # time spent paused is not the client's
            self._watch(peer)
        return True

    def _make_room(self, peer: _Peer | None, size: int) -> bool:
        """Return True if *size* more bytes fit the input budget, evicting clients that
        have sat on an unfinished frame for ``_EVICT_AGE`` or more to make room."""
        if self._in_held + size <= _INPUT_BUDGET:
            return True
        now = time.monotonic()
        for other in sorted(self._partial, key=lambda p: p.reader.since):
            if self._in_held + size <= _INPUT_BUDGET:
                break
            if other is not peer and now - other.reader.since >= _EVICT_AGE:
                self._drop(other, f"evicted: held an unfinished frame of {other.reader.held} "
                                  f"bytes for {now - other.reader.since:.1f} s while the "
                                  "broker's input budget was spent")
        return self._in_held + size <= _INPUT_BUDGET

    def _pause(self, peer: _Peer) -> None:
        if not peer.paused:
            peer.paused = True
            self._paused.append(peer)
            self._watch(peer)
            self._warn("budget", "broker of %s is holding %d bytes of unfinished frames; "
                       "pausing clients until some finish", self.bus.path, self._in_held)

    def _resume_paused(self) -> None:
        paused = self._paused
        while paused and _INPUT_BUDGET - self._in_held >= _BIG_FRAME:
            peer = paused.popleft()
            if peer.alive and peer.paused:
                peer.paused = False
                peer.reader.since = time.monotonic()
                self._watch(peer)

    def _on_frames(self, peer: _Peer, frames: list) -> None:
        """Decide what each frame of *peer* may do: events are relayed, a client's controls
        answered, anything else drops the client.  Runs on the broker thread."""
        filtered = bool(self._index)       # only they need each frame's tag and end
        tags = [] if filtered else None
        ends = [] if filtered else None
        run = None
        count = last = 0
        for kind, tag, data, start, _body, end in frames:
            if kind == _EVENT:
                if tag == GAP_TAG:             # listeners trust it: only ours
                    if run is not None:
                        self._publish(peer, data, run, last, count, tags, ends)
                    self._drop(peer, f"sent an event tagged {GAP_TAG!r} (the bus's own "
                                     "notice of missed events)")
                    return
                if run is None:
                    run = start
                count += 1
                last = end
                if filtered:
                    tags.append(tag)
                    ends.append(end)
                continue
            if run is not None:
                self._publish(peer, data, run, last, count, tags, ends)
                run = None
                count = 0
                tags = [] if filtered else None
                ends = [] if filtered else None
            if kind == _MARK:
                self._drop(peer, "sent a sequence mark (only the broker numbers events)")
                return
            try:
                self._control(peer, _decode_control(data[_body:end]))
            except FrameError as exc:
                self._drop(peer, str(exc))
                return
            if not peer.alive:
                return
        if run is not None:
            self._publish(peer, frames[-1][2], run, last, count, tags, ends)

    def _control(self, peer: _Peer, msg: dict) -> None:
        """Answer one control frame a client may send.  Runs on the broker thread."""
        ctl = msg["ctl"]
        if ctl == "sub":
            if peer.deferred:
                self._drop(peer, "subscribed twice")
            elif msg.get("since") is None and not msg.get("last"):
                self._subscribe(peer, msg)     # no replay; any replay may cut blocks (a
                                               # filter, event frames of bundles, a start
                                               # inside a block): it takes its share
            elif (msg.get("resume") and msg.get("since") is not None
                  and msg.get("lid").__class__ is str and msg["lid"] in self._resuming
                  or self._scan_allowed()):    # one handed over does not wait its turn
                self._scanning_subscribe(peer, msg)
            else:
                try:
                    fields = _sub_fields(msg)  # (only what was asked waits: checked)
                except ValueError as exc:
                    self._refuse(peer, f"bad subscription: {exc}")
                    return
                peer.deferred = True
                self._deferred.setdefault(peer.pid, {})[peer] = fields
                self._next_check = min(self._next_check, time.monotonic() + 0.01)
        elif ctl == "stats":
            if peer.stats_pending is not None:
                self._drop(peer, "asked for stats again before reading the answer")
                return
            block = _control_block({"ctl": "stats", "stats": self.stats()})
            if self._ctl_held + block.size > _CONTROL_BUDGET:
                self._drop(peer, "control replies for clients that do not read them are "
                                 f"over {_CONTROL_BUDGET} bytes")
                return
            peer.stats_pending = block
            self._queue_control(peer, block)
        else:
            self._drop(peer, f"sent a control frame clients may not send: {ctl[:40]!r}")

    def _scan_allowed(self) -> bool:
        """True while replays (which may cut ring blocks: for a filter, into event frames
        of a bundle, from inside a block) have used less than their share of the
        broker's time (``_SCAN_SHARE``, with a burst of ``_SCAN_BURST`` s)."""
        now = time.monotonic()
        self._scan_credit = min(_SCAN_BURST,
                                self._scan_credit + (now - self._scan_at) * _SCAN_SHARE)
        self._scan_at = now
        return self._scan_credit > 0

    def _scanning_subscribe(self, peer: _Peer, msg: dict) -> None:
        started = time.perf_counter()
        self._subscribe(peer, msg)
        self._scan_credit -= time.perf_counter() - started

    def _run_deferred(self) -> None:
        """Answer the subscriptions that wait as the share of time allows: one client
        process after another, each in its order (many from one cannot starve another)."""
        deferred = self._deferred
        while deferred and self._scan_allowed():
            pid = next(iter(deferred))
            waiting = deferred.pop(pid)
            peer = next(iter(waiting))
            msg = waiting.pop(peer)
            if waiting:
                deferred[pid] = waiting        # to the back of the line
            peer.deferred = False
            self._scanning_subscribe(peer, msg)
        if deferred:
            self._next_check = min(self._next_check, time.monotonic() + 0.01)


class _Listeners:
    """Part of Broker: registering listeners, replaying the ring, numbering events and
    queueing them for the listeners that want them.  Runs on the broker thread."""

    def _subscribe(self, peer: _Peer, msg: dict) -> None:
        """Register *peer* as a listener: reply ``ok``, replay what it asked for, then
        relay live events, atomically.  Runs on the broker thread."""
        if peer.listener:
            self._drop(peer, "subscribed twice")
            return
        try:
            msg = _sub_fields(msg)
        except ValueError as exc:
            self._refuse(peer, f"bad subscription: {exc}")
            return
        backlog, since, last = msg["backlog"], msg["since"], msg["last"]
        epoch, lid, patterns = msg["epoch"], msg["lid"], msg["tags"]
        filters = None
        if patterns is not None:
            cost = sum(len(pattern) + _FILTER_COST for pattern in patterns)
            mine = self._filter_pids.get(peer.pid, 0)
            pieces = self._index.new_pieces(patterns)
            if (self._filter_held + cost > _FILTER_BUDGET
                    or peer.pid and mine + cost > _FILTER_BUDGET // _FILTER_SHARES):
                # (pid 0: the platform does not tell it, so no process has a share)
                self._refuse(peer, f"listeners' tag filters hold {self._filter_held} bytes "
                                   f"({mine} for pid {peer.pid}); this listener's {cost} "
                                   f"would pass the bound ({_FILTER_BUDGET}, a quarter of "
                                   f"it per process)")
                return
            if self._index.glob_pieces + pieces > _GLOB_PIECES:
                self._refuse(peer, f"listeners' different globs have "
                                   f"{self._index.glob_pieces} pieces between their '*' "
                                   f"(one with '?' or '[' counts its length); "
                                   f"this listener's {pieces} new ones would pass the bound "
                                   f"({_GLOB_PIECES}, what matching one tag may cost)")
                return
            try:
                filters = self._index.add(peer, patterns)
            except ValueError as exc:          # a glob that cannot compile
                self._refuse(peer, f"bad subscription: {exc}")
                return
            peer.filters = patterns
            peer.filter_cost = cost
            self._filter_held += cost
            self._filter_pids[peer.pid] = mine + cost
        peer.backlog = min(backlog, self.backlog) if backlog else self.backlog
        peer.lid = lid
        peer.bundles = msg["bundles"]
        ring = self._ring
        self._queue_control(peer, _control_block({
            "ctl": "ok", "pid": os.getpid(), "epoch": self.epoch, "seq": self.seq,
            "ring": [ring.first, ring.last]}))
        resumed = msg["resume"] and since is not None
        handed = resumed and lid in self._resuming
        if handed:
            self._resuming.discard(lid)
            drop = self._handed_drops.pop(lid, None)
            if drop:
                self._note_drop(peer, drop[2], drop[0], drop[1], "backlog")
            if not self._resuming and ring.grace_until:
                ring.grace_until = time.monotonic()        # everyone is back
                self._next_check = 0.0
        if since is not None and epoch is not None and epoch != self.epoch:
            self._queue_control(peer, _control_block({
                "ctl": "gap", "reason": "crash", "epoch": epoch, "first": since + 1,
                "last": None, "n": None}))
            self._replay(peer, _Wanted(filters), 0, "crash", False)
        elif since is not None:
            self._replay(peer, _Wanted(filters), min(since, self.seq),
                         "handoff" if resumed else "ring", handed)
        elif last:
            wanted = _Wanted(filters)
            self._replay(peer, wanted, self._since_last(wanted, last), "ring", False)
        peer.listener = True
        if filters is None:
            self._plain[peer] = None
            self._bundled += peer.bundles
        self._dirty.add(peer)
        if self._ev_held > self._ev_cap + ring.extra_bytes:   # a replay may have copied
            self._shed()                                       # much of the ring
        log.debug("listener registered on %s (pid %d)", self.bus.path, peer.pid)

    def _refuse(self, peer: _Peer, reason: str) -> None:
        """Tell *peer* why its subscription is refused (it must not just retry), and drop
        it."""
        try:
            peer.sock.send(_encode_control({"ctl": "refused", "reason": reason[:1000]}))
        except OSError:
            pass
        self._drop(peer, reason)

    def _since_last(self, wanted: _Wanted, count: int) -> int:
        """Return the number after which the last *count* events (that *wanted* wants) lie."""
        if wanted.filters is None:
            return max(0, self.seq - count)
        found = 0
        for blk in reversed(self._ring.blocks):
            items = wanted.items(blk)
            if found + len(items) >= count:
                return items[found - count][0] - 1
            found += len(items)
        return max(0, self._ring.first - 1)

    def _replay(self, peer: _Peer, wanted: _Wanted, since: int, reason: str,
                trusted: bool) -> None:
        """Queue for *peer* the ring's events after *since* (those its filters want), with
        a ``gap`` notice for every stretch the ring does not have.

        A stretch missing between blocks is reported with its exact size to a listener
        that wants every event; to a filtered one with an unknown count, unless it is a
        listener whose own queue the predecessor handed over (*trusted*): everything it
        wanted is then in the ring.
        """
        cursor = since + 1
        filters = wanted.filters
        for blk in list(self._ring.blocks):
            if blk.last < cursor:
                continue
            if blk.first > cursor:
                self._gap_notice(peer, filters, cursor, blk.first - 1, reason, trusted)
            if cursor <= blk.first and filters is None:
                self._enqueue(peer, blk.for_peer(peer))
            else:
                items = wanted.items(blk)
                if cursor <= blk.first and len(items) == blk.count:
                    self._enqueue(peer, blk.for_peer(peer))   # all of it: shared
                else:
                    if items and items[0][0] < cursor:
                        items = [item for item in items if item[0] >= cursor]
                    if items:
                        self._enqueue(peer, _sub_block(blk.frames(), items))
            cursor = blk.last + 1
            if not peer.alive:
                return
        if cursor <= self.seq:
            self._gap_notice(peer, filters, cursor, self.seq, reason, trusted)

    def _gap_notice(self, peer: _Peer, filters: list | None, first: int, last: int,
                    reason: str, trusted: bool) -> None:
        if filters is not None and trusted:
            return
        count = last - first + 1 if filters is None else None
        self._queue_control(peer, _control_block({
            "ctl": "gap", "reason": reason, "epoch": self.epoch, "first": first,
            "last": last, "n": count}))

    def _nonce(self) -> bytes:
        """Return a new bundle nonce: 16 hex digits from the OS's random source, which
        no client can foresee (drawn 64 at a time)."""
        if not self._nonces:
            pool = os.urandom(8 * 64).hex().encode()
            self._nonces = [pool[i:i + 16] for i in range(0, len(pool), 16)]
        return self._nonces.pop()

    def _publish(self, peer: _Peer, data: Any, start: int, end: int, count: int,
                 tags: list | None, ends: list | None) -> None:
        """Number the *count* event frames ``data[start:end]`` and queue them for every
        listener that wants them, and the ring.  *tags* and *ends* (each frame's) are
        there when some listeners declared tags.  Runs on the broker thread."""
        if data is self._scratch or start or end != len(data):
            payload = bytes(memoryview(data)[start:end])   # the scratch is reused
        else:
            payload = data                      # a big frame, in a buffer of its own
        first = self.seq + 1
        self.seq += count
        mark = _SEQ_MARK.pack(_MARK, 0, 0, _SEQ.size, first)
        blk = _Block((mark, payload), len(payload) + len(mark), count, first, self.seq)
        peer.events_in += count
        peer.bytes_in += len(payload)
        self.events_in += count
        self.bytes_in += len(payload)
        live = blk                          # what listeners that take it all get
        if (count >= _BUNDLE_EVENTS and self._bundled >= _BUNDLE_LISTENERS
                and _BUNDLE_MIN_AVG * count <= len(payload) <= _BUNDLE_MAX_AVG * count):
            frame = _bundle(payload, count, self._nonce(), self._tag_json)
            live = _Block((mark, frame), len(frame) + len(mark), count, first, self.seq)
            self.bundles += 1
        enqueue = self._enqueue
        for listener in self._plain:
            enqueue(listener, live if listener.bundles else blk)
        if tags is not None:
            self._publish_filtered(blk, live, payload, start, tags, ends)
        ring = self._ring
        if ring.max_events and ring.max_bytes:       # one copy: what most listeners got
            if not live.refs:
                self._ev_held += live.cost
            ring.add(live, self._release)
        if self._ev_held > self._ev_cap + self._ring.extra_bytes:
            self._shed()

    def _publish_filtered(self, blk: _Block, live: _Block, payload: Any, start: int,
                          tags: list, ends: list) -> None:
        match = self._index.match
        wanted: dict = {}
        for index, tag in enumerate(tags):
            for peer in match(tag):
                wanted.setdefault(peer, []).append(index)
        if not wanted:
            return
        starts = [start] + ends[:-1]
        for peer, indexes in wanted.items():
            if len(indexes) == len(tags):
                self._enqueue(peer, live if peer.bundles else blk)
            else:
                self._enqueue(peer, _sub_block(payload, [
                    (blk.first + i, tags[i], starts[i] - start, ends[i] - start)
                    for i in indexes]))


class _Outbox:
    """Part of Broker: each client's output queue, within its backlog and the broker's
    bounds, and sending it without blocking.  Runs on the broker thread."""

    def _enqueue(self, peer: _Peer, blk: _Block) -> None:
        """Queue event block *blk* for *peer*, dropping its oldest past its backlog."""
        if peer.out is _NO_OUTPUT:
            peer.out = collections.deque()
        peer.out.append(blk)
        if not blk.refs:
            self._ev_held += blk.cost
        blk.refs += 1
        peer.out_bytes += blk.cost
        if peer.out_bytes > peer.backlog:
            self._trim(peer, peer.backlog, "backlog")
        if not peer.mask & selectors.EVENT_WRITE:   # else the selector says when
            self._dirty.add(peer)

    def _release(self, blk: _Block) -> None:
        blk.refs -= 1
        if not blk.refs:
            self._ev_held -= blk.cost

    def _queue_control(self, peer: _Peer, blk: _Block) -> None:
        if peer.out is _NO_OUTPUT:
            peer.out = collections.deque()
        peer.out.append(blk)
        peer.ctl_bytes += blk.size
        self._ctl_held += blk.size
        self._dirty.add(peer)

    def _trim(self, peer: _Peer, limit: int, reason: str) -> None:
        """Drop *peer*'s oldest event blocks until it holds at most *limit* bytes, keeping
        the one being sent and the newest; a ``drop`` notice takes the place of each run
        of them.  Shedding memory keeps the blocks the ring holds (dropping them frees
        nothing), and goes on past them: a filtered listener's own copies may follow."""
        out = peer.out
        index = 1 if peer.head_off else 0
        lost = folded = 0
        first = last = 0
        at = None
        while peer.out_bytes > limit and index < len(out) - 1:
            blk = out[index]
            keep = blk.in_ring and reason == "memory"
            if lost and _is_drop(blk):         # an older notice inside the run: one notice
                del out[index]
                peer.ctl_bytes -= blk.size
                self._ctl_held -= blk.size
                folded += blk.msg["n"]
                last = max(last, blk.msg["last"])
                continue
            if not blk.count or keep:
                if lost and keep:              # a run ends: its notice, then go on
                    size = len(out)
                    self._note_drop(peer, lost, first, last, reason, at, folded)
                    index += len(out) - size
                    lost = folded = 0
                    at = None
                index += 1
                continue
            if at is None:
                at = index
                first = blk.first
            del out[index]
            peer.out_bytes -= blk.cost
            self._release(blk)
            lost += blk.count
            last = blk.last
        if lost:
            self._note_drop(peer, lost, first, last, reason, at, folded)

    def _note_drop(self, peer: _Peer, lost: int, first: int, last: int, reason: str,
                   at: int | None = None, folded: int = 0) -> None:
        """Put (or grow) the ``drop`` notice where *peer*'s lost events were; *folded*
        events more are those of older notices this one takes the place of."""
        peer.dropped += lost
        self._drops += lost
        if peer.out is _NO_OUTPUT:
            peer.out = collections.deque()
        out = peer.out
        at = len(out) if at is None else at
        lost += folded
        notice = out[at - 1] if at > 0 else None
        if _is_drop(notice) and not (at == 1 and peer.head_off):
            old = notice.msg
            merged = {"ctl": "drop", "n": old["n"] + lost, "first": old["first"],
                      "last": max(last, old["last"]), "reason": reason}
            frame = _encode_control(merged)
            self._ctl_held += len(frame) - notice.size
            peer.ctl_bytes += len(frame) - notice.size
            notice.bufs, notice.size, notice.msg = (frame,), len(frame), merged
        else:
            msg = {"ctl": "drop", "n": lost, "first": first, "last": last, "reason": reason}
            notice = _control_block(msg)
            notice.msg = msg
            out.insert(at, notice)
            peer.ctl_bytes += notice.size
            self._ctl_held += notice.size
        now = time.monotonic()
        if now >= peer.warn_after:         # at most one warning a second per listener
            peer.warn_after = now + 1.0
            log.warning("listener of %s (pid %d) is %d bytes behind: dropped its oldest "
                        "events, %d so far", self.bus.path, peer.pid, peer.out_bytes,
                        peer.dropped)

    def _shed(self) -> None:
        """All listeners together hold too much: trim the ones furthest behind, of what
        only queues hold (dropping what the ring keeps would free nothing)."""
        spared: set = set()
        cap = self._ev_cap + self._ring.extra_bytes    # (what a predecessor handed over)
        listeners = self._listeners()
        while self._ev_held > cap and len(spared) < 64:
            victim = max((p for p in listeners if p.out_bytes and p not in spared),
                         key=lambda p: p.out_bytes, default=None)
            if victim is None:
                return
            before = self._ev_held
            self._trim(victim, victim.out_bytes // 2, "memory")
            if self._ev_held >= before:        # nothing freed: another holds the rest
                spared.add(victim)

    def _listeners(self) -> list:
        return [peer for peer in self._peers if peer.listener]

    def _flush(self, peer: _Peer) -> None:
        """Send what *peer* has queued, without blocking.  Runs on the broker thread."""
        out = peer.out
        sock = peer.sock
        while out:
            if len(out) == 1 and not peer.head_off:
                bufs = out[0].bufs
                offered = out[0].size
            else:
                bufs = []
                offered = 0                # what a socket can take at once is enough
                for blk in out:
                    bufs.extend(blk.bufs)
                    offered += blk.size
                    if offered >= _SEND_BYTES or len(bufs) >= _IOV_MAX:
                        break
                skip = peer.head_off
                offered -= skip
                while skip:
                    if skip >= len(bufs[0]):
                        skip -= len(bufs.pop(0))
                    else:
                        bufs[0] = memoryview(bufs[0])[skip:]
                        skip = 0
            try:
                sent = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                break
            except (BrokenPipeError, ConnectionResetError):
                # The client stopped reading, or closed: what it sent is still to be
                # read (and relayed), and then its end of file drops it.
                self._discard_output(peer)
                break
            except OSError as exc:
                self._drop(peer, f"write failed: {exc}")
                return
            peer.bytes_out += sent
            self.bytes_out += sent
            full = sent < offered              # the socket is full: try again when writable
            sent += peer.head_off
            peer.head_off = 0
            while sent:
                blk = out[0]
                if sent < blk.size:
                    peer.head_off = sent
                    break
                sent -= blk.size
                out.popleft()
                if blk.count:
                    peer.out_bytes -= blk.cost
                    peer.events_out += blk.count
                    self.events_out += blk.count
                    self._release(blk)
                else:
                    peer.ctl_bytes -= blk.size
                    self._ctl_held -= blk.size
                    if blk is peer.stats_pending:
                        peer.stats_pending = None
            if full:
                break
        if not out:
            peer.out = _NO_OUTPUT              # an idle listener holds no deque (760 bytes)
        self._watch(peer)

    def _discard_output(self, peer: _Peer) -> None:
        """Let go of everything queued for *peer*."""
        for blk in peer.out:
            if blk.count:
                self._release(blk)
            else:
                self._ctl_held -= blk.size
        peer.out = _NO_OUTPUT
        peer.out_bytes = peer.ctl_bytes = peer.head_off = 0
        peer.stats_pending = None

    def _watch(self, peer: _Peer) -> None:
        """Select *peer* for reading unless paused, and for writing while it has output."""
        mask = (0 if peer.paused else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if peer.out else 0)
        if mask == peer.mask:
            return
        if not peer.mask:
            self._selector.register(peer.sock, mask, peer)
        elif not mask:
            self._selector.unregister(peer.sock)
        else:
            self._selector.modify(peer.sock, mask, peer)
        peer.mask = mask


class _Succession:
    """Part of Broker: keeping its paths, and handing the bus over without losing an
    event.  Runs on the broker thread."""

    def _check_paths(self) -> None:
        """Recover when the lock or socket file was removed or replaced (tmp cleaners):
        take the lock again and rebind, or hand off to the broker that took over."""
        if self._listen_sock is None or self._ousted:
            return
        try:
            lock_info = os.fstat(self._lock_fd)
        except OSError:
            return
        if _ident(self.bus.lock_path) != (lock_info.st_dev, lock_info.st_ino):
            if not self._retake_lock():
                return
        if _ident(self.bus.path) != self._ident:
            self._rebind()

    def _retake_lock(self) -> bool:
        try:
            fd = _open_private(self.bus.lock_path, os.O_RDWR | os.O_CREAT, "lock file")
        except (OSError, BusClosedError) as exc:
            self._warn("lock", "broker of %s lost its lock file and cannot make a new one: "
                       "%s", self.bus.path, exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("another broker took over %s (its lock file was replaced); handing "
                        "off to it", self.bus.path)
            self._ousted = True
            self._stopping.set()
            return False
        os.write(fd, f"{os.getpid()}\n".encode())
        old, self._lock_fd = self._lock_fd, fd
        os.close(old)
        log.warning("broker of %s took its lock file again (it was removed)", self.bus.path)
        return True

    def _rebind(self) -> None:
        """Bind the bus path again (we hold the lock, so the path is ours)."""
        try:
            _remove_stale_socket(self.bus.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.bus.path)
                os.chmod(self.bus.path, 0o600)
                sock.listen(socket.SOMAXCONN)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        except (OSError, BusClosedError) as exc:
            self._warn("rebind", "broker of %s cannot bind its socket path again: %s",
                       self.bus.path, exc)
            return
        self._accept()                     # clients that reached the old socket
        old, self._listen_sock = self._listen_sock, sock
        if not self._accept_paused_until:
            self._selector.unregister(old)
            self._selector.register(sock, selectors.EVENT_READ, None)
        old.close()
        self._ident = _ident(self.bus.path)
        log.warning("broker of %s bound its socket path again (it was removed or replaced)",
                    self.bus.path)

    def _unlink_own_path(self) -> None:
        """Remove the bus's socket path if it still leads to this broker."""
        if not self._ousted:
            _unlink_if(self.bus.path, self._ident)

    def _handoff(self) -> None:
        """Give up the bus without losing an event.  Runs on the broker thread.

        The path goes first (we still hold the lock, so newcomers wait for the next
        broker); connections already queued are accepted like the others.  Every client
        is told ``bye`` and, where the platform allows, shut for reading: a firer's
        later send fails at once and it moves to the next broker, while what it sent
        before is still read here.  Elsewhere reading goes on until every client is
        quiet.  Then the numbering, the ring and every listener's unsent events go to
        the state file, the lock is released, and every connection closed: listeners
        resume on the next broker after the last event they got.
        """
        self._unlink_own_path()
        self._accept()
        sock, self._listen_sock = self._listen_sock, None
        if sock is not None:
            if not self._accept_paused_until:
                self._selector.unregister(sock)
            sock.close()
        for peer in list(self._peers):
            self._queue_control(peer, _Block((_BYE_FRAME,), len(_BYE_FRAME)))
            if _SHUT_RD_REFUSES:
                try:
                    peer.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        self._drain_input()
        if not self._ousted:
            try:
                self._save_state()
            except (OSError, BusClosedError) as exc:
                log.warning("broker of %s could not hand its events over: %s", self.bus.path,
                            exc)
        lock_fd, self._lock_fd = self._lock_fd, None
        os.close(lock_fd)                  # releases the flock: the next broker may start
        for peer in list(self._peers):
            if peer.alive:
                self._flush(peer)
        log.debug("broker of %s handed off (%d clients)", self.bus.path, len(self._peers))
        for peer in list(self._peers):
            held = peer.reader.held
            self._drop(peer, f"left a frame unfinished at the hand-off ({held} bytes held; a "
                             "firer still sending it sends it again to the next broker)"
                       if held else "")

    def _drain_input(self) -> None:
        """Take in what clients sent before the ``bye``.  Runs on the broker thread."""
        deadline = time.monotonic() + _HANDOFF_TIMEOUT
        pending = {peer: time.monotonic() for peer in self._peers}
        while pending and time.monotonic() < deadline:
            for peer in list(pending):
                while peer.alive and time.monotonic() < deadline:
                    reader = peer.reader
                    if reader.need and not self._allot(peer):
                        break                  # past the budget: left (and said) at the end
                    if not self._read(peer):
                        break
                    pending[peer] = time.monotonic()
                    if reader.eof:
                        pending.pop(peer, None)
                        if peer.alive and not peer.listener:
                            self._drop(peer, "")
                        break
                if not peer.alive:
                    pending.pop(peer, None)
            now = time.monotonic()
            for peer, seen in list(pending.items()):
                if peer.listener or now - seen >= _HANDOFF_QUIET:
                    del pending[peer]
            if pending:
                self._selector.select(max(0.0, min(deadline - now, _HANDOFF_QUIET)))

    def _save_state(self) -> None:
        """Write the numbering, the ring and listeners' unsent events for the successor."""
        shared = {id(blk): blk for blk in self._ring.blocks}
        singles = {}                   # seq -> frame, from filtered listeners' queues
        lids = []
        drops = {}
        for peer in self._listeners():
            if peer.lid:
                lids.append(peer.lid)
            for blk in peer.out:
                if not blk.count:
                    if _is_drop(blk) and peer.lid:     # (one sum of them all)
                        held = drops.get(peer.lid)
                        drops[peer.lid] = [blk.msg["first"], blk.msg["last"], blk.msg["n"]] \
                            if held is None else [held[0], blk.msg["last"],
                                                  held[2] + blk.msg["n"]]
                elif len(blk.bufs) == 2:
                    shared[id(blk)] = blk
                else:
                    for seq, _tag, start, end in _event_runs(blk.bufs[0], blk.first):
                        singles[seq] = blk.bufs[0][start:end]
        runs = [(blk.first, blk.last, blk.frames())
                for blk in sorted(shared.values(), key=lambda b: b.first)]
        if singles:
            import bisect
            firsts = [run[0] for run in runs]
            for seq in sorted(singles):
                at = bisect.bisect_right(firsts, seq) - 1
                if at < 0 or runs[at][1] < seq:
                    runs.append((seq, seq, singles[seq]))
            runs.sort(key=lambda run: run[0])
        merged = []                    # [first, last, [payloads]]: consecutive numbers
        for first, last, payload in runs:
            if merged and merged[-1][1] + 1 == first:
                merged[-1][1] = last
                merged[-1][2].append(payload)
            elif not merged or first > merged[-1][1]:
                merged.append([first, last, [payload]])
        head = {"ctl": "state", "epoch": self.epoch, "seq": self.seq, "lids": lids,
                "drops": drops}
        _write_state(self.bus, head, [(first, b"".join(parts)) for first, _l, parts in merged])


class Broker(_Intake, _Listeners, _Outbox, _Succession):
    """Relay every event from any client to every listener that wants it, on one bus.

    The broker owns the listening socket and the election lock.  ``start()`` runs
    ``serve_forever()`` on a daemon thread named ``saltevent-broker``.  It numbers
    events (``seq``, within an ``epoch``), keeps the recent ones in a ring for
    replays, queues each listener's events within its backlog (dropping the oldest
    past it, and saying so), and filters by the tags a listener declared.  ``close()``
    hands off: no newcomers, every client told ``bye``, what firers already sent taken
    in, then the numbering, the ring and every listener's unsent events written to the
    bus's state file for the next broker, the lock released, everything closed.

    Everything a client can make it hold is bounded: unfinished frames (all clients
    together: ``_INPUT_BUDGET``), control replies (``_CONTROL_BUDGET``), listener queues
    (each its backlog; all together ``_TOTAL_BACKLOG_FACTOR`` backlogs), clients
    (``max_clients``).  A client past a bound is dropped, or paused, never let grow.
    Methods marked so run on the broker thread; the others may be called from any.
    """

    def __init__(self, bus: _Bus, election: _Election, opts: Mapping | None = None):
        settings = dict(SALTEVENT_OPTS)
        settings.update({key: value for key, value in (opts or {}).items()
                         if key in SALTEVENT_OPTS and value is not None})
        self.bus = bus
        self.backlog = _positive_int(settings, "saltevent_broker_backlog_bytes")
        self.max_clients = _positive_int(settings, "saltevent_max_clients")
        self._listen_sock = election.sock
        self._lock_fd = election.lock_fd
        self._ident = election.ident
        self._ring = _Ring(_non_negative_int(settings, "saltevent_ring_events"),
                           _non_negative_int(settings, "saltevent_ring_bytes"))
        self._selector = selectors.DefaultSelector()
        try:
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._selector.close()
            raise
        self._peers: dict = {}                 # every connection
        self._plain: dict = {}                 # listeners that want every event
        self._bundled = 0                      # ... of them, those that take bundles
        self._index = _TagIndex()              # listeners that declared tags
        self._filter_held = 0                  # bytes their filters hold, all together
        self._filter_pids: dict = {}           # ... and for each client process
        self._scan_credit = _SCAN_BURST        # seconds filtered replays may still take
        self._scan_at = time.monotonic()
        self._deferred: dict = {}              # pid -> {peer: sub} waiting for the time
        self._partial: set = set()             # peers holding an unfinished frame
        self._paused: collections.deque = collections.deque()
        self._dirty: set = set()
        self._scratch = bytearray(_SCRATCH_BYTES)   # every read lands here first
        self._nonces: list = []                # bundle nonces not used yet
        self._tag_json: dict = {}              # raw tag -> its JSON text, for bundles
        self._stopping = threading.Event()
        self._thread = None
        self._error = None
        self._started_at = time.time()
        self._in_held = 0                      # bytes of unfinished frames, all peers
        self._ctl_held = 0                     # bytes of control replies queued, all peers
        self._ev_held = 0                      # bytes of event blocks queued or in the ring
        self._ev_cap = max(_TOTAL_BACKLOG_FACTOR * self.backlog,   # and room for the
                           self._ring.max_bytes + self.backlog)     # ring and a backlog
        self._accept_paused_until = 0.0
        self._next_check = time.monotonic() + _PATH_CHECK_INTERVAL
        self._warned: dict = {}                # warning key -> monotonic time of the last
        self._ousted = False                   # another broker owns the bus's paths now
        idle_exit = settings.get("saltevent_idle_exit")
        self._idle_exit = float(idle_exit) if idle_exit else None
        self._idle_since = time.monotonic()
        self.events_in = self.events_out = self.bytes_in = self.bytes_out = 0
        self.bundles = 0                       # B frames made (see _bundle)
        self._drops = 0
        self._resuming: set = set()            # listener ids the predecessor handed over
        self._handed_drops: dict = {}
        self.epoch, self.seq = os.urandom(6).hex(), 0
        self._hello = _encode_control({"ctl": "hello", "pid": os.getpid(), "v": 2,
                                       "epoch": self.epoch})
        try:
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector.register(self._listen_sock, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        except BaseException:
            self._close_own_fds()
            raise

    def _take_over(self) -> None:
        """Continue a clean predecessor's epoch, if it left a hand-off state.  On the
        broker thread, before serving: a big state costs the electing caller nothing,
        and no client is served before it is read."""
        state = _load_state(self.bus)
        if state:
            self.epoch, self.seq = state["epoch"], state["seq"]
            self._hello = _encode_control({"ctl": "hello", "pid": os.getpid(), "v": 2,
                                           "epoch": self.epoch})
            self._adopt(state)

    def _adopt(self, state: dict) -> None:
        """Take over the events a clean predecessor handed over."""
        ring = self._ring
        for first, last, payload in state["runs"]:
            mark = _SEQ_MARK.pack(_MARK, 0, 0, _SEQ.size, first)
            blk = _Block((mark, payload), len(payload) + len(mark), last - first + 1,
                         first, last)
            ring.blocks.append(blk)
            blk.refs += 1
            blk.in_ring = True
            ring.events += blk.count
            ring.bytes += blk.cost
            self._ev_held += blk.cost
        ring.extra_events, ring.extra_bytes = ring.events, ring.bytes
        ring.grace_until = time.monotonic() + _HANDOFF_GRACE
        self._resuming = state["lids"]
        self._handed_drops = state["drops"]
        log.debug("broker of %s continues epoch %s at %d with %d events handed over",
                  self.bus.path, self.epoch, self.seq, ring.events)

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
        thread = threading.Thread(target=self.serve_forever, name="saltevent-broker",
                                  daemon=True)
        thread.start()
        self._thread = thread

    def serve_forever(self) -> None:
        """Serve until close(); then hand off.  Runs on the broker thread."""
        try:
            self._take_over()
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
        self.wake()

    def wake(self) -> None:
        """Make the broker look at its timers and paths now."""
        self._next_check = 0.0
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
        for peer in list(self._peers):
            peer.alive = False
            peer.sock.close()
        self._peers.clear()
        self._plain.clear()
        self._index = _TagIndex()
        self._filter_held = 0
        self._filter_pids.clear()
        sock, self._listen_sock = self._listen_sock, None
        if sock is not None:
            self._unlink_own_path()
            sock.close()
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)
        self._close_own_fds()

    def _close_own_fds(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop (broker thread)

    def _serve(self) -> None:
        """Dispatch readiness until stop().  Runs on the broker thread."""
        select_ = self._selector.select
        dirty = self._dirty
        now = time.monotonic()
        events_in = 0
        while not self._stopping.is_set():
            timeout = self._next_check - now
            for key, mask in select_(timeout if timeout > 0 else 0):
                peer = key.data
                if peer is None:
                    self._accept()
                elif peer is self._wake_r:
                    self._drain_wake()
                else:
                    if mask & selectors.EVENT_READ and peer.alive:
                        self._on_readable(peer)
                    if mask & selectors.EVENT_WRITE and peer.alive:
                        dirty.add(peer)
            if dirty:
                for peer in dirty:
                    if peer.alive:
                        self._flush(peer)
                dirty.clear()
            if self.events_in != events_in and _sched_yield is not None:
                # Events came and went out: let their firers (and listeners) run before
                # this thread sleeps, so the next wake-up finds more to do at once.
                events_in = self.events_in
                _sched_yield()
            now = time.monotonic()
            if now >= self._next_check:
                self._timers()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        """Log a warning, at most once per _WARN_INTERVAL for one *key*."""
        now = time.monotonic()
        if now >= self._warned.get(key, 0.0):
            self._warned[key] = now + _WARN_INTERVAL
            log.warning(msg, *args)

    def _timers(self) -> None:
        """Check paths, resume accepting, drop stalled frames, evict old ones for paused
        clients, end the grace.  Runs on the broker thread."""
        now = time.monotonic()
        self._next_check = now + _PATH_CHECK_INTERVAL
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._resume_accept()
        if self._accept_paused_until:
            self._next_check = min(self._next_check, self._accept_paused_until)
        for peer in [p for p in self._partial
                     if not p.paused and now - p.reader.since > _FRAME_STALL]:
            self._drop(peer, f"left a frame unfinished for {_FRAME_STALL:g} s")
        if self._paused and self._make_room(None, _BIG_FRAME):
            self._resume_paused()          # frames held too long were evicted for them
        if self._ring.grace_until and now >= self._ring.grace_until:
            self._ring.end_grace(self._release)
            self._resuming.clear()             # later resumes are not the handed-over
            self._handed_drops.clear()         # ones: they wait their turn, as others
        if self._deferred:
            self._run_deferred()
        if self._peers:
            self._idle_since = now
        elif self._idle_exit is not None and now - self._idle_since >= self._idle_exit:
            log.info("broker of %s has had no clients for %g s; stopping", self.bus.path,
                     self._idle_exit)
            self._stopping.set()
        self._check_paths()

    # -- connections (broker thread)

    def _accept(self) -> None:
        """Accept pending connections, 64 at most before serving those already here (so
        a flood of connections that close at once cannot fill the table before their
        ends are read); refuse other users.  Runs on the broker thread."""
        for _ in range(64):
            if self._listen_sock is None:
                return
            try:
                sock, _ = self._listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(exc)
                    return
                self._warn("accept", "broker of %s cannot accept: %s", self.bus.path, exc)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        try:
            pid, uid = _peer_creds(sock)
        except OSError as exc:
            self._warn("creds", "refused a client of %s: %s", self.bus.path, exc)
            sock.close()
            return
        if not _trusted(uid):
            self._warn(f"uid{uid}", "refused a client of %s: uid %d is not ours",
                       self.bus.path, uid)
            sock.close()
            return
        sock.setblocking(False)
        if len(self._peers) >= self.max_clients:
            self._warn("full", "refused a client of %s (pid %d): %d clients is the most "
                       "this broker serves", self.bus.path, pid, self.max_clients)
            try:
                sock.send(_encode_control({"ctl": "refused", "reason": "too many clients"}))
            except OSError:
                pass
            sock.close()
            return
        peer = _Peer(sock, pid)
        self._peers[peer] = None
        leaving = self._stopping.is_set()
        frame = _BYE_FRAME if leaving else self._hello
        self._queue_control(peer, _Block((frame,), len(frame)))
        self._flush(peer)                  # (and select it, once, for what is left)
        log.debug("client connected to %s (pid %d)", self.bus.path, pid)

    def _pause_accept(self, exc: OSError) -> None:
        """Out of fds: stop watching the listening socket for a while (it would stay
        readable and spin the loop)."""
        self._warn("emfile", "broker of %s cannot accept new clients: %s; retrying every "
                   "%g s", self.bus.path, exc.strerror, _ACCEPT_BACKOFF)
        if not self._accept_paused_until:
            self._selector.unregister(self._listen_sock)
        self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF
        self._next_check = min(self._next_check, self._accept_paused_until)

    def _resume_accept(self) -> None:
        if self._accept_paused_until and self._listen_sock is not None:
            self._accept_paused_until = 0.0
            self._selector.register(self._listen_sock, selectors.EVENT_READ, None)

    def _drop(self, peer: _Peer, reason: str) -> None:
        """Close *peer* and let go of all it held; log *reason* when it is an error.
        Runs on the broker thread."""
        if not peer.alive:
            return
        peer.alive = False
        del self._peers[peer]
        if peer.filters is not None:
            self._index.remove(peer, peer.filters)
        elif peer in self._plain:
            del self._plain[peer]
            self._bundled -= peer.bundles
        if peer.deferred:
            waiting = self._deferred.get(peer.pid, {})
            waiting.pop(peer, None)
            if not waiting:
                self._deferred.pop(peer.pid, None)
            peer.deferred = False
        if peer.filter_cost:
            self._filter_held -= peer.filter_cost
            left = self._filter_pids.pop(peer.pid, 0) - peer.filter_cost
            if left > 0:
                self._filter_pids[peer.pid] = left
            peer.filter_cost = 0
        self._discard_output(peer)
        self._in_held -= peer.reader.held
        peer.reader.buf = None
        peer.reader.head = b""
        self._partial.discard(peer)
        if reason:
            log.warning("dropped a client of %s (pid %d): %s", self.bus.path, peer.pid, reason)
        else:
            log.debug("client of %s closed (pid %d)", self.bus.path, peer.pid)
        if peer.mask:
            self._selector.unregister(peer.sock)
        peer.sock.close()
        if self._accept_paused_until:
            self._resume_accept()
        self._resume_paused()

    def stats(self) -> dict:
        """Return the broker's figures (a snapshot; read on the broker thread)."""
        listeners = self._listeners()
        busy = [peer for peer in listeners if peer.out_bytes]      # most are idle: sort
        busy.sort(key=lambda p: p.out_bytes, reverse=True)         # only the busy ones
        shown = busy[:_STATS_LISTENERS]
        if len(shown) < _STATS_LISTENERS:
            shown += [peer for peer in listeners if not peer.out_bytes][
                :_STATS_LISTENERS - len(shown)]
        ring = self._ring
        return {
            "bus": self.bus.path, "pid": os.getpid(), "uptime": time.time() - self._started_at,
            "epoch": self.epoch, "seq": self.seq,
            "clients": len(self._peers), "listeners": len(listeners),
            "filtered_listeners": len(listeners) - len(self._plain),
            "events_in": self.events_in, "events_out": self.events_out,
            "bundles": self.bundles,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "dropped": self._drops,
            "ring": {"events": ring.events, "bytes": ring.bytes, "first": ring.first,
                     "last": ring.last, "max_events": ring.max_events,
                     "max_bytes": ring.max_bytes},
            "held": {"input": self._in_held, "control": self._ctl_held,
                     "events": self._ev_held, "filters": self._filter_held},
            "limits": {"backlog": self.backlog, "events": self._ev_cap,
                       "input": _INPUT_BUDGET, "control": _CONTROL_BUDGET,
                       "filters": _FILTER_BUDGET, "clients": self.max_clients},
            "per_listener": [{
                "pid": peer.pid, "events_out": peer.events_out, "bytes_out": peer.bytes_out,
                "queued_bytes": peer.out_bytes, "dropped": peer.dropped,
                "backlog": peer.backlog, "tags": None if peer.filters is None else len(
                    peer.filters)} for peer in shown],
        }


def _filters_match(filters: list, tag: str) -> bool:
    for prefix, glob in filters:
        if tag.startswith(prefix) and (glob is None or glob.match(tag)):
            return True
    return False


def _positive_int(settings: Mapping, key: str) -> int:
    value = settings[key]
    if value.__class__ is not int or value <= 0:
        raise ValueError(f"opts[{key!r}] must be a positive int, not {value!r}")
    return value


def _non_negative_int(settings: Mapping, key: str) -> int:
    value = settings[key]
    if value.__class__ is not int or value < 0:
        raise ValueError(f"opts[{key!r}] must be an int >= 0, not {value!r}")
    return value


def _sub_fields(msg: Mapping) -> dict:
    """The fields of a ``sub`` request, checked (ValueError says what is wrong), and
    nothing else of the client's message; a dict of them passes as a request too."""
    tags = msg.get("tags")
    if tags is not None:
        if (not isinstance(tags, list) or len(tags) > _MAX_TAG_FILTERS
                or not all(isinstance(t, str) for t in tags)
                or sum(map(len, tags)) > _MAX_TAG_FILTER_CHARS):
            raise ValueError(f"tags must be a list of at most {_MAX_TAG_FILTERS} "
                             f"strings of {_MAX_TAG_FILTER_CHARS} characters in all")
        tags = list(dict.fromkeys(tags))
    return {"backlog": _opt_int(msg, "backlog"), "since": _opt_int(msg, "since", minimum=0),
            "last": _opt_int(msg, "last", minimum=0), "epoch": _opt_str(msg, "epoch"),
            "lid": _opt_str(msg, "lid"), "tags": tags, "resume": bool(msg.get("resume")),
            "bundles": msg.get("bundles") is True}


def _opt_int(msg: Mapping, key: str, minimum: int = 1) -> int | None:
    value = msg.get(key)
    if value is None:
        return None
    if value.__class__ is not int or not minimum <= value < 1 << 63:
        raise ValueError(f"{key} must be an int >= {minimum}")
    return value


def _opt_str(msg: Mapping, key: str) -> str | None:
    value = msg.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ValueError(f"{key} must be a short string")
    return value


# Brokers this process runs, and how many live event objects use each bus here.
# __del__ never takes _registry_lock (a collection may run it while this thread holds
# the lock): it appends to _orphans, which the next registry call settles.
_registry_lock = threading.Lock()
_brokers: dict = {}
_users: dict = {}
_orphans: list = []


def _settle_orphans() -> list:
    """Forget the users that __del__ left; return the brokers no user needs any more.
    Call with _registry_lock held."""
    idle = []
    while _orphans:
        path = _orphans.pop()
        count = _users.get(path, 0) - 1
        if count > 0:
            _users[path] = count
            continue
        _users.pop(path, None)
        broker = _brokers.pop(path, None)
        if broker is not None:
            idle.append(broker)
    return idle


_spawned: dict = {}                    # bus path -> the broker process we started


def _spawn_broker(bus: _Bus, idle_exit: float | None) -> bool:
    """Start a broker process of its own for *bus* (``saltevent_broker: 'process'``), so
    that it never shares this process's GIL; False: the caller waits for it to listen.
    A spawned broker stops once it has had no clients for *idle_exit* seconds
    (``_SPAWNED_IDLE_EXIT`` when None)."""
    with _registry_lock:
        proc = _spawned.get(bus.path)
        if proc is not None and proc.poll() is None:
            return False                       # still starting, or serving elsewhere
        import subprocess
        argv = [sys.executable, os.path.abspath(__file__), "bus", "--sock-dir",
                os.path.dirname(bus.path), "--bus-name", bus.name, "--idle-exit",
                str(float(idle_exit or _SPAWNED_IDLE_EXIT))]
        try:
            _spawned[bus.path] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        except OSError as exc:
            log.warning("cannot start a broker process for %s (%s); running it on a thread",
                        bus.path, exc)
            return None
        log.debug("started broker process %d for %s", _spawned[bus.path].pid, bus.path)
        return False


def _start_broker(bus: _Bus, opts: Mapping | None = None) -> bool:
    """Run *bus*'s broker in this process if no process does; True if one runs here now."""
    if opts and opts.get("saltevent_broker") == "process" and sys.executable:
        spawned = _spawn_broker(bus, opts.get("saltevent_idle_exit"))
        if spawned is not None:
            return spawned
    with _registry_lock:
        idle = _settle_orphans()
        broker = _brokers.get(bus.path)
        running = broker is not None and broker.is_running and not broker._stopping.is_set()
        if not running:
            elected = _elect(bus)
            if elected is not None:
                try:
                    broker = Broker(bus, elected, opts)
                    broker.start()
                except BaseException:
                    elected.give_up(bus.path)
                    raise
                _brokers[bus.path] = broker
                running = True
    for old in idle:
        old.stop()
    if running:
        broker.wake()          # it checks its paths: a client here found no socket
    return running


def _attach(bus: _Bus) -> None:
    with _registry_lock:
        idle = _settle_orphans()
        _users[bus.path] = _users.get(bus.path, 0) + 1
    for broker in idle:
        broker.stop()


def _detach(bus: _Bus) -> None:
    """Forget one user of *bus*; hand off the broker here when it was the last."""
    with _registry_lock:
        _orphans.append(bus.path)
        idle = _settle_orphans()
    for broker in idle:
        broker.close()


@atexit.register
def _stop_brokers() -> None:
    # Another thread may hold the lock for ever (a daemon thread stuck at exit):
    # wait a little, then go on without it.
    locked = _registry_lock.acquire(timeout=1.0)
    try:
        brokers = list(_brokers.values())
        _brokers.clear()
        _users.clear()
        del _orphans[:]
    finally:
        if locked:
            _registry_lock.release()
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
        for peer in broker._peers:
            peer.sock.close()
        broker._peers.clear()
        for sock in (broker._listen_sock,):
            if sock is not None:
                sock.close()
        broker._listen_sock = None
        if broker._lock_fd is not None:
            os.close(broker._lock_fd)       # the flock stays the parent's
            broker._lock_fd = None
        broker._close_own_fds()
    _brokers.clear()
    _users.clear()
    del _orphans[:]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_brokers_after_fork)


# -- Client core --------------------------------------------------------------
#
# The client's I/O is written once, as generators of "steps": a step is a float
# (sleep that many seconds; _YIELD_STEP: only let other processes run first) or
# ``(sock, write, timeout)`` (wait until the socket is readable or writable; the
# generator is sent True, or False on timeout).  The sync API runs them with
# _drive(); the asyncio face with _drive_async().


#: A step that gives the CPU away once (sched_yield) instead of sleeping.
_YIELD_STEP = -1.0


def _drive(steps: Iterator, wake: threading.Event | None = None) -> Any:
    """Run a steps generator, blocking the calling thread; return its value.

    Sleeps wait on *wake*: once destroy() sets it (from any thread), the steps get
    BusClosedError instead of another sleep.
    """
    try:
        step = next(steps)
        while True:
            if step is _YIELD_STEP:
                if _sched_yield is not None:
                    _sched_yield()
                step = steps.send(None)
                continue
            if step.__class__ is float:
                if wake is None:
                    time.sleep(step)
                elif wake.wait(step):
                    step = steps.throw(BusClosedError("-", "the event object was destroyed"))
                    continue
                step = steps.send(None)
            else:
                step = steps.send(_wait_fd(*step))
    except StopIteration as stop:
        return stop.value


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _connect_steps(bus: _Bus, deadline: float | None, opts: Mapping | None = None,
                   timeout: float | None = None) -> Iterator:
    """Return a socket connected to *bus*'s broker, electing this process its broker if
    none runs.  Retries while nobody serves the path or its listen queue is full;
    raises EventTimeout at *deadline* (*timeout* is what the caller asked for)."""
    delay = 0.001
    while True:
        try:
            sock = _connect(bus.path)
        except OSError as exc:
            raise BusClosedError(bus.path, f"cannot connect: {exc.strerror}") from exc
        if sock is not None:
            return sock
        if not _start_broker(bus, opts) or delay > 0.001:
            if deadline is not None and time.monotonic() >= deadline:
                raise EventTimeout(bus.path, timeout)
            yield min(delay, max(0.0, deadline - time.monotonic())) if deadline else delay
            delay = min(delay * 2, 0.02)
        else:
            delay *= 2             # a broker here, yet no socket: give it a moment


def _control_steps(conn: "_Conn", ctl: str, deadline: float | None, events: Any,
                   path: str, timeout: float | None = None) -> Iterator:
    """Wait for the control frame *ctl* on *conn*; return it, or None if the
    connection ends or the broker says bye first.  Events read with it (a replay
    after ``ok``) go to *events*.  Raises EventTimeout at *deadline*, and FrameError
    if events come first: no broker sends any before it answers, so the peer is not
    ours.  What a read brings is held apart until the answer comes: on every way out
    without it, none of the peer's events reach *events* (nor could a peer that
    streams them grow anything for as long as the wait lasts)."""
    got = collections.deque()
    while not (conn.eof or conn.bye):
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise EventTimeout(path, timeout, f"no answer ({ctl}) from the broker")
        if not (yield (conn.sock, False, remaining)):
            continue
        try:
            controls = conn.recv_into(got)
        except BlockingIOError:
            continue
        for msg in controls:
            if msg["ctl"] == ctl:
                events.extend(got)
                return msg
            if msg["ctl"] == "refused":
                raise BusClosedError(path, f"the broker refused: {msg.get('reason')}")
        if got:
            raise FrameError(f"the peer at {path} sent events before its {ctl!r}: no broker "
                             "of ours does")
    return None


class _Conn:
    """One client connection: framing, control frames and hand-off, no policy.

    Events go to the caller's queue as ``(tag, body, seq)``; the broker's notices of
    missed events as ``(None, notice, seq)`` at the point of the hole.  Shared by the
    sync API and the asyncio face.  Not thread-safe.
    """

    __slots__ = ("sock", "reader", "bye", "eof", "seq", "epoch", "append", "extend",
                 "eager", "_controls")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = _FrameReader(MAX_FRAME_BYTES)
        self.bye = False          # the broker announced a hand-off
        self.eof = False          # the broker closed the connection
        self.seq = 0              # number of the last event received
        self.epoch = None
        self.append = self.extend = None   # where a read puts events (the caller's queue)
        self.eager = True         # decode bundles as they come (the reader takes all)
        self._controls = []

    def recv_into(self, events: Any) -> list:
        """Read once without blocking; queue events; return other control frames.

        Raises BlockingIOError if nothing is there, FrameError if the broker sent
        something malformed.
        """
        reader = self.reader
        if reader.need:
            reader.alloc()
        self.append = events.append
        self.extend = events.extend
        self._controls = controls = []
        try:
            reader.read(self.sock, _RECV_BYTES, None, self)
        except (ConnectionResetError, BrokenPipeError):
            reader.eof = True
        if reader.need:
            reader.alloc()
        if reader.eof:
            self.eof = True
        return controls

    def bundle(self, data: Any, body: int, end: int, seq: int) -> int:
        """Queue the events of the bundle ``data[body:end]``; return the number of the
        last.  Decoded at once for a reader that takes every event (``eager``); else, or
        if a body is not one JSON object, queued as bodies to decode one by one."""
        nonce, tags, bodies = _bundle_parts(data, body, end)
        count = len(tags)
        datas = _decode_joined(bodies, nonce, count) if self.eager else None
        if datas is None:
            datas = _bundle_split(bytes(bodies), nonce, count)
        self.extend(zip(tags, datas, range(seq + 1, seq + 1 + count)))
        return seq + count

    def control(self, kind: int, data: Any, body: int, end: int, seq: int) -> int:
        """Act on a frame that is not an event; return the number of the last event."""
        if kind == _MARK:
            return _SEQ.unpack_from(data, body)[0] - 1
        msg = _decode_control(data[body:end])
        ctl = msg["ctl"]
        if ctl == "drop" or ctl == "gap":
            self.append((None, msg, seq))      # at the point of the hole
        elif ctl == "bye":
            self.bye = True
            try:
                self.sock.shutdown(socket.SHUT_WR)     # we are done here
            except OSError:
                pass
        else:
            if ctl == "ok" or ctl == "hello":
                self.epoch = msg.get("epoch")
                if ctl == "ok" and msg.get("seq").__class__ is int:
                    seq = msg["seq"]
            self._controls.append(msg)
        return seq

    def handed_off(self) -> bool:
        """Return True if the broker said bye or went away (a firing connection).

        Reads what is there a few times at most, so a peer that keeps sending cannot
        hold the caller; events sent to a firer mean it is no broker of ours: True.
        """
        events = collections.deque()
        try:
            for _ in range(4):
                if self.eof or self.bye:
                    break
                self.recv_into(events)
                if events:
                    return True
        except BlockingIOError:
            pass
        except (OSError, FrameError):
            return True
        return self.eof or self.bye

    def wake(self) -> None:
        """End a wait on this connection in another thread (it sees EOF)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.wake()
        self.sock.close()


# -- Client classes -----------------------------------------------------------


#: One stretch of events a listener did not get: sequence numbers *first* to *last*
#: (``last`` None: unknown) of *epoch*, *count* of them (None: unknown), and why:
#: ``backlog`` (dropped when it fell behind), ``memory`` (dropped to bound the
#: broker), ``handoff`` (not kept through a hand-off), ``crash`` (the broker's process
#: died), ``ring`` (older than the ring on a replay).
Gap = collections.namedtuple("Gap", "first last count reason epoch")

_MISSED_KEPT = 1000                    # Gap records an event object keeps


class _GapEvent(dict):
    """The in-band notice of missed events that get_event returns (tag ``GAP_TAG``)."""

    __slots__ = ()


class _Pending(dict):
    """A cached event (Salt's ``pending_events``) that remembers its sequence number."""

    __slots__ = ("seq",)


class _Slot:
    """A connection that one call uses at a time; any thread may close it safely:
    while a call uses it, closing only wakes that call, which closes it on return."""

    __slots__ = ("conn", "busy", "doomed")

    def __init__(self):
        self.conn = None
        self.busy = False
        self.doomed = False


class _EventBase:
    """State and plumbing shared by the listening, firing and asyncio parts."""

    def _claim(self, slot: _Slot, deadline: float | None, gen: int) -> None:
        """Wait until *slot* is free and take it; EventTimeout at *deadline*."""
        with self._lock:
            while slot.busy:
                if self._gen != gen:
                    raise BusClosedError(self._bus.path, "the event object was destroyed")
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise EventTimeout(self._bus.path, self._timeout_of(deadline),
                                       "another thread is still using the connection")
                self._cond.wait(remaining)
            slot.busy = True

    def _try_claim(self, slot: _Slot) -> bool:
        with self._lock:
            if slot.busy:
                return False
            slot.busy = True
            return True

    def _unclaim(self, slot: _Slot) -> None:
        with self._lock:
            slot.busy = False
            conn = None
            if slot.doomed:
                slot.doomed = False
                conn, slot.conn = slot.conn, None
            self._cond.notify_all()
        if conn is not None:
            self._forget_fd(conn.sock)
            conn.close()

    def _close_slot(self, slot: _Slot) -> None:
        """Close *slot*'s connection now, or (while a call uses it) wake that call and let
        it close the connection when it returns."""
        with self._lock:
            conn = slot.conn
            if conn is None:
                return
            if slot.busy:
                slot.doomed = True
                conn.wake()
                return
            slot.conn = None
        self._forget_fd(conn.sock)
        conn.close()

    def _connect_side(self, slot: _Slot, timeout: float | None, steps: Callable,
                      what: str) -> bool:
        """Take *slot* and run ``steps(deadline, gen)`` to connect it, within *timeout*:
        True, or (as Salt's boolean API reports a failure) False or the raised error."""
        gen = self._gen
        deadline = None if timeout is None else time.monotonic() + timeout
        self._asked_timeout = timeout
        try:
            self._claim(slot, deadline, gen)
            try:
                steps(deadline, gen)
            finally:
                self._unclaim(slot)
        except (SaltEventError, OSError) as exc:
            return self._failed(what, exc)
        return True

    def _timeout_of(self, deadline: float | None) -> float | None:
        return getattr(self, "_asked_timeout", None)

    def _failed(self, what: str, exc: BaseException) -> bool:
        """Report a failure as Salt's boolean API does: log it and return False, or
        raise it with ``raise_errors``."""
        if self.raise_errors:
            raise exc
        log.warning("%s on %s: %s", what, self._bus.path, exc)
        return False

    def _forget_fd(self, sock: socket.socket) -> None:      # the asyncio part overrides it
        pass


class _Listening(_EventBase):
    """The listening side: registration, resume after a hand-off, the event queue,
    matching, Salt's subscribe cache, and the accounting of missed events."""

    @property
    def _pub(self) -> _Conn | None:
        return self._pub_slot.conn

    def _subscribe_steps(self, deadline: float | None, gen: int) -> Iterator:
        """Return a connection registered as a listener.

        After a hand-off or a crash it resumes after the last event received; the
        first time, it asks for the replay the opts want.  A connection closed before
        the broker's ``ok`` (it landed in a leaving broker's queue) is retried until
        *deadline*.
        """
        msg = {"ctl": "sub", "backlog": self._backlog, "lid": self._lid, "bundles": True}
        if self._filters is not None:
            msg["tags"] = self._filters
        if self._resume_from is not None:
            msg.update(resume=True, since=self._resume_from[0], epoch=self._resume_from[1])
        elif self._replay is not None:
            msg.update(self._replay)
        frame = _encode_control(msg)
        timeout = self._timeout_of(deadline)
        while True:
            if self._gen != gen:
                raise BusClosedError(self._bus.path, "the event object was destroyed")
            conn = _Conn((yield from _connect_steps(self._bus, deadline, self.opts, timeout)))
            conn.eager = self._eager and self._handler is None   # (a replay may come now)
            try:
                conn.sock.send(frame)
                ok = yield from _control_steps(conn, "ok", deadline, self._events,
                                                self._bus.path, timeout)
                if ok is not None:
                    self._replay = None
                    self._resume_from = None
                    self.epoch = conn.epoch
                    return conn
            except (BrokenPipeError, ConnectionResetError):
                pass
            except BaseException:
                conn.close()
                raise
            conn.close()
            log.debug("broker of %s closed before registering us; retrying", self._bus.path)
            if deadline is not None and time.monotonic() >= deadline:
                raise EventTimeout(self._bus.path, timeout)
            yield 0.001

    def _listen_steps(self, deadline: float | None, auto_reconnect: bool, gen: int) -> Iterator:
        """Read one batch of events into the queue; return False at the deadline.

        Resumes transparently after a hand-off (the new broker says what was missed).
        Raises BusClosedError if the bus is broken (and auto_reconnect gave up).
        """
        delay = 0.01
        slot = self._pub_slot
        while True:
            if self._gen != gen:
                return False
            if self._events:
                return True
            conn = slot.conn
            try:
                if conn is None:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        return False
                    conn = yield from self._subscribe_steps(deadline, gen)
                    slot.conn = conn
                    continue
                if conn.eof:
                    self._resume_from = (conn.seq, conn.epoch)
                    slot.conn = None
                    self._forget_fd(conn.sock)
                    conn.close()
                    retry_by = time.monotonic() + _RECONNECT_TIMEOUT
                    if deadline is not None:
                        retry_by = max(min(retry_by, deadline), time.monotonic() + 0.05)
                    slot.conn = yield from self._subscribe_steps(retry_by, gen)
                    log.debug("listener on %s resumed after a hand-off", self._bus.path)
                    continue
                conn.eager = self._eager
                try:
                    conn.recv_into(self._events)
                except BlockingIOError:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        return False
                    if self._streaming:        # events kept coming: let the broker
                        self._streaming = False    # run before sleeping, then look again
                        yield _YIELD_STEP
                        continue
                    yield (conn.sock, False, remaining)
                    continue
                self._streaming = True
                if self._events:
                    return True
            except (SaltEventError, OSError) as exc:
                if self._gen != gen:
                    return False
                conn = slot.conn
                if conn is not None:
                    if self._resume_from is None:
                        self._resume_from = (conn.seq, conn.epoch)
                    slot.conn = None
                    self._forget_fd(conn.sock)
                    conn.close()
                if not auto_reconnect:
                    raise BusClosedError(self._bus.path, str(exc)) from exc
                if deadline is not None and time.monotonic() + delay >= deadline:
                    return False
                yield delay
                delay = min(delay * 2, 0.5)

    def _note(self, notice: dict) -> dict | None:
        """Account for a broker notice of missed events; return its in-band gap event
        when the opts ask for one."""
        count, first, last = notice.get("n"), notice.get("first"), notice.get("last")
        reason = str(notice.get("reason"))
        if count.__class__ is not int or count < 0:
            count = None
        epoch = notice.get("epoch", self.epoch)
        if notice["ctl"] == "drop" or reason == "handoff":
            self.dropped += count or 0
            now = time.monotonic()
            if now >= self._warn_after:
                self._warn_after = now + 1.0
                log.warning("listener on %s missed %s events (%s), %d dropped in all",
                            self._bus.path, count, reason, self.dropped)
        elif reason == "crash":
            self.gaps += 1
            log.warning("listener on %s may have missed events: the broker's process died",
                        self._bus.path)
        else:
            log.info("listener on %s: %s events %s-%s are no longer on the bus (%s)",
                     self._bus.path, count, first, last, reason)
        gap = Gap(first, last, count, reason, epoch)
        self.missed.append(gap)
        if self._on_gap is not None:
            self._on_gap(gap)
        if not self._gap_events:
            return None
        event = {"data": dict(gap._asdict()), "tag": GAP_TAG}
        if self._seq_keys:
            event.update(seq=None, epoch=self.epoch)
        return _GapEvent(event)

    def _decoded(self, tag: str, body: Any, seq: int) -> dict | None:
        """Return the full event of a queued one, or None (counted, logged) if its data
        cannot be decoded."""
        if body.__class__ is dict:             # decoded with the events before it
            data = body
        else:
            try:                               # _decode_data's common case, inline
                text = body.decode() if body.__class__ is bytes else str(body, "utf-8")
                data, end = _scan_once(text, 0)
                good = end == len(text) and data.__class__ is dict
            except (ValueError, StopIteration, RecursionError):
                good = False
            if not good:
                self._malformed(tag, body)
                return None
        if self._seq_keys:
            return {"data": data, "tag": tag, "seq": seq, "epoch": self.epoch}
        return {"data": data, "tag": tag}       # Salt's key order

    def _decode_batch(self, events: Any) -> None:
        """Decode the small events at the head of the queue with one call of the JSON
        scanner: each queued ``(tag, body, seq)`` becomes ``(tag, data, seq)``.

        Each body must be exactly one JSON object, whatever the bodies around it hold: a
        body that is two objects, or that opens a string or a bracket the next body closes,
        must not shift data onto another event's tag.  So the bodies are joined with a
        random string none of them can know, ``[B1,"N",B2,"N",...]``, and the batch counts
        only if that string stands at every odd place and nowhere else; then each body
        was one value on its own.  If not (or the text is not UTF-8, or nests too deep),
        each is decoded on its own, once: a body that fails stays raw, to be counted
        when it is taken.
        """
        bodies = []
        size = 0
        for tag, raw, _seq in events:
            if tag is None or raw.__class__ is not bytes or len(bodies) == _BATCH_EVENTS:
                break
            size += len(raw)
            if size > _BATCH_BYTES:
                break
            bodies.append(raw)
        count = len(bodies)
        if count < 2:
            return
        nonce = os.urandom(12).hex()
        datas = _decode_joined(_join_bodies(bodies, nonce.encode()), nonce, count)
        if datas is None:                      # decode each on its own; a bad body stays
            datas = []                         # raw (not bytes: it is not batched again)
            for raw in bodies:
                try:
                    datas.append(_decode_data(raw))
                except FrameError:
                    datas.append(memoryview(raw))
        popleft = events.popleft
        head = [popleft() for _ in range(count)]
        events.extendleft(reversed([(tag, data, seq) for (tag, _raw, seq), data
                                    in zip(head, datas)]))

    def _malformed(self, tag: str, body: Any) -> None:
        """Count and log (once a second at most) an event whose data cannot be decoded."""
        try:
            _decode_data(body)
            reason = "frame body is not one JSON object"
        except FrameError as exc:
            reason = str(exc)
        self.malformed += 1
        now = time.monotonic()
        if now >= self._bad_warn_after:
            self._bad_warn_after = now + 1.0
            log.warning("Event with bad payload received from '%s': %s (%d skipped)",
                        tag, reason, self.malformed)

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
        if found is None:
            return None
        self.last_seq = found.seq
        return dict(found)

    def _take(self, tag: str, match: Callable) -> dict | None:
        """Return the first queued event matching *tag* (or an in-band gap event); cache
        subscribed ones on the way."""
        events = self._events
        pending_tags = self.pending_tags
        every = not tag and match is _match_startswith
        self._eager = every                    # bundles: decode all at once, or each taken
        declared = self._declared
        while events:
            etag, body, seq = events.popleft()
            if etag is None:
                gap = self._note(body)
                if gap is not None:
                    return gap
                continue
            if (declared is not None and len(etag) > _GLOB_TAG_CHARS
                    and not _filters_match(declared, etag)):
                continue                       # the broker matched the glob's start only
            if every or match(etag, tag):
                if body.__class__ is dict and not self._seq_keys:     # the fast path
                    self.last_seq = seq
                    return {"data": body, "tag": etag}
                if every and events and body.__class__ is bytes:
                    events.appendleft((etag, body, seq))
                    self._decode_batch(events)
                    etag, body, seq = events.popleft()
                event = self._decoded(etag, body, seq)
                if event is not None:
                    self.last_seq = seq
                    return event
            elif pending_tags and any(pmatch(etag, ptag) for ptag, pmatch in pending_tags):
                event = self._decoded(etag, body, seq)
                if event is not None:
                    cached = _Pending(event)
                    cached.seq = seq
                    self.pending_events.append(cached)
        return None

    def _get_event_steps(self, timeout: float | None, tag: str, match: Callable,
                         auto_reconnect: bool, gen: int) -> Iterator:
        """Return the next event matching *tag*, or None at the deadline or when destroyed."""
        event = self._check_pending(tag, match)
        if event is not None:
            return event
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = False                         # no_block (timeout 0) still reads once
        while True:
            event = self._take(tag, match)
            if event is not None:
                return event
            if deadline is not None and time.monotonic() >= deadline and (
                    timeout > 0 or looked):
                return None
            looked = True
            try:
                if not (yield from self._listen_steps(deadline, auto_reconnect, gen)):
                    return None
            except BusClosedError as exc:
                if self.raise_errors:
                    raise
                log.warning("%s", exc)
                return None

    @staticmethod
    def _wait_timeout(wait: float | None, no_block: bool = False) -> float | None:
        """Translate Salt's ``wait`` (seconds, 0 = for ever) to a timeout."""
        if no_block:
            return 0.0
        if wait == 0 or wait is None:
            return None
        return float(wait)

    def connect_pub(self, timeout: float | None = None) -> bool:
        """Connect the listening side and register with the broker.

        Returns True once the broker has registered this listener, False if no bus
        could be reached within *timeout* seconds (None: wait as long as it takes).
        With ``raise_errors`` a failure raises instead.  After destroy() it listens again.
        """
        self._open()
        if self._pub_slot.conn is not None:
            return True
        return self._connect_side(self._pub_slot, timeout, self._register_pub, "cannot listen")

    def _register_pub(self, deadline: float | None, gen: int) -> None:
        slot = self._pub_slot
        if slot.conn is None:                  # another thread may have connected it
            slot.conn = _drive(self._subscribe_steps(deadline, gen), self._wake)

    def close_pub(self) -> None:
        """Close the listening side; as in Salt, cached and unread events are dropped."""
        self._resume_from = None
        self._close_slot(self._pub_slot)
        self.pending_events = []
        self._events.clear()

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
        match = _get_matcher(match_type) if match_type else self._match
        event = None
        if self._events and not self.pending_events:     # the fast path: one queued
            event = self._take(tag, match)
        if event is None:
            event = self._get_event_blocking(self._wait_timeout(wait, no_block), tag, match,
                                             auto_reconnect)
        if event is None or full:
            return event
        return event["data"]

    def _get_event_blocking(self, timeout: float | None, tag: str, match: Callable,
                            auto_reconnect: bool, gen: int | None = None) -> dict | None:
        if gen is None:
            self._open()
            gen = self._gen
        elif gen != self._gen:
            return None
        slot = self._pub_slot
        deadline = None if timeout is None else time.monotonic() + timeout
        self._asked_timeout = timeout
        try:
            self._claim(slot, deadline, gen)
        except SaltEventError:
            return None
        try:
            return _drive(self._get_event_steps(timeout, tag, match, auto_reconnect, gen),
                          self._wake)
        finally:
            self._unclaim(slot)

    def iter_events(self, tag: str = "", full: bool = False, match_type: str | None = None,
                    auto_reconnect: bool = False) -> Iterator[dict]:
        """Yield matching events for ever; the iterator ends when the object is destroyed.

        It always reconnects (as with *auto_reconnect*): an endless iterator has no
        deadline at which to give up.
        """
        match = _get_matcher(match_type or self._match_type)
        self._open()
        gen = self._gen
        while self._gen == gen:
            event = self._check_pending(tag, match) or self._take(tag, match)
            if event is None:
                event = self._get_event_blocking(None, tag, match, True, gen)
            if event is not None:
                yield event if full else event["data"]

    def _raw_event(self, timeout: float | None) -> dict | None:
        self._open()
        gen = self._gen
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self._take("", _match_startswith) if self._events else None
            if event is not None:
                return {"data": event["data"], "tag": event["tag"]}
            try:
                if not _drive(self._listen_steps(deadline, False, gen), self._wake):
                    return None
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

        A tag that is not subscribed is ignored, as Salt 3008 does.
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


_tag_cache: dict = {}                  # tag -> its UTF-8 bytes, for the tags fired before


class _Firing(_EventBase):
    """The firing side: its connection, framing an event, sending it whole."""

    @property
    def _pull(self) -> _Conn | None:
        return self._pull_slot.conn

    def _pull_steps(self, deadline: float | None) -> Iterator:
        """Return the firing connection, connecting (and electing) if needed.

        A new connection is used only once the broker greeted it: a connection that
        landed on a broker about to leave is told ``bye`` (or reset) instead.
        """
        slot = self._pull_slot
        timeout = self._timeout_of(deadline)
        while slot.conn is None:
            conn = _Conn((yield from _connect_steps(self._bus, deadline, self.opts, timeout)))
            try:
                msg = yield from _control_steps(conn, "hello", deadline, collections.deque(),
                                                 self._bus.path, timeout)
            except BaseException:
                conn.close()
                raise
            if msg is None:
                conn.close()
                log.debug("broker of %s is leaving; firing at the next one", self._bus.path)
                continue
            slot.conn = conn
            self._bye_checked = time.monotonic()
        return slot.conn

    def _send_steps(self, frame: bytes, sent: int, deadline: float | None, gen: int) -> Iterator:
        """Send *frame* from offset *sent*, moving to the next broker after a hand-off.

        A broker never relays an unfinished frame, so a frame cut off by a hand-off or
        a crash is sent again whole, to the next broker.
        """
        slot = self._pull_slot
        timeout = self._timeout_of(deadline)
        failures = 0
        while True:
            if self._gen != gen or slot.doomed:
                raise BusClosedError(self._bus.path, "the event object was destroyed")
            conn = slot.conn
            if conn is None or sent == 0:
                conn = yield from self._pull_steps(deadline)
                now = time.monotonic()
                if now - self._bye_checked >= _BYE_CHECK_INTERVAL:
                    self._bye_checked = now
                    if conn.handed_off():
                        self._drop_pull(conn)
                        continue
            try:
                sent += conn.sock.send(memoryview(frame)[sent:] if sent else frame)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                self._drop_pull(conn)          # the broker went away: on to the next one
                sent = 0
                failures += 1
                if failures > 3:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise EventTimeout(self._bus.path, timeout, "event not sent: no "
                                           "broker kept the connection") from None
                    yield 0.01
                continue
            if sent == len(frame):
                return True
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0 or not (
                    yield (conn.sock, True, remaining)):
                self._drop_pull(conn)          # the broker discards the unfinished frame
                raise EventTimeout(self._bus.path, timeout, "event not sent: the broker "
                                   "did not take it")

    def _drop_pull(self, conn: _Conn) -> None:
        slot = self._pull_slot
        if slot.conn is conn:
            slot.conn = None
        self._forget_fd(conn.sock)
        conn.close()

    def connect_pull(self, timeout: float | None = 1) -> bool:
        """Connect the firing side; True on success, False after *timeout* seconds."""
        self._open()
        return self._connect_side(
            self._pull_slot, timeout,
            lambda deadline, gen: _drive(self._pull_steps(deadline), self._wake),
            "cannot fire")

    def close_pull(self) -> None:
        """Close the firing side."""
        self._close_slot(self._pull_slot)

    @classmethod
    def pack(cls, tag: str, data: Any, max_size: int | None = None) -> bytes:
        """Return the wire frame of one event; with *max_size*, trim *data* as Salt does."""
        raw_tag = _encode_tag(tag)
        body = _encode_body(data)
        if max_size and isinstance(data, dict) and _too_big(body, max_size):
            data = dict(data)
            _trim(data, max_size)
            body = _encode_body(data)
        return _HDR.pack(_EVENT, 0, len(raw_tag), len(body)) + raw_tag + body

    @classmethod
    def unpack(cls, raw: bytes | str) -> tuple:
        """Return ``(tag, data)`` from one frame made by pack()."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        if len(raw) < _HDR_SIZE:
            raise FrameError("frame is not an event", raw)
        kind, flags, taglen, bodylen = _HDR.unpack_from(raw)
        if kind != _EVENT or flags or len(raw) != _HDR_SIZE + taglen + bodylen:
            raise FrameError("frame is not an event", raw)
        try:
            tag = raw[_HDR_SIZE:_HDR_SIZE + taglen].decode()
            text = raw[_HDR_SIZE + taglen:].decode()
            data, end = _scan_once(text, 0)
        except (ValueError, StopIteration, RecursionError):
            raise FrameError("frame is not an event", raw) from None
        if end != len(text):
            raise FrameError("frame is not an event", raw)
        return tag, data

    def _frame(self, data: Mapping, tag: str) -> bytes:
        """Validate, stamp, trim and encode one event (the caller's dict is not changed)."""
        raw_tag = _tag_cache.get(tag) if tag.__class__ is str else None
        if raw_tag is None:
            if not isinstance(tag, str):
                raise TypeError(f"tag must be a str, not {type(tag).__name__}")
            if not tag:
                raise ValueError("Empty tag.")
            if tag == GAP_TAG:
                raise ValueError(f"tag {GAP_TAG!r} is the bus's own notice of missed "
                                 "events; no client may fire it")
            raw_tag = _encode_tag(tag)
            if len(tag) <= _CACHED_TAG_CHARS:
                if len(_tag_cache) >= 1024:
                    _tag_cache.clear()
                _tag_cache[tag] = raw_tag
        if data.__class__ is not dict and not isinstance(data, Mapping):
            raise ValueError(f"Dict object expected, not '{data}'.")
        data = dict(data)
        data["_stamp"] = _stamp()
        try:
            body = _json_encode(data).encode()
        except (TypeError, ValueError, RecursionError):
            body = _encode_body(data)           # it says what is wrong
        limit = self._max_event_size
        if limit and _too_big(body, limit):
            trimmed = _trim(data, limit)
            log.warning("event %s is over max_event_size (%d bytes): trimmed %s",
                        tag, limit, ", ".join(map(str, trimmed)) or "nothing")
            body = _encode_body(data)
        size = _HDR_SIZE + len(raw_tag) + len(body)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"event {tag!r} is {size} bytes; the bus carries at most "
                             f"{MAX_FRAME_BYTES}")
        return _HDR.pack(_EVENT, 0, len(raw_tag), len(body)) + raw_tag + body

    def _send(self, frame: bytes, timeout: float | None) -> bool:
        """Send one frame; False (or raise with raise_errors) if not within *timeout*."""
        slot = self._pull_slot
        sent = 0
        with self._lock:                        # the fast path: one send() on a fresh check
            conn = slot.conn
            if (conn is not None and not slot.busy and self._attached is not None
                    and time.monotonic() - self._bye_checked < _BYE_CHECK_INTERVAL):
                try:
                    sent = conn.sock.send(frame)
                except OSError:
                    sent = 0
                if sent == len(frame):
                    return True
                if sent:
                    slot.busy = True            # the rest must follow on this connection
        self._open()
        gen = self._gen
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        self._asked_timeout = timeout
        try:
            if not sent:
                self._claim(slot, deadline, gen)
            try:
                return _drive(self._send_steps(frame, sent, deadline, gen), self._wake)
            finally:
                self._unclaim(slot)
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


def _asyncio_loop(io_loop: Any) -> Any:
    """Return the asyncio loop of *io_loop*: an asyncio loop itself, or a Tornado
    IOLoop's ``asyncio_loop`` (what Salt code passes; tornado is never imported)."""
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


class _AsyncFace(_EventBase):
    """The asyncio face: the same steps, driven by the event loop."""

    def _loop(self) -> Any:
        """Return the asyncio loop: io_loop's, else the running one, else a new one we own."""
        if self._aloop is None:
            import asyncio
            try:
                self._aloop = asyncio.get_running_loop()
            except RuntimeError:
                self._aloop = asyncio.new_event_loop()
                self._own_loop = True
            if self.io_loop is None:
                self.io_loop = self._aloop
        return self._aloop

    async def _drive_async(self, steps: Iterator) -> Any:
        """Run a steps generator on the event loop; return its value."""
        import asyncio
        gen = self._gen
        try:
            step = next(steps)
            while True:
                if step.__class__ is float:
                    await asyncio.sleep(max(step, 0.0))
                    if self._gen != gen:
                        step = steps.throw(BusClosedError(self._bus.path,
                                                          "the event object was destroyed"))
                        continue
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
        if fd < 0 or self._attached is None:
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

    async def _claim_async(self, slot: _Slot, deadline: float | None, gen: int) -> None:
        """Take *slot* without blocking the loop (another thread or task may hold it)."""
        import asyncio
        delay = 0.0005
        while not self._try_claim(slot):
            if self._gen != gen:
                raise BusClosedError(self._bus.path, "the event object was destroyed")
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise EventTimeout(self._bus.path, self._timeout_of(deadline),
                                   "another caller is still using the connection")
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def _forget_fd(self, sock: socket.socket) -> None:
        """Stop the loop watching *sock* before it is closed."""
        fd = sock.fileno()
        if fd >= 0:
            self._release_loop(fd)

    def _release_loop(self, fd: int | None = None) -> None:
        """Wake the waiters on *fd* (on every fd if None) and drop the handler's reader."""
        loop = self._aloop
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
        (self._aloop.remove_writer if write else self._aloop.remove_reader)(fd)
        if not future.done():
            future.set_result(True)

    def _call_in_loop(self, func: Callable, *args: Any) -> None:
        """Call *func* now if on the loop's thread (or the loop is idle), else soon, safely."""
        import asyncio
        loop = self._aloop
        if asyncio._get_running_loop() is loop or not loop.is_running():
            func(*args)
        else:
            loop.call_soon_threadsafe(func, *args)

    def _close_async(self) -> None:
        """Wake every waiter, cancel our tasks, close the loop if we made it."""
        loop = self._aloop
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
        self._open()
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
        if conn is None or self._attached is None:
            return
        conn.eager = False                     # the handler gets frames: keep the bodies
        try:
            conn.recv_into(self._events)
        except BlockingIOError:
            return
        except (OSError, FrameError):
            conn.eof = True
        if conn.eof:
            self._release_loop(self._handler_fd)
            self._spawn(self._handler_resume())
        self._dispatch()

    def _dispatch(self) -> None:
        import inspect
        events = self._events
        while events and self._handler is not None and self._attached is not None:
            tag, body, seq = events.popleft()
            if tag is None:
                gap = self._note(body)
                if gap is None:
                    continue
                raw = _encode_event(gap["tag"], gap["data"])
            elif (self._declared is not None and len(tag) > _GLOB_TAG_CHARS
                  and not _filters_match(self._declared, tag)):
                continue                           # (as in _take)
            else:
                if body.__class__ is dict:         # decoded ahead by get_event
                    body = _encode_body(body)
                raw_tag = tag.encode()
                raw = _HDR.pack(_EVENT, 0, len(raw_tag), len(body)) + raw_tag + body
                self.last_seq = seq
            try:
                result = self._handler(raw)
            except Exception:
                log.exception("event handler on %s raised on %s", self._bus.path, tag)
                continue
            if inspect.isawaitable(result):
                self._spawn(result)

    async def _handler_resume(self) -> None:
        """Register the handler's connection again after a hand-off."""
        import asyncio
        delay = 0.01
        gen = self._gen
        slot = self._pub_slot
        while self._gen == gen:
            conn = slot.conn
            if conn is not None and conn.eof:
                self._resume_from = (conn.seq, conn.epoch)
                slot.conn = None
                conn.close()
            try:
                deadline = time.monotonic() + _RECONNECT_TIMEOUT
                slot.conn = await self._drive_async(self._subscribe_steps(deadline, gen))
            except (SaltEventError, OSError) as exc:
                log.warning("listener on %s cannot resume yet: %s", self._bus.path, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._gen == gen:
                self._watch_for_handler(self._aloop)
                self._dispatch()
            return

    async def fire_event_async(self, data: Mapping, tag: str, cb: Callable | None = None,
                               timeout: float | None = 1000) -> bool:
        """Fire like fire_event(), without blocking the loop; safe from many tasks at once.

        As Salt 3008 does, a *cb* (deprecated there) is called with None once the event
        is sent, with a DeprecationWarning.
        """
        frame = self._frame(data, tag)
        self._open()
        gen = self._gen
        slot = self._pull_slot
        deadline = None if timeout is None else time.monotonic() + max(timeout / 1000.0, 0.0)
        try:
            await self._claim_async(slot, deadline, gen)
            try:
                ok = await self._drive_async(self._send_steps(frame, 0, deadline, gen))
            finally:
                self._unclaim(slot)
        except (SaltEventError, OSError) as exc:
            return self._failed("event not sent", exc)
        if ok and self.node != "master" and tag.startswith("fire_master"):
            ok = await self._forward_to_master_async(data, timeout)
        if ok and cb is not None:
            warnings.warn("The cb argument to fire_event_async will be removed in 3009",
                          DeprecationWarning, stacklevel=2)
            cb(None)
        return ok

    def _check_no_handler(self) -> None:
        if self._handler is not None:
            raise RuntimeError("set_event_handler() already consumes this object's events")

    async def _get_event_async(self, timeout: float | None, tag: str, match: Callable,
                               auto_reconnect: bool, gen: int) -> dict | None:
        slot = self._pub_slot
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await self._claim_async(slot, deadline, gen)
        except SaltEventError:
            return None
        try:
            return await self._drive_async(self._get_event_steps(timeout, tag, match,
                                                                 auto_reconnect, gen))
        finally:
            self._unclaim(slot)

    async def get_event_async(self, wait: float = DEFAULT_WAIT, tag: str = "", full: bool = False,
                              match_type: str | None = None) -> dict | None:
        """Return like get_event(), awaiting on the loop; ``wait`` is the same hard deadline."""
        self._check_no_handler()
        match = _get_matcher(match_type or self._match_type)
        self._open()
        event = await self._get_event_async(self._wait_timeout(wait), tag, match, False,
                                            self._gen)
        if event is None or full:
            return event
        return event["data"]

    async def aiter_events(self, tag: str = "", full: bool = False,
                           match_type: str | None = None) -> Any:
        """Yield matching events as an async iterator; it ends when the object is destroyed."""
        self._check_no_handler()
        match = _get_matcher(match_type or self._match_type)
        self._open()
        gen = self._gen
        while self._gen == gen:
            event = await self._get_event_async(None, tag, match, True, gen)
            if event is not None:
                yield event if full else event["data"]


class SaltEvent(_Listening, _Firing, _AsyncFace):
    """Listen to and fire events on one bus, with ``salt.utils.event.SaltEvent``'s API.

    *node* ``'master'`` is the master bus of *sock_dir*; any other node is the minion
    bus of ``opts['id']`` there.  With *listen* the object registers as a listener
    before the constructor returns, so it sees every event fired after that.

    Threads: one thread at a time listens (get_event, iter_events).  ``fire_event``
    may be called from any number of threads and asyncio tasks at once: frames are
    never interleaved.  ``destroy`` may be called from any thread; it returns at once
    and wakes every blocked call on the object.  As in Salt, a destroyed object may be
    used again (it reconnects).  Do not share one across ``fork()``.  With *io_loop*
    (an asyncio loop, or a Tornado IOLoop) the asyncio methods are available too.

    :ivar dropped: events the broker dropped because this listener fell behind.
    :ivar gaps: hand-offs after a crash, after which events may have been missed.
    :ivar missed: the last 1,000 stretches of missed events, as :class:`Gap` records.
    :ivar last_seq: the sequence number of the last event returned.
    :ivar epoch: the numbering's epoch (it changes when a broker's process dies).
    """

    def __init__(self, node: str, sock_dir: str | None = None, opts: Mapping | None = None,
                 listen: bool = True, io_loop: Any = None, keep_loop: bool = False,
                 raise_errors: bool = False):
        self._attached = None
        self._gen = 0
        self._lock = threading.Lock()         # guards the slots' state; taken as itself,
        self._cond = threading.Condition(self._lock)   # never through the Condition,
        # whose __enter__ is Python: a signal handler that raises (the CLI's SIGTERM and
        # SIGHUP) could run between its acquire and the with, and leave the lock held
        self._wake = None                     # set by destroy(): ends sleeps in _drive
        self._pub_slot = _Slot()
        self._pull_slot = _Slot()
        self.node = node
        self.opts = dict(_DEFAULT_OPTS)
        if opts:
            self.opts.update(opts)
        self.raise_errors = raise_errors
        self._aloop = self.io_loop = _asyncio_loop(io_loop)
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
        self.malformed = 0
        self.missed = collections.deque(maxlen=_MISSED_KEPT)
        self.last_seq = None
        self.epoch = None
        self._events = collections.deque()
        self._declared = None                  # declared globs, checked here (see _take)
        self._bye_checked = 0.0
        self._warn_after = 0.0
        self._bad_warn_after = 0.0
        self._resume_from = None               # (seq, epoch) to resume after, if any
        self._streaming = False                # the last read brought events
        self._eager = True                     # the last get_event took every event
        self._on_gap = None                    # called with each Gap (the CLI prints it)
        self._lid = os.urandom(8).hex()
        self._match_type = self.opts.get("event_match_type") or "startswith"
        self._match = _get_matcher(self._match_type)
        self._max_event_size = self.opts.get("max_event_size") or 0
        self._read_listener_opts()
        given_dir = sock_dir or self.opts.get("sock_dir")
        self._master_sock_dir = self.opts.get("master_sock_dir") or given_dir
        self.sock_dir = self.opts["sock_dir"] = _resolve_sock_dir(given_dir, node)
        self._bus = _Bus(self.sock_dir, _bus_name(node, self.opts))
        self.puburi = self.pulluri = self._bus.path
        limit = _sun_path_max()
        if len(os.fsencode(self._bus.path)) > limit:
            raise ValueError(f"socket path too long for AF_UNIX ({len(os.fsencode(self._bus.path))} "
                             f"bytes, at most {limit} on {sys.platform}): {self._bus.path}")
        _ensure_sock_dir(self.sock_dir)
        self._open()
        try:
            if listen:
                self._listen_now()
        except BaseException:
            self.destroy()
            raise

    def _read_listener_opts(self) -> None:
        """Read saltevent's own listener keys from opts (see SALTEVENT_OPTS)."""
        opts = self.opts
        backlog = opts.get("saltevent_backlog_bytes") or DEFAULT_BACKLOG_BYTES
        if backlog.__class__ is not int or backlog <= 0:
            raise ValueError(f"opts['saltevent_backlog_bytes'] must be a positive int, not "
                             f"{backlog!r}")
        self._backlog = backlog
        tags = opts.get("saltevent_tags")
        if isinstance(tags, str):
            tags = [tags]
        if tags is not None:
            if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
                raise TypeError("opts['saltevent_tags'] must be a list of tag prefixes or globs")
            if len(tags) > _MAX_TAG_FILTERS or sum(map(len, tags)) > _MAX_TAG_FILTER_CHARS:
                raise ValueError(f"opts['saltevent_tags'] has {len(tags)} entries of "
                                 f"{sum(map(len, tags))} characters; at most "
                                 f"{_MAX_TAG_FILTERS} of {_MAX_TAG_FILTER_CHARS} in all")
            tags = list(tags)
            try:                               # a glob that cannot compile: now
                declared = [_tag_filter(pattern) for pattern in tags]
            except ValueError as exc:
                raise ValueError(f"opts['saltevent_tags']: {exc}") from None
            if any(glob is not None for _prefix, glob in declared):
                self._declared = declared      # the broker filters on their starts only
        self._filters = tags
        self._replay = None
        last, since = opts.get("saltevent_replay_last"), opts.get("saltevent_replay_since")
        for key, value in (("saltevent_replay_last", last), ("saltevent_replay_since", since)):
            if value is not None and (value.__class__ is not int or value < 0):
                raise ValueError(f"opts[{key!r}] must be an int >= 0, not {value!r}")
        if since is not None:
            self._replay = {"since": since}
            epoch = opts.get("saltevent_replay_epoch")
            if epoch is not None:
                self._replay["epoch"] = str(epoch)
        elif last:
            self._replay = {"last": last}
        self._seq_keys = bool(opts.get("saltevent_seq"))
        self._gap_events = bool(opts.get("saltevent_gap_events"))

    def _listen_now(self) -> None:
        """Register as a listener for the constructor: a bus that cannot be used at all
        raises BusClosedError; one that is only slow to answer logs and is retried by
        the first get_event."""
        gen = self._gen
        deadline = time.monotonic() + _CONNECT_TIMEOUT
        self._asked_timeout = _CONNECT_TIMEOUT
        try:
            self._pub_slot.conn = _drive(self._subscribe_steps(deadline, gen), self._wake)
        except EventTimeout as exc:
            self._failed("cannot listen", exc)
        except (OSError, FrameError) as exc:   # FrameError: no broker of ours answered
            raise BusClosedError(self._bus.path, f"cannot listen: {exc}") from exc

    def _open(self) -> None:
        """Count this object as a user of its bus (again, after destroy())."""
        if self._attached is None:
            _attach(self._bus)
            self._attached = self._bus
            self._wake = threading.Event()
            loop = self._aloop
            if self._own_loop and loop is not None and loop.is_closed():
                self._aloop = self.io_loop = None
                self._own_loop = False

    # -- state derived from the connections (Salt's cpub / cpush flags)

    @property
    def cpub(self) -> bool:
        """True while the listening side is connected."""
        return self._pub_slot.conn is not None

    @property
    def cpush(self) -> bool:
        """True while the firing side is connected."""
        return self._pull_slot.conn is not None

    @property
    def subscriber(self) -> Any:
        """The listening connection, or None (Salt's attribute, for ``if ev.subscriber:``)."""
        return self._pub_slot.conn

    @property
    def pusher(self) -> Any:
        """The firing connection, or None (Salt's attribute)."""
        return self._pull_slot.conn

    @property
    def closed(self) -> bool:
        """True after destroy(), until the object is used again."""
        return self._attached is None

    def __repr__(self) -> str:
        state = "closed" if self._attached is None else (
            "listening" if self._pub_slot.conn else "idle")
        return f"<{type(self).__name__} bus={self._bus.path} {state}>"

    def destroy(self) -> None:
        """Close everything and wake every blocked call; idempotent.  The object may be
        used again afterwards, as in Salt: firing or listening reconnects."""
        self._gen += 1
        if self._wake is not None:
            self._wake.set()
        self._close_async()
        self._handler = None
        self._close_slot(self._pub_slot)
        self._close_slot(self._pull_slot)
        self.pending_events = []               # as Salt's close_pub(): unread events go
        self._events.clear()
        with self._lock:
            self._cond.notify_all()
        bus, self._attached = self._attached, None
        if bus is not None:
            _detach(bus)

    close = destroy

    def __enter__(self) -> SaltEvent:
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    def __del__(self) -> None:
        bus = getattr(self, "_attached", None)
        if bus is None:
            return
        warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
        self._attached = None
        for slot in (self._pub_slot, self._pull_slot):
            if slot.conn is not None:
                slot.conn.sock.close()
        _orphans.append(bus.path)
        # Never wait for the lock here: the collection may have interrupted the code
        # that holds it.  If it is free, settle now; else the next registry call will.
        if _registry_lock.acquire(blocking=False):
            try:
                idle = _settle_orphans()
            finally:
                _registry_lock.release()
            for broker in idle:
                broker.stop()


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
    except Exception as exc:            # never raises, as Salt's
        log.warning("Failed to fire args event %s with data %s: %s", tag, tag_data, exc)


# -- Bridge to Salt -----------------------------------------------------------
#
# The only code that uses Salt.  Bridge.run() imports it (importlib, so that nothing
# else does); importing saltevent never does.

#: The key a bridge adds to the data of each event it forwards:
#: ``{"via": [bridge ids], "_stamp": the event's _stamp where it was first fired}``.
#: A bridge never forwards an event whose ``via`` holds its own id.
BRIDGE_MARK = "__saltevent_bridge__"

_BRIDGE_POLL = 0.5                     # seconds one get_event waits, either side
_BRIDGE_HOLD = 10_000                  # events one direction holds while its far bus is down
_BRIDGE_FLUSH = 5.0                    # seconds a stopping bridge spends on what it holds
_BRIDGE_RETRY = 0.1                    # seconds before retrying a bus that is down ...
_BRIDGE_RETRY_MAX = 2.0                # ... doubling up to this
_BRIDGE_PROBE = 1.0                    # seconds of quiet before checking Salt's publisher
_BRIDGE_REPORT = 60.0                  # seconds between counter lines in the log
_SALT_NODES = ("master", "minion")
_NO_SALT = ("Salt is not importable by {python} ({exc}); run the bridge under a Python "
            "that has Salt, for example Salt's onedir Python: "
            "/opt/saltstack/salt/bin/python3 -m saltevent bridge ...")


class BridgeError(SaltEventError):
    """The bridge cannot run: Salt is missing, or its config cannot be used."""


class _Link:
    """One bus as the bridge sees it, up or down; each outage is logged once, whichever
    direction's thread notices it.  A *probed* bus is not sent to while it is down:
    the bridge's check of its socket says when it is back."""

    def __init__(self, name: str, probed: bool = False):
        self.name = name
        self.probed = probed
        self.outages = 0
        self._down_since = None
        self._lock = threading.Lock()          # guards outages and _down_since

    def down(self, reason: str) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        log.warning("%s is down (%s); the bridge holds events for it and retries",
                    self.name, reason)

    def up(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("%s is back after %.1f s", self.name, time.monotonic() - since)

    @property
    def waits(self) -> bool:
        """True while nothing should be sent to this bus."""
        return self.probed and self._down_since is not None


class _Direction:
    """One way through the bridge: its tag filter, the events it holds for the far bus,
    and its counters.  Used by its own thread; reports read the counters."""

    def __init__(self, name: str, patterns: list, far: _Link, hold: int):
        self.name = name
        self.patterns = patterns
        self.filters = [_tag_filter(pattern) for pattern in patterns]
        self.far = far
        self.hold = hold
        self.held = collections.deque()
        self.retry_at = 0.0
        self.delay = _BRIDGE_RETRY
        self.forwarded = self.filtered = self.failed = self.echoes = 0
        self.missed = self.gaps = 0
        self.receive = self.send = None        # set by Bridge.run()
        self.reset = None                      # drops the far side's stale connection
        self.outages_seen = 0

    def counters(self) -> dict:
        return {"forwarded": self.forwarded, "filtered": self.filtered, "failed": self.failed,
                "echoes": self.echoes, "missed": self.missed, "held": len(self.held)}


def _salt_pull_address(opts: Mapping, node: str) -> tuple:
    """Return ``(family, address)`` of the socket Salt's firers send to on the bus of
    *node* (its publisher binds it last), as ``salt.transport.base`` works it out."""
    if opts.get("ipc_mode") == "tcp":
        host = "::1" if opts.get("ipv6") else "127.0.0.1"
        port = opts["tcp_master_pull_port" if node == "master" else "tcp_pull_port"]
        family = socket.AF_INET6 if opts.get("ipv6") else socket.AF_INET
        return family, (host, int(port))
    if node == "master":
        return socket.AF_UNIX, os.path.join(opts["sock_dir"], "master_event_pull.ipc")
    import hashlib
    minion_id = opts.get("hash_id", opts["id"])
    id_hash = hashlib.new(opts["hash_type"], str(minion_id).encode()).hexdigest()[:10]
    return socket.AF_UNIX, os.path.join(opts["sock_dir"], f"minion_event_{id_hash}_pull.ipc")


def _salt_node_of(path: str) -> str:
    """Return 'master' or 'minion' from a Salt config file's name, as Salt names them."""
    name = os.path.basename(path.rstrip(os.sep))
    found = [node for node in _SALT_NODES if node in name]
    if len(found) != 1:
        raise ValueError(f"cannot tell whether {path} is a master or a minion config; "
                         "say which with salt_node (--salt-node)")
    return found[0]


def _restore_logging(root: Any, level: int, kept: list) -> None:
    """Undo what importing Salt does to the root logger: its deferred stderr handler
    goes (its records to ours), and our handlers get back their levels and formats."""
    handlers = [handler for handler, _, _ in kept]
    for handler in root.handlers[:]:
        if handler not in handlers:
            sync = getattr(handler, "sync_with_handlers", None)
            root.removeHandler(handler)
            if sync is not None:
                sync(handlers)
    for handler, handler_level, formatter in kept:
        handler.setLevel(handler_level)
        handler.setFormatter(formatter)
    root.setLevel(level)


def _import_salt() -> tuple:
    """Return Salt's ``salt.config`` and ``salt.utils.event``; BridgeError without Salt."""
    import importlib
    import logging
    root = logging.getLogger()
    level, kept = root.level, [(h, h.level, h.formatter) for h in root.handlers]
    try:
        config = importlib.import_module("salt.config")
        event = importlib.import_module("salt.utils.event")
    except ImportError as exc:
        raise BridgeError(_NO_SALT.format(python=sys.executable, exc=exc)) from None
    finally:
        _restore_logging(root, level, kept)
    return config, event


def _load_salt_config(config: Any, path: str, node: str) -> dict:
    """Read *path* with Salt's own config loader; BridgeError (one line) if it cannot be."""
    import logging
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise BridgeError(f"cannot read the Salt config {path}: {exc.strerror or exc}") from None
    errors = []

    class _Errors(logging.Handler):
        def emit(self, record: Any) -> None:
            errors.append(record.getMessage().splitlines()[0])

    salt_log = logging.getLogger("salt")
    handler, propagate = _Errors(logging.ERROR), salt_log.propagate
    salt_log.addHandler(handler)
    salt_log.propagate = False                 # Salt's loader logs, then exits
    try:
        loader = config.master_config if node == "master" else config.minion_config
        return dict(loader(path))
    except (SystemExit, Exception) as exc:    # whatever Salt's loader raises means "bad"
        reason = errors[0] if errors else (str(exc) or type(exc).__name__)
        raise BridgeError(f"cannot read the Salt config {path}: {reason}") from None
    finally:
        salt_log.removeHandler(handler)
        salt_log.propagate = propagate


class Bridge:
    """Forward events between a saltevent bus and a Salt event bus, both ways.

    The Salt side is a config file read with Salt's loader (*salt_config*, e.g.
    ``/etc/salt/master``), a sock_dir (*salt_sock_dir*), or Salt opts (*salt_opts*,
    e.g. ``__opts__``), with *salt_node* ``'master'`` or ``'minion'`` (default: from
    the file's name, ``opts['__role']``, else ``'master'``; *salt_node* alone means
    ``/etc/salt/<node>``).  The saltevent side is *node*, *sock_dir* and *opts* as for
    :class:`SaltEvent`; *node* defaults to *salt_node*, and a minion bus's id to the
    Salt minion's.  ``opts['id']`` is also the minion id of a *salt_sock_dir* minion.

    Events whose tag matches *to_salt* go from saltevent to Salt: fired on a master
    bus, or sent to the master with Salt's ``fire_master`` on a minion bus (a
    saltevent ``fire_master`` event is unwrapped and sent the same way).  Events
    matching *from_salt* come back.  Patterns are prefixes or globs (as
    ``opts['saltevent_tags']``); ``()`` turns a direction off.  Each forwarded event
    carries :data:`BRIDGE_MARK`, so the bridge never sends it back.

    Salt is imported by :meth:`run`, which blocks until :meth:`stop`.  One thread per
    direction; stop() may be called from any thread or a signal handler, and the
    bridge stops within about a second plus what flushing takes (*flush_timeout*).
    While a bus is down each direction holds up to *hold* events for it, oldest
    dropped first (and counted as failed).
    """

    def __init__(self, salt_config: str | None = None, salt_node: str | None = None,
                 salt_sock_dir: str | None = None, salt_opts: Mapping | None = None,
                 node: str | None = None, sock_dir: str | None = None,
                 opts: Mapping | None = None, to_salt: Any = ("*",), from_salt: Any = ("*",),
                 bridge_id: str | None = None, hold: int = _BRIDGE_HOLD,
                 flush_timeout: float = _BRIDGE_FLUSH):
        if salt_node is not None and salt_node not in _SALT_NODES:
            raise ValueError(f"salt_node must be 'master' or 'minion', not {salt_node!r}")
        if sum(x is not None for x in (salt_config, salt_sock_dir, salt_opts)) > 1:
            raise ValueError("give one of salt_config, salt_sock_dir and salt_opts")
        if salt_opts is not None:
            salt_node = salt_node or salt_opts.get("__role")
        elif salt_config is not None:
            salt_node = salt_node or _salt_node_of(salt_config)
        elif salt_sock_dir is None:
            if salt_node is None:
                raise ValueError("give salt_config, salt_sock_dir or salt_opts")
            salt_config = f"/etc/salt/{salt_node}"
        self.salt_node = salt_node if salt_node in _SALT_NODES else "master"
        self.opts = dict(opts or {})
        if salt_sock_dir is not None and self.salt_node == "minion" and not self.opts.get("id"):
            raise ValueError("a Salt minion bus needs the minion's id: opts['id'] (--id)")
        patterns = []
        for name, value in (("to_salt", to_salt), ("from_salt", from_salt)):
            value = [value] if isinstance(value, str) else list(value or ())
            if not all(isinstance(item, str) for item in value):
                raise TypeError(f"{name} must be a list of tag prefixes or globs")
            patterns.append(value)
        if not any(patterns):
            raise ValueError("nothing to forward: both directions are off")
        if hold.__class__ is not int or hold <= 0:
            raise ValueError(f"hold must be a positive int, not {hold!r}")
        if flush_timeout < 0:
            raise ValueError(f"flush_timeout must be 0 or more, not {flush_timeout!r}")
        self._salt_config = salt_config
        self._salt_sock_dir = salt_sock_dir
        self._salt_opts = salt_opts
        self.node = node or self.salt_node
        self.sock_dir = sock_dir
        self.bridge_id = bridge_id
        self.flush_timeout = float(flush_timeout)
        self.salt_bus = _Link(f"salt {self.salt_node} bus", probed=True)
        self.saltevent_bus = _Link(f"saltevent {self.node} bus")
        self.to_salt = _Direction("saltevent->salt", patterns[0], self.salt_bus, hold)
        self.from_salt = _Direction("salt->saltevent", patterns[1], self.saltevent_bus, hold)
        #: set once run() has connected both sides and forwards events
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()          # guards _started
        self._started = False
        self._ran = False                      # True once forwarding began
        self._error = None
        self._probe_at = 0.0
        self._prober = None                    # the direction that watches Salt's publisher
        self._salt_pull = None
        self._objects = []

    def __repr__(self) -> str:
        return (f"<Bridge id={self.bridge_id} saltevent {self.node} <-> salt "
                f"{self.salt_node}{' running' if self.ready.is_set() else ''}>")

    # -- the public face

    def stop(self) -> None:
        """Ask run() to flush what it holds and return; safe from any thread or signal handler."""
        self._stop.set()

    def counters(self) -> dict:
        """Return each direction's counters and each bus's outages."""
        return {"to_salt": self.to_salt.counters(), "from_salt": self.from_salt.counters(),
                "outages": {"salt": self.salt_bus.outages,
                            "saltevent": self.saltevent_bus.outages}}

    def report(self) -> str:
        """Return the counters as the CLI prints them (SIGUSR1, exit), one line per direction."""
        lines = [f"bridge {self.bridge_id}: {self.saltevent_bus.name} <-> {self.salt_bus.name}"]
        for d in (self.to_salt, self.from_salt):
            if not d.patterns:
                lines.append(f"  {d.name}: off")
                continue
            line = (f"  {d.name}: forwarded {d.forwarded}, filtered {d.filtered}, failed "
                    f"{d.failed}, echoes {d.echoes}, held {len(d.held)}")
            if d is self.to_salt:
                line += f", missed {d.missed} in {d.gaps} gaps"
            lines.append(line)
        lines.append(f"  outages: salt {self.salt_bus.outages}, saltevent "
                     f"{self.saltevent_bus.outages}")
        return "\n".join(lines)

    def _summary(self) -> str:
        return "; ".join(line.strip() for line in self.report().splitlines()[1:])

    def run(self) -> dict:
        """Connect both sides and forward events until stop(); return the counters.

        :raises BridgeError: Salt is not importable, or its config cannot be read.
        :raises RuntimeError: run() was called before.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("a Bridge runs once")
            self._started = True
        try:
            threads = self._start()
            last, log_at = None, time.monotonic() + _BRIDGE_REPORT
            # Short waits: a signal that lands on another thread runs its Python handler
            # (SIGTERM's stop(), SIGUSR1's report) only when this thread wakes.
            while not self._stop.wait(_BRIDGE_POLL):
                if time.monotonic() >= log_at:
                    log_at += _BRIDGE_REPORT
                    now = self.counters()
                    if now != last:
                        log.info("counters: %s", self._summary())
                        last = now
            for thread in threads:
                thread.join(self.flush_timeout + 3 * _BRIDGE_POLL + 5.0)
                if thread.is_alive():
                    log.error("bridge thread %s did not stop", thread.name)
        finally:
            self._stop.set()
            self.ready.clear()
            for obj in reversed(self._objects):
                obj.destroy()
            self._objects = []
        log.info("stopped; counters: %s", self._summary())
        if self._error is not None:
            raise BridgeError(f"the bridge stopped on an error: {self._error!r}")
        return self.counters()

    # -- setting up

    def _salt_side(self, config: Any) -> dict:
        """Return the Salt opts of the bus to bridge."""
        node = self.salt_node
        if self._salt_opts is not None:
            return dict(self._salt_opts)
        if self._salt_config is not None:
            return _load_salt_config(config, self._salt_config, node)
        opts = dict(config.DEFAULT_MASTER_OPTS if node == "master"
                    else config.DEFAULT_MINION_OPTS)
        opts["sock_dir"] = self._salt_sock_dir
        if node == "minion":
            opts["id"] = self.opts["id"]
        return opts

    def _start(self) -> list:
        """Import Salt, open the four event objects, start one thread per direction."""
        config, salt_event = _import_salt()
        salt_opts = self._salt_side(config)
        node = self.salt_node
        self._salt_pull = _salt_pull_address(salt_opts, node)
        se_opts = dict(self.opts)
        if self.node != "master" and not se_opts.get("id") and salt_opts.get("id"):
            se_opts["id"] = salt_opts["id"]
        salt_dir = salt_opts["sock_dir"]

        def opened(obj: Any) -> Any:
            self._objects.append(obj)
            return obj

        se_firer = opened(SaltEvent(self.node, self.sock_dir, se_opts, listen=False,
                                    raise_errors=True))
        if self.bridge_id is None:
            import hashlib
            where = f"{se_firer._bus.path}\0{node}\0{self._salt_pull[1]}".encode()
            self.bridge_id = f"{socket.gethostname()}:{hashlib.sha256(where).hexdigest()[:8]}"
        self.saltevent_bus.name = f"saltevent {self.node} bus {se_firer._bus.path}"
        self.salt_bus.name = f"salt {node} bus {salt_dir}"
        threads = []
        if self.to_salt.patterns:
            listener = opened(SaltEvent(self.node, self.sock_dir,
                                        dict(se_opts, saltevent_gap_events=True)))
            salt_firer = opened(salt_event.get_event(node, salt_dir, opts=salt_opts,
                                                     listen=False))
            self.to_salt.receive = lambda timeout: listener.get_event(
                wait=timeout, no_block=timeout <= 0, full=True, auto_reconnect=True)
            self.to_salt.send = (salt_firer.fire_event if node == "master"
                                 else salt_firer.fire_master)
            self.to_salt.reset = salt_firer.destroy          # Salt's objects reconnect
            threads.append(self.to_salt)
        if self.from_salt.patterns:
            salt_listener = opened(salt_event.get_event(node, salt_dir, opts=salt_opts,
                                                        listen=True))
            self.from_salt.receive = lambda timeout: salt_listener.get_event(
                wait=timeout, no_block=timeout <= 0, full=True)
            self.from_salt.send = se_firer.fire_event
            threads.append(self.from_salt)
        self._prober = threads[-1]
        log.info("bridge %s: saltevent %s bus %s <-> salt %s bus %s; %s", self.bridge_id,
                 self.node, se_firer._bus.path, node, salt_dir, "; ".join(
                     f"{d.name} {' '.join(d.patterns)}" for d in threads))
        started = []
        try:
            for d in threads:
                thread = threading.Thread(target=self._pump, args=(d,), daemon=True,
                                          name=f"saltevent-bridge {d.name}")
                thread.start()
                started.append(thread)
        except BaseException:
            self._stop.set()
            for thread in started:
                thread.join(self.flush_timeout + 3 * _BRIDGE_POLL + 5.0)
            raise
        self._ran = True
        self.ready.set()
        return started

    # -- moving events (each direction on its own thread)

    def _watch_salt(self, got_salt_event: bool) -> None:
        """Notice Salt's publisher coming and going: Salt's listener reconnects silently
        and its firer fails only when used, so while quiet try its socket once a second.
        Runs on one direction's thread (salt->saltevent's when it runs)."""
        now = time.monotonic()
        if got_salt_event:
            self.salt_bus.up()
            self._probe_at = now + _BRIDGE_PROBE
        elif now >= self._probe_at:
            self._probe_at = now + _BRIDGE_PROBE
            self._probe_salt()

    def _probe_salt(self) -> bool:
        """Connect to the socket Salt's firers use; mark the Salt bus up or down."""
        family, address = self._salt_pull
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_BRIDGE_PROBE)
            sock.connect(address)
        except OSError as exc:
            self.salt_bus.down(f"cannot connect to {address}: {exc.strerror or exc}")
            return False
        finally:
            sock.close()
        self.salt_bus.up()
        return True

    def _pump(self, d: _Direction) -> None:
        """Move events through *d* until stopped, then flush.  Runs on d's thread."""
        try:
            while not self._stop.is_set():
                sending = d.held and not d.far.waits
                if sending and time.monotonic() >= d.retry_at:
                    sending = not self._deliver(d)
                timeout = _BRIDGE_POLL
                if sending:
                    timeout = min(timeout, max(0.0, d.retry_at - time.monotonic()))
                event = d.receive(timeout)
                if d is self._prober:
                    self._watch_salt(event is not None and d is self.from_salt)
                self._take(d, event)
            self._flush(d)
        except Exception as exc:               # a bug: stop the bridge, and say so
            log.exception("bridge %s stopped on an error", d.name)
            self._error = exc
            self._stop.set()

    def _own(self, data: Any) -> bool:
        mark = data.get(BRIDGE_MARK) if isinstance(data, dict) else None
        return isinstance(mark, dict) and self.bridge_id in (mark.get("via") or ())

    def _take(self, d: _Direction, event: dict | None) -> None:
        """Hold one event from *d*'s source for the far bus, or count why not."""
        if event is None:
            return
        tag, data = event["tag"], event["data"]
        if event.__class__ is _GapEvent:
            d.missed += data.get("count") or 0
            d.gaps += 1
            return
        if not isinstance(data, dict):
            d.failed += 1
            log.warning("%s: event %s has data that is not a dict; not forwarded", d.name, tag)
            return
        wrapped = tag.startswith("fire_master")
        if self._own(data) or (wrapped and self._own(data.get("data"))):
            d.echoes += 1
            return
        stamp = data.get("_stamp")
        if (d is self.to_salt and self.salt_node == "minion" and tag == "fire_master"
                and isinstance(data.get("tag"), str) and data.get("events") is None):
            tag, data = data["tag"], data.get("data")      # sent as Salt's fire_master
        if not _filters_match(d.filters, tag):
            d.filtered += 1
            return
        if isinstance(data, dict):
            data = dict(data)
            data.pop("_stamp", None)               # the far bus stamps it anew
            mark = data.get(BRIDGE_MARK)
            mark = mark if isinstance(mark, dict) else {}
            via = mark.get("via")
            data[BRIDGE_MARK] = {"via": (list(via) if isinstance(via, list) else [])
                                 + [self.bridge_id], "_stamp": mark.get("_stamp", stamp)}
        if len(d.held) >= d.hold:
            d.held.popleft()
            d.failed += 1
            if d.failed == 1 or not d.failed % 1000:
                log.warning("%s: holding %d events for the %s, dropped the oldest (%d failed)",
                            d.name, d.hold, d.far.name, d.failed)
        d.held.append((tag, data))
        log.debug("%s: %s", d.name, tag)

    def _deliver(self, d: _Direction) -> bool:
        """Send what *d* holds, in order; False when the far bus is down (retry later)."""
        if d.reset is not None and d.outages_seen != d.far.outages:
            d.outages_seen = d.far.outages     # the bus is back: connect afresh
            d.reset()
        while d.held:
            tag, data = d.held[0]
            try:
                ok, why = d.send(data, tag), "the bus could not be reached"
            except (TypeError, ValueError) as exc:     # this event can never go
                d.held.popleft()
                d.failed += 1
                log.warning("%s: event %s not forwarded: %s", d.name, tag, exc)
                continue
            except Exception as exc:  # Salt's transport raises many kinds; all are "not sent"
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                d.far.down(why)
                d.retry_at = time.monotonic() + d.delay
                d.delay = min(d.delay * 2, _BRIDGE_RETRY_MAX)
                return False
            d.held.popleft()
            d.forwarded += 1
            d.delay = _BRIDGE_RETRY
            d.far.up()
        return True

    def _flush(self, d: _Direction) -> None:
        """Forward what *d*'s source already has and what it holds, within flush_timeout."""
        deadline = time.monotonic() + self.flush_timeout
        while time.monotonic() < deadline:
            event = d.receive(0.0)
            if event is None:
                break
            self._take(d, event)
        while d.held and time.monotonic() < deadline:
            if d.far.waits and not self._probe_salt() or not self._deliver(d):
                time.sleep(min(_BRIDGE_RETRY, max(0.0, deadline - time.monotonic())))
        if d.held:
            d.failed += len(d.held)
            log.warning("%s: %d events held for the %s were not forwarded", d.name,
                        len(d.held), d.far.name)
            d.held.clear()


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
  saltevent listen --last 100 --seq         # the bus's last 100 events, then live
  saltevent listen | while IFS=$'\\t' read -r tag data; do echo "$tag"; done""",
    "bus": """examples:
  saltevent bus -v                          # until SIGTERM or Ctrl-C
  saltevent bus --sock-dir /var/run/salt/master --ring-events 100000""",
    "stats": """examples:
  saltevent stats
  saltevent stats --json""",
    "bridge": """examples:
  saltevent bridge --salt-config /etc/salt/master -v      # a master host: both ways
  saltevent bridge --salt-config /etc/salt/minion --to-salt 'myco/*' --from-salt
  saltevent bridge --salt-sock-dir /var/run/salt/master --salt-node master
  /opt/saltstack/salt/bin/python3 -m saltevent bridge --salt-node minion

SIGUSR1 prints the counters; SIGTERM or Ctrl-C forwards what the bridge holds and stops.""",
}


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind, closing (and handing off) what we hold."""


class _UsageError(Exception):
    """Wrong arguments that argparse cannot see."""


def _non_negative(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive(text: str) -> int:
    import argparse
    value = _non_negative(text)
    if not value:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _add_common(parser: Any, default: Any) -> None:
    """The common options, accepted before and after the command."""
    parser.add_argument("--sock-dir", default=default, help="directory of the bus sockets "
                        "(default: $SALTEVENT_SOCK_DIR, Salt's, or a private one)")
    parser.add_argument("--node", choices=("master", "minion"), default=default,
                        help="which bus: the master's or a minion's")
    parser.add_argument("--id", default=default,
                        help="minion id of a minion bus (default: the host name)")
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="log to stderr (-vv for debug)")


def _build_parser() -> Any:
    import argparse
    parser = argparse.ArgumentParser(
        prog="saltevent", description="SaltStack's event bus on this host: fire, listen, "
        "run a broker, read its figures.")
    parser.add_argument("--version", action="version", version=f"saltevent {__version__}")
    _add_common(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)
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
                     help="glob, else whole-string regex, on the tag (default: everything); "
                          "the broker is told its literal prefix, and sends only those events")
    sub.add_argument("--match-type", choices=sorted(_MATCHERS),
                     help="match TAGMATCH with this API match type instead")
    sub.add_argument("--pretty", action="store_true", help="sorted keys, indented JSON")
    sub.add_argument("--count", type=_non_negative, default=None, metavar="N",
                     help="exit 0 after N matching events")
    sub.add_argument("--quiet", action="store_true", help="print nothing")
    replay = sub.add_mutually_exclusive_group()
    replay.add_argument("--last", type=_positive, metavar="N",
                        help="first print the bus's last N matching events (from its ring)")
    replay.add_argument("--since", type=_non_negative, metavar="SEQ",
                        help="first print every event after sequence number SEQ")
    sub.add_argument("--epoch", help="the epoch SEQ belongs to (default: the current one)")
    sub.add_argument("--seq", action="store_true",
                     help="print each event's sequence number first: seq, TAB, tag, TAB, data")
    sub.add_argument("--gaps", action="store_true",
                     help="print missed events as saltevent/gap lines too (always on stderr)")
    sub = command("bus", "run a standalone broker in the foreground until SIGTERM/SIGINT")
    sub.add_argument("--ring-events", type=_non_negative, metavar="N",
                     default=DEFAULT_RING_EVENTS,
                     help=f"recent events kept for replays (default {DEFAULT_RING_EVENTS})")
    sub.add_argument("--ring-bytes", type=_non_negative, metavar="BYTES",
                     default=DEFAULT_RING_BYTES,
                     help=f"bytes of them at most (default {DEFAULT_RING_BYTES})")
    sub.add_argument("--max-clients", type=_positive, metavar="N", default=DEFAULT_MAX_CLIENTS,
                     help=f"connections served at once (default {DEFAULT_MAX_CLIENTS})")
    sub.add_argument("--backlog-bytes", type=_positive, metavar="BYTES",
                     default=DEFAULT_BACKLOG_BYTES,
                     help="the most a listener may fall behind before its oldest events are "
                          f"dropped (default {DEFAULT_BACKLOG_BYTES})")
    sub.add_argument("--idle-exit", type=float, metavar="SECONDS",
                     help="stop (handing off) after SECONDS without clients")
    sub.add_argument("--bus-name", help=argparse.SUPPRESS)    # what a spawned broker serves
    sub = command("stats", "print the running broker's figures")
    sub.add_argument("--json", action="store_true", help="one JSON object, for machines")
    _bridge_arguments(command("bridge", "forward events between this bus and a Salt event "
                                        "bus, both ways (needs a Python that has Salt)"))
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
    """Return the event data of the CLI's DATA words; _UsageError if not an object."""
    if len(items) == 1:
        try:
            data = json.loads(items[0])
        except ValueError:
            data = None
        else:
            if not isinstance(data, dict):
                raise _UsageError(f"DATA must be a JSON object, not {items[0]!r}")
            return data
    data = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"DATA must be a JSON object or key=value pairs, not {item!r}")
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


def _one_line(text: str) -> str:
    """*text* as it may be printed on one line of output: JSON-escaped, in ASCII, if it
    holds a tab, a newline, an escape sequence or another character that is not
    printable (some break lines), or a backslash (then an escape stands for itself)."""
    return text if text.isprintable() and "\\" not in text else json.dumps(text)[1:-1]


def _listen_filter(args: Any) -> tuple:
    """Return the listen command's test of a tag, as Salt's state.event does it, and the
    prefix the broker may filter on (None: everything)."""
    if args.match_type:
        match, pattern = _get_matcher(args.match_type), args.tagmatch or ""
        prefix = _glob_start(pattern) if args.match_type == "startswith" else ""
        return (lambda tag: match(tag, pattern)), (prefix or None)
    pattern = args.tagmatch or "*"
    import re
    glob = _Glob(pattern)
    regex = None
    if not _glob_only(pattern):                # a glob is not tried as a regex: ``a/*/*``
        try:                                   # would backtrack for minutes on a
            regex = re.compile(r"\A(?:" + pattern + r")\Z")     # hostile tag
        except re.error:
            pass
    if regex is None:
        return glob.match, _literal_prefix(pattern) or None
    return (lambda tag: glob.match(tag) or regex.match(tag) is not None), (
        _literal_prefix(pattern) or None)


def _json_text(data: Any, pretty: bool) -> str:
    """Return *data* as JSON text that any terminal can take: non-ASCII kept, but text
    UTF-8 cannot hold (lone surrogates) escaped."""
    kwargs = {"sort_keys": True, "indent": 4} if pretty else {}
    text = json.dumps(data, ensure_ascii=False, **kwargs)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = json.dumps(data, **kwargs)
    return text


def _write_line(out: Any, line: str) -> None:
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        buffer.write(line.encode("utf-8", "backslashreplace"))
        buffer.flush()
    else:
        out.write(line)
    out.flush()


def _cmd_listen(args: Any, node: str) -> int:
    if args.epoch and args.since is None:
        raise _UsageError("--epoch goes with --since")
    wanted, prefix = _listen_filter(args)
    opts = _cli_opts(args)
    if prefix is not None:
        opts["saltevent_tags"] = [prefix]
    if args.last:
        opts["saltevent_replay_last"] = args.last
    if args.since is not None:
        opts["saltevent_replay_since"] = args.since
        opts["saltevent_replay_epoch"] = args.epoch
    opts["saltevent_gap_events"] = args.gaps
    out = sys.stdout
    count = 0

    def tell(gap: Gap) -> None:
        print(_one_line(f"saltevent: missed {'some' if gap.count is None else gap.count} "
                        f"events {gap.first}-{'?' if gap.last is None else gap.last} of "
                        f"epoch {gap.epoch} ({gap.reason})"), file=sys.stderr, flush=True)

    with SaltEvent(node, args.sock_dir, opts, raise_errors=True) as event:
        event._on_gap = tell
        if args.count == 0:
            return 0
        for found in event.iter_events(full=True):
            tag = found["tag"]
            is_gap = found.__class__ is _GapEvent
            if not is_gap and not wanted(tag):
                continue
            if not args.quiet:
                line = f"{_one_line(tag)}\t{_json_text(found['data'], args.pretty)}\n"
                if args.seq:
                    line = f"{'-' if is_gap else event.last_seq}\t{line}"
                try:
                    _write_line(out, line)
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


def _raise_fd_limit(wanted: int) -> None:
    """Let a standalone broker hold *wanted* connections if the hard limit allows."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.debug("cannot raise the open files limit: %s", exc)


def _cmd_bus(args: Any, node: str) -> int:
    import signal
    bus = _cli_bus(args, node)
    if args.bus_name:
        if not all(c.isalnum() or c == "-" for c in args.bus_name):
            raise _UsageError(f"bad --bus-name {args.bus_name!r}")
        bus = _Bus(os.path.dirname(bus.path), args.bus_name)
    _ensure_sock_dir(os.path.dirname(bus.path))
    _raise_fd_limit(args.max_clients + 64)
    elected = _elect(bus)
    if elected is None:
        raise SaltEventError(f"a broker already runs for {bus.path}")
    opts = {"saltevent_ring_events": args.ring_events, "saltevent_ring_bytes": args.ring_bytes,
            "saltevent_max_clients": args.max_clients,
            "saltevent_broker_backlog_bytes": args.backlog_bytes,
            "saltevent_idle_exit": args.idle_exit}
    try:
        broker = Broker(bus, elected, opts)
    except BaseException:
        elected.give_up(bus.path)
        raise
    log.info("serving %s (pid %d, epoch %s); SIGTERM or Ctrl-C hands off and stops",
             bus.path, os.getpid(), broker.epoch)
    signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP")
                                                 else [])
    previous = {sig: signal.signal(sig, lambda *_: broker.stop()) for sig in signals}
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
    deadline = time.monotonic() + _CONNECT_TIMEOUT
    try:
        sock = _connect(bus.path)
    except OSError:
        sock = None
    if sock is None:
        raise SaltEventError(f"no broker runs for {bus.path}")
    conn = _Conn(sock)
    try:
        conn.sock.send(_encode_control({"ctl": "stats"}))
        msg = _drive(_control_steps(conn, "stats", deadline, collections.deque(), bus.path,
                                    _CONNECT_TIMEOUT))
    except (EventTimeout, OSError, FrameError):
        msg = None
    finally:
        conn.close()
    if msg is None or not isinstance(msg.get("stats"), dict):
        raise SaltEventError(f"the broker of {bus.path} did not answer")
    stats = msg["stats"]
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return 0
    try:
        lines = _stats_lines(stats)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SaltEventError(f"the broker of {bus.path} sent stats it cannot have made "
                             f"({type(exc).__name__}: {exc})") from None
    for line in lines:
        print(line)
    return 0


def _stats_lines(stats: dict) -> list:
    """The lines ``saltevent stats`` prints (the broker's reply is input: any part of it
    may be missing or of another type, which raises)."""
    ring = stats.get("ring", {})
    held = stats.get("held", {})
    rows = [("bus", stats["bus"]), ("broker pid", stats["pid"]),
            ("uptime", f"{stats['uptime']:.1f} s"), ("epoch", stats.get("epoch")),
            ("seq", stats.get("seq")), ("clients", stats["clients"]),
            ("listeners", stats["listeners"]), ("events in", stats["events_in"]),
            ("events out", stats["events_out"]), ("bytes in", stats["bytes_in"]),
            ("bytes out", stats["bytes_out"]), ("dropped", stats["dropped"]),
            ("ring", f"{ring.get('events')} events, {ring.get('bytes')} bytes, "
                     f"seq {ring.get('first')}-{ring.get('last')}"),
            ("held", f"{held.get('events')} bytes of events, {held.get('input')} of input, "
                     f"{held.get('control')} of replies")]
    lines = [f"{name:<11} {value}" for name, value in rows]
    for item in stats["per_listener"]:
        lines.append(f"listener    pid {item['pid']}: {item['events_out']} events out, "
                     f"{item['dropped']} dropped, {item['queued_bytes']} bytes queued")
    return [_one_line(line) for line in lines]


def _seconds(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _bridge_arguments(sub: Any) -> None:
    """The bridge command's own options (the common ones choose the saltevent bus)."""
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--salt-config", metavar="FILE",
                       help="Salt's master or minion config, read with Salt's own loader "
                            "(default with --salt-node alone: /etc/salt/NODE)")
    where.add_argument("--salt-sock-dir", metavar="DIR",
                       help="the sock_dir of the Salt bus instead (a minion's needs --id)")
    sub.add_argument("--salt-node", choices=_SALT_NODES,
                     help="the Salt bus is a master's or a minion's (default: from the "
                          "config file's name, else master)")
    sub.add_argument("--to-salt", action="append", nargs="?", const="*", metavar="TAG",
                     help="forward saltevent events whose tag matches TAG (a prefix or a "
                          "glob; repeatable; alone: every tag) to Salt")
    sub.add_argument("--from-salt", action="append", nargs="?", const="*", metavar="TAG",
                     help="forward Salt events whose tag matches TAG to saltevent; with "
                          "neither option both directions forward every tag, with one "
                          "only that direction runs")
    sub.add_argument("--bridge-id", metavar="ID",
                     help=f"the id in {BRIDGE_MARK}['via'] (default: host name and a hash "
                          "of the two buses)")
    sub.add_argument("--flush-timeout", type=_seconds, default=_BRIDGE_FLUSH, metavar="S",
                     help="seconds to spend at exit forwarding what the bridge holds "
                          f"(default {_BRIDGE_FLUSH:g})")


def _cmd_bridge(args: Any) -> int:
    import signal
    if not (args.salt_config or args.salt_sock_dir or args.salt_node):
        raise _UsageError("say where the Salt bus is: --salt-config FILE, --salt-sock-dir "
                          "DIR, or --salt-node NODE for /etc/salt/NODE")
    to_salt, from_salt = args.to_salt, args.from_salt
    if to_salt is None and from_salt is None:
        to_salt = from_salt = ["*"]
    opts = {"id": args.id} if args.id else {}      # else the Salt minion's id, not the host's
    try:
        bridge = Bridge(salt_config=args.salt_config, salt_node=args.salt_node,
                        salt_sock_dir=args.salt_sock_dir, node=args.node,
                        sock_dir=args.sock_dir, opts=opts, to_salt=to_salt or (),
                        from_salt=from_salt or (), bridge_id=args.bridge_id,
                        flush_timeout=args.flush_timeout)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None

    def report(*_: Any) -> None:
        print(bridge.report(), file=sys.stderr, flush=True)

    handlers = {signal.SIGTERM: lambda *_: bridge.stop(), signal.SIGINT: lambda *_: bridge.stop()}
    for name, handler in (("SIGHUP", handlers[signal.SIGTERM]), ("SIGUSR1", report)):
        if hasattr(signal, name):
            handlers[getattr(signal, name)] = handler
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()} if (
        in_main) else {}
    try:
        bridge.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bridge._ran:
            report()
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

    def terminate(signum: int, _frame: Any) -> None:
        raise _Terminated(signum)

    in_main = threading.current_thread() is threading.main_thread()
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, terminate) for sig in signals} if in_main else {}
    try:
        if args.command in ("fire", "fire-master"):
            return _cmd_fire(args, node, args.command == "fire-master")
        if args.command == "listen":
            return _cmd_listen(args, node)
        if args.command == "bus":
            return _cmd_bus(args, node)
        if args.command == "bridge":
            return _cmd_bridge(args)
        return _cmd_stats(args, node)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except (SaltEventError, OSError, ValueError, TypeError) as exc:
        print(f"saltevent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except _Terminated as exc:
        return 128 + exc.args[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.modules.setdefault("saltevent", sys.modules["__main__"])
    sys.exit(main())
