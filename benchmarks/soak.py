#!/usr/bin/env python3
"""Soak the listener: a steady event rate over connections that come and go.

Reports events in and out, and the listener's RSS and open descriptors
after a warm-up and at the end; exits 1 if an event was lost or
duplicated, or if either grew by 10% or more.

    python3 benchmarks/soak.py                 # 60 s at 2,000 events/s
    python3 benchmarks/soak.py --duration 3600 --rate 20000
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

LISTENER = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "listen_events_cybertrace.py")
GROWTH_LIMIT = 0.10


def sample(pid: int) -> tuple:
    """Return (RSS in KiB, open descriptors) of a process."""
    with open("/proc/%d/status" % pid) as f:
        rss = next(int(line.split()[1]) for line in f
                   if line.startswith("VmRSS:"))
    return rss, len(os.listdir("/proc/%d/fd" % pid))


class Load:
    """Threads that each send events over short-lived connections."""

    def __init__(self, address: tuple, rate: float, threads: int,
                 per_connection: int) -> None:
        self.address = address
        self.interval = threads / rate
        self.per_connection = per_connection
        self.sent = 0
        self.connections = 0
        self.errors = []
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,))
                        for n in range(threads)]

    def start(self) -> None:
        self.running.set()
        for thread in self.threads:
            thread.start()

    def run(self, number: int) -> None:
        seq = 0
        due = time.monotonic()
        while not self.stopping.is_set():
            if not self.running.wait(0.1):
                continue
            try:
                with socket.create_connection(self.address, timeout=10) as s:
                    with self.lock:
                        self.connections += 1
                    for _ in range(self.per_connection):
                        if self.stopping.is_set() or not self.running.is_set():
                            break
                        s.sendall(b"soak sender=%d seq=%d category=KL_Test "
                                  b"ip=192.0.2.1 pad=%s\n" % (number, seq,
                                                              b"s" * 300))
                        seq += 1
                        with self.lock:
                            self.sent += 1
                        due += self.interval
                        pause = due - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                        else:
                            due = time.monotonic()  # behind: do not burst
            except OSError as exc:
                self.errors.append(exc)
                return

    def pause(self) -> None:
        """Stop sending; wait until every connection is closed."""
        self.running.clear()
        time.sleep(0.3)

    def stop(self) -> None:
        self.stopping.set()
        self.running.set()
        for thread in self.threads:
            thread.join(30)


def wait_quiet(pid: int, base_fds: int) -> None:
    """Give the listener a moment to close the connections that ended."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sample(pid)[1] > base_fds:
        time.sleep(0.05)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of load (default: 60)")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="events per second in all (default: 2000)")
    parser.add_argument("--connections", type=int, default=4,
                        help="connections open at a time (default: 4)")
    parser.add_argument("--per-connection", type=int, default=200,
                        help="events before a connection closes and a new "
                        "one opens (default: 200)")
    parser.add_argument("--format", default="raw",
                        choices=("raw", "text", "json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "events")
        listener = subprocess.Popen(
            [sys.executable, LISTENER, "-l", "127.0.0.1:0", "-f", args.format,
             "-o", out_path], stderr=subprocess.PIPE, text=True)
        try:
            found = re.search(r":(\d+)$", listener.stderr.readline().strip())
            if not found:
                raise SystemExit("soak: the listener did not start")
            # Status lines must keep flowing, or the listener would block.
            drain = threading.Thread(target=lambda: listener.stderr.read(),
                                     daemon=True)
            drain.start()
            load = Load(("127.0.0.1", int(found.group(1))), args.rate,
                        args.connections, args.per_connection)
            base_fds = sample(listener.pid)[1]
            load.start()
            warm = min(max(1.0, args.duration / 10), args.duration / 2)
            time.sleep(warm)
            load.pause()
            wait_quiet(listener.pid, base_fds)
            start = sample(listener.pid)
            load.running.set()
            time.sleep(max(0.0, args.duration - warm))
            load.pause()
            load.stop()
            wait_quiet(listener.pid, base_fds)
            end = sample(listener.pid)
        finally:
            listener.send_signal(signal.SIGTERM)
            listener.wait(30)
            listener.stderr.close()
        with open(out_path, "rb") as f:
            lines = f.read().splitlines()

    events = [line for line in lines if b"soak sender=" in line] \
        if args.format != "text" else [line for line in lines
                                       if line.startswith(b"soak ")]
    counts = Counter(events)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = load.sent - len(counts)
    rss_growth = (end[0] - start[0]) / start[0]
    fd_growth = (end[1] - start[1]) / start[1]
    ok = not lost and not duplicated and not load.errors and \
        rss_growth < GROWTH_LIMIT and fd_growth < GROWTH_LIMIT
    print("duration %.0f s at %.0f events/s, %d connections at a time, %d "
          "events each" % (args.duration, args.rate, args.connections,
                           args.per_connection))
    print("events: sent %d, received %d (lost %d, duplicated %d)"
          % (load.sent, len(events), lost, duplicated))
    print("connections: %d%s" % (load.connections, "; sender errors: %s"
                                 % load.errors[:3] if load.errors else ""))
    print("RSS: %.1f MiB after warm-up, %.1f MiB at the end (%+.1f%%)"
          % (start[0] / 1024, end[0] / 1024, rss_growth * 100))
    print("open descriptors: %d after warm-up, %d at the end"
          % (start[1], end[1]))
    print("result: %s" % ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
