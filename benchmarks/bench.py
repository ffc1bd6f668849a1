#!/usr/bin/env python3
"""Measure the listener beside what a user would pick instead, in one run.

Peers side by side on the same data: nc -l, socat, the tutorial's listener,
syslog-ng (raw lines, and kv-parser + format-json), a bare Python loop that
only receives and writes, and the listener in each format; then the
listener and the bare loop over 1, 8 and 64 connections with three kinds of
sender (sendfile, as a C relay streams a file; sendall from memory, as a
Python sender does; one nc -N per connection, as users pipe files).  Every
receiver runs as a user runs it (output to a file, no PYTHONUNBUFFERED) and
is timed from the first byte sent until its output reaches full size; its
CPU time comes from /proc/PID/stat.  One warm-up, then rounds in
alternating order, each round's ratios printed, the median reported.
Prints Markdown tables (the README's) and each target as met or missed;
exit status 1 if one is missed.

    python3 benchmarks/bench.py            # 500,000 events, 5 rounds
    python3 benchmarks/bench.py --quick    # 100,000 events, 2 rounds
    python3 benchmarks/bench.py --baseline HEAD~5 --parts peers,hostile

--baseline REV adds the listener as it was at a git revision, in every
format, beside today's in the same rounds (old vs new in one run).  The
hostile part times -f json on known templates clean, after 12,000 events
of ever-new shapes (as a peer trying to slow it would send), while a
stream of such shapes goes on, and after 3 look-alikes of a template.

nc and socat are installed with apt-get when missing (as root); syslog-ng
is fetched with apt-get download and unpacked into a cache folder, never
installed (Debian's package conflicts with rsyslog).  What cannot be had is
named and its rows left out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
TUTORIAL = os.path.join(HERE, "tutorial_listener.py")
BARE = os.path.join(HERE, "bare_receiver.py")
SEND_PARTS = os.path.join(HERE, "send_parts.py")
sys.path.insert(0, ROOT)

import listen_events_cybertrace as lec  # noqa: E402
from peers import SyslogNg, find_tool, user_env  # noqa: E402

# The tutorial's stdout is block-buffered: its last few events stay in this
# buffer until it exits, so it counts as done this close to the end.
TUTORIAL_SLACK = 8192
POLL = 0.001
CONNECTIONS = (1, 8, 64)
# nc joins them when it can be had (main): users pipe files into it.
SENDERS = ("sendfile", "sendall")
FORMATS = ("raw", "text", "json")
FLOOD_PEERS = 512
FLOOD_EVENT = 1024 * 1024
TARGETS = [
    # (label, receiver, baseline, minimum throughput ratio)
    ("raw vs nc -l", "listener raw", "nc -l", 1.5),
    ("text vs tutorial", "listener text", "tutorial", 4.5),
    ("json vs syslog-ng json", "listener json", "syslog-ng json", 2.0),
    ("raw vs syslog-ng raw", "listener raw", "syslog-ng raw", 3.0),
]
CONNECTION_TARGETS = {8: 0.9, 64: 0.8}
RSS_ONE_STREAM_MIB = 32
BIG_EVENT = 64 * 1024 * 1024
BIG_EVENT_SECONDS = 0.5
RSS_FLOOD_MIB = 100
# Today's listener against the one at --baseline, same format.
BASELINE_TARGET = 0.95
# -f json on known templates under ever-new shapes, against clean.
HOSTILE_TARGET = 0.8
HOSTILE_CONNECTIONS = 3000
HOSTILE_PER_CONNECTION = 4
PARTS = ("peers", "connections", "memory", "latency", "sender", "hostile",
         "templates", "floods")
# --prefix's cost: the listener with every field, beside it without.
PREFIX = "time,peer,listen"
PREFIXED = ("raw", "text")


# --- Data --------------------------------------------------------------------

def make_events(count: int, seed: int = 1) -> bytes:
    """Return count events like the tutorial's detections, about 450 bytes."""
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


def make_cef_events(count: int, seed: int = 2) -> bytes:
    """Return count events of Kaspersky's ArcSight (CEF) templates, about
    the size of make_events' ones: detections, and a service alert in 100;
    their values hold CEF's escapes."""
    rng = random.Random(seed)
    hexd = "0123456789ABCDEF"
    lines = []
    for seq in range(count):
        def h(n):
            return "".join(rng.choice(hexd) for _ in range(n))
        if seq % 100 == 99:
            lines.append(
                "CEF:0|Kaspersky Lab|Kaspersky CyberTrace for ArcSight|2.0|1|"
                "CyberTrace Service Event|4| reason=KL_ALERT_UpdatedFeed "
                "msg=feed\\=Malicious_URL_Data_Feed.json records\\=%d"
                % rng.randrange(1000, 999999))
            continue
        day = "%02d.%02d.20%02d %02d:%02d" % (rng.randrange(1, 29),
                                              rng.randrange(1, 13),
                                              rng.randrange(15, 26),
                                              rng.randrange(24),
                                              rng.randrange(60))
        lines.append(
            "CEF:0|Kaspersky Lab|Kaspersky CyberTrace for ArcSight|2.0|2|"
            "CyberTrace Detection Event|8| reason=KL_Malicious_Hash_MD5 "
            "cs5Label=MatchedIndicator cs5=%s src=192.0.2.%d "
            "request=http://host-%s.example.com/a\\=b cs1Label=Threat "
            "cs1=HEUR:Trojan.Win32.Generic cs2Label=FirstSeen cs2=%s "
            "cs3Label=SHA256 cs3=%s msg=C:\\\\Users\\\\x\\\\file.exe seq=%d"
            % (h(32), rng.randrange(256), h(12).lower(), day, h(64), seq))
    return ("\n".join(lines) + "\n").encode()


