#!/usr/bin/env python3
"""Benchmark saltevent's bus against a minimal raw AF_UNIX relay, in the same run.

Run from the repository root::

    python bench/bench.py              # full suite, 3 repetitions, medians (~3 min)
    python bench/bench.py --quick      # smoke run of every scenario, ~30 s
    python bench/bench.py --json       # machine-readable output on stdout
    python bench/bench.py --only throughput,latency --repeat 5
    python bench/bench.py --only throughput --profile listener,firer,broker
    git worktree add /tmp/se-main main && python bench/bench.py --compare /tmp/se-main
    git worktree remove /tmp/se-main   # afterwards

Every broker/relay, firer and listener is its own OS process (``bench.py --worker
ROLE ARGS``, spawned with subprocess); workers report to this process as JSON lines
over pipes and wait for a ``go`` line, the common start signal.  Times are
``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process on Linux).
Every wait has a deadline (a hard timeout per run of a scenario, ``--timeout``) and
every process started is killed and reaped when its run ends, however it ends.

Scenarios (S = saltevent, B = baseline relay):

1. ``throughput``  1 firer -> 1 listener, 20,000 ~150-byte JSON dict events.
2. ``fanout``      1 firer -> 8 listeners, aggregate deliveries/s.
3. ``fanin``       4 firers -> 1 listener.
   Rates are deliveries / (last receive at any listener - the go signal).
4. ``latency``     1,000 events/s for 3 s; fire->receive latency p50/p99/max
   (the firer stamps monotonic_ns into each event; the first 50 are warm-up).
5. ``stall``       50,000 ~1 KB events while one listener does not read, one does;
   the stalled one reads on afterwards and reports what it got and ``dropped``.
   Broker/relay RSS is sampled from /proc every 10 ms (and VmHWM at the end).
6. ``joinrace``    200 rounds: a long-lived process A constructs a listener, tells B
   over a socketpair the moment the constructor returns, B fires one event; does
   A get it?  (saltevent only: the baseline has no join guarantee to test.)
7. ``coldstart``   wall time of a fresh interpreter that imports saltevent and fires
   one event on a running bus (median of 20), against ``python -c pass``; plus the
   heaviest lines of ``python -X importtime -c "import saltevent"``.
8. ``fanout64``    1 firer -> 64 listener processes, 5,000 ~150-byte events (320,000
   deliveries: 64 listeners share the cores, so the count is kept modest).
9. ``fanin16``     16 firers -> 1 listener, 32,000 events (2,000 per firer); the
   listener checks that each firer's events all arrive, in order (lost, order
   violations: a seq not above the last one from the same firer).
10. ``big``        1 -> 1 MiB/s of payload for 1 KiB x 20,000, 64 KiB x 1,500 and
   900 KiB x 120 events, then fire->receive p50/p99 for 100 events of 64 KiB and
   of 900 KiB paced at 20/s (first 5 warm-up), each phase on a fresh bus.  The
   payload is a realistic job return (``make_records``): a dict with a list of state
   records mixing short strings, numbers, booleans, small nested dicts and, every
   fifth, a long comment; deterministic, built once per firer, exactly the size in
   compact JSON; the fire time goes in its top-level ``t``.  Listeners decode every
   event in full (saltevent's get_event does; the baseline's json.loads) and report
   the record counts they saw, so a trimmed event would show.
11. ``idle1000``   1 -> 1 events/s, 50,000 small events, on three fresh buses: with no
   idle listeners; (a) with 1,000 idle listeners (10 processes x 100, connected
   before the go) that never read, not once; (b) the same, each declaring a tag
   prefix no event matches, ``opts['saltevent_tags'] = ['idle/nomatch/<i>/']``, so
   a broker that honours declared tags sends them nothing (a saltevent that ignores
   the key gives (b) = (a) within noise).  Reported: the rates, the slowdown against
   no idle listeners, and the broker's VmRSS growth per idle listener once they
   are connected (and, in the notes, after the run, queued events included).  The
   broker/relay and the holders raise their soft RLIMIT_NOFILE to the hard limit;
   a hard limit under 1,064 scales the count down, and the output says so.
12. ``catchup``    a listener that starts 1 s into a burst with a replay of the last N
   events gets every event exactly once, and how long it takes (saltevent only: the
   baseline has no replay, n/a).  A firer fires 12,000 ~150-byte events at a steady
   6,000/s (2 s); 1 s in, it reports how many it has fired, and N is that plus 0.5 s
   of events (3,000: the listener registers later, a CLI ~50-100 ms later), rounded
   up to the next 1,000: 9,000, within the broker's default ring of 10,000 events
   (it holds the first 1.5 s).  A listener that registered more than 0.5 s late, or
   a ring that lost the start, shows as missing events and a first bus seq above 1
   in the notes.  Two phases, each on a fresh bus:
   (api) a process started before the burst (saltevent imported) constructs
   ``MasterEvent(opts={"saltevent_replay_last": N, "saltevent_seq": True})`` and reads
   until the end marker the firer sends after its last event; (cli) ``python -m
   saltevent listen --last N --seq --count M`` is started 1 s in (interpreter start
   included) and its lines are read from a pipe and stamped on arrival.  Checked:
   events received, duplicates, missing, bus seq breaks (each seq must be the last
   one + 1), and, for the CLI, its stderr (where it reports missed events).  Timed
   from the listener's start (the constructor call; the Popen): "caught up", the
   arrival of the last event fired before the constructor returned (events arrive
   in order: every replayed one, and the few fired while it registered; API only:
   when the CLI has registered is not seen from outside); "live", the first event
   received within 5 ms of its fire; and the end marker.
   Catch-up events/s: events received up to caught up (CLI: live), per second since
   the first arrived.  Correctness counts are the worst of the runs, not the median;
   each run's details are in the notes.

A growth chart follows the table: deliveries/s against the number of listeners (1,
8, 64: throughput, fanout, fanout64) and MiB/s against the event size (1, 64, 900
KiB: big), bars to scale, xN against the first point.  ``--quick`` runs every
scenario with fewer events (fanout64 1,000, fanin16 8,000, big 3,000/200/20 and 20
paced, idle1000 10,000, catchup 9,000: a 1.5 s burst); its p99s of 18 paced big
events are their maximum.

``--compare PATH``: PATH is a directory with another saltevent.py (a worktree of
an older commit, say).  Each repetition runs every saltevent scenario on this
checkout's copy, then on PATH's, then the baseline, so both copies see the same
machine; the table adds PATH's figure ("old") and new/old, the plain quotient.
Workers import the copy named by their ``se_path`` argument; the broker reports
the file it imported and a mismatch is an error.  The bench itself uses only the
public API (MasterEvent, connect_pull, fire_event, get_event, opts), so it runs
against either copy.

The baseline ("raw relay") is the practical ceiling for a pure-Python bus: a relay
process with a selector accept loop that recv()s what a firer sent (cut at the last
newline) and sendall()s the same bytes to every listener; firers encode compact
JSON (as saltevent does) + sendall; listeners recv, split lines, json.loads each.
A frame spanning several recv()s is joined once, from a list of parts.  No backlog
bounds, no features: a stalled listener blocks the relay (reported, with a time
cap).  In idle1000 only, the relay runs in queue mode: a listener whose socket is
full gets what it cannot take queued, unbounded, instead of blocking everyone
(else the first idle socket to fill would stop the bus); it has no filters, so its
(b) is its (a), not run again, marked ``*``.  The relay sends one b"\\n" when it
accepts a listener, so a connected baseline listener is registered.

saltevent's broker runs in its own process too: a helper that holds an idle
``MasterEvent(sock_dir, listen=False)`` whose ``connect_pull()`` elects it broker.

Stdlib only.  Nothing here asserts: the figures are for reading.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THIS = os.path.abspath(__file__)

# Workers import this file as a module (so it is compiled once, to a cached .pyc,
# rather than recompiled as __main__ in every process: less start-up noise and RSS).
# Which saltevent.py they import is a worker argument, ``se_path`` (see worker_main).
WORKER_BOOT = ("import sys; sys.path.insert(0, %r); import bench; sys.exit(bench.main(sys.argv[1:]))"
               % HERE)
RELAY_PUB = "relay-pub.sock"      # baseline: listeners connect here
RELAY_PULL = "relay-pull.sock"    # baseline: firers connect here
RECV_BYTES = 256 << 10
LAT_WARMUP = 50                   # events skipped at the start of the latency run

# ============================================================================
# Payloads (identical for saltevent and the baseline)
# ============================================================================

_TAG = "salt/job/20241127133800123456/ret/minion-0042"
_PAD_1K = "x" * 840


def make_small(seq: int) -> dict:
    """~150 bytes of JSON (the saltevent frame adds its ``_stamp`` and the tag)."""
    return {"id": "minion-0042", "fun": "test.ping", "jid": "20241127133800123456",
            "seq": seq, "retcode": 0, "success": True, "return": True,
            "t": time.monotonic_ns()}


def make_big(seq: int) -> dict:
    """~1 KB of JSON."""
    return {"id": "minion-0042", "fun": "test.ping", "jid": "20241127133800123456",
            "seq": seq, "retcode": 0, "success": True, "return": _PAD_1K,
            "t": time.monotonic_ns()}


PAYLOADS = {"small": make_small, "big": make_big}

#: Compact JSON, as saltevent encodes; the baseline's firer encodes the same way.
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode
_WORDS = ("minion state highstate pkg file service running installed latest managed "
          "changed result comment duration salt master job return retcode success "
          "failed the a of to in is was for with not already configured nginx httpd "
          "openssl kernel python3 cron user group mode owner source hash").split()


def _text(rnd, nwords: int) -> str:
    return " ".join(rnd.choice(_WORDS) for _ in range(nwords))


def _record(rnd, i: int) -> dict:
    """One state return: short strings, numbers, booleans, a nested dict, a comment."""
    fun = rnd.choice(("pkg.installed", "file.managed", "service.running", "cmd.run", "user.present"))
    name = rnd.choice(_WORDS) + "-" + str(rnd.randrange(1000))
    ok = rnd.random() > 0.1
    return {"id": f"{fun.split('.')[0]}_|-{name}_|-{name}_|-{fun.split('.')[1]}", "fun": fun,
            "name": name, "result": ok, "retcode": 0 if ok else rnd.choice((1, 2, 127)),
            "duration_ms": round(rnd.uniform(0.05, 2500.0), 3), "__run_num__": i,
            "start_time": f"13:38:{rnd.randrange(60):02d}.{rnd.randrange(10 ** 6):06d}",
            "changes": ({"old": f"1.{rnd.randrange(30)}.{rnd.randrange(9)}",
                         "new": f"1.{rnd.randrange(30)}.{rnd.randrange(9)}"} if rnd.random() < 0.4 else {}),
            "pchanges": {}, "warnings": [] if ok else [_text(rnd, 6)],
            # mostly a short comment, every fifth a long one (a diff, a command's output)
            "comment": _text(rnd, rnd.randrange(4, 16) if i % 5 != 4 else rnd.randrange(60, 200))}


def make_records(size: int) -> dict:
    """A job return of *size* bytes of compact JSON (to the byte while ``t`` keeps its digits).

    Deterministic (seeded by *size*): a dict with a list of state records, padded
    with a top-level ``note``.  ``t`` (the fire time) and ``seq`` are set per event.
    """
    import random
    rnd = random.Random(size)
    d = {"t": time.monotonic_ns(), "seq": 0, "jid": "20241127133800123456", "id": "minion-0042",
         "fun": "state.apply", "success": True, "records": []}
    used = len(_COMPACT(d))
    recs = d["records"]
    while True:
        r = _record(rnd, len(recs))
        add = len(_COMPACT(r)) + (1 if recs else 0)
        if used + add > size:
            break
        recs.append(r)
        used += add
    pad = size - used - len(',"note":""')
    if pad < 0 and recs:                  # no room for the note: one record fewer
        pad += len(_COMPACT(recs.pop())) + (1 if recs else 0)
    if pad >= 0:
        note = _text(rnd, pad // 3 + 1)
        d["note"] = (note + " " * pad)[:pad]
    return d


def payload_maker(spec: str):
    """Return (make(seq) -> dict, encoded size or None) for a payload spec.

    ``small`` and ``big`` are built per event; ``json:N`` is a :func:`make_records`
    payload of N bytes built once, whose ``seq`` and ``t`` (the fire time) are set
    just before each fire (both firers encode it at once, so reusing it is safe).
    """
    if spec in PAYLOADS:
        return PAYLOADS[spec], None
    base = make_records(int(spec.split(":", 1)[1]))
    mono = time.monotonic_ns

    def make(seq: int) -> dict:
        base["seq"] = seq
        base["t"] = mono()
        return base
    return make, len(_COMPACT(base).encode())

# ============================================================================
# Worker side: one role per process
# ============================================================================


def _out(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _in() -> dict | None:
    """Read one command line from the parent; None on EOF."""
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    return json.loads(line)


def _wait_go() -> None:
    cmd = _in()
    if cmd is None or cmd.get("cmd") != "go":
        raise SystemExit(f"expected go, got {cmd!r}")


def _raise_nofile() -> tuple:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return (soft, hard)."""
    try:
        import resource
    except ImportError:                  # not Unix: nothing to raise
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class RawListener:
    """Baseline listener: non-blocking recv, poll() when empty, split lines, json.loads.

    A frame that spans several recv()s is kept as a list of parts and joined once.
    """

    def __init__(self, sock_dir: str, timeout: float = 10.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(os.path.join(sock_dir, RELAY_PUB))
        if s.recv(1) != b"\n":              # the relay's accept acknowledgement
            raise RuntimeError("relay did not acknowledge the listener")
        s.setblocking(False)
        self.sock = s
        self.poller = select.poll()
        self.poller.register(s.fileno(), select.POLLIN)
        self.q = deque()
        self.parts = []
        self.dropped = 0
        self.gaps = 0

    def next(self, wait: float):
        q = self.q
        if q:
            return q.popleft()
        recv = self.sock.recv
        loads = json.loads
        deadline = time.monotonic() + wait
        while True:
            try:
                chunk = recv(RECV_BYTES)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.poller.poll(int(remaining * 1000) + 1):
                    return None
                continue
            if not chunk:
                return None
            parts = self.parts
            if b"\n" not in chunk:
                parts.append(chunk)
                continue
            if parts:
                parts.append(chunk)
                chunk = b"".join(parts)
                parts.clear()
            lines = chunk.split(b"\n")
            tail = lines.pop()
            if tail:
                parts.append(tail)
            for line in lines:
                if line:
                    q.append(loads(line))
            if q:
                return q.popleft()

    def close(self) -> None:
        self.sock.close()


class RawFirer:
    """Baseline firer: compact json.dumps (as saltevent's) + sendall on a blocking socket."""

    def __init__(self, sock_dir: str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.path.join(sock_dir, RELAY_PULL))
        self.sock = s
        self._sendall = s.sendall

    def fire(self, data: dict, tag: str) -> bool:
        self._sendall((_COMPACT({"tag": tag, "data": data}) + "\n").encode())
        return True

    def close(self) -> None:
        self.sock.close()


def _se_listener(sock_dir: str, backlog: int | None = None):
    import saltevent
    opts = {"saltevent_backlog_bytes": backlog} if backlog else None
    ev = saltevent.MasterEvent(sock_dir, opts=opts, listen=True)
    if not ev.cpub:
        raise RuntimeError("saltevent listener did not connect")
    get = ev.get_event

    class L:
        def next(self, wait):
            return get(wait=wait, full=True)

        @property
        def dropped(self):
            return ev.dropped

        @property
        def gaps(self):
            return getattr(ev, "gaps", 0)

        def close(self):
            ev.destroy()
    return L()


def _se_firer(sock_dir: str):
    import saltevent
    ev = saltevent.MasterEvent(sock_dir, listen=False)
    if not ev.connect_pull(timeout=10):
        raise RuntimeError("saltevent firer did not connect")

    class F:
        fire = ev.fire_event

        def close(self):
            ev.destroy()
    return F()


class Inspect:
    """What a listener checks in each event it receives, as its arguments ask.

    ``latency``: fire->receive time from the event's ``t`` (the first ``warmup``
    skipped).  ``order``: events per firer; firer k sends seq k*order, k*order+1, ...
    so each event's firer is seq // order; counts events per firer and order
    violations (a seq not above the last one from that firer).  ``records``: the
    length of the payload's record list, to see that big events arrived whole.
    """

    def __init__(self, a: dict):
        self.lat = [] if a.get("latency") else None
        self.warmup = a.get("warmup", LAT_WARMUP)
        self.per = a.get("order")
        self.last: dict = {}
        self.count: dict = {}
        self.violations = 0
        self.records = a.get("records", False)
        self.rec_lens: set = set()

    def __call__(self, ev: dict, now: int) -> None:
        data = ev["data"]
        if self.lat is not None:
            self.lat.append(now - data["t"])
        if self.per:
            seq = data["seq"]
            src = seq // self.per
            if seq <= self.last.get(src, -1):
                self.violations += 1
            else:
                self.last[src] = seq
            self.count[src] = self.count.get(src, 0) + 1
        if self.records:
            self.rec_lens.add(len(data.get("records") or ()))

    def result(self) -> dict:
        res = {}
        if self.lat is not None:
            lat = self.lat[self.warmup:] if len(self.lat) > self.warmup else self.lat
            lat.sort()
            res["lat"] = {"n": len(lat), "p50_ms": _pct(lat, 50) / 1e6, "p99_ms": _pct(lat, 99) / 1e6,
                          "max_ms": lat[-1] / 1e6 if lat else None,
                          "mean_ms": sum(lat) / len(lat) / 1e6 if lat else None}
        if self.per:
            res["order_violations"] = self.violations
            res["per_firer"] = {str(k): v for k, v in sorted(self.count.items())}
        if self.records:
            res["record_lens"] = sorted(self.rec_lens)
        return res


def w_listener(a: dict) -> None:
    """Read events; report count, first/last receive time, drops and what Inspect saw."""
    if a["impl"] == "se":
        lst = _se_listener(a["sock_dir"], a.get("backlog"))
    else:
        lst = RawListener(a["sock_dir"])
    _out({"ready": True, "pid": os.getpid()})
    if a.get("stall"):
        cmd = _in()                                   # do not read until told
        if cmd is None:
            return
    expect = a["expect"]
    inspect = Inspect(a) if a.get("latency") or a.get("order") or a.get("records") else None
    nxt = lst.next
    mono = time.monotonic_ns
    n = 0
    t_first = t_last = 0
    t_resume = mono()
    ev = nxt(a["first_wait"])
    idle = a["idle"]
    stop_at = time.monotonic() + a["max_time"]
    while ev is not None:
        now = mono()
        if not n:
            t_first = now
        n += 1
        t_last = now
        if inspect is not None:
            inspect(ev, now)
        if n + lst.dropped >= expect:
            break
        if not n & 1023 and time.monotonic() > stop_at:
            break
        ev = nxt(idle)
    res = {"n": n, "t_first": t_first, "t_last": t_last, "t_resume": t_resume,
           "dropped": lst.dropped, "gaps": lst.gaps}
    if inspect is not None:
        res.update(inspect.result())
    _out({"result": res})
    lst.close()


def _pct(sorted_vals: list, p: float):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def w_firer(a: dict) -> None:
    """Fire ``count`` events (optionally paced); report timing, failures, max call time."""
    if a["impl"] == "se":
        f = _se_firer(a["sock_dir"])
    else:
        f = RawFirer(a["sock_dir"])
    make, nbytes = payload_maker(a["payload"])
    count = a["count"]
    seq0 = a.get("seq0", 0)
    rate = a.get("rate")
    track = a.get("track_calls", False)
    fire = f.fire
    tag = _TAG
    mono = time.monotonic_ns
    _out({"ready": True, "pid": os.getpid()})
    _wait_go()
    fails = 0
    max_call = 0
    t_start = mono()
    if rate:
        interval = 1e9 / rate
        sleep = time.sleep
        for i in range(count):
            target = t_start + int(i * interval)
            now = mono()
            if target > now:
                sleep((target - now) / 1e9)
            if not fire(make(seq0 + i), tag):
                fails += 1
    elif track:
        for i in range(count):
            t0 = mono()
            if not fire(make(seq0 + i), tag):
                fails += 1
            dt = mono() - t0
            if dt > max_call:
                max_call = dt
    else:
        for i in range(count):
            if not fire(make(seq0 + i), tag):
                fails += 1
    t_end = mono()
    _out({"result": {"t_start": t_start, "t_end": t_end, "fails": fails,
                     "max_call_ms": max_call / 1e6 if track else None, "payload_bytes": nbytes}})
    # Keep the connection open until told: closing early can only hurt delivery.
    _in()
    f.close()


def w_se_broker(a: dict) -> None:
    """Hold saltevent's broker for ``sock_dir`` in this process until stdin closes."""
    _raise_nofile()
    import saltevent
    prof = None
    if a.get("profile"):
        import cProfile
        prof = cProfile.Profile()
        # Profile the broker thread too: enable the profiler from inside each new thread.
        threading.setprofile(lambda *_: prof.enable())
    ev = saltevent.MasterEvent(a["sock_dir"], listen=False)
    if not ev.connect_pull(timeout=10):
        raise RuntimeError("could not start saltevent's broker")
    brokers = getattr(saltevent, "_brokers", None)
    here = None
    if isinstance(brokers, dict):
        bus = getattr(ev, "_bus", None)
        path = getattr(bus, "path", None) or getattr(ev, "puburi", None)
        here = path in brokers
    ev.close_pull()
    threading.setprofile(None)
    _out({"ready": True, "pid": os.getpid(), "broker_here": here,
          "se_file": os.path.abspath(saltevent.__file__)})
    while True:
        cmd = _in()
        if cmd is None or cmd.get("cmd") == "stop":
            break
    ev.destroy()
    if prof is not None:
        prof.disable()
        prof.dump_stats(a["profile"])


def w_relay(a: dict) -> None:
    """The baseline relay: selector accept loop, recv from firers, sendall to listeners.

    A frame that spans several recv()s is kept as a list of parts and joined once.
    With ``queue`` (idle1000), a listener whose socket is full does not block the
    relay: what it cannot take yet waits, unbounded, in a deque of shared blocks
    (the minimum a relay needs to carry on past listeners that never read).
    """
    _raise_nofile()
    d = a["sock_dir"]
    pull = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pull.bind(os.path.join(d, RELAY_PULL))
    pull.listen(128)
    pub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pub.bind(os.path.join(d, RELAY_PUB))
    pub.listen(128)
    sel = selectors.DefaultSelector()
    sel.register(pull, selectors.EVENT_READ, ("pull", None))
    sel.register(pub, selectors.EVENT_READ, ("pub", None))
    stdin_fd = sys.stdin.fileno()
    sel.register(stdin_fd, selectors.EVENT_READ, ("ctl", None))
    queue = a.get("queue", False)
    listeners = []
    partial = {}                 # firer -> parts of its unfinished frame
    pending = {}                 # listener -> deque of what its full socket could not take

    def send_queued(lst, block) -> None:
        q = pending.get(lst)
        if q is not None:
            q.append(block)
            return
        try:
            n = lst.send(block)
        except BlockingIOError:
            n = 0
        if n < len(block):
            pending[lst] = deque([memoryview(block)[n:]])
            sel.register(lst, selectors.EVENT_WRITE, ("flush", lst))

    def flush(lst) -> None:
        q = pending[lst]
        while q:
            try:
                n = lst.send(q[0])
            except BlockingIOError:
                return
            if n < len(q[0]):
                q[0] = memoryview(q[0])[n:]
                return
            q.popleft()
        del pending[lst]
        sel.unregister(lst)

    def drop(lst) -> None:
        listeners.remove(lst)
        if pending.pop(lst, None) is not None:
            sel.unregister(lst)
        lst.close()

    send = send_queued if queue else (lambda lst, block: lst.sendall(block))
    _out({"ready": True, "pid": os.getpid()})
    while True:
        for key, _ in sel.select():
            what, conn = key.data
            if what == "in":
                chunk = conn.recv(RECV_BYTES)
                if not chunk:
                    sel.unregister(conn)
                    del partial[conn]
                    conn.close()
                    continue
                end = chunk.rfind(b"\n") + 1
                parts = partial[conn]
                if not end:
                    parts.append(chunk)
                    continue
                if parts:
                    parts.append(chunk[:end])
                    block = b"".join(parts)
                    parts.clear()
                else:
                    block = chunk[:end]
                if end < len(chunk):
                    parts.append(chunk[end:])
                dead = None
                for lst in listeners:
                    try:
                        send(lst, block)
                    except OSError:
                        dead = (dead or []) + [lst]
                for lst in dead or ():
                    drop(lst)
            elif what == "flush":
                try:
                    flush(conn)
                except OSError:
                    drop(conn)
            elif what == "pull":
                conn, _ = pull.accept()
                partial[conn] = []
                sel.register(conn, selectors.EVENT_READ, ("in", conn))
            elif what == "pub":
                conn, _ = pub.accept()
                conn.sendall(b"\n")
                if queue:
                    conn.setblocking(False)
                listeners.append(conn)
            elif what == "ctl":
                if not os.read(stdin_fd, 4096):
                    return


def w_race_a(a: dict) -> None:
    """Join race, process A: per round, construct a listener, signal B, wait for the event."""
    import saltevent
    sig = socket.socket(fileno=a["fd"])
    _out({"ready": True, "pid": os.getpid()})
    while True:
        cmd = _in()
        if cmd is None or cmd.get("cmd") != "round":
            break
        i = cmd["i"]
        t0 = time.monotonic_ns()
        ev = saltevent.MasterEvent(a["sock_dir"], listen=True)
        t1 = time.monotonic_ns()
        sig.sendall(b"%d\n" % i)
        want = f"race/{i}"
        got = ev.get_event(wait=a["wait"], tag=want, full=True)
        t2 = time.monotonic_ns()
        ev.destroy()
        _out({"i": i, "hit": got is not None and got.get("tag") == want,
              "ctor_ms": (t1 - t0) / 1e6, "recv_ms": (t2 - t1) / 1e6})


def w_race_b(a: dict) -> None:
    """Join race, process B: fire ``race/<i>`` each time A signals round i."""
    import saltevent
    sig = socket.socket(fileno=a["fd"])
    ev = saltevent.MasterEvent(a["sock_dir"], listen=False)
    ev.connect_pull(timeout=10)
    _out({"ready": True, "pid": os.getpid()})
    buf = b""
    fails = 0
    while True:
        chunk = sig.recv(4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not ev.fire_event({"round": int(line)}, f"race/{int(line)}"):
                fails += 1
    ev.destroy()


def w_idle(a: dict) -> None:
    """Hold ``count`` listeners that never read (idle1000) until stdin closes.

    saltevent: ``MasterEvent(listen=True)``, with ``tags`` each declaring its own
    non-matching prefix in ``opts['saltevent_tags']``; baseline: a connection to the
    relay's pub socket (its one-byte acknowledgement read, then nothing).
    """
    soft, _ = _raise_nofile()
    if a["impl"] == "se":
        import saltevent
    held = []
    try:
        for i in range(a["count"]):
            if a["impl"] == "se":
                k = a["first"] + i
                opts = {"saltevent_tags": [f"idle/nomatch/{k}/"]} if a.get("tags") else None
                ev = saltevent.MasterEvent(a["sock_dir"], opts=opts, listen=True)
                held.append(ev)
                if not ev.cpub:
                    raise RuntimeError(f"idle listener {i} did not connect")
            else:
                held.append(RawListener(a["sock_dir"]))
        _out({"ready": True, "pid": os.getpid(), "held": len(held), "nofile": soft})
        while _in() is not None:         # never read the listeners: only wait for EOF
            pass
    finally:
        for h in held:                   # MasterEvent.destroy() or RawListener.close()
            try:
                (getattr(h, "destroy", None) or h.close)()
            except Exception:
                pass


# -- catchup (workers) ---------------------------------------------------------

CU_END = "bench/catchup/end"      # the firer's end marker, after its last event
CU_LIVE_LAG_MS = 5.0              # "live": the first event received this soon after its fire


def w_cu_firer(a: dict) -> None:
    """Fire ``count`` small events paced at ``rate``/s, then the end marker.

    ``mark_after`` seconds after the go it reports ``{"mark": events fired so far}``
    (the parent then starts the catch-up listener).  Each event's ``seq`` is its
    number here (0..count-1) and ``t`` its fire time.  Pacing: it sleeps only when
    more than 0.2 ms ahead of the schedule (a sleep costs ~60 us), so events go out
    in small bunches at the steady average rate.
    """
    f = _se_firer(a["sock_dir"])
    count, rate = a["count"], a["rate"]
    fire = f.fire
    tag = _TAG
    mono = time.monotonic_ns
    sleep = time.sleep
    interval = 1e9 / rate
    _out({"ready": True, "pid": os.getpid()})
    _wait_go()
    fails = 0
    behind = 0                      # the most the firer fell behind its schedule, ns
    t_start = mono()
    mark_at = t_start + int(a["mark_after"] * 1e9)
    marked = False
    for i in range(count):
        target = t_start + int(i * interval)
        now = mono()
        if target - now > 200_000:
            sleep((target - now) / 1e9)
        elif now - target > behind:
            behind = now - target
        if not marked and now >= mark_at:
            _out({"mark": i, "t": now})
            marked = True
        if not fire(make_small(i), tag):
            fails += 1
    t_end = mono()
    end_ok = fire({"n": count, "t": t_end}, CU_END)
    if not marked:                  # a burst shorter than mark_after: mark at its end
        _out({"mark": count, "t": t_end})
    _out({"result": {"t_start": t_start, "t_end": t_end, "fails": fails, "end_ok": end_ok,
                     "behind_max_ms": behind / 1e6}})
    _in()
    f.close()


class CatchupCheck:
    """What a catch-up listener checks: every event once, bus seqs consecutive, timings.

    ``feed(n, seq, t_fire, now)`` per event, ``n`` the firer's number, ``seq`` the bus's.
    Caught up: the arrival of the last event fired before ``t_ref`` (the constructor's
    return: every event replayed, and the few fired while it registered; events
    arrive in order), known only when ``t_ref`` is.  Live: the first event received
    within CU_LIVE_LAG_MS of its fire.
    """

    def __init__(self, count: int, t_ref: int | None = None):
        self.count = count
        self.seen = bytearray(count)
        self.received = self.dups = self.foreign = 0
        self.breaks = 0                 # a bus seq other than the previous one + 1
        self.first_seq = self.prev_seq = None
        self.t_ref = t_ref
        self.t_first = self.t_caught = self.t_live = None
        self.n_caught = self.n_live = None
        self.lag_caught_ms = self.end_lag_ms = None
        self.live_ns = int(CU_LIVE_LAG_MS * 1e6)

    def feed(self, n, seq, t_fire: int, now: int) -> None:
        if self.t_first is None:
            self.t_first = now
        self.received += 1
        if isinstance(n, int) and 0 <= n < self.count:
            if self.seen[n]:
                self.dups += 1
            self.seen[n] = 1
        else:
            self.foreign += 1
        if self.first_seq is None:
            self.first_seq = seq
        elif seq != self.prev_seq + 1:
            self.breaks += 1
        self.prev_seq = seq
        if self.t_ref is not None and t_fire < self.t_ref:
            self.t_caught = now
            self.n_caught = self.received
            self.lag_caught_ms = (now - t_fire) / 1e6
        if self.t_live is None and now - t_fire < self.live_ns:
            self.t_live = now
            self.n_live = self.received

    def result(self, t0: int, t_end: int | None) -> dict:
        def ms(t):
            return (t - t0) / 1e6 if t is not None else None

        def rate(n, t):                 # events received up to t, per second since the first
            return n / ((t - self.t_first) / 1e9) if t is not None and t > self.t_first else None
        got = sum(self.seen)
        return {"received": got, "dups": self.dups, "missing": self.count - got,
                "foreign": self.foreign, "seq_breaks": self.breaks, "first_seq": self.first_seq,
                "last_seq": self.prev_seq,
                "first_ms": ms(self.t_first), "caught_ms": ms(self.t_caught),
                "n_caught": self.n_caught, "lag_caught_ms": self.lag_caught_ms,
                "caught_rate": rate(self.n_caught, self.t_caught),
                "live_ms": ms(self.t_live), "n_live": self.n_live,
                "live_rate": rate(self.n_live, self.t_live), "end_ms": ms(t_end),
                "end_lag_ms": self.end_lag_ms}


def _cu_api(a: dict, last: int) -> dict:
    """Catch up through the API: MasterEvent with a replay of the last *last* events."""
    import saltevent
    stop_at = time.monotonic() + a["max_time"]
    mono = time.monotonic_ns
    t0 = mono()
    ev = saltevent.MasterEvent(a["sock_dir"], listen=True,
                               opts={"saltevent_replay_last": last, "saltevent_seq": True})
    t1 = mono()
    check = CatchupCheck(a["count"], t1)
    feed = check.feed
    get = ev.get_event
    t_end = None
    try:
        while True:
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                break
            got = get(wait=min(remaining, 5.0), full=True)
            now = mono()
            if got is None:
                continue
            data = got["data"]
            if got["tag"] == CU_END:
                t_end = now
                check.end_lag_ms = (now - data.get("t", now)) / 1e6
                break
            feed(data.get("seq"), got.get("seq"), data.get("t", 0), now)
        res = check.result(t0, t_end)
        res.update(ctor_ms=(t1 - t0) / 1e6, gaps=ev.gaps, dropped=ev.dropped,
                   missed=[list(g) for g in list(ev.missed)[:5]], end_seen=t_end is not None)
        return res
    finally:
        ev.destroy()


def _cu_cli(a: dict, last: int) -> dict:
    """Catch up through the CLI: ``python -m saltevent listen --last N --seq --count M``.

    Lines are ``seq<TAB>tag<TAB>json``, read from a pipe and stamped here on arrival;
    the caught-up point is the "live" one (the CLI does not say where its replay ended).
    Its stderr (where it reports missed events) goes to a file beside the sockets.
    """
    count = a["count"]
    err_path = os.path.join(a["sock_dir"], "cli.err")
    argv = [sys.executable, "-m", "saltevent", "listen", "--sock-dir", a["sock_dir"],
            "--last", str(last), "--seq", "--count", str(count + 1)]
    stop_at = time.monotonic() + a["max_time"]
    mono = time.monotonic_ns
    check = CatchupCheck(count)
    feed = check.feed
    loads = json.loads
    t_end = None
    bad = 0
    t0 = mono()
    with open(err_path, "wb") as err:
        cli = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                               cwd=a["se_path"])
    try:
        fd = cli.stdout.fileno()
        buf = b""
        while t_end is None:
            remaining = stop_at - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 1 << 16)
            now = mono()
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    seq, tag, body = line.split(b"\t", 2)
                    data = loads(body)
                    seq = int(seq)
                except ValueError:
                    bad += 1
                    continue
                if tag == CU_END.encode():
                    t_end = now
                    check.end_lag_ms = (now - data.get("t", now)) / 1e6
                    break
                feed(data.get("seq"), seq, data.get("t", 0), now)
        try:
            rc = cli.wait(max(0.1, min(2.0, stop_at - time.monotonic())))
        except subprocess.TimeoutExpired:
            rc = None
        res = check.result(t0, t_end)
        with open(err_path, "rb") as f:
            err_text = f.read().decode(errors="replace")
        res.update(bad_lines=bad, rc=rc, end_seen=t_end is not None,
                   stderr_lines=err_text.count("\n"), stderr_head=err_text[:300])
        return res
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait(5)
        cli.stdout.close()


