#!/usr/bin/env python3
"""Measure the listener and the sender beside nc and the guide's algorithm.

Every receiver is started as a user starts it (stdout to a file, no
PYTHONUNBUFFERED) and timed from the first byte sent until its output holds
every event.  Receivers take turns (A B A B ...), and ratios are reported
round by round, so a noisy machine shows up as spread, not as a verdict.

    python3 benchmarks/bench.py            # 500,000 events, 3 rounds
    python3 benchmarks/bench.py -n 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LISTENER = os.path.join(ROOT, "listen_events_cybertrace.py")
SENDER = os.path.join(ROOT, "send_events_cybertrace.py")
GUIDE = os.path.join(HERE, "guide_listener.py")
sys.path.insert(0, ROOT)

import listen_events_cybertrace as lec  # noqa: E402

# The guide's stdout is block-buffered: its last few events stay in this
# buffer until it exits, so it counts as done this close to the end.
GUIDE_SLACK = 8192
PEER = "127.0.0.1:55555"  # same length as any ephemeral-port peer
POLL = 0.002
BIG_EVENT = 64 * 1024 * 1024
TARGETS = {"raw/nc": 1.5, "text/guide": 4.0, "json/guide": 0.75,
           "8conn/1conn": 0.9, "send/nc -N": 0.9}
RSS_LIMIT_KIB = 32 * 1024
BIG_EVENT_SECONDS = 0.5


def make_events(count: int, seed: int = 1) -> bytes:
    """Return count events like the guide's detections, about 450 bytes."""
    rng = random.Random(seed)
    hexd = "0123456789ABCDEF"
    lines = []
    for seq in range(count):
        def h(n):
            return "".join(rng.choice(hexd) for _ in range(n))
        day = "%02d.%02d.20%02d %02d:%02d" % (rng.randrange(1, 29),
                                              rng.randrange(1, 13),
                                              rng.randrange(15, 26),
                                              rng.randrange(24),
                                              rng.randrange(60))
        if seq % 2:
            md5 = h(32)
            line = ("- category=KL_Malicious_Hash_MD5 matchedIndicator=%s "
                    "url=- src=- ip=- md5=%s sha1=- sha256=- usrName=- "
                    "confidence=100 MD5=%s SHA1=%s SHA256=%s file_size=%d "
                    "first_seen=%s last_seen=%s popularity=%d "
                    "threat=HEUR:Trojan.Win32.Generic seq=%d"
                    % (md5, md5, md5, h(40), h(64), rng.randrange(100, 99999),
                       day, day, rng.randrange(1, 6), seq))
        else:
            ip = "192.0.2.%d" % rng.randrange(256)
            line = ("- category=KL_IP_Reputation matchedIndicator=%s url=- "
                    "src=- ip=%s md5=- sha1=- sha256=- usrName=- "
                    "confidence=100 category=test first_seen=%s ip=%s "
                    "ip_geo=ru last_seen=%s popularity=1 threat_score=75 "
                    "src_host=host-%s.example.com dst_port=%d seq=%d "
                    "comment=%s"
                    % (ip, ip, day, ip, day, h(12).lower(),
                       rng.randrange(1, 65536), seq, h(96).lower()))
        lines.append(line)
    return ("\n".join(lines) + "\n").encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    """Tell from /proc whether something listens on the port, unconnected."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return True
    return False


def user_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def peak_rss(pid: int) -> int:
    """Return a process's peak RSS in KiB, from /proc (0 if unknown)."""
    # Not wait4's ru_maxrss: it counts the benchmark's own memory, which
    # the child shared between fork and exec.
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop(proc: subprocess.Popen) -> int:
    """Stop a receiver; return its peak RSS in KiB."""
    rss = peak_rss(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return rss


def send_parts(port: int, parts: list) -> None:
    """Send each part on its own connection, all at once."""
    def send(part):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            view = memoryview(part)
            for start in range(0, len(part), 4 << 20):
                s.sendall(view[start:start + (4 << 20)])
    threads = [threading.Thread(target=send, args=(p,)) for p in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def split_events(data: bytes, count: int) -> list:
    """Cut data into count parts at event boundaries."""
    parts, start = [], 0
    for index in range(1, count + 1):
        end = len(data) if index == count else \
            data.index(b"\n", len(data) * index // count) + 1
        parts.append(data[start:end])
        start = end
    return parts


def measure(argv: list, parts: list, expected: int, workdir: str) -> tuple:
    """Run one receiver; return (seconds, peak RSS KiB, output path)."""
    port = free_port()
    out_path = os.path.join(workdir, "out")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([a.replace("PORT", str(port)) for a in argv],
                                stdout=out, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, env=user_env())
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("%s did not start" % argv)
            time.sleep(POLL)
        started = time.perf_counter()
        sender = threading.Thread(target=send_parts, args=(port, parts))
        sender.start()
        deadline = time.monotonic() + 600
        while os.path.getsize(out_path) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError("%s timed out" % argv)
            time.sleep(POLL)
        took = time.perf_counter() - started
        sender.join(120)
    finally:
        rss = stop(proc)
    return took, rss, out_path


def receivers(nc: str | None, count: int, py: str) -> list:
    """Return (name, argv, connections) for every receiver."""
    ours = [py, LISTENER, "-q", "-l", "127.0.0.1:PORT", "-f"]
    specs = []
    if nc:
        specs.append(("nc -l", [nc, "-l", "-d", "127.0.0.1", "PORT"], 1))
    specs.append(("guide", [py, GUIDE, "127.0.0.1", "PORT"], 1))
    for fmt in ("raw", "text", "json"):
        specs.append((fmt, ours + [fmt], 1))
    for fmt in ("raw", "text", "json"):
        specs.append((fmt + " x8", ours + [fmt], 8))
    return specs


def expected_size(name: str, data: bytes, count: int) -> int:
    fmt = name.split()[0]
    if fmt in ("nc", "raw"):
        return len(data)
    if fmt == "text":
        return len(data) + 10 * count
    if fmt == "guide":
        return len(data) + 10 * count - GUIDE_SLACK
    return len(lec.format_json(data, lec.split_lines(data), PEER, time.time(),
                               False))


def bench_receivers(args, data: bytes, workdir: str) -> dict:
    nc = shutil.which("nc")
    specs = receivers(nc, args.count, args.python)
    if args.only:
        specs = [spec for spec in specs if spec[0] in args.only.split(",")]
    sizes = {name: expected_size(name, data, args.count)
             for name, _, _ in specs}
    results = {name: [] for name, _, _ in specs}
    rss = {name: 0 for name, _, _ in specs}
    for round_number in range(args.rounds):
        for name, argv, conns in specs:
            took, peak, out_path = measure(argv, split_events(data, conns),
                                           sizes[name], workdir)
            results[name].append(took)
            rss[name] = max(rss[name], peak)
            if round_number == 0 and name in ("raw", "json x8"):
                check_output(name, out_path, data, args.count)
            os.unlink(out_path)
        print("  round %d: %s" % (round_number + 1, "  ".join(
            "%s %.3fs" % (name, results[name][-1]) for name, _, _ in specs)),
            file=sys.stderr)
    return {"times": results, "rss": rss, "nc": nc is not None}


def check_output(name: str, path: str, data: bytes, count: int) -> None:
    """Fail loudly if a timed run lost, added or broke an event."""
    with open(path, "rb") as f:
        out = f.read()
    if name == "raw":
        ok = out == data
    else:
        import json
        events = sorted(json.loads(line)["event"] for line in
                        out.splitlines())
        ok = events == sorted(data.decode().splitlines())
    if not ok:
        raise SystemExit("bench: %s output does not match the input" % name)


def bench_big_event(args, workdir: str) -> tuple:
    """Time one 64 MiB event with no newline; return (seconds, RSS KiB)."""
    data = b"x" * BIG_EVENT
    pieces = -(-BIG_EVENT // lec.MAX_EVENT_BYTES)
    argv = [args.python, LISTENER, "-q", "-l", "127.0.0.1:PORT", "-f", "raw"]
    took, rss, out_path = measure(argv, [data], BIG_EVENT + pieces, workdir)
    os.unlink(out_path)
    return took, rss


def bench_sender(args, data_path: str) -> dict:
    """Time the sender and nc -N streaming the file into a 1 MiB reader."""
    sink_code = (
        "import socket,sys\n"
        "s=socket.create_server(('127.0.0.1',0));print(s.getsockname()[1],"
        "flush=True)\nb=bytearray(1<<20)\n"
        "while True:\n c,_=s.accept();n=0\n"
        " while True:\n  k=c.recv_into(b)\n  if not k: break\n  n+=k\n"
        " c.close();print(n,flush=True)\n")
    sink = subprocess.Popen([args.python, "-c", sink_code],
                            stdout=subprocess.PIPE, env=user_env())
    port = int(sink.stdout.readline())
    nc = shutil.which("nc")
    commands = {"send": [args.python, SENDER, "-q", "-c",
                         "127.0.0.1:%d" % port, data_path]}
    if nc:
        commands["nc -N"] = [nc, "-N", "127.0.0.1", str(port)]
    size = os.path.getsize(data_path)
    times = {name: [] for name in commands}
    try:
        for _ in range(args.rounds):
            for name, argv in commands.items():
                with open(data_path, "rb") as stdin:
                    started = time.perf_counter()
                    subprocess.run(argv, stdin=stdin, check=True,
                                   env=user_env(), timeout=600)
                    got = int(sink.stdout.readline())
                    times[name].append(time.perf_counter() - started)
                if got != size:
                    raise SystemExit("bench: %s delivered %d of %d bytes"
                                     % (name, got, size))
    finally:
        sink.kill()
        sink.wait()
        sink.stdout.close()
    return times


def ratios(a: list, b: list) -> list:
    """Throughput ratio a/b per round, from times."""
    return [tb / ta for ta, tb in zip(a, b)]


def report(args, data: bytes, rec: dict, big: tuple, send: dict) -> int:
    count, size = args.count, len(data)
    times, rss = rec["times"], rec["rss"]
    lines = ["| receiver | events/s | MB/s | vs nc | vs guide | peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    checks = []

    def cell(name, base):
        if base not in times:
            return "n/a"
        per = ratios(times[name], times[base])
        return "%.2f (%s)" % (statistics.median(per),
                              " ".join("%.2f" % r for r in per))
    for name in times:
        best = statistics.median(times[name])
        lines.append("| %s | %s | %.0f | %s | %s | %.1f MiB |" % (
            name if name in ("nc -l", "guide") else "listener -f " + name,
            "{:,.0f}".format(count / best), size / best / 1e6,
            cell(name, "nc -l"), cell(name, "guide"), rss[name] / 1024))

    def check(label, per, target):
        value = statistics.median(per)
        checks.append((label, value, target, value >= target))
    if rec["nc"]:
        check("raw/nc", ratios(times["raw"], times["nc -l"]),
              TARGETS["raw/nc"])
    check("text/guide", ratios(times["text"], times["guide"]),
          TARGETS["text/guide"])
    check("json/guide", ratios(times["json"], times["guide"]),
          TARGETS["json/guide"])
    for fmt in ("raw", "text", "json"):
        check("%s 8conn/1conn" % fmt, ratios(times[fmt + " x8"], times[fmt]),
              TARGETS["8conn/1conn"])
    lines.append("| listener, one 64 MiB event | | %.0f | | | %.1f MiB |"
                 % (BIG_EVENT / big[0] / 1e6, big[1] / 1024))
    for name, per in send.items():
        best = statistics.median(per)
        lines.append("| %s (file to a 1 MiB reader) | %s | %.0f | %s | | |"
                     % ("sender" if name == "send" else name,
                        "{:,.0f}".format(count / best), size / best / 1e6,
                        "%.2f" % statistics.median(ratios(per, send["nc -N"]))
                        if "nc -N" in send else "n/a"))
    if "nc -N" in send:
        check("send/nc -N", ratios(send["send"], send["nc -N"]),
              TARGETS["send/nc -N"])
    print("\n".join(lines))
    print()
    print("Ratios are throughput ratios, median of %d rounds (each round in "
          "brackets). The guide's baseline counts as done %d bytes before "
          "the end: its block-buffered stdout holds its last events until "
          "it exits." % (args.rounds, GUIDE_SLACK))
    if not rec["nc"]:
        print("nc is not installed: its rows are skipped.")
    print()
    failed = 0
    for label, value, target, ok in checks:
        failed += not ok
        print("%-6s %-18s %.2f (target >= %.2f)" % (
            "ok" if ok else "MISSED", label, value, target))
    for name in ("raw", "text", "json"):
        ok = rss[name] < RSS_LIMIT_KIB
        failed += not ok
        print("%-6s %-18s %.1f MiB (target < 32)" % (
            "ok" if ok else "MISSED", "RSS " + name, rss[name] / 1024))
    ok = big[1] < RSS_LIMIT_KIB and big[0] < BIG_EVENT_SECONDS
    failed += not ok
    print("%-6s %-18s %.3f s, %.1f MiB (target < %.1f s, < 32 MiB)" % (
        "ok" if ok else "MISSED", "64 MiB event", big[0], big[1] / 1024,
        BIG_EVENT_SECONDS))
    return 1 if failed else 0


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--count", type=int, default=500000,
                        help="events per run (default: 500000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of alternating runs (default: 3)")
    parser.add_argument("--only", metavar="NAMES",
                        help="measure only these receivers, e.g. 'nc -l,raw'"
                        " (for profiling; the report needs them all)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the Python receivers")
    args = parser.parse_args(argv)
    print("Generating %d events..." % args.count, file=sys.stderr)
    data = make_events(args.count)
    with tempfile.TemporaryDirectory() as workdir:
        data_path = os.path.join(workdir, "events.txt")
        with open(data_path, "wb") as f:
            f.write(data)
        print("Receivers, %d bytes:" % len(data), file=sys.stderr)
        rec = bench_receivers(args, data, workdir)
        if args.only:
            for name, times in rec["times"].items():
                print("%-12s %s" % (name, " ".join("%.3f" % t for t in times)))
            return 0
        big = bench_big_event(args, workdir)
        print("Sender:", file=sys.stderr)
        send = bench_sender(args, data_path)
    print("%d events, %.0f bytes each; %s, %d cores; Python %s" % (
        args.count, len(data) / args.count, os.uname().machine,
        os.cpu_count(), sys.version.split()[0]))
    print()
    return report(args, data, rec, big, send)


if __name__ == "__main__":
    sys.exit(main())
