#!/usr/bin/env python3
"""What a busy broker host does to the bus: the host process holds the GIL in C (issue 8).

Run from the repository root::

    python bench/busyhost.py            # the three setups, a table and a conclusion (~15 s)
    python bench/busyhost.py --json     # the same figures for machines
    python bench/busyhost.py --hog 4 --only thread   # long enough for fires to time out

A process H opens the bus first, then, at a set time, runs ``sum(range(n))`` with n
calibrated to ``--hog`` seconds (2 by default): one C call that never releases the
GIL, so no other thread of H runs meanwhile.  Three setups, each on a fresh
sock_dir, in the same run:

(a) ``thread``   the default: H's ``connect_pull()`` elects H, and the broker runs on a
    thread of H, the busy process;
(b) ``process``  H opens the bus with opts ``{"saltevent_broker": "process",
    "saltevent_idle_exit": 1.0}``: saltevent starts a broker process of its own;
(c) ``bus``      a standalone ``python -m saltevent bus`` process runs before H starts;
    H is only a client.

Where the broker runs is checked, not assumed: ``python -m saltevent stats --json``
gives its pid, which must be H's in (a), neither H's nor ours in (b), the ``bus``
process's in (c).  In each setup a listener process L and a firer process F (both
elsewhere, not H) exchange events paced at ``--rate``/s (200) from 0.8 s before
the hog to 0.8 s after its real end, ``fire_event`` with its default timeout of
1000 ms; 0.3 s into the hog a thread of F creates a fresh firer object (a
``MasterEvent(listen=False)``, which must connect and be greeted by the broker)
and fires one event with the default timeout.  Then F fires an end marker (timeout
10 s) and L reads until it arrives.  Times are ``time.monotonic_ns()``, one clock
for every process.  Reported per setup:

- the hog's real length (H measures it; calibration is approximate on a busy box);
- the longest stall L saw: the largest gap between two consecutive arrivals whose
  interval overlaps the hog (events are 5 ms apart at 200/s); the JSON also says
  where it began (from the hog's start), the largest gap between F's own fire calls
  over it (as large as the stall: F paused, not the bus) and F's largest delay
  behind its schedule;
- fire->receive latency p50/p99/max of the events fired during the hog;
- F's paced fires that returned False (during the hog / in all) and its slowest call;
- the fresh firer: True/False and how long its construction plus fire took;
- whether every event F's fire_event returned True for arrived at L, exactly once.

Every process (workers, the ``bus`` process, and in (b) the broker process saltevent
spawns, whose pid H reads from saltevent's registry and ``stats`` confirms) is
stopped in a ``finally``: clients first (stdin closed, SIGKILL to its session after
a grace), the ``bus`` process by SIGTERM (it hands off), the spawned broker given 3 s
to exit by itself (its idle exit, reported) before a SIGKILL.  Every wait has a
deadline (``--timeout`` per setup, 20 s).  Stdlib only; nothing asserts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THIS = os.path.abspath(__file__)

TAG_EV = "busy/ev"
TAG_END = "busy/end"
FRESH_N = 1_000_000              # the fresh firer's event numbers start here
SETUPS = (("thread", "(a) broker on a thread of the busy process (default)"),
          ("process", "(b) opts saltevent_broker='process' in the busy process"),
          ("bus", "(c) standalone `python -m saltevent bus`"))
LEAD = 0.8                       # s of paced events before the hog and after its planned end
FRESH_AFTER = 0.3                # s into the hog the fresh firer is created
SPAWNED_IDLE_EXIT = 1.0          # (b): the spawned broker's saltevent_idle_exit, s


# ============================================================================
# Workers: ``busyhost.py --worker ROLE ARGS``, JSON lines over stdin/stdout
# ============================================================================

def _out(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _in():
    line = sys.stdin.readline()
    return json.loads(line) if line else None


def _sleep_until(t_ns: int) -> None:
    while True:
        left = t_ns - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9, 0.5))


def _calibrate(seconds: float) -> tuple:
    """Return (n, ns per item) so that ``sum(range(n))`` takes about *seconds*.

    Wall-clock time, as the GIL is held: a rough estimate on 2**20 items, then the
    median of five runs of about 60 ms, so that the CPU share the hog will get on a
    shared machine is in the figure.  Approximate all the same: the real length is
    measured and reported, and the firer fires until 0.8 s after it.
    """
    def per_item(k: int) -> float:
        t0 = time.perf_counter_ns()
        sum(range(k))
        return (time.perf_counter_ns() - t0) / k
    k = int(0.06e9 / per_item(1 << 20))
    per = statistics.median(per_item(k) for _ in range(5))
    return int(seconds * 1e9 / per), per


def w_host(a: dict) -> None:
    """H: open the bus (electing or spawning its broker, or as a client), then hog."""
    import saltevent
    opts = None
    if a["setup"] == "process":
        opts = {"saltevent_broker": "process", "saltevent_idle_exit": SPAWNED_IDLE_EXIT}
    t0 = time.monotonic_ns()
    ev = saltevent.MasterEvent(a["sock_dir"], listen=False, opts=opts)
    if not ev.connect_pull(timeout=10):
        raise RuntimeError("the host could not connect to the bus")
    connect_ms = (time.monotonic_ns() - t0) / 1e6
    n, per = _calibrate(a["hog"])
    # (b): the broker process saltevent started here, so that the parent can reap it
    # whatever happens (saltevent's private registry: a bench may look).
    spawned = [p.pid for p in getattr(saltevent, "_spawned", {}).values()]
    _out({"ready": True, "pid": os.getpid(), "n": n, "ns_per_item": per, "spawned": spawned,
          "connect_ms": connect_ms})
    cmd = _in()
    if cmd is None:
        return
    _sleep_until(cmd["t_hog"])
    t1 = time.monotonic_ns()
    sum(range(n))                    # holds the GIL throughout: no thread of H runs
    t2 = time.monotonic_ns()
    _out({"result": {"hog_start": t1, "hog_end": t2}})
    _in()                            # until the parent closes stdin
    ev.destroy()


def w_listener(a: dict) -> None:
    """L: read events until the end marker (or max_time); report (n, fired, received)."""
    import saltevent
    ev = saltevent.MasterEvent(a["sock_dir"], listen=True)
    _out({"ready": True, "pid": os.getpid()})
    stop_at = time.monotonic() + a["max_time"]
    mono = time.monotonic_ns
    arrivals = []
    end = False
    while True:
        remaining = stop_at - time.monotonic()
        if remaining <= 0:
            break
        got = ev.get_event(wait=min(remaining, 0.5), full=True)
        if got is None:
            continue
        now = mono()
        if got["tag"] == TAG_END:
            end = True
            break
        if got["tag"] == TAG_EV:
            arrivals.append((got["data"]["n"], got["data"]["t"], now))
    _out({"result": {"arrivals": arrivals, "end_seen": end, "dropped": ev.dropped,
                     "gaps": ev.gaps}})
    ev.destroy()


def w_firer(a: dict) -> None:
    """F: paced fires with the default timeout, and fresh firer objects at set times.

    It fires from ``t0`` until ``{"cmd": "stop_at", "t": ns}`` says (the hog's real end
    + LEAD), or ``hard_stop`` at the latest; a thread reads those commands.
    """
    import saltevent
    ev = saltevent.MasterEvent(a["sock_dir"], listen=False)
    if not ev.connect_pull(timeout=10):
        raise RuntimeError("the firer could not connect to the bus")
    _out({"ready": True, "pid": os.getpid()})
    go = _in()
    if go is None:
        return
    mono = time.monotonic_ns
    fresh = []

    def fire_fresh(k: int, at: int) -> None:
        _sleep_until(at)
        t0 = mono()
        try:
            fe = saltevent.MasterEvent(a["sock_dir"], listen=False)
            t1 = mono()
            try:
                ok = fe.fire_event({"n": FRESH_N + k, "t": t1}, TAG_EV)  # default timeout, 1000 ms
                t2 = mono()
            finally:
                fe.destroy()
        except Exception as exc:                  # reported, not raised: the thread would vanish
            fresh.append({"k": k, "at": t0, "ok": False, "error": repr(exc),
                          "total_ms": (mono() - t0) / 1e6})
            return
        fresh.append({"k": k, "at": t0, "ok": ok, "ctor_ms": (t1 - t0) / 1e6,
                      "fire_ms": (t2 - t1) / 1e6, "total_ms": (t2 - t0) / 1e6})

    threads = [threading.Thread(target=fire_fresh, args=(k, at), daemon=True)
               for k, at in enumerate(go["fresh_at"])]
    for t in threads:
        t.start()
    stop_at = [go["hard_stop"]]
    done = threading.Event()

    def commands() -> None:
        while True:
            cmd = _in()
            if cmd is None or cmd.get("cmd") == "done":
                break
            if cmd.get("cmd") == "stop_at":
                stop_at[0] = min(stop_at[0], cmd["t"])
        done.set()
    threading.Thread(target=commands, daemon=True).start()
    t0 = go["t0"]
    interval = 1e9 / go["rate"]
    fires = []                       # (n, fire time, call ns, ok, ns late)
    for i in range(1 << 30):
        due = t0 + int(i * interval)
        if due >= stop_at[0]:
            break
        _sleep_until(due)
        t = mono()
        ok = ev.fire_event({"n": i, "t": t}, TAG_EV)                   # default timeout, 1000 ms
        fires.append((i, t, mono() - t, ok, t - due))
    for t in threads:
        t.join(10)
    end_ok = ev.fire_event({"count": len(fires)}, TAG_END, timeout=10000)
    _out({"result": {"fires": fires, "fresh": fresh, "end_ok": end_ok,
                     "fresh_unfinished": sum(t.is_alive() for t in threads)}})
    done.wait(10)
    ev.destroy()


WORKERS = {"host": w_host, "listener": w_listener, "firer": w_firer}


def worker_main(role: str, args_json: str) -> int:
    sys.path.insert(0, ROOT)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        WORKERS[role](json.loads(args_json))
    except BaseException:
        try:
            _out({"error": traceback.format_exc()})
        except Exception:
            pass
        return 1
    return 0


# ============================================================================
# Parent
# ============================================================================

class Failed(Exception):
    pass


class Worker:
    """One worker process in a session of its own, spoken to in JSON lines."""

    def __init__(self, name: str, role: str, args: dict, log_dir: str, procs: list):
        self.name = name
        self.err_path = os.path.join(log_dir, f"{name}.err")
        with open(self.err_path, "wb") as err:
            self.p = subprocess.Popen([sys.executable, THIS, "--worker", role, json.dumps(args)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                      cwd=ROOT, start_new_session=True)
        procs.append(self)
        self.fd = self.p.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""

    def send(self, obj: dict) -> None:
        try:
            self.p.stdin.write((json.dumps(obj) + "\n").encode())
            self.p.stdin.flush()
        except OSError:
            pass

    def recv(self, deadline: float) -> dict:
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed(f"{self.name}: no answer in time")
            if not select.select([self.fd], [], [], remaining)[0]:
                continue
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                with open(self.err_path, "rb") as f:
                    tail = f.read()[-800:].decode(errors="replace")
                raise Failed(f"{self.name} exited: {tail}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise Failed(f"{self.name} failed:\n{msg['error']}")
        return msg

    def stop(self, grace: float) -> None:
        """Close stdin (workers then leave), wait up to *grace*, then SIGKILL its group."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)    # its own session: only its group
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.p.stdout.close()