def split_events(data: bytes, count: int) -> list:
    """Cut data into count parts at event boundaries."""
    parts, start = [], 0
    for index in range(1, count + 1):
        end = len(data) if index == count else \
            data.index(b"\n", len(data) * index // count) + 1
        parts.append(data[start:end])
        start = end
    return parts


def write_parts(data: bytes, workdir: str) -> dict:
    """Write the data cut for each number of connections; return the paths."""
    paths = {}
    for conns in CONNECTIONS:
        paths[conns] = []
        for index, part in enumerate(split_events(data, conns)):
            path = os.path.join(workdir, "part-%d-%d" % (conns, index))
            with open(path, "wb") as f:
                f.write(part)
            paths[conns].append(path)
    return paths


def read_into_page_cache(paths: list) -> None:
    buf = bytearray(1 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --- Processes ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tcp_rows():
    """Yield (local port, remote port, state, tx queue, rx queue) rows."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            tx, rx = (int(n, 16) for n in fields[4].split(":"))
            yield (int(fields[1].rsplit(":", 1)[1], 16),
                   int(fields[2].rsplit(":", 1)[1], 16), fields[3], tx, rx)


def listening(port: int) -> bool:
    return any(row[0] == port and row[2] == "0A" for row in tcp_rows())


def unread_bytes(port: int) -> int:
    """Return what connections to port still hold in the kernel's queues."""
    return sum(tx + rx for local, remote, state, tx, rx in tcp_rows()
               if port in (local, remote) and state == "01")


def cpu_seconds(pid: int) -> float:
    """Return a process's user + system CPU time so far, from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int, field: str = "VmHWM") -> int:
    """Return a process's peak (VmHWM) or current (VmRSS) RSS in KiB."""
    # Not wait4's ru_maxrss: it counts the memory the child shared with
    # this benchmark between fork and exec.
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise SystemExit("bench: %s: the receiver exited (status %s)"
                             % (what, proc.returncode))
        if time.monotonic() > deadline:
            raise SystemExit("bench: timed out waiting for %s" % what)
        time.sleep(POLL)


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


# --- Receivers ---------------------------------------------------------------

class Receiver:
    """A program that listens on a port and writes what it gets to a file."""

    def __init__(self, name: str, argv: list = None, fmt: str = "raw",
                 syslog_ng: SyslogNg = None, prefixed: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.format = fmt
        self.prefixed = prefixed  # --prefix PREFIX
        self.syslog_ng = syslog_ng
        self.expected = None  # output bytes once all is written

    def start(self, workdir: str, port: int, out_path: str):
        if self.syslog_ng:
            return self.syslog_ng.start(workdir, port, out_path, self.format)
        with open(out_path, "wb") as out:
            return subprocess.Popen(
                [arg.replace("PORT", str(port)) for arg in self.argv],
                stdout=out, stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL, env=user_env())


def receivers(tools: dict, python: str, baseline: str = None) -> list:
    ours = [python, LISTENER, "-q", "-l", "127.0.0.1:PORT", "-f"]
    found = []
    if baseline:
        for fmt in FORMATS:
            found.append(Receiver("baseline " + fmt, [
                python, baseline, "-q", "-l", "127.0.0.1:PORT", "-f", fmt],
                fmt))
    if tools.get("nc"):
        found.append(Receiver("nc -l", [tools["nc"], "-l", "-d", "127.0.0.1",
                                        "PORT"]))
    if tools.get("socat"):
        found.append(Receiver("socat", [
            tools["socat"], "-u", "TCP-LISTEN:PORT,bind=127.0.0.1,reuseaddr",
            "STDOUT"]))
    found.append(Receiver("tutorial", [python, TUTORIAL, "127.0.0.1", "PORT"],
                          "text"))
    if tools.get("syslog-ng"):
        for fmt in ("raw", "json"):
            found.append(Receiver("syslog-ng " + fmt, fmt=fmt,
                                  syslog_ng=tools["syslog-ng"]))
    found.append(Receiver("bare loop", [python, BARE, "127.0.0.1", "PORT"]))
    for fmt in FORMATS:
        found.append(Receiver("listener " + fmt, ours + [fmt], fmt))
    for fmt in PREFIXED:
        found.append(Receiver("listener %s --prefix" % fmt, ours + [
            fmt, "--prefix", PREFIX], fmt, prefixed=True))
    return found


def prefix_bytes() -> int:
    """Return the length of PREFIX before each event in the benchmark."""
    # An ISO time, then peer and listen on 127.0.0.1, each port (ephemeral,
    # or picked by free_port) of 5 digits; each field and a space.
    return len("2026-12-07T23:01:02.123Z ") + 2 * len("127.0.0.1:55555 ")


def expected_size(receiver: Receiver, data: bytes, count: int):
    """Return the receiver's full output size, or None to learn it."""
    if receiver.syslog_ng:
        return len(data) if receiver.format == "raw" else None
    if receiver.name == "tutorial":
        return len(data) + 10 * count - TUTORIAL_SLACK
    if receiver.prefixed:
        extra = prefix_bytes() * count
        return len(data) + extra + (10 * count if receiver.format == "text"
                                    else 0)
    if receiver.format == "text":
        return len(data) + 10 * count
    if receiver.format == "json" and receiver.name.startswith("baseline"):
        return None  # its own JSON, learnt from the warm-up
    if receiver.format == "json":
        # Every ephemeral port has 5 digits: any peer, and the listening
        # address each event names ("listen"), formats as long.
        return len(lec.JsonFormatter().format(
            data, lec.split_lines(data), "127.0.0.1:55555", time.time(),
            False, listen="127.0.0.1:55555"))
    return len(data)


class Run:
    """One timed run: wall and CPU seconds, peak RSS."""

    def __init__(self, seconds: float, cpu: float, rss_kib: int) -> None:
        self.seconds = seconds
        self.cpu = cpu
        self.rss_kib = rss_kib


def run_once(receiver: Receiver, parts: list, sender: str, count: int,
             learn: bool = False) -> Run:
    """Start receiver, send parts with sender, time until all is out."""
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        port = free_port()
        out_path = os.path.join(workdir, "out")
        proc = receiver.start(workdir, port, out_path)
        try:
            wait_until(lambda: listening(port), 30,
                       "%s to listen" % receiver.name, proc)
            read_into_page_cache(parts)
            peer = subprocess.Popen(
                [sys.executable, SEND_PARTS, sender, str(port), *parts],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=user_env())
            try:
                if peer.stdout.readline() != b"ready\n":
                    raise SystemExit("bench: the sender did not connect")
                cpu = cpu_seconds(proc.pid)
                started = time.perf_counter()
                peer.stdin.write(b"go\n")
                peer.stdin.flush()
                if learn and receiver.expected is None:
                    learn_size(receiver, out_path, proc, peer, count)
                expected = receiver.expected
                wait_until(lambda: file_size(out_path) >= expected, 600,
                           "%s's output" % receiver.name, proc)
                run = Run(time.perf_counter() - started,
                          cpu_seconds(proc.pid) - cpu, memory_kib(proc.pid))
                if peer.returncode is None:
                    _, status, _ = os.wait4(peer.pid, 0)
                    peer.returncode = os.waitstatus_to_exitcode(status)
            finally:
                if peer.poll() is None:
                    peer.kill()
                    peer.wait()
                peer.stdin.close()
                peer.stdout.close()
            if receiver.syslog_ng:
                receiver.syslog_ng.check(workdir, count)
            if learn:
                check_output(receiver, out_path, parts, count)
        finally:
            stop(proc)
    return run


def learn_size(receiver: Receiver, out_path: str, proc, peer,
               count: int) -> None:
    """Wait for the warm-up's output to hold every event; keep its size."""
    # Only for syslog-ng's JSON, whose exact layout is syslog-ng's to say.
    peer.wait(600)
    wait_until(lambda: lines_in(out_path) >= count, 600,
               "%s's output" % receiver.name, proc)
    receiver.expected = file_size(out_path)


def lines_in(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def check_output(receiver: Receiver, out_path: str, parts: list,
                 count: int) -> None:
    """Fail loudly if the warm-up lost, added or broke an event."""
    with open(out_path, "rb") as f:
        out = f.read()
    sent = []
    for path in parts:
        with open(path, "rb") as f:
            sent.extend(f.read().splitlines())
    if receiver.format == "json":
        key = "MESSAGE" if receiver.syslog_ng else "event"
        got = [json.loads(line)[key].encode() for line in out.splitlines()]
    elif receiver.name == "tutorial":
        return  # its last events are still in its stdout buffer
    elif receiver.format == "text":
        got = out.splitlines()[1::2]
    else:
        got = out.splitlines()
    if receiver.prefixed:
        got = [line.split(b" ", 3)[3] for line in got]
    if sorted(got) != sorted(sent) or len(got) != count:
        raise SystemExit("bench: %s's output does not match the input"
                         % receiver.name)


# --- The rounds --------------------------------------------------------------

# Each ratio's two runs follow each other, so that both meet the same load
# from whatever else the machine runs.
PEER_ORDER = ("nc -l", "listener raw", "baseline raw",
              "listener raw --prefix", "bare loop", "syslog-ng raw", "socat",
              "tutorial", "listener text", "baseline text",
              "listener text --prefix", "syslog-ng json", "listener json",
              "baseline json")
SHOWN_ORDER = ("nc -l", "socat", "tutorial", "syslog-ng raw", "syslog-ng json",
               "bare loop", "baseline raw", "baseline text", "baseline json",
               "listener raw", "listener text", "listener json",
               "listener raw --prefix", "listener text --prefix")
# Over several connections: the listener, and the floor under it.
SCALED = ("bare loop", "listener raw", "listener text", "listener json")


def plan(found: list, parts: tuple) -> list:
    """Return every (receiver, sender, connections, table) run of a round."""
    runs = [(receiver, "sendfile", 1, "peers") for receiver in
            sorted(found, key=lambda r: PEER_ORDER.index(r.name))
            if "peers" in parts]
    for receiver in found:
        if receiver.name in SCALED and "connections" in parts:
            for sender in SENDERS:
                for conns in CONNECTIONS:
                    runs.append((receiver, sender, conns, "connections"))
    return runs


def bench_rounds(args, found: list, parts: dict, count: int) -> dict:
    runs = plan(found, args.parts)
    if not runs:
        return {}
    found = sorted({run[0] for run in runs}, key=lambda r: r.name)
    print("Warm-up: %d runs..." % len(found), file=sys.stderr)
    for receiver in found:
        run_once(receiver, parts[1], "sendfile", count, learn=True)
    results = {(r.name, s, c, t): [] for r, s, c, t in runs}
    for number in range(args.rounds):
        # Alternate the order, so that drift over a round favours no one.
        order = runs if number % 2 == 0 else runs[::-1]
        for receiver, sender, conns, table in order:
            results[(receiver.name, sender, conns, table)].append(
                run_once(receiver, parts[conns], sender, count))
        print("  round %d: %s" % (number + 1, "  ".join(
            "%s %.2f" % (label, value) for label, value in
            round_ratios(results, number))), file=sys.stderr)
    return results


def ratio(results: dict, a: tuple, b: tuple) -> list:
    """Throughput of a over b, round by round."""
    return [rb.seconds / ra.seconds for ra, rb in zip(results[a],
                                                      results[b])]


def round_ratios(results: dict, number: int) -> list:
    out = []
    for label, name, base, *_ in TARGETS + baseline_targets() + \
            prefix_ratios():
        a, b = (name, "sendfile", 1, "peers"), (base, "sendfile", 1, "peers")
        if a in results and b in results:
            out.append((label, ratio(results, a, b)[number]))
    for name in SCALED:
        for sender in SENDERS:
            for conns in CONNECTION_TARGETS:
                a = (name, sender, conns, "connections")
                b = (name, sender, 1, "connections")
                if a in results:
                    out.append(("%s %s %d/1" % (
                        name.replace("listener ", ""), sender, conns),
                        ratio(results, a, b)[number]))
    return out


def baseline_targets() -> list:
    return [("%s vs baseline" % fmt, "listener " + fmt, "baseline " + fmt,
             BASELINE_TARGET) for fmt in FORMATS]


def prefix_ratios() -> list:
    """Return (label, with --prefix, without) for --prefix's cost."""
    return [("%s --prefix vs without" % fmt, "listener %s --prefix" % fmt,
             "listener " + fmt) for fmt in PREFIXED]


def checkout(revision: str, workdir: str) -> str:
    """Write the listener as it was at a git revision; return its path."""
    try:
        source = subprocess.run(
            ["git", "-C", ROOT, "show",
             "%s:listen_events_cybertrace.py" % revision],
            capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit("bench: cannot get the listener at %s: %s" % (
            revision, getattr(exc, "stderr", b"").decode().strip() or exc))
    path = os.path.join(workdir, "baseline_listener.py")
    with open(path, "wb") as f:
        f.write(source)
    return path


# --- Memory, fairness and the sender -----------------------------------------

def bench_big_event(args, workdir: str) -> Run:
    """Time one 64 MiB event without a newline, cut into 1 MiB pieces."""
    path = os.path.join(workdir, "big-event")
    with open(path, "wb") as f:
        f.write(b"x" * BIG_EVENT)
    receiver = Receiver("big event", [args.python, LISTENER, "-q", "-l",
                                      "127.0.0.1:PORT", "-f", "raw"])
    receiver.expected = BIG_EVENT + BIG_EVENT // lec.MAX_EVENT_BYTES
    return run_once(receiver, [path], "sendfile", 1)


def bench_flood(args) -> int:
    """Return the listener's peak RSS in KiB under 512 peers x 1 MiB."""
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        port = free_port()
        out_path = os.path.join(workdir, "out")
        proc = Receiver("flood", [args.python, LISTENER, "-q", "-l",
                                  "127.0.0.1:PORT", "-f", "raw", "-o",
                                  os.devnull]).start(workdir, port, out_path)
        peers = []
        try:
            wait_until(lambda: listening(port), 30, "the listener", proc)
            send_unfinished(port, FLOOD_PEERS, b"x" * FLOOD_EVENT, 300,
                            peers)
            wait_until(lambda: unread_bytes(port) == 0, 300,
                       "the listener to read the flood", proc)
            rss = memory_kib(proc.pid)
        finally:
            for sock in peers:
                sock.close()
            stop(proc)
    return rss


def send_unfinished(port: int, count: int, event: bytes, seconds: float,
                    peers: list) -> None:
    """Connect count peers (into peers) and send event, without its
    newline, on each, all at once."""
    views = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        peers.append(sock)
        views.append(memoryview(event))
    deadline = time.monotonic() + seconds
    while any(views):
        if time.monotonic() > deadline:
            raise SystemExit("bench: sending the unfinished events timed "
                             "out")
        for number, sock in enumerate(peers):
            if views[number]:
                try:
                    views[number] = views[number][sock.send(views[number]):]
                except BlockingIOError:
                    pass


def closed_by_peer(sock: socket.socket) -> bool:
    """Tell whether the listener closed this (non-blocking) connection."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# 64 peers each holding 1 MiB of \x01 (6 bytes each in JSON) when their
# events time out, and nothing reads stdout: what waits to be written must
# stay within --max-buffer-bytes (64 MiB) too, not grow with JSON's escapes.
STALLED_PEERS = 64
STALLED_MIB = 3 * 64


def bench_stalled(args, script: str) -> int:
    """Return the peak RSS in KiB of the listener at script in -f json,
    its stdout a pipe nobody reads, when STALLED_PEERS peers' unfinished
    events of 1 MiB time out."""
    port = free_port()
    proc = subprocess.Popen(
        [args.python, script, "-q", "-l", "127.0.0.1:%d" % port, "-f",
         "json", "--event-timeout", "3"], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=user_env())
    peers = []
    try:
        wait_until(lambda: listening(port), 30, "the listener", proc)
        send_unfinished(port, STALLED_PEERS, b"\x01" * FLOOD_EVENT, 120,
                        peers)
        deadline = time.monotonic() + 120
        # The events time out 3 s after their first byte, and their
        # connections close; then the peak holds still once what can wait
        # is waiting.
        wait_until(lambda: all(closed_by_peer(sock) for sock in peers), 60,
                   "the events to time out", proc)
        peak, still = memory_kib(proc.pid), 0
        while still < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
            now = memory_kib(proc.pid)
            still = still + 1 if now == peak else 0
            peak = now
        return peak
    finally:
        for sock in peers:
            sock.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()


MARKERS = {"text": b"Received:\nsingle=event\n",
           "json": b'"event":"single=event"'}


def bench_latency(args, fmt: str, flood_path: str, samples: int = 5) -> list:
    """Return how long a single event took to be written during a flood."""
    delays = []
    for _ in range(samples):
        with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
            port = free_port()
            out_path = os.path.join(workdir, "out")
            proc = Receiver("latency", [args.python, LISTENER, "-q", "-l",
                                        "127.0.0.1:PORT", "-f", fmt, "-o",
                                        out_path]).start(workdir, port,
                                                         os.devnull)
            stop_flood = threading.Event()

            def flood():
                try:
                    with socket.create_connection(("127.0.0.1", port)) as s, \
                            open(flood_path, "rb") as f:
                        while not stop_flood.is_set():
                            s.sendfile(f, 0)
                except OSError:
                    pass
            thread = threading.Thread(target=flood)
            try:
                wait_until(lambda: listening(port), 30, "the listener", proc)
                thread.start()
                wait_until(lambda: file_size(out_path) > 16 << 20, 30,
                           "the flood", proc)
                watch = FileWatch(out_path, MARKERS[fmt])
                started = time.perf_counter()
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(b"single=event\n")
                    wait_until(watch.found, 60, "the single event", proc)
                delays.append(time.perf_counter() - started)
                if not thread.is_alive():
                    raise SystemExit("bench: the flood ended too soon")
            finally:
                stop_flood.set()
                stop(proc)
                thread.join(60)
    return delays


class FileWatch:
    """Find a marker in a growing file, reading each new byte once."""

    def __init__(self, path: str, marker: bytes) -> None:
        self.path = path
        self.offset = file_size(path)
        self.marker = marker
        self.tail = b""

    def found(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self.tail + f.read()
        self.offset += len(data) - len(self.tail)
        self.tail = data[-len(self.marker):]
        return self.marker in data


SINK = """
import socket, sys, time
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
while True:
    conn, _ = server.accept()
    size = conn.recv_into(buf)
    first = time.perf_counter()
    while True:
        got = conn.recv_into(buf)
        if not got:
            break
        size += got
    took = time.perf_counter() - first
    conn.close()
    print(size, took, flush=True)
"""


def bench_sender(args, data_path: str, tools: dict) -> dict:
    """Time the sender (and nc -N) streaming the file into a sink."""
    sink = subprocess.Popen([args.python, "-c", SINK], env=user_env(),
                            stdout=subprocess.PIPE)
    port = int(sink.stdout.readline())
    commands = {"sender": [args.python, SENDER, "-q", "-c",
                           "127.0.0.1:%d" % port, data_path]}
    if tools.get("nc"):
        commands["nc -N"] = [tools["nc"], "-N", "127.0.0.1", str(port)]
    size = os.path.getsize(data_path)
    times = {name: [] for name in commands}
    try:
        for _ in range(args.rounds):
            for name, argv in commands.items():
                read_into_page_cache([data_path])
                with open(data_path, "rb") as stdin:
                    started = time.perf_counter()
                    proc = subprocess.Popen(argv, stdin=stdin,
                                            env=user_env())
                    _, status, _ = os.wait4(proc.pid, 0)
                    whole = time.perf_counter() - started
                    proc.returncode = os.waitstatus_to_exitcode(status)
                got, steady = sink.stdout.readline().split()
                if proc.returncode or int(got) != size:
                    raise SystemExit("bench: %s delivered %s of %d bytes"
                                     % (name, got, size))
                times[name].append((whole, float(steady)))
    finally:
        sink.kill()
        sink.wait()
        sink.stdout.close()
    return times


# --- Ever-new shapes (-f json) -----------------------------------------------

def shapes_like(line: bytes, first: int, count: int) -> bytes:
    """Return count events of ever-new keys, as many "=" as line has: the
    plans a peer trying to slow -f json would make it build and keep."""
    filler = b" a=1" * (line.count(b"=") - 1)
    return b"".join(b"- k%d=1%s\n" % (number, filler)
                    for number in range(first, first + count))


def bench_hostile(args, data: bytes, rounds: int) -> dict:
    """Time -f json on data clean, after ever-new shapes, and during them;
    return {case: [seconds, ...]}."""
    last = data[data.rstrip(b"\n").rfind(b"\n") + 1:-1]
    first_line = data[:data.index(b"\n") + 1]
    times = {"clean": [], "after": [], "during": [], "look-alike": []}
    hostile_run(args, data, last, first_line, "clean")  # warm-up
    for number in range(rounds):
        cases = list(times) if number % 2 == 0 else list(times)[::-1]
        for case in cases:
            times[case].append(hostile_run(args, data, last, first_line,
                                           case))
        print("  hostile round %d: %s" % (number + 1, ", ".join(
            "%s %.2f" % (case, times["clean"][-1] / times[case][-1])
            for case in list(times)[1:])), file=sys.stderr)
    return times


def hostile_run(args, data: bytes, last: bytes, line: bytes,
                case: str) -> float:
    """Return the seconds a fresh listener takes to write data's events."""
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        port = free_port()
        out_path = os.path.join(workdir, "out")
        proc = Receiver("hostile", [args.python, LISTENER, "-q", "-l",
                                    "127.0.0.1:PORT", "-f", "json", "-o",
                                    out_path]).start(workdir, port,
                                                     os.devnull)
        stop_stream = threading.Event()
        stream = threading.Thread(target=hostile_stream, args=(
            port, line, stop_stream))
        try:
            wait_until(lambda: listening(port), 30, "the listener", proc)
            # The known templates come first, as from a CyberTrace that
            # was there before: the shapes then pile up in front of them.
            prelude = data[:data.index(b"\n", 200 * 1024) + 1]
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(prelude)
            count = prelude.count(b"\n")
            wait_until(lambda: lines_in(out_path) >= count, 60,
                       "the first events to be written", proc)
            if case == "after":
                for conn in range(HOSTILE_CONNECTIONS):
                    with socket.create_connection(("127.0.0.1", port)) as s:
                        s.sendall(shapes_like(line, conn * 4,
                                              HOSTILE_PER_CONNECTION))
                total = count + HOSTILE_CONNECTIONS * HOSTILE_PER_CONNECTION
                wait_until(lambda: lines_in(out_path) >= total, 120,
                           "the shapes to be written", proc)
            elif case == "during":
                stream.start()
            elif case == "look-alike":
                # The template's keys but the last, renamed: plans that
                # fail late, each sent alone to be a batch of its own.
                cut = line.rindex(b" ") + 1
                for number in range(3):
                    with socket.create_connection(("127.0.0.1", port)) as s:
                        s.sendall(line[:cut] + b"x%d" % number + line[cut:])
                wait_until(lambda: lines_in(out_path) >= count + 3, 60,
                           "the look-alikes to be written", proc)
            watch = FileWatch(out_path, b'"event":"%s"' % last)
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(data)
                wait_until(watch.found, 600, "the last event", proc)
            took = time.perf_counter() - started
        finally:
            stop_stream.set()
            if stream.is_alive():
                stream.join(60)
            stop(proc)
    return took


# --- One peer floods, another sends: fairness by cost ------------------------

FLOOD = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s, \\
        open(sys.argv[2], "rb") as f:
    print("ready", flush=True)
    try:
        while True:
            s.sendfile(f, 0)
    except OSError:
        pass
"""
# (case, format): each flood against the same format's flood of normal
# events: the victim's rate under it, and one event's delay.
FLOODS = (("normal events", "json"), ("ever-new shapes", "json"),
          ("look-alikes", "json"), ("14 KB lines of 128 keys", "json"),
          ("1 MiB events of k=v", "json"),
          ("normal events", "raw"), ("a\\n events", "raw"),
          ("bare \\n events", "raw"), ("normal events", "text"),
          ("a\\n events", "text"), ("bare \\n events", "text"))
FLOOD_BYTES = 4 << 20
FLOOD_SAMPLES = 5
# The victim under any flood, against under a flood of normal events.
FLOOD_TARGET = 0.5
FLOOD_LATENCY_MS = 10.0


def flood_data(case: str, data: bytes) -> bytes:
    """Return about FLOOD_BYTES of a flooding peer's events for a case."""
    lines = data[:data.index(b"\n", min(FLOOD_BYTES, len(data) - 1)) + 1] \
        .splitlines(True)
    if case == "normal events":
        return b"".join(lines)
    if case == "ever-new shapes":
        return shapes_like(lines[0], 0, FLOOD_BYTES // len(
            shapes_like(lines[0], 10 ** 6, 1)))
    if case == "look-alikes":
        # A template's keys but the last, renamed: plans that fail late.
        out = []
        for number, line in enumerate(lines):
            cut = line.rindex(b" ") + 1
            out.append(line[:cut] + b"x%d" % (number % 64) + line[cut:])
        return b"".join(out)
    if case.startswith("14 KB"):
        # Ever-new shapes of 128 keys of 100 bytes: the dearest plans.
        return b"".join(b"- " + b" ".join(
            (b"k%d_%d_" % (number, key)).ljust(100, b"x") + b"=1"
            for key in range(128)) + b"\n" for number in range(300))
    if case.startswith("1 MiB"):
        # As long as --max-event-bytes lets an event be, all fields.
        return (b"k=v " * (1 << 18) + b"\n") * 4
    if case.startswith("a"):
        return b"a\n" * (FLOOD_BYTES // 2)
    return b"\n" * FLOOD_BYTES


def flood_marker(fmt: str, event: bytes) -> bytes:
    """Return what shows event (no newline) in the output of fmt."""
    if fmt == "json":
        return b'"event":"%s"' % event
    if fmt == "text":
        return b"Received:\n%s\n" % event
    return b"\n%s\n" % event


def bench_floods(args, data: bytes, baseline: str, rounds: int) -> dict:
    """Time a victim peer's events and one event's delay while another
    peer floods, for each FLOODS case, today's listener and the
    baseline's in the same rounds; return {(who, case, fmt): [(seconds,
    [delays], events), ...]}."""
    listeners = {"listener": LISTENER}
    if baseline:
        listeners["baseline"] = baseline
    results = {(who, case, fmt): [] for who in listeners
               for case, fmt in FLOODS}
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        floods = {}
        for case, _ in FLOODS:
            if case not in floods:
                floods[case] = os.path.join(workdir, "flood-%d" % len(floods))
                with open(floods[case], "wb") as f:
                    f.write(flood_data(case, data))
        runs = [(who, case, fmt) for case, fmt in FLOODS
                for who in listeners]
        for number in range(rounds):
            for who, case, fmt in runs if number % 2 == 0 else runs[::-1]:
                results[(who, case, fmt)].append(flood_run(
                    args, listeners[who], fmt, floods[case], data))
            print("  flood round %d: %s" % (number + 1, ", ".join(
                "%s %s %s %.2f" % (who, fmt, case, ratio_list(
                    results, who, case, fmt)[-1])
                for who, case, fmt in runs if case != "normal events")),
                file=sys.stderr)
    return results


def ratio_list(results: dict, who: str, case: str, fmt: str) -> list:
    """The victim's rate under a case's flood over its rate under a flood
    of normal events, round by round."""
    return [normal[0] / flooded[0] for normal, flooded in zip(
        results[(who, "normal events", fmt)], results[(who, case, fmt)])]


def flood_run(args, listener: str, fmt: str, flood_path: str,
              data: bytes) -> tuple:
    """Return (seconds the victim's events took, [one event's delays],
    the victim's events) while a peer sends flood_path over and over."""
    size = len(data) // (25 if fmt == "json" else 2)
    victim = data[:data.index(b"\n", size) + 1]
    last = victim[victim.rstrip(b"\n").rfind(b"\n") + 1:-1]
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        port = free_port()
        out_path = os.path.join(workdir, "out")
        proc = Receiver("flood", [args.python, listener, "-q", "-l",
                                  "127.0.0.1:PORT", "-f", fmt, "-o",
                                  out_path]).start(workdir, port, os.devnull)
        flooder = None
        try:
            wait_until(lambda: listening(port), 30, "the listener", proc)
            flooder = subprocess.Popen(
                [args.python, "-c", FLOOD, str(port), flood_path],
                stdout=subprocess.PIPE, env=user_env())
            if flooder.stdout.readline() != b"ready\n":
                raise SystemExit("bench: the flooder did not connect")
            wait_until(lambda: file_size(out_path) > 1 << 20, 60,
                       "the flood", proc)
            watch = FileWatch(out_path, flood_marker(fmt, last))
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(victim)
                wait_until(watch.found, 600, "the victim's events", proc)
            took = time.perf_counter() - started
            delays = []
            for number in range(FLOOD_SAMPLES):
                event = b"single=event%d" % number
                watch = FileWatch(out_path, flood_marker(fmt, event))
                started = time.perf_counter()
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(event + b"\n")
                    wait_until(watch.found, 60, "the single event", proc)
                delays.append(time.perf_counter() - started)
            if flooder.poll() is not None:
                raise SystemExit("bench: the flood ended too soon")
        finally:
            if flooder is not None:
                flooder.kill()
                flooder.wait()
                flooder.stdout.close()
            stop(proc)
    return took, delays, victim.count(b"\n")


def hostile_stream(port: int, line: bytes, stop_stream) -> None:
    """Send ever-new shapes, 100 every 50 ms, until told to stop."""
    number = 10 ** 6
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            while not stop_stream.wait(0.05):
                s.sendall(shapes_like(line, number, 100))
                number += 100
    except OSError:
        pass


# --- -f json on each template ------------------------------------------------

TEMPLATES = (("key=value", "kv"), ("CEF", "cef"))
TEMPLATE_BYTES = {}  # template label: bytes of its events


def bench_templates(args, baseline: str, kv: bytes, cef: bytes,
                    workdir: str, count: int) -> dict:
    """Time -f json on key=value events and on CEF events, today's listener
    and (with --baseline) the one at that revision, in the same rounds;
    return {(listener, template): [seconds, ...]}."""
    found = []
    for label, short in TEMPLATES:
        data = kv if short == "kv" else cef
        TEMPLATE_BYTES[label] = len(data)
        folder = os.path.join(workdir, "templates-" + short)
        os.mkdir(folder)
        path = write_parts(data, folder)[1]
        for who, script in (("listener", LISTENER), ("baseline", baseline)):
            if script is None:
                continue
            receiver = Receiver("%s json" % who, [
                args.python, script, "-q", "-l", "127.0.0.1:PORT", "-f",
                "json"], "json")
            receiver.expected = expected_size(receiver, data, count)
            found.append((who, label, receiver, path))
    print("Warm-up: %d runs of -f json on each template..." % len(found),
          file=sys.stderr)
    for _, _, receiver, path in found:
        run_once(receiver, path, "sendfile", count, learn=True)
    times = {(who, label): [] for who, label, _, _ in found}
    for number in range(args.rounds):
        order = found if number % 2 == 0 else found[::-1]
        for who, label, receiver, path in order:
            times[(who, label)].append(
                run_once(receiver, path, "sendfile", count).seconds)
        print("  templates round %d: %s" % (number + 1, "  ".join(
            "%s %.2f" % (name, values[-1]) for name, values in
            template_ratios(times).items())), file=sys.stderr)
    return times


def template_ratios(times: dict) -> dict:
    """Return {label: [throughput ratio per round]} for the templates."""
    out = {}

    def per(a, b):
        return [tb / ta for ta, tb in zip(times[a], times[b])]
    for label, _ in TEMPLATES:
        if ("baseline", label) in times:
            out["%s vs baseline" % label] = per(("listener", label),
                                                ("baseline", label))
    out["CEF vs key=value"] = per(("listener", "CEF"),
                                  ("listener", "key=value"))
    if ("baseline", "CEF") in times:
        out["baseline CEF vs key=value"] = per(("baseline", "CEF"),
                                               ("baseline", "key=value"))
    return out


# --- Report ------------------------------------------------------------------

def median(values) -> float:
    return statistics.median(values)


def each(values) -> str:
    return " ".join("%.2f" % v for v in values)


def spread(values, unit: str = "{:,.0f}") -> str:
    """Return the median of values with their range: "3,950,417
    (3,512,000-4,101,113)"."""
    return "%s (%s-%s)" % (unit.format(median(values)), unit.format(
        min(values)), unit.format(max(values)))


def report(args, data: bytes, count: int, tools: dict, missing: dict,
           results: dict, big: Run, flood_kib: int, delays: dict,
           send: dict, hostile: dict, templates: dict = None,
           floods: dict = None, stalled: dict = None) -> int:
    """Print the tables (those of the parts that ran) and the targets;
    return 1 if a target is missed."""
    size = len(data)
    one = {key[0]: runs for key, runs in sorted(
        results.items(), key=lambda item: SHOWN_ORDER.index(item[0][0]))
        if key[3] == "peers"}
    lines = []
    out = lines.append
    out("%s events of %d bytes on average (%.0f MB); %s, %d cores; Python %s"
        "%s; %d rounds, median (each round's ratio in brackets)%s." % (
            "{:,}".format(count), size // count, size / 1e6,
            os.uname().machine, os.cpu_count(), sys.version.split()[0],
            "; " + tools["syslog-ng"].version if tools.get("syslog-ng")
            else "", args.rounds, "; baseline: the listener at %s"
            % args.baseline if args.baseline else ""))
    out("")
    if one:
        out("One connection, sendfile sender, every peer on the same data:")
        out("")
        bases = [base for base in ("nc -l", "tutorial", "syslog-ng json",
                                   "syslog-ng raw") if base in one]
        columns = bases + (["baseline"] if args.baseline else [])
        out("| receiver | events/s (min-max) | MB/s | receiver CPU | %s | "
            "peak RSS |" % " | ".join("vs " + base for base in columns))
        out("| --- | ---: | ---: | ---: |%s ---: |"
            % (" ---: |" * len(columns)))
        for name, runs in one.items():
            best = median([r.seconds for r in runs])
            cells = []
            for base in bases:
                per = ratio(results, (name, "sendfile", 1, "peers"),
                            (base, "sendfile", 1, "peers"))
                cells.append("%.2f (%s)" % (median(per), each(per)))
            if args.baseline:
                base = "baseline " + name.split()[-1]
                if name.startswith("listener") and base in one:
                    per = ratio(results, (name, "sendfile", 1, "peers"),
                                (base, "sendfile", 1, "peers"))
                    cells.append("%.2f (%s)" % (median(per), each(per)))
                else:
                    cells.append("")
            out("| %s | %s | %.0f | %.2f s | %s | %.1f MiB |" % (
                name, spread([count / r.seconds for r in runs]),
                size / best / 1e6,
                median([r.cpu for r in runs]), " | ".join(cells),
                max(r.rss_kib for r in runs) / 1024))
        out("")
        costs = []
        for label, name, base in prefix_ratios():
            if name in one and base in one:
                per = ratio(results, (name, "sendfile", 1, "peers"),
                            (base, "sendfile", 1, "peers"))
                costs.append("`-f %s` %.2f (%s)" % (label.split()[0],
                                                   median(per), each(per)))
        if costs:
            out("`--prefix %s` against no prefix, same format, throughput: "
                "%s." % (PREFIX, ", ".join(costs)))
            out("")
    if "connections" in args.parts:
        out("The listener over several connections, and the bare loop (no "
            "work but recv_into and write) as the floor under it: events/s "
            "with the receiver's CPU time, and throughput against one "
            "connection with the same sender:")
        out("")
        out("| receiver | sender | 1 connection | 8 connections | 8 vs 1 "
            "| 64 connections | 64 vs 1 |")
        out("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for name in SCALED:
            for sender in SENDERS:
                cells = []
                for conns in CONNECTIONS:
                    runs = results[(name, sender, conns, "connections")]
                    cells.append("{} ({:.2f} s)".format(
                        spread([count / r.seconds for r in runs]),
                        median([r.cpu for r in runs])))
                    if conns != 1:
                        per = ratio(results,
                                    (name, sender, conns, "connections"),
                                    (name, sender, 1, "connections"))
                        cells.append("%.2f (%s)" % (median(per), each(per)))
                out("| %s | %s | %s |" % (name, sender, " | ".join(cells)))
        out("")
    if hostile:
        out("`-f json` on the same events from one peer: clean; after %s "
            "short connections sent %s events of ever-new shapes; while "
            "another peer sends 2,000 such events a second; and after 3 "
            "events each of a shape that has a template's keys but the "
            "last:" % (
                "{:,}".format(HOSTILE_CONNECTIONS), "{:,}".format(
                    HOSTILE_CONNECTIONS * HOSTILE_PER_CONNECTION)))
        out("")
        out("| case | events/s (min-max) | vs clean |")
        out("| --- | ---: | ---: |")
        for case, label in (("clean", "clean"),
                            ("after", "after ever-new shapes"),
                            ("during", "during ever-new shapes"),
                            ("look-alike", "after 3 look-alike shapes")):
            per = [c / t for c, t in zip(hostile["clean"], hostile[case])]
            out("| %s | %s | %.2f (%s) |" % (
                label, spread([count / t for t in hostile[case]]),
                median(per), each(per)))
        out("")
    if floods:
        report_floods(out, floods)
    if templates:
        out("`-f json` on key=value events (the tutorial's detections) and "
            "on CEF events (Kaspersky's ArcSight templates, with escapes), "
            "as many, one connection, in the same rounds:")
        out("")
        out("| listener | template | events/s | MB/s |")
        out("| --- | --- | ---: | ---: |")
        for (who, label), runs in templates.items():
            out("| %s | %s | %s | %.0f |" % (
                "today's" if who == "listener" else "baseline", label,
                "{:,.0f}".format(count / median(runs)),
                TEMPLATE_BYTES[label] / median(runs) / 1e6))
        out("")
        out("| ratio (throughput) | median (each round) |")
        out("| --- | ---: |")
        for label, per in template_ratios(templates).items():
            out("| %s | %.2f (%s) |" % (label, median(per), each(per)))
        out("")
    also = []
    if big is not None:
        also.append("| listener, one 64 MiB event without a newline: time, "
                    "peak RSS (median of %d, min-max) | %s s, %s MiB |" % (
                        len(big), spread([r.seconds for r in big], "{:.3f}"),
                        spread([r.rss_kib / 1024 for r in big], "{:.1f}")))
        also.append("| listener peak RSS, %d peers each sending 1 MiB "
                    "without a newline (median of %d, min-max) | %s MiB |" % (
                        FLOOD_PEERS, len(flood_kib), spread(
                            [kib / 1024 for kib in flood_kib], "{:.1f}")))
    for who, peaks in (stalled or {}).items():
        also.append("| %s peak RSS, `-f json`, %d peers' 1 MiB of `\\x01` "
                    "timed out while stdout takes nothing (median of %d, "
                    "min-max) | %s MiB |" % (who, STALLED_PEERS, len(peaks),
                                             spread([kib / 1024 for kib in
                                                     peaks], "{:.1f}")))
    for fmt, times in (delays or {}).items():
        also.append("| `-f %s`: one event's delay while another peer floods "
                    "(median of %d) | %.1f ms (%s) |" % (
                        fmt, len(times), median(times) * 1000,
                        " ".join("%.1f" % (d * 1000) for d in times)))
    for name, runs in (send or {}).items():
        also.append("| %s, file to a sink: whole process / steady state at "
                    "the sink (median of %d, min-max) | %s s / %s MB/s |" % (
                        "the sender" if name == "sender" else "`nc -N`",
                        len(runs), spread([w for w, _ in runs], "{:.3f}"),
                        spread([size / s / 1e6 for _, s in runs])))
    if also:
        lines.extend(["| also measured | |", "| --- | --- |"] + also + [""])
    for problem in missing.values():
        out("Left out: %s." % problem)
    if missing:
        out("")
    print("\n".join(lines))
    checks = targets(args, results, one, big, flood_kib, hostile,
                     templates) + flood_targets(floods or {})
    if stalled:
        rss = max(stalled["listener"]) / 1024
        checks.append(("peak RSS, %d x 1 MiB timed out, stdout stalled"
                       % STALLED_PEERS, "%.1f MiB" % rss,
                       "< %d MiB" % STALLED_MIB, rss < STALLED_MIB))
    print("Targets:")
    print()
    print("```")
    for label, value, target, ok in checks:
        print("%-6s  %-42s %10s  (%s)" % ("met" if ok else "MISSED", label,
                                          value, target))
    print("```")
    return 0 if all(ok for *_, ok in checks) else 1


def targets(args, results: dict, one: dict, big: Run, flood_kib: int,
            hostile: dict, templates: dict = None) -> list:
    """Return (label, value, target, met) for each goal of what ran."""
    checks = []
    for label, name, base, target in TARGETS + (
            baseline_targets() if args.baseline else []):
        if name not in one:
            continue
        if base in one:
            per = ratio(results, (name, "sendfile", 1, "peers"),
                        (base, "sendfile", 1, "peers"))
            checks.append((label, "%.2f" % median(per), ">= %.2f" % target,
                           median(per) >= target))
        else:
            checks.append((label, "n/a", "%s missing" % base, False))
    if "connections" in args.parts:
        for fmt in FORMATS:
            for sender in SENDERS:
                for conns, target in CONNECTION_TARGETS.items():
                    name = "listener " + fmt
                    value = median(ratio(
                        results, (name, sender, conns, "connections"),
                        (name, sender, 1, "connections")))
                    checks.append(("%s, %s, %d vs 1 connection" % (
                        fmt, sender, conns), "%.2f" % value,
                        ">= %.1f" % target, value >= target))
    for fmt in FORMATS:
        if "listener " + fmt in one:
            rss = max(r.rss_kib for r in one["listener " + fmt]) / 1024
            checks.append(("peak RSS, one stream, " + fmt, "%.1f MiB" % rss,
                           "< %d MiB" % RSS_ONE_STREAM_MIB,
                           rss < RSS_ONE_STREAM_MIB))
    if big is not None:
        seconds = median([r.seconds for r in big])
        rss = max(r.rss_kib for r in big) / 1024
        checks.append(("one 64 MiB event", "%.3f s, %.1f MiB" % (
            seconds, rss), "< %.1f s, < %d MiB" % (
                BIG_EVENT_SECONDS, RSS_ONE_STREAM_MIB),
            seconds < BIG_EVENT_SECONDS and rss < RSS_ONE_STREAM_MIB))
        rss = max(flood_kib) / 1024
        checks.append(("peak RSS, %d x 1 MiB without newline" % FLOOD_PEERS,
                       "%.1f MiB" % rss, "< %d MiB" % RSS_FLOOD_MIB,
                       rss < RSS_FLOOD_MIB))
    if hostile:
        for case in ("after", "during", "look-alike"):
            value = median([c / t for c, t in zip(hostile["clean"],
                                                  hostile[case])])
            checks.append(("json, %s hostile shapes, vs clean" % case,
                           "%.2f" % value, ">= %.1f" % HOSTILE_TARGET,
                           value >= HOSTILE_TARGET))
    if templates and ("baseline", "key=value") in templates:
        value = median(template_ratios(templates)["key=value vs baseline"])
        checks.append(("json on key=value events vs baseline",
                       "%.2f" % value, ">= %.2f" % BASELINE_TARGET,
                       value >= BASELINE_TARGET))
    return checks


def report_floods(out, floods: dict) -> None:
    """Print the victim's rate and one event's delay under each flood."""
    old = any(who == "baseline" for who, _, _ in floods)
    out("One peer floods (`sendfile` of the same file over and over) while "
        "a victim sends half the benchmark's events (a 25th in `json`) on "
        "one connection: the victim's events/s, its rate against under a "
        "flood of normal events in the same format (each round's in "
        "brackets), and one event's delay on a new connection (median and "
        "max, %d a round)%s:" % (FLOOD_SAMPLES, ", beside the baseline in "
                                 "the same rounds" if old else ""))
    out("")
    out("| flood | format | victim events/s | vs normal flood | delay |%s"
        % (" baseline: vs normal flood | baseline: delay |" if old else ""))
    out("| --- | --- | ---: | ---: | ---: |%s" % (" ---: | ---: |" if old
                                                else ""))
    for case, fmt in FLOODS:
        cells = []
        for who in ("listener", "baseline") if old else ("listener",):
            runs = floods[(who, case, fmt)]
            per = ratio_list(floods, who, case, fmt)
            delays = [d for _, ds, _ in runs for d in ds]
            if who == "listener":
                cells.append("{:,.0f}".format(median(
                    [events / t for t, _, events in runs])))
            cells.append("%.2f (%s)" % (median(per), each(per)))
            cells.append("%.1f ms, %.1f" % (median(delays) * 1000,
                                            max(delays) * 1000))
        out("| %s | %s | %s |" % (case, fmt, " | ".join(cells)))
    out("")


def flood_targets(floods: dict) -> list:
    """Return (label, value, target, met) for the victim under floods."""
    checks = []
    for case, fmt in FLOODS:
        if case == "normal events" or ("listener", case, fmt) not in floods:
            continue
        value = median(ratio_list(floods, "listener", case, fmt))
        checks.append(("%s, victim under %s" % (fmt, case), "%.2f" % value,
                       ">= %.1f" % FLOOD_TARGET, value >= FLOOD_TARGET))
        delay = median([d for _, ds, _ in floods[("listener", case, fmt)]
                        for d in ds]) * 1000
        checks.append(("%s, one event's delay under %s" % (fmt, case),
                       "%.1f ms" % delay, "< %g ms" % FLOOD_LATENCY_MS,
                       delay < FLOOD_LATENCY_MS))
    return checks


def parts_list(text: str) -> tuple:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise argparse.ArgumentTypeError("choose from %s" % ",".join(PARTS))
    return parts


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Progress goes to stderr, the report (Markdown) to stdout.")
    parser.add_argument("-n", "--count", type=int,
                        help="events per run (default: 500000; --quick: "
                        "100000)")
    parser.add_argument("--runs", "--rounds", dest="rounds", type=int,
                        metavar="N",
                        help="run every case N times, in rounds of "
                        "alternating order; each figure is the median, with "
                        "the min-max or each round's ratio (default: 5; "
                        "--quick: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer events and rounds, for iteration; the "
                        "README's table comes from a full run")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the Python receivers")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the listener as it was at this git "
                        "revision, in every format, in the same rounds")
    parser.add_argument("--parts", type=parts_list, default=PARTS,
                        help="what to measure, of %s (default: all)"
                        % ",".join(PARTS))
    args = parser.parse_args(argv)
    count = args.count or (100000 if args.quick else 500000)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if not os.path.exists("/proc/self/stat"):
        parser.error("needs Linux: it reads CPU time and RSS from /proc")
    missing = {}
    tools = {"nc": find_tool("nc", "netcat-openbsd", missing),
             "socat": find_tool("socat", "socat", missing),
             "syslog-ng": SyslogNg.fetch(missing)
             if "peers" in args.parts else None}
    for problem in missing.values():
        print("bench: %s; left out." % problem, file=sys.stderr)
    if tools["nc"]:
        global SENDERS
        SENDERS += ("nc",)
    print("Generating %s events..." % "{:,}".format(count), file=sys.stderr)
    data = make_events(count)
    big = flood_kib = delays = send = hostile = templates = floods = None
    stalled = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        parts = write_parts(data, workdir)
        baseline = checkout(args.baseline, workdir) if args.baseline \
            else None
        found = receivers(tools, args.python, baseline)
        for receiver in found:
            receiver.expected = expected_size(receiver, data, count)
        results = bench_rounds(args, found, parts, count)
        if "memory" in args.parts:
            print("One 64 MiB event...", file=sys.stderr)
            big = [bench_big_event(args, workdir)
                   for _ in range(args.rounds)]
            print("Flood of %d peers x 1 MiB..." % FLOOD_PEERS,
                  file=sys.stderr)
            flood_kib = [bench_flood(args) for _ in range(args.rounds)]
            print("%d peers x 1 MiB timed out, stdout stalled..."
                  % STALLED_PEERS, file=sys.stderr)
            stalled = {who: [bench_stalled(args, script)
                             for _ in range(args.rounds)]
                       for who, script in (("listener", LISTENER),
                                           ("baseline", baseline))
                       if script}
        if "latency" in args.parts:
            print("One event during a flood...", file=sys.stderr)
            delays = {fmt: bench_latency(args, fmt, parts[1][0],
                                         args.rounds) for fmt in MARKERS}
        if "sender" in args.parts:
            print("The sender...", file=sys.stderr)
            send = bench_sender(args, parts[1][0], tools)
        if "hostile" in args.parts:
            print("-f json and ever-new shapes...", file=sys.stderr)
            hostile = bench_hostile(args, data, args.rounds)
        if "floods" in args.parts:
            print("A victim peer beside a flooding one...", file=sys.stderr)
            floods = bench_floods(args, data, baseline, args.rounds)
        if "templates" in args.parts:
            print("-f json on each template...", file=sys.stderr)
            templates = bench_templates(args, baseline, data,
                                        make_cef_events(count), workdir,
                                        count)
    return report(args, data, count, tools, missing, results, big, flood_kib,
                  delays, send, hostile, templates, floods, stalled)


if __name__ == "__main__":
    sys.exit(main())
