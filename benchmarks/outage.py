#!/usr/bin/env python3
"""Soak the sender's --reconnect through a long outage, input waiting.

A feeder writes numbered events into the sender's stdin at a steady rate;
the listener is stopped (SIGTERM) for --outage seconds and started again
on the same port.  Reports the sender's RSS before, during and after the
outage, how much input the feeder got in while nothing listened, and
whether every event arrived (by sequence number); exits 1 on a lost event
or on RSS growth of 10% or more.

    python3 benchmarks/outage.py                 # 60 s outage at 20,000 EPS
    python3 benchmarks/outage.py --outage 600 --rate 50000
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENER = os.path.join(ROOT, "listen_events_cybertrace.py")
SENDER = os.path.join(ROOT, "send_events_cybertrace.py")
GROWTH_LIMIT = 0.10
EVENT = b"seq=%09d " + b"o" * 49 + b"\n"


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) for line in status
                    if line.startswith("VmRSS:"))


class Feeder:
    """Write numbered events into a pipe at a steady rate, as a log grows."""

    def __init__(self, fd: int, rate: float) -> None:
        self.fd = fd
        self.rate = rate
        self.made = 0  # events due so far, written or waiting
        self.bytes = 0  # written
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        started = time.monotonic()
        data = b""
        while not (self.stopping.is_set() and not data):
            if not data and not self.stopping.is_set():
                due = int((time.monotonic() - started) * self.rate)
                if due <= self.made:
                    time.sleep(0.005)
                    continue
                # What came while the pipe was full waits here, as in a
                # log file that tail -F has not read yet.
                due = min(due, self.made + 100000)
                data = b"".join(EVENT % n for n in range(self.made, due))
                self.made = due
            if select.select([], [self.fd], [], 0.1)[1]:
                try:
                    written = os.write(self.fd, data)
                except BlockingIOError:
                    continue
                data = data[written:]
                self.bytes += written

    def stop(self) -> int:
        """Stop after the events in hand are written; return the count."""
        self.stopping.set()
        self.thread.join()
        return self.made


def start_listener(port: int, output: str) -> tuple:
    proc = subprocess.Popen([sys.executable, LISTENER, "-l",
                             "127.0.0.1:%d" % port, "-f", "raw", "-o",
                             output], stderr=subprocess.PIPE)
    line = proc.stderr.readline().decode()
    if not line.startswith("Starting on "):
        raise SystemExit("listener did not start: %r" % line)
    return proc, int(line.split()[2].rsplit(":", 1)[1])


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    proc.stderr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20000,
                        help="events per second (default 20000)")
    parser.add_argument("--warmup", type=float, default=10,
                        help="seconds before the outage (default 10)")
    parser.add_argument("--outage", type=float, default=60,
                        help="seconds the listener stays down (default 60)")
    parser.add_argument("--after", type=float, default=10,
                        help="seconds after it is back (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [os.path.join(tmp, "before.log"),
                   os.path.join(tmp, "after.log")]
        listener, port = start_listener(0, outputs[0])
        sender = subprocess.Popen(
            [sys.executable, SENDER, "--reconnect", "-c",
             "127.0.0.1:%d" % port], stdin=subprocess.PIPE,
            stderr=subprocess.PIPE)
        os.set_blocking(sender.stdin.fileno(), False)
        feeder = Feeder(sender.stdin.fileno(), args.rate)
        time.sleep(args.warmup)
        warm = rss_kib(sender.pid)
        stop(listener)
        down = time.monotonic()
        fed = feeder.bytes
        samples = []
        while time.monotonic() - down < args.outage:
            time.sleep(min(1.0, args.outage / 10))
            samples.append(rss_kib(sender.pid))
        fed = feeder.bytes - fed
        listener, _ = start_listener(port, outputs[1])
        # The sender comes back at its next attempt, up to 30 s later.
        while not os.path.getsize(outputs[1]):
            time.sleep(0.1)
        back = time.monotonic() - down
        time.sleep(args.after)
        after = rss_kib(sender.pid)
        total = feeder.stop()
        sender.stdin.close()
        status = sender.wait(60)
        err = sender.stderr.read().decode()
        sender.stderr.close()
        time.sleep(0.5)
        stop(listener)
        seen = set()
        received = 0
        for path in outputs:
            with open(path, "rb") as f:
                for line in f:
                    seen.add(int(line[4:13]))
                    received += 1
    missing = total - len(seen & set(range(total)))
    print("sender stderr:\n  " + "\n  ".join(err.splitlines()))
    print("events: fed %d, received %d, missing %d, duplicates %d; "
          "sender exit %d" % (total, received, missing, received - len(seen),
                              status))
    print("listener down %.0f s, sender back after %.1f s; input taken "
          "meanwhile: %d bytes" % (args.outage, back, fed))
    print("sender RSS (KiB): %d before the outage; during it %d to %d "
          "(last %d); %d after" % (warm, min(samples), max(samples),
                                   samples[-1], after))
    grew = max(samples + [after]) > warm * (1 + GROWTH_LIMIT)
    return 1 if missing or status or grew else 0


if __name__ == "__main__":
    sys.exit(main())