def w_cu_listener(a: dict) -> None:
    """Wait for ``{"cmd": "start", "last": N}``, then catch up through the API or the CLI."""
    if a["mode"] == "api":
        import saltevent  # noqa: F401  (imported before the start: not part of the timing)
    _out({"ready": True, "pid": os.getpid()})
    cmd = _in()
    if cmd is None or cmd.get("cmd") != "start":
        return
    last = cmd["last"]
    res = _cu_api(a, last) if a["mode"] == "api" else _cu_cli(a, last)
    _out({"result": res})


WORKERS = {"listener": w_listener, "idle": w_idle, "firer": w_firer, "se_broker": w_se_broker,
           "relay": w_relay, "race_a": w_race_a, "race_b": w_race_b,
           "cu_firer": w_cu_firer, "cu_listener": w_cu_listener}


def worker_main(role: str, args_json: str) -> int:
    a = json.loads(args_json)
    # The directory whose saltevent.py this worker imports: this checkout's, or the
    # other copy's under --compare.  First on sys.path, ahead of the cwd.
    sys.path.insert(0, a.get("se_path") or ROOT)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    prof = None
    if a.get("profile") and role != "se_broker":
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        WORKERS[role](a)
    except BaseException:
        try:
            _out({"error": traceback.format_exc()})
        except Exception:
            pass
        traceback.print_exc()
        return 1
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(a["profile"])
    return 0


