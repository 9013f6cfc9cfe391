#!/usr/bin/env python3
"""Time a hand-off: how long listeners and firers stall when the broker's process goes.

Run from the repository root: ``python bench/handoff.py [--rounds N]``.

Each round: process H hosts the broker (it created the bus first); process F fires
one event every millisecond; this process listens.  H then leaves, either cleanly
(it returns from main: atexit hands off) or by SIGKILL.  Reported per mode: the
longest gap between two consecutive events at the listener around the hand-off
(the stall a user sees), events lost, and the listener's ``gaps``.  Stdlib only.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import saltevent  # noqa: E402

HOST = """
import saltevent, sys
e = saltevent.MasterEvent(sys.argv[1])
print('ready', flush=True)
sys.stdin.readline()
"""
FIRER = """
import saltevent, sys, time
e = saltevent.MasterEvent(sys.argv[1], listen=False)
print('ready', flush=True)
sys.stdin.readline()
i = 0
stop_at = time.monotonic() + float(sys.argv[2])
while time.monotonic() < stop_at:
    assert e.fire_event({'i': i, 't': time.monotonic()}, 'ho/n', timeout=5000)
    i += 1
    time.sleep(0.001)
e.fire_event({'n': i}, 'ho/end', timeout=5000)
e.destroy()
"""


def one_round(mode, run_for=1.5):
    sock_dir = tempfile.mkdtemp(prefix="se-h")
    env = dict(os.environ, PYTHONPATH=HERE)
    procs = []
    try:
        host = subprocess.Popen([sys.executable, "-c", HOST, sock_dir], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(host)
        assert host.stdout.readline().strip() == "ready"
        listener = saltevent.MasterEvent(sock_dir)
        firer = subprocess.Popen([sys.executable, "-c", FIRER, sock_dir, str(run_for)], env=env,
                                 text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(firer)
        assert firer.stdout.readline().strip() == "ready"
        firer.stdin.write("go\n")
        firer.stdin.flush()
        arrivals, left_at, total = [], None, None
        started = time.monotonic()
        while True:
            if left_at is None and time.monotonic() - started > run_for / 3:
                left_at = time.monotonic()
                if mode == "kill":
                    host.kill()
                else:
                    host.stdin.write("\n")
                    host.stdin.flush()
            event = listener.get_event(wait=5, tag="ho/", full=True)
            if event is None:
                break
            if event["tag"] == "ho/end":
                total = event["data"]["n"]
                break
            arrivals.append((time.monotonic(), event["data"]["i"]))
        gaps = listener.gaps
        listener.destroy()
        firer.wait(10)
        host.wait(10)
        times = [t for t, _ in arrivals]
        stall = max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("nan")
        got = {i for _, i in arrivals}
        lost = (total if total is not None else max(got) + 1) - len(got)
        in_order = [i for _, i in arrivals] == sorted(got)
        return stall, lost, gaps, in_order
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        shutil.rmtree(sock_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"hand-off, {args.rounds} rounds per mode, firer at ~1,000 events/s "
          f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    for mode in ("clean", "kill"):
        rows = [one_round(mode) for _ in range(args.rounds)]
        stalls = sorted(r[0] * 1000 for r in rows)
        print(f"{mode:>5}: longest stall at the listener: median {statistics.median(stalls):.0f} ms, "
              f"max {stalls[-1]:.0f} ms; events lost per round: {[r[1] for r in rows]}; "
              f"gaps counted: {[r[2] for r in rows]}; in order: {all(r[3] for r in rows)}")


if __name__ == "__main__":
    main()
