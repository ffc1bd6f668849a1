#!/usr/bin/env python3
"""The sender's own ceiling for --load (issue 22, item 5).

Runs the capacity test pinned to one core against a receiver that answers
every event at once with a LookupFinished (one process, on the other core),
at fixed rates, one step each, and prints what it offered, what came back
and the share of a core it used.  --profile prints where the time goes.

    python3 benchmarks/capacity_ceiling.py                 # 25k..150k/s
    python3 benchmarks/capacity_ceiling.py --rates 100000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import selectors
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cybertrace_capacity as capacity  # noqa: E402
import send_events_cybertrace as sender  # noqa: E402

ANSWER = b"eventName=LookupFinished sent_events=0 total=\n"


def answer_all(server: socket.socket) -> None:
    """Answer every event line at once, as fast as Python can."""
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                sock, _ = server.accept()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(sock, selectors.EVENT_READ)
                continue
            data = key.fileobj.recv(1 << 20)
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                continue
            count = data.count(b"\n")
            if count:
                key.fileobj.sendall(ANSWER * count)


def measure(address: tuple, rate: float, seconds: float,
            connections: int) -> capacity.Step:
    test = capacity.CapacityTest(address, sender.test_events(),
                                 connections=connections, start_rate=rate,
                                 max_rate=rate, step_seconds=seconds)
    test.run()
    return test.steps[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="25000,50000,100000,150000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    server = socket.create_server(("127.0.0.1", 0))
    receiver = multiprocessing.Process(target=answer_all, args=(server,),
                                       daemon=True)
    receiver.start()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    address = server.getsockname()[:2]
    print("| offered/s | due | sent | answered in step | answered/s | p50 "
          "| p99 | sender CPU |\n|---|---|---|---|---|---|---|---|")
    try:
        for rate in [float(r) for r in args.rates.split(",")]:
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            step = measure(address, rate, args.seconds, args.connections)
            if profile:
                profile.disable()
            print("| %s | %s | %s | %s | %s | %s | %s | %.0f%% |" % (
                capacity.format_rate(rate), step.due, step.sent,
                step.in_time, capacity.format_rate(step.answered_rate()),
                capacity.format_ms(step.percentile(0.5)),
                capacity.format_ms(step.percentile(0.99)),
                100 * step.cpu / step.seconds), flush=True)
            if profile:
                pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    finally:
        receiver.terminate()
        receiver.join()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