# ============================================================================
# Parent side: processes, scenarios, report
# ============================================================================


class ScenarioTimeout(Exception):
    pass


class WorkerFailed(Exception):
    pass


class Proc:
    """One worker process, spoken to in JSON lines."""

    def __init__(self, ctx: "Ctx", name: str, role: str, args: dict, pass_fds=()):
        self.name = name
        self.err_path = os.path.join(ctx.log_dir, f"{ctx.seq:03d}-{name}.err")
        ctx.seq += 1
        args = dict(args, se_path=ctx.se_path)
        if ctx.profile_roles and _profile_key(role, args) in ctx.profile_roles and args.get("impl", "se") == "se":
            args = dict(args, profile=os.path.join(ctx.prof_dir, f"{name}-{ctx.seq:03d}.prof"))
            ctx.prof_files.append((name, args["profile"]))
        with open(self.err_path, "wb") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOT, "--worker", role, json.dumps(args)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                pass_fds=pass_fds, cwd=ROOT, env=ctx.env, start_new_session=True)
        self.pid = self.p.pid
        self.is_bus = False
        self.fd = self.p.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        ctx.procs.append(self)

    def send(self, obj: dict) -> None:
        try:
            self.p.stdin.write((json.dumps(obj) + "\n").encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def recv(self, deadline: float, soft: bool = False):
        """Return the next JSON line; at *deadline* raise ScenarioTimeout (or None if soft)."""
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if soft:
                    return None
                raise ScenarioTimeout(f"{self.name}: no answer in time")
            r, _, _ = select.select([self.fd], [], [], remaining)
            if not r:
                continue
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                self.p.wait(1)
                raise WorkerFailed(f"{self.name} exited ({self.p.returncode}): {self.err_tail()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerFailed(f"{self.name} failed:\n{msg['error']}")
        return msg

    def err_tail(self, n: int = 1500) -> str:
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def err_lines(self) -> int:
        try:
            with open(self.err_path, "rb") as f:
                return f.read().count(b"\n")
        except OSError:
            return 0

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)   # its own session: only its group
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass

    def stop(self, timeout: float = 2.0) -> None:
        """Close stdin (the polite stop) and give it *timeout* to exit."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def reap(procs) -> None:
    """Stop *procs*: politely first (stdin closed: brokers hand off), SIGKILL after 1 s.

    Clients go first, then brokers/relays, so that no client is left to take over a bus.
    """
    clients = [p for p in procs if not p.is_bus]
    if len(clients) < len(procs):
        reap(clients)
        procs = [p for p in procs if p.is_bus]
    for p in procs:
        if p.p.poll() is None:
            try:
                p.p.stdin.close()
            except OSError:
                pass
    t_end = time.monotonic() + 1.0
    for p in procs:
        try:
            p.p.wait(max(0.01, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        p.kill()


def _profile_key(role: str, args: dict) -> str:
    if role == "se_broker":
        return "broker"
    if role == "listener" and args.get("stall"):
        return "stalled"
    return role


class Ctx:
    """Per-run state: every process started, where logs go, configuration."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.procs: list = []
        self.seq = 0
        self.log_dir = tempfile.mkdtemp(prefix="se-blog")
        self.prof_dir = cfg.profile_dir
        self.profile_roles = set(cfg.profile.split(",")) if cfg.profile else set()
        self.prof_files: list = []
        self.se_path = ROOT        # whose saltevent.py the workers import (run_one sets it)
        # Run every worker as installed code runs: with compiled .pyc files.  The
        # environment may set PYTHONDONTWRITEBYTECODE (then every process would
        # recompile saltevent.py: ~25 ms and ~6 MB RSS); cache them outside the repo.
        self.pyc_dir = tempfile.mkdtemp(prefix="se-bpyc")
        self.env = dict(os.environ, PYTHONPYCACHEPREFIX=self.pyc_dir)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)

    def kill_all(self) -> None:
        procs, self.procs = self.procs, []
        for p in procs:
            p.kill()