def _alive(pid: int) -> bool:
    """True while *pid* runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def broker_pid(sock_dir: str, deadline: float) -> int:
    """The broker's pid, from ``python -m saltevent stats --json``."""
    r = subprocess.run([sys.executable, "-m", "saltevent", "stats", "--sock-dir", sock_dir, "--json"],
                       cwd=ROOT, capture_output=True, text=True,
                       timeout=max(1.0, min(15.0, deadline - time.monotonic())))
    if r.returncode != 0:
        raise Failed(f"saltevent stats failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)["pid"]


def _pct(vals: list, p: float):
    if not vals:
        return None
    k = min(len(vals) - 1, max(0, int(round(p / 100.0 * len(vals) + 0.5)) - 1))
    return vals[k]


def run_setup(setup: str, cfg, log_dir: str) -> dict:
    """One setup on a fresh sock_dir; every process it starts is stopped before it returns."""
    deadline = time.monotonic() + cfg.timeout
    d = tempfile.mkdtemp(prefix="seb-")
    procs: list = []
    bus = None
    spawned = None                   # (b): the broker process saltevent started, by pid
    res = {"setup": setup}
    try:
        if setup == "bus":
            with open(os.path.join(log_dir, f"{setup}-bus.err"), "wb") as err:
                bus = subprocess.Popen([sys.executable, "-m", "saltevent", "bus", "--sock-dir", d],
                                       cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=err, start_new_session=True)
            sock = os.path.join(d, "saltevent-master.sock")
            while not os.path.exists(sock):
                if bus.poll() is not None or time.monotonic() > deadline:
                    raise Failed(f"`saltevent bus` did not start (rc {bus.poll()})")
                time.sleep(0.01)
        host = Worker(f"{setup}-host", "host", {"sock_dir": d, "setup": setup, "hog": cfg.hog},
                      log_dir, procs)
        hmsg = host.recv(deadline)
        if hmsg.get("spawned"):
            spawned = hmsg["spawned"][0]
        pid = broker_pid(d, deadline)
        where = {host.p.pid: "the busy process", os.getpid(): "this process"}
        if bus is not None:
            where[bus.pid] = "the `saltevent bus` process"
        if spawned is not None:
            where.setdefault(spawned, "a process saltevent spawned")
        expected = {"thread": host.p.pid, "process": spawned, "bus": bus.pid if bus else None}[setup]
        if pid != expected:
            raise Failed(f"the broker runs in {where.get(pid, f'pid {pid}')}, not where {setup} puts it")
        lst = Worker(f"{setup}-listener", "listener", {"sock_dir": d, "max_time": cfg.timeout}, log_dir, procs)
        firer = Worker(f"{setup}-firer", "firer", {"sock_dir": d}, log_dir, procs)
        lst.recv(deadline)
        firer.recv(deadline)
        t0 = time.monotonic_ns() + 200_000_000           # 0.2 s for the go to reach everyone
        t_hog = t0 + int(LEAD * 1e9)
        # The firer fires until LEAD after the hog's real end, at most until the deadline.
        hard_stop = t0 + int((deadline - time.monotonic() - 3.0) * 1e9)
        firer.send({"cmd": "go", "t0": t0, "rate": cfg.rate, "hard_stop": hard_stop,
                    "fresh_at": [t_hog + int(FRESH_AFTER * 1e9)]})
        host.send({"cmd": "hog", "t_hog": t_hog})
        hres = host.recv(deadline)["result"]
        firer.send({"cmd": "stop_at", "t": hres["hog_end"] + int(LEAD * 1e9)})
        fres = firer.recv(deadline)["result"]
        lres = lst.recv(deadline)["result"]
        firer.send({"cmd": "done"})
        res.update(analyse(hres, fres, lres))
        res.update(broker_in=where[pid], broker_pid=pid, host_pid=host.p.pid,
                   host_connect_ms=hmsg["connect_ms"], ns_per_item=hmsg["ns_per_item"],
                   hog_planned_s=cfg.hog, rate=cfg.rate)
    except (Failed, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        res = {"setup": setup, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        for w in reversed(procs):                    # clients first, the host last
            w.stop(1.0 if w.name.endswith("host") else 0.5)
        if bus is not None:
            if bus.poll() is None:
                bus.send_signal(signal.SIGTERM)      # it hands off and stops
                try:
                    bus.wait(2)
                except subprocess.TimeoutExpired:
                    bus.kill()
            bus.wait(5)
        if spawned is not None:
            # It stops by itself SPAWNED_IDLE_EXIT s after its last client; not our child,
            # so poll /proc, and SIGKILL it (checking it is that broker) if it lingers.
            t_left = time.monotonic()
            t_end = t_left + SPAWNED_IDLE_EXIT + 2.0
            while _alive(spawned) and time.monotonic() < t_end:
                time.sleep(0.05)
            res["spawned_exit"] = f"by itself in {time.monotonic() - t_left:.1f} s"
            if _alive(spawned):
                cmd = _cmdline(spawned)
                if d in cmd and " bus " in cmd:        # still that broker, not a reused pid
                    os.kill(spawned, signal.SIGKILL)
                    res["spawned_exit"] = "killed: still running 3 s after its clients left"
        shutil.rmtree(d, ignore_errors=True)
    return res


def analyse(h: dict, f: dict, lres: dict) -> dict:
    hs, he = h["hog_start"], h["hog_end"]
    arrivals = sorted(lres["arrivals"], key=lambda a: a[2])
    times = [a[2] for a in arrivals]
    # Longest stall: consecutive arrivals whose interval overlaps the hog.
    stall, stall_from = 0, hs
    for a, b in zip(times, times[1:]):
        if b > hs and a < he and b - a > stall:
            stall, stall_from = b - a, a
    if not times:
        stall = he - hs
    elif times[-1] < he and he - max(times[-1], hs) > stall:   # nothing arrived after the hog began
        stall, stall_from = he - max(times[-1], hs), max(times[-1], hs)
    # Was the firer itself late then?  The largest gap between its own fire calls over
    # the stall's interval (close to the stall: the firer, not the bus, paused).
    fire_ts = [x[1] for x in f["fires"]]
    fire_gap = max((b - a for a, b in zip(fire_ts, fire_ts[1:]) if b > stall_from and a < stall_from + stall),
                   default=0)
    lat_hog = sorted(r - t for n, t, r in arrivals if n < FRESH_N and hs <= t <= he)
    lat_all = sorted(r - t for n, t, r in arrivals if n < FRESH_N)
    fires = f["fires"]
    hog_fires = [x for x in fires if hs <= x[1] <= he]
    got = {}
    for n, _, _ in arrivals:
        got[n] = got.get(n, 0) + 1
    sent_ok = [x[0] for x in fires if x[3]]
    missing = [n for n in sent_ok if n not in got]
    false_arrived = [x[0] for x in fires if not x[3] and x[0] in got]
    fresh = f["fresh"]
    for fr in fresh:
        fr["arrived"] = (FRESH_N + fr["k"]) in got
    ms = lambda v: v / 1e6 if v is not None else None  # noqa: E731
    return {
        "hog_s": (he - hs) / 1e9,
        "stall_ms": stall / 1e6, "stall_from_ms": (stall_from - hs) / 1e6,
        "firer_gap_in_stall_ms": fire_gap / 1e6,
        "firer_late_max_ms": max((x[4] for x in f["fires"]), default=0) / 1e6,
        "lat_hog_n": len(lat_hog), "lat_hog_p50_ms": ms(_pct(lat_hog, 50)),
        "lat_hog_p99_ms": ms(_pct(lat_hog, 99)), "lat_hog_max_ms": ms(lat_hog[-1] if lat_hog else None),
        "lat_all_p50_ms": ms(_pct(lat_all, 50)),
        "fired": len(fires), "fired_in_hog": len(hog_fires),
        "false_in_hog": sum(1 for x in hog_fires if not x[3]), "false_all": sum(1 for x in fires if not x[3]),
        "max_call_ms": max((x[2] for x in fires), default=0) / 1e6,
        "fresh": fresh, "fresh_ok": bool(fresh) and all(fr["ok"] for fr in fresh),
        "fresh_unfinished": f["fresh_unfinished"],
        "received": sum(1 for n in got if n < FRESH_N), "duplicates": sum(c - 1 for c in got.values()),
        "missing": len(missing), "missing_first": missing[:10], "false_but_arrived": len(false_arrived),
        "all_arrived": not missing and lres["end_seen"] and not any(c > 1 for c in got.values()),
        "end_seen": lres["end_seen"], "end_fired": f["end_ok"],
        "dropped": lres["dropped"], "gaps": lres["gaps"],
    }


# -- report -----------------------------------------------------------------

def fmt(v, nd=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def table(results: list) -> list:
    cols = ["setup", "broker in", "hog s", "longest stall ms", "p50 ms", "p99 ms",
            "slowest fire ms", "fires False (hog/all)", "fresh firer", "all arrived"]
    rows = []
    for r in results:
        name = "(" + "abc"[[s for s, _ in SETUPS].index(r["setup"])] + ") " + r["setup"]
        if "error" in r:
            rows.append([name, "ERROR: " + r["error"].splitlines()[0][:90]] + [""] * (len(cols) - 2))
            continue
        fr = r["fresh"][0] if r["fresh"] else None
        fresh = "-" if fr is None else f"{'True' if fr['ok'] else 'False'} in {fmt(fr['total_ms'], 0)} ms"
        rows.append([name, r["broker_in"], fmt(r["hog_s"], 2), fmt(r["stall_ms"]),
                     fmt(r["lat_hog_p50_ms"], 2), fmt(r["lat_hog_p99_ms"], 2), fmt(r["max_call_ms"]),
                     f"{r['false_in_hog']}/{r['false_all']} of {r['fired_in_hog']}/{r['fired']}", fresh,
                     "yes" if r["all_arrived"] else f"NO ({r['missing']} missing)"])
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  ".join((v.rjust(w) if 2 <= i <= 6 else v.ljust(w))
                               for i, (v, w) in enumerate(zip(row, widths))).rstrip())
    return lines


def conclusion(results: list) -> str:
    """One paragraph from the figures: what the thread broker did, what the others did."""
    by = {r["setup"]: r for r in results if "error" not in r}
    a, b, c = by.get("thread"), by.get("process"), by.get("bus")
    if not (a and b and c):
        return "Not every setup ran (see the errors above, or --only): no conclusion."

    def fresh(r):
        fr = r["fresh"][0] if r["fresh"] else None
        return "-" if fr is None else f"{fr['ok']} after {fr['total_ms']:,.0f} ms"
    text = (f"While the busy process held the GIL for {a['hog_s']:.1f} s, the broker on its thread relayed"
            f" nothing: the listener's longest stall was {a['stall_ms']:,.0f} ms, and events fired"
            f" meanwhile arrived {a['lat_hog_p50_ms']:,.0f} ms late (p50), "
            + ("all of them in the end. " if a["all_arrived"] else "NOT all of them. "))
    if a["false_all"]:
        text += (f"{a['false_all']} paced fires returned False: once the kernel's socket buffer was full,"
                 f" each call waited its whole 1000 ms timeout (slowest {a['max_call_ms']:,.0f} ms). ")
    elif a["max_call_ms"] > 100:
        text += (f"Paced fires all returned True, but once the kernel's socket buffer was full a call"
                 f" blocked up to {a['max_call_ms']:,.0f} ms; a longer hog (try --hog 4) turns that into"
                 f" False after the 1000 ms timeout. ")
    else:
        text += (f"Paced fires returned True, none slower than {a['max_call_ms']:,.0f} ms: the kernel's"
                 f" socket buffer held the events. ")
    text += (f"A firer created during the hog got {fresh(a)}. With the broker in a process of its own, the"
             f" longest stall was {b['stall_ms']:,.0f} ms (saltevent_broker='process') and"
             f" {c['stall_ms']:,.0f} ms (`saltevent bus`) with events 5 ms apart, p99 latency"
             f" {b['lat_hog_p99_ms']:.2f} and {c['lat_hog_p99_ms']:.2f} ms, and the fresh firer got"
             f" {fresh(b)} and {fresh(c)}. ")
    for r, name in ((b, "process"), (c, "bus")):
        if r["stall_ms"] <= 20:
            continue
        if r["firer_gap_in_stall_ms"] >= r["stall_ms"] / 2:
            text += (f"({name}: the firer itself paused {r['firer_gap_in_stall_ms']:,.0f} ms during that"
                     f" stall, CPU scheduling with one of the {os.cpu_count()} CPUs taken by the hog and a load"
                     f" average of {os.getloadavg()[0]:.1f}, not the bus.) ")
        else:
            text += (f"({name}: the firer did not pause during that stall (its largest gap"
                     f" {r['firer_gap_in_stall_ms']:,.0f} ms): the broker or the listener did; not explained"
                     f" here.) ")
    if max(b["stall_ms"], c["stall_ms"]) < a["stall_ms"] / 5:
        text += ("So when the process that opens a bus first may make long calls that hold the GIL (C"
                 " extensions, or builtins such as sum, sorted or json on large data), do not leave the broker"
                 " on its thread: run `saltevent bus` as a service started before its users where a service"
                 " manager is at hand (a fixed process, its limits set once), or set opts"
                 " saltevent_broker='process' in the processes that open the bus where nothing can be"
                 f" deployed (the first one spawns the broker, {b['host_connect_ms']:,.0f} ms for its first"
                 " connect here, and it exits once idle). Not measured here: a host busy in pure Python"
                 " hands the GIL to other threads every 5 ms (sys.getswitchinterval()), so its broker"
                 " should slow down rather than stop.")
    else:
        text += ("The own-process setups did not stall much less than the thread broker in this run:"
                 " no conclusion from it; run it again on a quieter machine.")
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--hog", type=float, default=2.0, help="seconds the host holds the GIL (default 2)")
    ap.add_argument("--rate", type=int, default=200, help="paced events/s (default 200)")
    ap.add_argument("--only", default="", help="comma-separated subset of thread,process,bus")
    ap.add_argument("--timeout", type=float, default=20.0, help="hard limit of one setup, s (default 20)")
    cfg = ap.parse_args(argv)
    names = [s for s, _ in SETUPS if not cfg.only or s in cfg.only.split(",")]
    log_dir = tempfile.mkdtemp(prefix="seb-log")
    t0 = time.monotonic()
    load0 = os.getloadavg()
    results = []
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        for name in names:
            t = time.monotonic()
            results.append(run_setup(name, cfg, log_dir))
            print(f"[{time.monotonic() - t0:5.1f}s] {name} ({time.monotonic() - t:.1f}s)"
                  + (f"  ERROR: {results[-1]['error'].splitlines()[0]}" if "error" in results[-1] else ""),
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:                           # run_setup's finally has reaped its processes
        interrupted = True
    errors = any("error" in r for r in results)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "hog_s": cfg.hog, "rate": cfg.rate,
            "elapsed_s": time.monotonic() - t0, "interrupted": interrupted}
    text = conclusion(results)
    if cfg.json:
        json.dump({"meta": meta, "setups": results, "conclusion": text}, sys.stdout, indent=1)
        print()
    else:
        print(f"busyhost  |  Python {meta['python']}  |  {meta['cpus']} CPUs  |  {meta['date']}  |"
              f"  hog {cfg.hog:g} s of sum(range(n)), events {cfg.rate}/s")
        print(f"load average at start {' '.join(f'{x:.2f}' for x in load0)}, at end"
              f" {' '.join(f'{x:.2f}' for x in meta['loadavg_end'])}")
        print("stall: the longest gap between two arrivals at the listener overlapping the hog;"
              " p50/p99: fire->receive of the events fired during it.\n")
        for line in table(results):
            print(line)
        for r in results:
            if "error" in r:
                continue
            extra = []
            if r["false_but_arrived"]:
                extra.append(f"{r['false_but_arrived']} events whose fire returned False arrived anyway")
            if r["duplicates"]:
                extra.append(f"{r['duplicates']} duplicates")
            if r["missing"]:
                extra.append(f"missing {r['missing_first']}...")
            if r["dropped"] or r["gaps"]:
                extra.append(f"listener dropped {r['dropped']}, gaps {r['gaps']}")
            if not r["end_seen"]:
                extra.append("end marker NOT seen")
            print(f"  {r['setup']}: broker pid {r['broker_pid']} (host {r['host_pid']}, its first connect"
                  f" {r['host_connect_ms']:,.1f} ms); stall from {r['stall_from_ms']:+,.0f} ms into the hog,"
                  f" the firer's own largest gap then {r['firer_gap_in_stall_ms']:,.1f} ms (at most"
                  f" {r['firer_late_max_ms']:,.1f} ms behind schedule); {r['received']:,} of {r['fired']:,}"
                  f" paced events received; latency p50 over the whole run {r['lat_all_p50_ms']:.2f} ms"
                  + (f"; spawned broker exited {r['spawned_exit']}" if r.get("spawned_exit") else "")
                  + ("; " + "; ".join(extra) if extra else ""))
        print()
        import textwrap
        print(textwrap.fill(text, 100))
        print(f"\nelapsed {meta['elapsed_s']:.1f} s" + ("  (INTERRUPTED: setups not run are missing)"
                                                      if interrupted else ""))
    if errors:
        print(f"worker stderr logs kept in {log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 130 if interrupted else (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