class RssSampler(threading.Thread):
    """Sample VmRSS of one pid every *interval* seconds; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.first_kb = None
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            st = read_status(self.pid)
            if not st:
                return
            rss = st.get("VmRSS", 0)
            if self.first_kb is None:
                self.first_kb = rss
            if rss > self.peak_kb:
                self.peak_kb = rss
            self._stop_evt.wait(self.interval)

    def stop(self) -> dict:
        self._stop_evt.set()
        self.join(2)
        st = read_status(self.pid)
        hwm = st.get("VmHWM", 0)
        peak = max(self.peak_kb, hwm)
        return {"rss_start_mb": (self.first_kb or 0) / 1024, "rss_peak_mb": peak / 1024,
                "rss_growth_mb": (peak - (self.first_kb or 0)) / 1024,
                "rss_sampled_peak_mb": self.peak_kb / 1024, "vmhwm_mb": hwm / 1024,
                "rss_end_mb": st.get("VmRSS", 0) / 1024}


def read_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def start_bus(ctx: Ctx, impl: str, d: str, deadline: float, queue: bool = False) -> Proc:
    if impl == "se":
        b = Proc(ctx, "se-broker", "se_broker", {"sock_dir": d})
    else:
        b = Proc(ctx, "relay", "relay", {"sock_dir": d, "queue": queue})
    b.is_bus = True
    msg = b.recv(deadline)
    if impl == "se" and msg.get("broker_here") is False:
        raise WorkerFailed("the saltevent helper did not become the broker")
    want = os.path.join(os.path.abspath(ctx.se_path), "saltevent.py")
    if impl == "se" and msg.get("se_file") != want:
        raise WorkerFailed(f"the broker imported {msg.get('se_file')}, not {want}")
    b.t_ready = time.monotonic()
    return b


def _wait_all_ready(procs, deadline) -> list:
    return [p.recv(deadline) for p in procs]


def _vmrss_kb(pid: int) -> int:
    return read_status(pid).get("VmRSS", 0)


# -- scenarios 1-4, fanout64, fanin16, and the phases of big and idle1000 -----


def sc_flow(ctx: Ctx, impl: str, d: str, deadline: float, *, firers: int, listeners: int,
            count: int, payload: str = "small", rate: int | None = None,
            latency: bool = False, warmup: int = LAT_WARMUP, order: bool = False,
            idle: int = 0, idle_tags: bool = False, idle_procs: int = 10,
            queue: bool = False) -> dict:
    """N firers -> M listeners; ``count`` events in all, split between the firers.

    ``order``: listeners check per-firer order and count per firer.  ``json:N``
    payloads: listeners check each event's record list, and the result has MiB/s.
    ``idle``: that many listeners that never read, held by ``idle_procs`` processes,
    connected after the others are ready; the broker's VmRSS is read before, after
    they connect and after the run.  ``queue``: the relay's queue mode.
    """
    bus = start_bus(ctx, impl, d, deadline, queue=queue)
    per = count // firers
    total = per * firers
    cap = deadline - time.monotonic()
    big = payload.startswith("json:")
    ls = [Proc(ctx, f"listener{i}", "listener",
               {"impl": impl, "sock_dir": d, "expect": total, "latency": latency, "warmup": warmup,
                "order": per if order else None, "records": big,
                "first_wait": cap, "idle": 5.0, "max_time": cap})
          for i in range(listeners)]
    fs = [Proc(ctx, f"firer{i}", "firer",
               {"impl": impl, "sock_dir": d, "count": per, "seq0": i * per,
                "payload": payload, "rate": rate})
          for i in range(firers)]
    _wait_all_ready(ls + fs, deadline)
    idle_res = {}
    if idle:
        rss0 = _vmrss_kb(bus.pid)
        shares = [idle // idle_procs + (k < idle % idle_procs) for k in range(idle_procs)]
        holders = [Proc(ctx, f"idle{k}", "idle", {"impl": impl, "sock_dir": d, "count": n,
                                                   "first": sum(shares[:k]), "tags": idle_tags})
                   for k, n in enumerate(shares) if n]
        held = sum(m["held"] for m in _wait_all_ready(holders, deadline))
        rss1 = _vmrss_kb(bus.pid)
        idle_res = {"idle": held, "rss_kb_before_idle": rss0, "rss_kb_idle_connected": rss1,
                    "idle_rss_kb_each": (rss1 - rss0) / held if held else None}
    rss = RssSampler(bus.pid)
    rss.start()
    t_go = time.monotonic_ns()
    for f in fs:
        f.send({"cmd": "go"})
    fres = [f.recv(deadline)["result"] for f in fs]
    lres = [p.recv(deadline)["result"] for p in ls]
    for f in fs:
        f.send({"cmd": "done"})
    mem = rss.stop()
    got = sum(r["n"] for r in lres)
    t_last = max(r["t_last"] for r in lres)
    secs = (t_last - t_go) / 1e9 if got else float("nan")
    res = {"events": total, "listeners": listeners, "firers": firers, "received": got,
           "expected": total * listeners, "rate": got / secs if got else 0.0,
           "seconds": secs,
           "fire_seconds": (max(r["t_end"] for r in fres) - t_go) / 1e9,
           "fire_fails": sum(r["fails"] for r in fres),
           "dropped": sum(r["dropped"] for r in lres), **mem, **idle_res}
    if idle:
        rss2 = _vmrss_kb(bus.pid)
        res["idle_rss_kb_each_after_run"] = (rss2 - idle_res["rss_kb_before_idle"]) / held if held else None
    if latency:
        res.update(lres[0]["lat"])
    if order:
        per_firer = [lr["per_firer"] for lr in lres]
        res["order_violations"] = sum(lr["order_violations"] for lr in lres)
        res["lost"] = res["expected"] - got
        res["firers_short"] = sum(1 for pf in per_firer for k in range(firers) if pf.get(str(k), 0) < per)
    if big:
        nbytes = fres[0]["payload_bytes"]
        res["payload_bytes"] = nbytes
        res["mib_s"] = got * nbytes / secs / (1 << 20) if got else 0.0
        res["record_lens"] = sorted({n for lr in lres for n in lr["record_lens"]})
    return res


def sc_phase(ctx: Ctx, impl: str, d: str, deadline: float, name: str, **kw) -> dict:
    """One :func:`sc_flow` in a fresh bus (subdirectory *name*); its processes reaped after."""
    sub = os.path.join(d, name)
    os.mkdir(sub)
    first = len(ctx.procs)
    try:
        return sc_flow(ctx, impl, sub, deadline, **kw)
    finally:
        procs = ctx.procs[first:]
        del ctx.procs[first:]
        reap(procs)


# -- big and idle1000 ----------------------------------------------------------

BIG_SIZES = (("1k", 1 << 10), ("64k", 64 << 10), ("900k", 900 << 10))   # label, payload bytes
BIG_LAT_RATE = 20                 # events/s in big's latency phases
BIG_LAT_SIZES = ("64k", "900k")


def sc_big(ctx: Ctx, impl: str, d: str, deadline: float) -> dict:
    """MiB/s 1 -> 1 at each size in BIG_SIZES, then latency at 20/s for 64 KiB and 900 KiB."""
    cfg = ctx.cfg
    size = dict(BIG_SIZES)
    res = {}
    for label, nbytes in BIG_SIZES:
        r = sc_phase(ctx, impl, d, deadline, f"t{label}", firers=1, listeners=1,
                     count=cfg.big_events[label], payload=f"json:{nbytes}")
        for key in ("mib_s", "rate", "received", "expected", "dropped", "fire_fails",
                    "payload_bytes", "record_lens", "rss_growth_mb"):
            res[f"{key}_{label}"] = r[key]
    for label in BIG_LAT_SIZES:
        r = sc_phase(ctx, impl, d, deadline, f"l{label}", firers=1, listeners=1,
                     count=cfg.big_lat_events, payload=f"json:{size[label]}", rate=BIG_LAT_RATE,
                     latency=True, warmup=cfg.big_lat_warmup)
        for key in ("p50_ms", "p99_ms", "max_ms", "n", "received", "expected", "dropped"):
            res[f"lat_{key}_{label}"] = r.get(key)
    return res


IDLE_FD_MARGIN = 64               # fds a broker or holder needs besides the idle connections


def idle_count(cfg) -> tuple:
    """How many idle listeners the hard fd limit allows: (count, hard limit, scaled down?).

    Workers inherit this process's hard RLIMIT_NOFILE and raise their soft limit to it.
    """
    try:
        import resource
    except ImportError:
        return cfg.idle_listeners, None, False
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    n = cfg.idle_listeners
    if hard != resource.RLIM_INFINITY:
        n = max(0, min(n, hard - IDLE_FD_MARGIN))
    return n, hard, n < cfg.idle_listeners


def sc_idle(ctx: Ctx, impl: str, d: str, deadline: float) -> dict:
    """1 -> 1 with no idle listeners, then (a) with plain ones, then (b) with declared tags.

    Each phase has a fresh bus.  The baseline relay runs in queue mode in all of them
    (a blocking relay would stop at the first full idle socket); it has no filters,
    so (b) would be (a) again: it is not run, and its figures are (a)'s.
    """
    cfg = ctx.cfg
    n, hard, scaled = idle_count(cfg)
    kw = dict(firers=1, listeners=1, count=cfg.idle_events, queue=True, idle_procs=cfg.idle_procs)
    ref = sc_phase(ctx, impl, d, deadline, "ref", **kw)
    a = sc_phase(ctx, impl, d, deadline, "a", idle=n, **kw)
    b = sc_phase(ctx, impl, d, deadline, "b", idle=n, idle_tags=True, **kw) if impl == "se" else a
    res = {"idle": n, "idle_procs": cfg.idle_procs, "nofile_hard": hard, "scaled_down": scaled,
           "b_is_a": impl != "se", "events": ref["events"]}
    for tag, r in (("ref", ref), ("a", a), ("b", b)):
        res[f"rate_{tag}"] = r["rate"]
        res[f"received_{tag}"] = r["received"]
        res[f"expected_{tag}"] = r["expected"]
        res[f"dropped_{tag}"] = r["dropped"]
        res[f"rss_growth_mb_{tag}"] = r["rss_growth_mb"]
        if tag != "ref":
            res[f"slowdown_{tag}"] = ref["rate"] / r["rate"] if r["rate"] else None
            res[f"held_{tag}"] = r["idle"]
            res[f"rss_kb_each_{tag}"] = r["idle_rss_kb_each"]
            res[f"rss_kb_each_after_run_{tag}"] = r["idle_rss_kb_each_after_run"]
    return res


# -- catchup -------------------------------------------------------------------

CU_MODES = ("api", "cli")


def sc_catchup(ctx: Ctx, impl: str, d: str, deadline: float) -> dict:
    """A listener that starts 1 s into a burst with a replay of the last N events.

    Two phases, each on a fresh bus: ``api`` (MasterEvent with opts
    saltevent_replay_last/saltevent_seq, in a process started before the burst) and
    ``cli`` (``python -m saltevent listen --last N --seq --count M``, started 1 s in).
    """
    res = {}
    for mode in CU_MODES:
        sub = os.path.join(d, mode)
        os.mkdir(sub)
        first = len(ctx.procs)
        try:
            r = _catchup_phase(ctx, sub, deadline, mode)
        finally:
            procs = ctx.procs[first:]
            del ctx.procs[first:]
            reap(procs)
        for key, value in r.items():
            res[f"{key}_{mode}"] = value
    res.update(events=ctx.cfg.catchup_events, rate=ctx.cfg.catchup_rate)
    return res


def _catchup_phase(ctx: Ctx, d: str, deadline: float, mode: str) -> dict:
    cfg = ctx.cfg
    count, rate = cfg.catchup_events, cfg.catchup_rate
    start_bus(ctx, "se", d, deadline)
    cap = deadline - time.monotonic()
    lst = Proc(ctx, f"catchup-{mode}", "cu_listener",
               {"sock_dir": d, "mode": mode, "count": count, "max_time": cap})
    firer = Proc(ctx, "firer", "cu_firer",
                 {"sock_dir": d, "count": count, "rate": rate, "mark_after": cfg.catchup_after})
    _wait_all_ready([lst, firer], deadline)
    t_go = time.monotonic_ns()
    firer.send({"cmd": "go"})
    mark = firer.recv(deadline)
    fired = mark["mark"]
    # Ask for what will have been fired when the listener registers: what was fired so
    # far and catchup_margin seconds more, rounded up to the next 1,000, within the ring.
    last = min(-(-(fired + int(rate * cfg.catchup_margin)) // 1000) * 1000, cfg.catchup_ring)
    t_start = time.monotonic_ns()
    lst.send({"cmd": "start", "last": last})
    fres = firer.recv(deadline)["result"]
    lres = lst.recv(deadline)["result"]
    firer.send({"cmd": "done"})
    secs = (fres["t_end"] - fres["t_start"]) / 1e9
    return dict(lres, last=last, fired_at_start=fired, fired_past_ring=fired > cfg.catchup_ring,
                start_s=(t_start - t_go) / 1e9, fire_seconds=secs, fire_rate=count / secs,
                fire_fails=fres["fails"], fire_end_ok=fres["end_ok"],
                fire_behind_max_ms=fres["behind_max_ms"])


# -- scenario 5 --------------------------------------------------------------


def sc_stall(ctx: Ctx, impl: str, d: str, deadline: float) -> dict:
    cfg = ctx.cfg
    n = cfg.stall_events
    bus = start_bus(ctx, impl, d, deadline)
    cap = deadline - time.monotonic()
    stalled = Proc(ctx, "stalled", "listener",
                   {"impl": impl, "sock_dir": d, "expect": n, "stall": True, "first_wait": 5.0,
                    "idle": 5.0, "max_time": cap, "backlog": cfg.stall_backlog})
    normal = Proc(ctx, "normal", "listener",
                  {"impl": impl, "sock_dir": d, "expect": n, "first_wait": cap,
                   "idle": cfg.stall_cap + 10.0, "max_time": cap})   # outlasts a blocked relay
    firer = Proc(ctx, "firer", "firer",
                 {"impl": impl, "sock_dir": d, "count": n, "payload": "big", "track_calls": True})
    _wait_all_ready([stalled, normal, firer], deadline)
    if impl == "se" and cfg.settle:
        # A steady-state broker: past any start-up window (saltevent keeps a short
        # replay buffer for resuming listeners right after a broker starts).
        wait = bus.t_ready + cfg.settle - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    rss = RssSampler(bus.pid)
    rss.start()
    t_go = time.monotonic_ns()
    firer.send({"cmd": "go"})
    t_cap = time.monotonic() + cfg.stall_cap
    capped = False
    fres = firer.recv(min(t_cap, deadline), soft=True)
    if fres is None:
        capped = True
        stalled.send({"cmd": "read"})
        fres = firer.recv(deadline)
    fres = fres["result"]
    nres = normal.recv(min(deadline, time.monotonic() + 5.0), soft=True)
    if not capped:
        if nres is None:
            capped = True
        stalled.send({"cmd": "read"})
    if nres is None:
        nres = normal.recv(deadline)
    nres = nres["result"]
    sres = stalled.recv(deadline)["result"]
    firer.send({"cmd": "done"})
    mem = rss.stop()
    return {
        "events": n,
        "burst_seconds": (fres["t_end"] - fres["t_start"]) / 1e9,
        "capped": capped, "cap_seconds": cfg.stall_cap,
        "max_call_ms": fres["max_call_ms"], "fire_fails": fres["fails"],
        "normal_received": nres["n"], "normal_dropped": nres["dropped"],
        "normal_done_seconds": (nres["t_last"] - t_go) / 1e9 if nres["n"] else None,
        "stalled_received": sres["n"], "stalled_dropped": sres["dropped"],
        "stalled_total": sres["n"] + sres["dropped"], "stalled_gaps": sres["gaps"],
        "stalled_read_seconds": (sres["t_last"] - sres["t_resume"]) / 1e9 if sres["n"] else None,
        "broker_stderr_lines": bus.err_lines(),
        **mem,
    }


# -- scenario 6 --------------------------------------------------------------


def sc_joinrace(ctx: Ctx, impl: str, d: str, deadline: float) -> dict:
    start_bus(ctx, "se", d, deadline)
    a_sock, b_sock = socket.socketpair()
    try:
        A = Proc(ctx, "race-a", "race_a", {"sock_dir": d, "fd": a_sock.fileno(), "wait": 1.0},
                 pass_fds=(a_sock.fileno(),))
        B = Proc(ctx, "race-b", "race_b", {"sock_dir": d, "fd": b_sock.fileno()},
                 pass_fds=(b_sock.fileno(),))
    finally:
        a_sock.close()
        b_sock.close()
    _wait_all_ready([A, B], deadline)
    misses = []
    ctor = []
    recv = []
    rounds = ctx.cfg.race_rounds
    for i in range(rounds):
        A.send({"cmd": "round", "i": i})
        r = A.recv(deadline)
        if not r["hit"]:
            misses.append(i)
        ctor.append(r["ctor_ms"])
        recv.append(r["recv_ms"])
    return {"rounds": rounds, "misses": len(misses), "missed_rounds": misses[:20],
            "ctor_ms_median": statistics.median(ctor), "ctor_ms_max": max(ctor),
            "recv_ms_median": statistics.median(recv)}


# -- scenario 7 --------------------------------------------------------------


def _time_cmd(argv, env, deadline, cwd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=max(1.0, deadline - time.monotonic()))
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise WorkerFailed(f"{argv[-1][:60]!r} exited {r.returncode}: {r.stderr[-800:].decode(errors='replace')}")
    return dt


def sc_coldstart(ctx: Ctx, impl: str, d: str, deadline: float) -> dict:
    start_bus(ctx, "se", d, deadline)
    py = sys.executable
    env = dict(ctx.env)
    env.pop("PYTHONPATH", None)
    nopyc_env = dict(env, PYTHONDONTWRITEBYTECODE="1")
    nopyc_env.pop("PYTHONPYCACHEPREFIX")
    return _coldstart(ctx, d, py, env, nopyc_env, deadline)


def _coldstart(ctx: Ctx, d: str, py: str, env: dict, nopyc_env: dict, deadline: float) -> dict:
    cwd = ctx.se_path                                       # `import saltevent` finds that copy
    fire = ("import saltevent; e = saltevent.MasterEvent(%r, listen=False); "
            "ok = e.fire_event({'a': 1}, 'x'); e.destroy(); raise SystemExit(0 if ok else 3)" % d)
    bare = [py, "-c", "pass"]
    se = [py, "-c", fire]
    for _ in range(2):                                      # warm the page cache and .pyc
        _time_cmd(bare, env, deadline, cwd)
        _time_cmd(se, env, deadline, cwd)
    t_bare, t_se, t_nopyc = [], [], []
    for _ in range(ctx.cfg.cold_runs):                      # interleaved: same noise for both
        t_bare.append(_time_cmd(bare, env, deadline, cwd))
        t_se.append(_time_cmd(se, env, deadline, cwd))
    for _ in range(max(3, ctx.cfg.cold_runs // 4)):
        t_nopyc.append(_time_cmd(se, nopyc_env, deadline, cwd))
    r = subprocess.run([py, "-X", "importtime", "-c", "import saltevent"], cwd=cwd, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    imports = []
    for line in r.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        _, selfus, cum, name = _parse_importtime(line)
        imports.append({"module": name.strip(), "depth": (len(name) - len(name.lstrip())) // 2,
                        "self_us": selfus, "cumulative_us": cum})
    # importtime prints a module's imports (deeper) right before the module itself.
    idx = next((k for k, i in enumerate(imports) if i["module"] == "saltevent"), None)
    sub = []
    if idx is not None:
        k = idx - 1
        while k >= 0 and imports[k]["depth"] > imports[idx]["depth"]:
            sub.append(imports[k])
            k -= 1
        sub.append(imports[idx])
    se_imp = imports[idx] if idx is not None else {}
    top = sorted(sub, key=lambda i: -i["cumulative_us"])[:10]
    site = next((i for i in imports if i["module"] == "site"), {})
    med_bare, med_se = statistics.median(t_bare), statistics.median(t_se)
    return {"runs": ctx.cfg.cold_runs, "bare_ms": med_bare * 1e3, "fire_ms": med_se * 1e3,
            "ratio": med_se / med_bare, "fire_ms_min": min(t_se) * 1e3, "bare_ms_min": min(t_bare) * 1e3,
            "fire_nopyc_ms": statistics.median(t_nopyc) * 1e3,
            "import_saltevent_us": se_imp.get("cumulative_us"),
            "import_saltevent_self_us": se_imp.get("self_us"),
            "saltevent_new_modules": len(sub) - 1,
            "site_cumulative_us": site.get("cumulative_us"),
            "importtime_top": top}


def _parse_importtime(line: str):
    # "import time:       123 |        456 |   name"
    body = line.split(":", 1)[1]
    a, b, name = body.split("|", 2)
    return None, int(a), int(b), name.rstrip()


# -- running ----------------------------------------------------------------

SCENARIOS = ["throughput", "fanout", "fanin", "latency", "stall", "joinrace", "coldstart",
             "fanout64", "fanin16", "big", "idle1000", "catchup"]
SE_ONLY = {"joinrace", "coldstart", "catchup"}
# Default hard timeout of one run of a scenario, seconds: (--quick, full).
TIMEOUTS = {name: (20, 120) for name in SCENARIOS}
TIMEOUTS.update(fanout64=(45, 120), fanin16=(30, 120), big=(60, 180), idle1000=(60, 180),
                catchup=(30, 60))


def run_one(ctx: Ctx, name: str, impl: str) -> dict:
    cfg = ctx.cfg
    d = tempfile.mkdtemp(prefix="se-b")
    deadline = time.monotonic() + (cfg.timeout or TIMEOUTS[name][0 if cfg.quick else 1])
    try:
        if name == "throughput":
            return sc_flow(ctx, impl, d, deadline, firers=1, listeners=1, count=cfg.events)
        if name == "fanout":
            return sc_flow(ctx, impl, d, deadline, firers=1, listeners=8, count=cfg.events)
        if name == "fanin":
            return sc_flow(ctx, impl, d, deadline, firers=4, listeners=1, count=cfg.events)
        if name == "latency":
            return sc_flow(ctx, impl, d, deadline, firers=1, listeners=1,
                           count=int(1000 * cfg.latency_seconds), rate=1000, latency=True)
        if name == "stall":
            return sc_stall(ctx, impl, d, deadline)
        if name == "joinrace":
            return sc_joinrace(ctx, impl, d, deadline)
        if name == "coldstart":
            return sc_coldstart(ctx, impl, d, deadline)
        if name == "fanout64":
            return sc_flow(ctx, impl, d, deadline, firers=1, listeners=64, count=cfg.fanout64_events)
        if name == "fanin16":
            return sc_flow(ctx, impl, d, deadline, firers=16, listeners=1, count=cfg.fanin16_events,
                           order=True)
        if name == "big":
            return sc_big(ctx, impl, d, deadline)
        if name == "idle1000":
            return sc_idle(ctx, impl, d, deadline)
        if name == "catchup":
            return sc_catchup(ctx, impl, d, deadline)
        raise ValueError(name)
    except (ScenarioTimeout, WorkerFailed, subprocess.TimeoutExpired, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        procs, ctx.procs = ctx.procs, []
        reap(procs)
        shutil.rmtree(d, ignore_errors=True)


#: Correctness figures reported as the worst run, not the median (catchup's, per mode):
#: a loss in one run of three must show.
WORST_OF = {f"{key}_{mode}": how for mode in ("api", "cli") for key, how in (
    ("received", min), ("dups", max), ("missing", max), ("foreign", max), ("seq_breaks", max),
    ("gaps", max), ("dropped", max), ("bad_lines", max), ("stderr_lines", max),
    ("fire_fails", max), ("fired_past_ring", any), ("end_seen", all), ("fire_end_ok", all))}


def median_result(runs: list) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    out = {}
    for k, v in ok[0].items():
        vals = [r.get(k) for r in ok]
        if k in WORST_OF and all(x is not None for x in vals):
            out[k] = WORST_OF[k](vals)
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            out[k] = statistics.median(vals)
        elif all(isinstance(x, bool) for x in vals):
            out[k] = any(vals)
        else:
            out[k] = vals[len(vals) // 2]
    if len(ok) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


# -- report -----------------------------------------------------------------


IMPL_NAMES = {"saltevent": "saltevent", "other": "old", "baseline": "baseline"}   # result key -> shown


def fmt_num(v, unit=""):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    a = abs(v)
    if float(v).is_integer() and a < 1e15:
        return f"{int(v):,}" + unit
    if a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    elif a >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return s + unit


def build_rows(results: dict, cfg) -> list:
    """Rows: (scenario, metric, saltevent, baseline, ratio, better, target, met[, old, new/old])."""
    rows = []

    def get(name, impl, key):
        r = results.get(name, {}).get(impl, {}).get("median", {})
        return r.get(key), r.get("error")

    def row(name, label, key, better, target=None, unit="", cmp=None, base_key=None, note=""):
        s, se_err = get(name, "saltevent", key)
        b, b_err = get(name, "baseline", base_key or key)
        if name not in results:
            return
        ratio = None
        if better in ("higher", "lower") and isinstance(s, (int, float)) and isinstance(b, (int, float)) and s and b:
            ratio = s / b if better == "higher" else b / s
        met = None
        if target is not None and isinstance(s, (int, float)):
            met = cmp(s, target)
        rows.append({
            "scenario": name, "metric": label,
            "saltevent": "ERROR" if se_err else fmt_num(s, unit),
            "baseline": "ERROR" if b_err else ("n/a" if b is None else fmt_num(b, unit)),
            "ratio": "-" if ratio is None else f"{ratio:.2f}x",
            "better": better, "target": note or (fmt_num(target, unit) if target is not None else ""),
            "met": "" if met is None else ("yes" if met else "NO"),
            "raw": {"saltevent": s, "baseline": b, "ratio": ratio},
        })
        if cfg.compare:                 # the other copy's figure and the plain quotient new/old
            o, o_err = get(name, "other", key)
            new_old = s / o if isinstance(s, (int, float)) and isinstance(o, (int, float)) and o else None
            rows[-1].update({"old": "ERROR" if o_err else fmt_num(o, unit),
                             "new/old": "-" if new_old is None else f"{new_old:.2f}"})
            rows[-1]["raw"].update(old=o, new_old=new_old)

    ge = lambda s, t: s >= t  # noqa: E731
    le = lambda s, t: s <= t  # noqa: E731
    lt = lambda s, t: s < t  # noqa: E731
    full = not cfg.quick
    row("throughput", f"1->1 events/s ({cfg.events:,} ev)", "rate", "higher", 80000 if full else None, cmp=ge,
        note=">= 80,000" if full else "")
    row("fanout", f"1->8 deliveries/s ({cfg.events:,} ev)", "rate", "higher", 160000 if full else None, cmp=ge,
        note=">= 160,000" if full else "")
    row("fanin", f"4->1 events/s ({cfg.events:,} ev)", "rate", "higher", 85000 if full else None, cmp=ge,
        note=">= 85,000" if full else "")
    row("latency", "p50 ms @1000/s", "p50_ms", "lower", 0.18, cmp=lt, note="< 0.18")
    row("latency", "p99 ms @1000/s", "p99_ms", "lower", 0.4, cmp=lt, note="< 0.4")
    row("latency", "max ms @1000/s", "max_ms", "lower")
    n = cfg.stall_events
    row("stall", f"burst s ({n:,} x 1KB ev)", "burst_seconds", "lower", 1.0 if full else None, cmp=lt,
        note="< 1" if full else "")
    row("stall", "firer max fire call ms", "max_call_ms", "lower")
    row("stall", "normal listener got", "normal_received", "higher", n, cmp=ge, note=f"{n:,}")
    row("stall", "stalled: received", "stalled_received", "info")
    row("stall", "stalled: told dropped", "stalled_dropped", "info")
    row("stall", "stalled: received+dropped", "stalled_total", "info", n, cmp=lambda s, t: s == t,
        note=f"= {n:,}")
    row("stall", "broker RSS peak MB", "rss_peak_mb", "lower")
    row("stall", "broker RSS growth MB", "rss_growth_mb", "lower")
    row("joinrace", f"missed of {cfg.race_rounds}", "misses", "info", 0, cmp=le, note="0")
    row("joinrace", "listener ctor ms (median)", "ctor_ms_median", "info")
    row("coldstart", "fire-one-event process ms", "fire_ms", "lower")
    # cold start: the baseline is a bare interpreter
    if "coldstart" in results:
        m = results["coldstart"].get("saltevent", {}).get("median", {})
        if "error" not in m:
            rows[-1]["baseline"] = fmt_num(m.get("bare_ms"), "") + " (bare)"
            ratio = m.get("ratio")
            rows[-1]["ratio"] = f"{ratio:.2f}x" if ratio else "-"
            rows[-1]["better"] = "lower (se/bare)"
            rows[-1]["target"] = "<= 1.30x"
            rows[-1]["met"] = "yes" if ratio and ratio <= 1.3 else "NO"
            rows[-1]["raw"] = {"saltevent": m.get("fire_ms"), "baseline": m.get("bare_ms"), "ratio": ratio}
            row("coldstart", "import saltevent us (cum.)", "import_saltevent_us", "info")
    row("fanout64", f"1->64 deliveries/s ({cfg.fanout64_events:,} ev)", "rate", "higher")
    row("fanin16", f"16->1 events/s ({cfg.fanin16_events:,} ev)", "rate", "higher")
    row("fanin16", "lost events", "lost", "info", 0, cmp=le, note="0")
    row("fanin16", "order violations", "order_violations", "info", 0, cmp=le, note="0")
    for label, _ in BIG_SIZES:
        row("big", f"{_size_name(label)} MiB/s ({cfg.big_events[label]:,} ev)", f"mib_s_{label}", "higher")
    for label in BIG_LAT_SIZES:
        for pct in ("p50", "p99"):
            row("big", f"{_size_name(label)} {pct} ms @{BIG_LAT_RATE}/s", f"lat_{pct}_ms_{label}", "lower")
    idle = _idle_label(results)
    row("idle1000", f"1->1 events/s, no idle ({cfg.idle_events:,} ev)", "rate_ref", "higher")
    row("idle1000", f"(a) 1->1 events/s, {idle} idle", "rate_a", "higher")
    row("idle1000", "(a) slowdown vs no idle", "slowdown_a", "lower", unit="x")
    row("idle1000", f"(b) 1->1 events/s, {idle} idle+tags", "rate_b", "higher")
    row("idle1000", "(b) slowdown vs no idle", "slowdown_b", "lower", unit="x")
    row("idle1000", "(a) broker RSS KB per idle", "rss_kb_each_a", "lower")
    row("idle1000", "(b) broker RSS KB per idle", "rss_kb_each_b", "lower")
    cu = results.get("catchup", {}).get("saltevent", {}).get("median", {})
    cu_n = cu.get("events") or cfg.catchup_events
    cu_last = _catchup_last(results)
    eq = lambda s, t: s == t  # noqa: E731
    for mode, label in (("api", "API"), ("cli", "CLI")):
        row("catchup", f"{label}: received of {cu_n:,} (--last {cu_last})", f"received_{mode}", "info",
            cu_n, cmp=eq, note=f"= {cu_n:,}")
        row("catchup", f"{label}: duplicates", f"dups_{mode}", "info", 0, cmp=le, note="0")
        row("catchup", f"{label}: missing", f"missing_{mode}", "info", 0, cmp=le, note="0")
        row("catchup", f"{label}: seq breaks (0 = consecutive)", f"seq_breaks_{mode}", "info", 0, cmp=le,
            note="0")
        if mode == "api":
            row("catchup", "API: ms to caught up", "caught_ms_api", "lower")
        row("catchup", f"{label}: ms to live (lag < {CU_LIVE_LAG_MS:g} ms)", f"live_ms_{mode}", "lower")
        row("catchup", f"{label}: ms to end marker", f"end_ms_{mode}", "lower")
        row("catchup", f"{label}: catch-up events/s", f"{'caught' if mode == 'api' else 'live'}_rate_{mode}",
            "higher")
    base = results.get("idle1000", {}).get("baseline", {}).get("median", {})
    if base.get("b_is_a"):              # not measured: the relay has no filters
        for r in rows:
            if r["scenario"] == "idle1000" and r["metric"].startswith("(b)") and r["baseline"] != "ERROR":
                r["baseline"] += " *"
    return rows


def _catchup_last(results: dict) -> str:
    runs = results.get("catchup", {}).get("saltevent", {}).get("runs", [])
    lasts = sorted({r[f"last_{m}"] for r in runs if "error" not in r for m in CU_MODES})
    return "/".join(f"{n:,}" for n in lasts) or "N"


def _size_name(label: str) -> str:
    return label[:-1] + " KiB"


def _idle_label(results: dict) -> str:
    counts = {r["median"].get("idle") for r in results.get("idle1000", {}).values()} - {None}
    return "/".join(f"{n:,}" for n in sorted(counts)) or "1,000"


def print_table(rows: list, meta: dict, results: dict, cfg, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"saltevent bench  |  Python {meta['python']} ({meta['implementation']})  |  "
      f"{meta['cpus']} CPUs  |  {meta['date']}")
    p(f"{meta['platform']}  |  saltevent {meta['saltevent_version']}  |  "
      f"repeat={cfg.repeat} (medians){'  |  QUICK (smoke) mode' if cfg.quick else ''}")
    if meta.get("loadavg"):
        end = os.getloadavg()
        p(f"load average (1/5/15 min) at start {' '.join(f'{x:.2f}' for x in meta['loadavg'])},"
          f" at end {' '.join(f'{x:.2f}' for x in end)}  (other work on the machine adds noise)")
    p("ratio: higher-is-better metrics saltevent/baseline, lower-is-better baseline/saltevent;"
      " so > 1.00x means saltevent is better.")
    if cfg.compare:
        c = meta.get("compare", {})
        p(f"compare: new = {meta.get('saltevent_path')} ({meta['saltevent_version']},"
          f" {meta.get('saltevent_commit') or '?'})")
        p(f"         old = {c.get('path')} ({c.get('version')}, {c.get('commit') or '?'})")
        p("         run interleaved in each repetition: new, old, baseline.")
        p("new/old is the plain quotient of the two figures: > 1 is better where higher is better"
          " (rates, MiB/s), < 1 where lower is (ms, MB, slowdown).")
    p("")
    cols = ["scenario", "metric", "saltevent", "baseline", "ratio", "target", "met"]
    if cfg.compare:
        cols[3:3] = ["old", "new/old"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols}
    p("  ".join(c.ljust(widths[c]) for c in cols))
    p("  ".join("-" * widths[c] for c in cols))
    last = None
    for r in rows:
        sc = r["scenario"] if r["scenario"] != last else ""
        last = r["scenario"]
        cells = dict(r, scenario=sc)
        p("  ".join((str(cells[c]).rjust(widths[c]) if c in ("saltevent", "old", "new/old", "baseline", "ratio")
                     else str(cells[c]).ljust(widths[c])) for c in cols))
    p("")
    notes = []
    st = results.get("stall", {})
    for impl in ("saltevent", "baseline"):
        m = st.get(impl, {}).get("median", {})
        if m and "error" not in m:
            notes.append(
                f"stall/{impl}: burst {fmt_num(m['burst_seconds'])} s"
                f"{' (CAPPED: the firer stayed blocked until the stalled listener was let read after ' + fmt_num(m['cap_seconds']) + ' s)' if m.get('capped') else ''}"
                f", fire fails {m['fire_fails']}, normal listener done at {fmt_num(m['normal_done_seconds'])} s,"
                f" stalled read {fmt_num(m['stalled_received'])} + dropped {fmt_num(m['stalled_dropped'])}"
                f" in {fmt_num(m['stalled_read_seconds'])} s after resuming, RSS {fmt_num(m['rss_start_mb'])} ->"
                f" {fmt_num(m['rss_peak_mb'])} MB, broker stderr lines {m.get('broker_stderr_lines')}")
    for name in ("throughput", "fanout", "fanin", "latency", "fanout64", "fanin16"):
        for impl in ("saltevent", "other", "baseline"):
            m = results.get(name, {}).get(impl, {}).get("median", {})
            if m and "error" not in m and (m.get("received") != m.get("expected") or m.get("fire_fails")
                                           or m.get("dropped")):
                notes.append(f"{name}/{IMPL_NAMES[impl]}: received {m.get('received')} of {m.get('expected')},"
                             f" fire fails {m.get('fire_fails')}, dropped {m.get('dropped')}")
    for name, impls in results.items():
        for impl, r in impls.items():
            for e in r.get("errors", []) + ([r["median"]["error"]] if "error" in r.get("median", {}) else []):
                notes.append(f"{name}/{IMPL_NAMES[impl]} ERROR: {e.splitlines()[0] if e else e}"
                             + (f" ... {e.splitlines()[-1]}" if e and len(e.splitlines()) > 1 else ""))
    notes += new_scenario_notes(results)
    cs = results.get("coldstart", {}).get("saltevent", {}).get("median", {})
    if cs and "error" not in cs:
        notes.append(f"coldstart: median of {cs['runs']}: fire-one-event {fmt_num(cs['fire_ms'])} ms,"
                     f" bare `python -c pass` {fmt_num(cs['bare_ms'])} ms, ratio {cs['ratio']:.2f}x"
                     f" (.pyc cached; without .pyc: {fmt_num(cs['fire_nopyc_ms'])} ms);"
                     f" site.py alone {fmt_num(cs['site_cumulative_us'])} us.")
        notes.append(f"  python -X importtime -c 'import saltevent': {cs['saltevent_new_modules']} modules"
                     f" beyond site's; heaviest (cumulative us):")
        for i in cs.get("importtime_top", [])[:8]:
            notes.append(f"    {i['cumulative_us']:>8} us cum  {i['self_us']:>7} us self  "
                         f"{'  ' * i['depth']}{i['module'].strip()}")
    jr = results.get("joinrace", {}).get("saltevent", {}).get("median", {})
    if jr and "error" not in jr and jr.get("misses"):
        notes.append(f"joinrace: missed rounds (first 20 of one run): {jr['missed_rounds']}")
    if notes:
        p("notes:")
        for n in notes:
            p("  " + n)


def new_scenario_notes(results: dict) -> list:
    """Checks and side figures of fanin16, big and idle1000, one line each."""
    notes = []
    for impl in ("saltevent", "other", "baseline"):
        name = IMPL_NAMES[impl]
        m = results.get("fanin16", {}).get(impl, {}).get("median", {})
        if m and "error" not in m and (m.get("lost") or m.get("order_violations") or m.get("firers_short")):
            notes.append(f"fanin16/{name}: lost {m['lost']}, order violations {m['order_violations']},"
                         f" firers short of their events {m['firers_short']}")
        m = results.get("big", {}).get(impl, {}).get("median", {})
        if m and "error" not in m:
            parts = []
            for label, _ in BIG_SIZES:
                parts.append(f"{_size_name(label)}: {m[f'payload_bytes_{label}']:,} B x"
                             f" {m[f'received_{label}']:,}/{m[f'expected_{label}']:,} received"
                             + (f", dropped {m[f'dropped_{label}']}" if m[f"dropped_{label}"] else "")
                             + (f", fire fails {m[f'fire_fails_{label}']}" if m[f"fire_fails_{label}"] else "")
                             + (f", record counts seen {m[f'record_lens_{label}']} (trimmed?)"
                                if len(m[f"record_lens_{label}"]) != 1 else ""))
            lat = ", ".join(f"{_size_name(label)} {m[f'lat_received_{label}']}/{m[f'lat_expected_{label}']}"
                            f" (p50/p99 of {m[f'lat_n_{label}']}, max {fmt_num(m[f'lat_max_ms_{label}'])} ms)"
                            for label in BIG_LAT_SIZES)
            notes.append(f"big/{name}: {'; '.join(parts)}; latency runs received {lat}")
        runs = results.get("catchup", {}).get(impl, {}).get("runs", [])
        for k, r in enumerate(runs):
            if "error" in r:
                continue
            parts = []
            for mode in CU_MODES:
                g = lambda key: r.get(f"{key}_{mode}")  # noqa: E731
                parts.append(
                    f"{mode} --last {g('last'):,} at {fmt_num(g('start_s'))} s ({g('fired_at_start'):,} fired"
                    f"{', MORE THAN THE RING' if g('fired_past_ring') else ''}):"
                    f" {g('received'):,} received, bus seq {g('first_seq')}..{g('last_seq')},"
                    f" first event at {fmt_num(g('first_ms'))} ms"
                    + (f", had the {g('n_caught'):,} fired before its constructor returned"
                       f" ({fmt_num(g('ctor_ms'))} ms) by {fmt_num(g('caught_ms'))} ms"
                       f" (the last {fmt_num(g('lag_caught_ms'))} ms after its fire)"
                       if g("caught_ms") is not None else "")
                    + f", live after {g('n_live') or 0:,} events at {fmt_num(g('live_ms'))} ms,"
                      f" end marker at {fmt_num(g('end_ms'))} ms ({fmt_num(g('end_lag_ms'))} ms after its fire)"
                    + (", END MARKER NOT SEEN" if not g("end_seen") else "")
                    + (f", gaps {g('gaps')}, dropped {g('dropped')}, missed {g('missed')}"
                       if g("gaps") or g("dropped") or g("missed") else "")
                    + (f", stderr: {g('stderr_head')!r}" if g("stderr_lines") else "")
                    + ((", the CLI did not exit by itself (killed)" if g("rc") is None else f", rc {g('rc')}")
                       if mode == "cli" and g("rc") != 0 else "")
                    + f"; firer {fmt_num(g('fire_rate'))}/s (at most {fmt_num(g('fire_behind_max_ms'))} ms"
                      f" behind), fails {g('fire_fails')}")
            notes.append(f"catchup/{name} run {k + 1}: " + "; ".join(parts))
        m = results.get("idle1000", {}).get(impl, {}).get("median", {})
        if m and "error" not in m:
            short = [t for t in ("ref", "a", "b") if m[f"received_{t}"] != m[f"expected_{t}"] or m[f"dropped_{t}"]]
            notes.append(
                f"idle1000/{name}: {m['idle']:,} idle listeners in {m.get('idle_procs', '?')} processes"
                + (f" (SCALED DOWN from 1,000: hard RLIMIT_NOFILE {m['nofile_hard']})" if m["scaled_down"] else "")
                + f"; broker RSS KB per idle after the 1->1 run (queued events included):"
                  f" (a) {fmt_num(m['rss_kb_each_after_run_a'])}, (b) {fmt_num(m['rss_kb_each_after_run_b'])}"
                + f"; broker RSS growth during the run MB: no idle {fmt_num(m['rss_growth_mb_ref'])},"
                  f" (a) {fmt_num(m['rss_growth_mb_a'])}, (b) {fmt_num(m['rss_growth_mb_b'])}"
                + (f"; the 1->1 listener MISSED events in {short}" if short else "")
                + ("; * (b) = (a): the relay has no filters, so (b) is not run" if m.get("b_is_a") else ""))
    return notes


GROWTH = (
    ("deliveries/s by number of listeners (1 firer; throughput, fanout, fanout64)",
     (("1", "throughput", "rate"), ("8", "fanout", "rate"), ("64", "fanout64", "rate"))),
    ("MiB/s by event size (1 firer -> 1 listener; big)",
     tuple((_size_name(label), "big", f"mib_s_{label}") for label, _ in BIG_SIZES)),
)


def growth(results: dict) -> list:
    """The chart's data: [(title, [(point, {series: value})])], series in table order."""
    charts = []
    for title, points in GROWTH:
        rows = []
        for point, name, key in points:
            vals = {}
            for impl in ("saltevent", "other", "baseline"):
                v = results.get(name, {}).get(impl, {}).get("median", {}).get(key)
                if isinstance(v, (int, float)):
                    vals[impl] = v
            rows.append((point, vals))
        if any(vals for _, vals in rows):
            charts.append((title, rows))
    return charts


def print_chart(results: dict, out=sys.stdout, bar_width: int = 38) -> None:
    """Bars to scale within each chart; xN is the figure over the same series' first point."""
    for title, rows in growth(results):
        top = max(v for _, vals in rows for v in vals.values()) or 1
        first: dict = {}
        print(f"\n{title}", file=out)
        for point, vals in rows:
            label = point
            for impl in ("saltevent", "other", "baseline"):
                if impl not in vals:
                    continue
                v = vals[impl]
                grow = f"x{v / first[impl]:.2f}" if first.get(impl) else ""
                first.setdefault(impl, v)
                bar = "#" * max(1, round(v / top * bar_width))
                line = f"  {label:>7}  {IMPL_NAMES[impl]:<9} |{bar:<{bar_width}}| {fmt_num(v):>9} {grow:>6}"
                print(line.rstrip(), file=out)
                label = ""
            if not vals:
                print(f"  {point:>7}  (not run)", file=out)


def _git_commit(path: str):
    """The last commit that changed *path*/saltevent.py, "+ changes" if it has uncommitted ones."""
    try:
        git = ["git", "-C", path]
        r = subprocess.run(git + ["log", "-1", "--format=%h %s", "--", "saltevent.py"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "saltevent.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip()[:60] + (" + changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _file_version(path: str):
    """``__version__`` of a saltevent.py read as text (two copies cannot both be imported)."""
    import re
    try:
        with open(path, encoding="utf-8") as f:
            m = re.search(r"""^__version__ = ["']([^"']+)["']""", f.read(), re.M)
        return m.group(1) if m else "?"
    except OSError as exc:
        return f"unreadable: {exc}"


def collect_meta(cfg=None) -> dict:
    try:
        sys.path.insert(0, ROOT)
        import saltevent
        version = getattr(saltevent, "__version__", "?")
        path = saltevent.__file__
    except Exception as exc:  # pragma: no cover
        version, path = f"import failed: {exc}", None
    finally:
        if sys.path and sys.path[0] == ROOT:
            sys.path.pop(0)
    meta = {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable, "cpus": os.cpu_count(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "saltevent_version": version, "saltevent_path": path,
            "saltevent_commit": _git_commit(ROOT),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if cfg is not None and cfg.compare:
        other = os.path.join(cfg.compare, "saltevent.py")
        meta["compare"] = {"path": other, "version": _file_version(other), "commit": _git_commit(cfg.compare)}
    return meta


def print_profiles(ctx: Ctx, out) -> None:
    import io
    import pstats
    for name, path in ctx.prof_files:
        if not os.path.exists(path):
            continue
        buf = io.StringIO()
        st = pstats.Stats(path, stream=buf)
        st.sort_stats("tottime").print_stats(18)
        print(f"\n===== profile: {name} ({path}) =====", file=out)
        text = buf.getvalue()
        print(text[text.find("   ncalls"):] if "   ncalls" in text else text, file=out)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--quick", action="store_true", help="short smoke version (< ~30 s)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions, median reported (default 3; quick 1)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--impl", default="both", choices=["both", "saltevent", "baseline"])
    ap.add_argument("--compare", metavar="PATH", default=None,
                    help="also run every saltevent scenario on PATH/saltevent.py (another checkout),"
                         " interleaved with this one's; the table gets its figure and new/old")
    ap.add_argument("--timeout", type=float, default=None,
                    help="hard timeout of one run of one scenario, s (default: 120-180; quick 20-60)")
    ap.add_argument("--profile", default="",
                    help="cProfile saltevent workers of these roles: firer,listener,stalled,broker")
    ap.add_argument("--profile-dir", default=None, help="where .prof files go (default: a temp dir)")
    ap.add_argument("--worker", nargs=2, metavar=("ROLE", "ARGS"), help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    q = cfg.quick
    cfg.repeat = cfg.repeat or (1 if q else 3)
    cfg.events = 5000 if q else 20000
    cfg.latency_seconds = 1.0 if q else 3.0
    cfg.stall_events = 10000 if q else 50000
    cfg.stall_backlog = (2 << 20) if q else None     # quick: a small backlog so drops show
    cfg.stall_cap = 5.0 if q else 10.0
    cfg.settle = 0.0 if q else 3.5
    cfg.race_rounds = 50 if q else 200
    cfg.cold_runs = 5 if q else 20
    cfg.fanout64_events = 1000 if q else 5000
    cfg.fanin16_events = 8000 if q else 32000         # 500 or 2,000 per firer
    cfg.big_events = {"1k": 3000, "64k": 200, "900k": 20} if q else {"1k": 20000, "64k": 1500, "900k": 120}
    cfg.big_lat_events = 20 if q else 100            # per size, at BIG_LAT_RATE/s
    cfg.big_lat_warmup = 2 if q else 5
    cfg.idle_listeners = 1000
    cfg.idle_procs = 10
    cfg.idle_events = 10000 if q else 50000
    cfg.catchup_rate = 6000                          # events/s: 1.5 s of them fit the ring
    cfg.catchup_events = 9000 if q else 12000        # a burst of 1.5 s or 2 s
    cfg.catchup_after = 1.0                          # s into the burst the listener starts
    cfg.catchup_margin = 0.5                         # s of events N adds for the listener's start
    cfg.catchup_ring = 10000                         # saltevent's default ring (DEFAULT_RING_EVENTS)
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    cfg = parse_args(argv)
    if cfg.profile and not cfg.profile_dir:
        cfg.profile_dir = tempfile.mkdtemp(prefix="se-bprof")
    unknown = set(filter(None, cfg.only.split(","))) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    names = [s for s in SCENARIOS if not cfg.only or s in cfg.only.split(",")]
    if cfg.compare:
        cfg.compare = os.path.abspath(cfg.compare)
        if not os.path.isfile(os.path.join(cfg.compare, "saltevent.py")):
            print(f"--compare: no saltevent.py in {cfg.compare}", file=sys.stderr)
            return 2
    # (result key, worker impl, directory whose saltevent.py the workers import)
    variants = []
    if cfg.impl in ("both", "saltevent"):
        variants.append(("saltevent", "se", ROOT))
        if cfg.compare:
            variants.append(("other", "se", cfg.compare))
    if cfg.impl in ("both", "baseline"):
        variants.append(("baseline", "base", ROOT))
    meta = collect_meta(cfg)
    ctx = Ctx(cfg)
    results: dict = {}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if started with SIGINT ignored
    t0 = time.monotonic()
    interrupted = False
    try:
        for name in names:
            runs = {key: [] for key, _, _ in variants}
            for rep in range(cfg.repeat):
                for key, impl, se_path in variants:      # interleaved: new, old, baseline, new, ...
                    if impl == "base" and name in SE_ONLY:
                        continue
                    ctx.se_path = se_path
                    t = time.monotonic()
                    r = run_one(ctx, name, impl)
                    runs[key].append(r)
                    results[name] = {k: {"runs": v, "median": median_result(v)}
                                     for k, v in runs.items() if v}
                    log(f"[{time.monotonic() - t0:6.1f}s] {name:<10} {'old' if key == 'other' else key:<9}"
                        f" rep {rep + 1}/{cfg.repeat}"
                        f" ({time.monotonic() - t:.1f}s){'  ERROR: ' + r['error'].splitlines()[0] if 'error' in r else ''}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process started")
    finally:
        ctx.kill_all()
        shutil.rmtree(ctx.pyc_dir, ignore_errors=True)
    rows = build_rows(results, cfg)
    if cfg.json:
        if hasattr(os, "getloadavg"):
            meta["loadavg_end"] = os.getloadavg()
        doc = {"meta": meta, "config": {k: v for k, v in vars(cfg).items() if k != "worker"},
               "elapsed_seconds": time.monotonic() - t0, "interrupted": interrupted,
               "table": [{k: v for k, v in r.items()} for r in rows],
               "growth": {title: {point: vals for point, vals in rows_}
                          for title, rows_ in growth(results)},
               "results": results}
        json.dump(doc, sys.stdout, indent=1, default=str)
        print()
    else:
        print_table(rows, meta, results, cfg)
        print_chart(results)
        print(f"\nelapsed {time.monotonic() - t0:.1f} s")
    if ctx.prof_files:
        print_profiles(ctx, sys.stderr if cfg.json else sys.stdout)
    errors = any("error" in r for impls in results.values() for v in impls.values() for r in v["runs"])
    if errors:
        log(f"worker stderr logs kept in {ctx.log_dir}")
    else:
        shutil.rmtree(ctx.log_dir, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
