#!/usr/bin/env python3
"""A stand-in for Kaspersky CyberTrace, to try the tools without one.

    python3 fake_cybertrace.py [--input ADDR:PORT] [--output ADDR:PORT]
                               [--demo-feeds | --detect-all | --no-feeds]

It takes events on its input port (default 127.0.0.1:9999) and delivers
its detections to its output address (default 127.0.0.1:9998), where
listen_events_cybertrace.py or send_events_cybertrace.py --check listens,
speaking CyberTrace's event protocol:

- A connection may start with flags, glued together with no separator:
  X-KF-ReplyBack sends the detections back on that connection instead of
  to the output; X-KF-SendFinishedEvent adds one LookupFinished event after
  the detections of each event; X-KF-SaveStatistic is accepted.
  X-KF-ReplyBackPING is answered with PONG.
- Events are lines ending with \\n (a \\r before it is ignored); a line
  over 64 KiB is taken as several events, as CyberTrace splits them.
- A detection uses the default detection template: the event's date, then
  category, matchedIndicator, url, src, ip, md5, sha1, sha256 and usrName,
  then the indicator's context.
- A failed delivery to the output is tried again 3 times, 10 s apart;
  while the output is down, at most 16 MiB of detections wait, the oldest
  dropped first.
- On start, a KL_ALERT_ServiceStarted service alert goes to the output.

It detects the 17 indicators Kaspersky keeps for tests (--detect-all), by
default only the 3 of them that the demo feeds carry (--demo-feeds), or
none (--no-feeds: feeds not loaded).  Status goes to stderr; Ctrl+C stops.
It serves 128 connections at once (with all taken, the one silent longest
gives its place; none is closed for being idle) and rides out running out
of file descriptors.  --eps, --scanners and --lookup-ms give it a
capacity.  The tests import FakeCyberTrace to run it in-process on a free
port.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterable, Optional

try:
    import listen_events_cybertrace as lec
except ModuleNotFoundError as exc:
    if exc.name != "listen_events_cybertrace":
        raise
    # Copied alone, without the module it shares its code with.
    sys.exit("%s: error: listen_events_cybertrace.py must be in the same "
             "folder (it holds the framing)"
             % os.path.basename(sys.argv[0] or "fake_cybertrace.py"))

INPUT = ("127.0.0.1", 9999)
OUTPUT = ("127.0.0.1", 9998)
RETRIES = 3
RETRY_INTERVAL = 10.0
FLAGS = (b"X-KF-SendFinishedEvent", b"X-KF-ReplyBack", b"X-KF-SaveStatistic")
PING = b"PING"  # only right after X-KF-ReplyBack
# CyberTrace splits inbound events over 64 KB: so does the stand-in, which
# keeps what one connection holds small.
INBOUND_EVENT_BYTES = 64 * 1024
MAX_CLIENTS = 128
# CyberTrace documents no idle timeout, so none by default: with every place
# taken, the connection silent longest gives its place to a new one, as
# nginx frees keep-alive connections when out of them.
IDLE_TIMEOUT = None
# With --noise, how long a connection's events wait for its alert to be sent.
NOISE_WAIT = 2.0
# Detections waiting for an output that is down, at most.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
# With the output down and peers sending, every batch fails: so many lines
# about it a window, then a count, as the listener's Rejected lines.
FAILURE_LINES = 5
FAILURE_WINDOW = 10.0
# With --eps or --lookup-ms, at most so many events wait for a lookup, all
# connections together; past it they are dropped and counted, as CyberTrace
# drops events over its EPSLimit.
MAX_WAITING = 10000
# Status lines, to stderr while it is there.
CONSOLE = lec.Console()

# The test indicators and the category of the feed that has each.
INDICATORS = {
    "http://fakess123.nu": "KL_Malicious_URL",
    "http://fakess123ap.nu": "KL_Phishing_URL",
    "http://fakess123r.nu": "KL_Ransomware_URL",
    "http://a7396d61caffe18a4cffbb3b428c9b60.com": "KL_BotnetCnC_URL",
    "http://5a015004f9fc05290d87e86d69c4b237.com": "KL_BotnetCnC_URL",
    "http://b046f5b25458638f6705d53539c79f62.com": "KL_APT_URL",
    "http://e593461621ee0f9134c632d00bf108fd.com/.i": "KL_IoT_URL",
    "192.0.2.0": "KL_IP_Reputation",
    "192.0.2.1": "KL_IP_Reputation",
    "192.0.2.4": "KL_APT_IP",
    "C912705B4BBB14EC7E78FA8B370532C9": "KL_Malicious_Hash_MD5",
    "776735A8CA96DB15B422879DA599F474": "KL_Malicious_Hash_MD5",
    "7A2E65A0F70EE0615EC0CA34240CF082": "KL_APT_Hash",
    "60300A92E1D0A55C7FDD360EE40A9DC1": "KL_Mobile_Malicious_Hash",
    "001F6251169E6916C455495050A3FB8D": "KL_Mobile_BotnetCnC_Hash",
    "D8C1F5B4AD32296649FF46027177C594": "KL_Vulnerable_File_Hash",
    "7A8F30B40C6564EFF95E678F7C43346C": "KL_ICS_Hash",
}
DEMO_FEEDS = ("192.0.2.1", "776735A8CA96DB15B422879DA599F474",
              "http://5a015004f9fc05290d87e86d69c4b237.com")
# What --noise adds to each connection's deliveries, as a busy site would:
# an alert, and the detection of an event someone else sent.
NOISE = ("%s alert=KL_ALERT_UpdatedFeed "
         "feed=Demo_Botnet_CnC_URL_Data_Feed.json records=200",
         "- category=KL_IP_Reputation matchedIndicator=192.0.2.10 url=- "
         "src=198.51.100.9 ip=192.0.2.10 md5=- sha1=- sha256=- usrName=- "
         "confidence=100 first_seen=01.01.2017 00:00 popularity=1")

_INDICATOR = re.compile(
    r"(?<![\w.])(%s)(?![\w.])" % "|".join(
        re.escape(i) for i in sorted(INDICATORS, key=len, reverse=True)),
    re.IGNORECASE)
_CANONICAL = {i.lower(): i for i in INDICATORS}
_DATE = re.compile(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d")
_FIELD = re.compile(r"(?:^| )(url|src|dst|ip|md5|usrName)=(\S+)")


# Flags are a few bytes; past so many of them the rest is taken as events,
# so that a flood of flags costs no more than one of events.
MAX_FLAG_BYTES = 4096


def read_flags(sock: socket.socket) -> tuple:
    """Return (flags, bytes after them) from the start of a connection;
    a flag given again is kept once."""
    buf = bytearray()
    start = 0  # of what is not yet a flag
    flags = []
    while True:
        last = flags[-1] if flags else None
        if last == b"X-KF-ReplyBack" and buf.startswith(PING, start):
            flags.append(PING)
            return flags, bytes(buf[start + len(PING):])
        token = next((f for f in FLAGS if buf.startswith(f, start)), None)
        if token is not None and start < MAX_FLAG_BYTES:
            if token in flags:
                flags.remove(token)  # kept once, where last given
            flags.append(token)
            start += len(token)
            continue
        rest = bytes(buf[start:])
        wanted = FLAGS + ((PING,) if last == b"X-KF-ReplyBack" else ())
        if start >= MAX_FLAG_BYTES or rest and not any(
                w.startswith(rest) for w in wanted):
            return flags, rest
        data = sock.recv(65536)
        if not data:
            return flags, rest
        del buf[:start]
        start = 0
        buf += data


def now_date() -> str:
    """Return the time as CyberTrace's %Date%: Apr 16 09:05:41."""
    return time.strftime("%b %d %H:%M:%S")


def detections(event: str, detect: Iterable[str] = INDICATORS) -> list:
    """Return the detection events CyberTrace would send for event."""
    date = _DATE.match(event)
    fields = dict(_FIELD.findall(event))
    found = []
    for match in _INDICATOR.finditer(event):
        indicator = _CANONICAL[match.group(1).lower()]
        if indicator not in detect:
            continue
        kind = "url" if indicator.startswith("http") else \
            "ip" if "." in indicator else "md5"
        values = {"url": fields.get("url", "-"),
                  "ip": fields.get("dst", fields.get("ip", "-")),
                  "md5": fields.get("md5", "-")}
        values[kind] = indicator
        found.append(
            "%s category=%s matchedIndicator=%s url=%s src=%s ip=%s md5=%s "
            "sha1=- sha256=- usrName=%s confidence=100 first_seen=10.07.2015 "
            "23:53 last_seen=14.07.2020 13:35 popularity=1"
            % (date.group(0) if date else "-", INDICATORS[indicator],
               indicator, values["url"], fields.get("src", "-"), values["ip"],
               values["md5"], fields.get("usrName", "-")))
    return found


def finished_event(found: list) -> str:
    """Return the LookupFinished event that closes one event's answer."""
    totals = {}
    for detection in found:
        category = detection.split("category=")[1].split()[0]
        totals[category] = totals.get(category, 0) + 1
    return "eventName=LookupFinished sent_events=%d total=%s" % (
        len(found), "".join("%s:%d;" % item for item in totals.items()))


class Delivery:
    """Send events to the output address, trying a failed batch again.

    One connection is kept while it works; a batch that cannot be sent is
    tried again `retries` times, `interval` seconds apart, while newer
    batches go out at once.
    """

    def __init__(self, address: tuple, retries: int, interval: float,
                 status: Callable[[str], None]) -> None:
        self.address = address
        self.where = lec.format_address(*address)
        self.retries = retries
        self.interval = interval
        self.status = status
        self.failures = lec.Throttle(status, FAILURE_LINES, FAILURE_WINDOW,
                                     say_failures)
        # Drops too: a flood to a down output dropped a line's worth a
        # batch, hundreds of lines a second.  Pushed from every connection's
        # thread, hence the lock.
        self.drops = lec.Throttle(status, FAILURE_LINES, FAILURE_WINDOW,
                                  self.say_drops)
        self.drops_lock = threading.Lock()
        self.sock = None
        # Heap of [when due, order first queued, data, attempts so far].
        self.queue = []
        # The same entries by when first queued, for drops, as (order,
        # attempts, entry): a dropped entry's data becomes None and the run
        # loop skips it (no search, no heapify of the queue).
        self.ages = []
        self.live = 0  # entries neither sent nor dropped
        self.queued = 0  # bytes in the queue
        self.order = itertools.count()
        self.delivered = self.dropped = self.given_up = 0
        self.sending = False  # a batch is out of the queue, being sent
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def put(self, lines: list) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        self.push(time.monotonic(), data, 0, next(self.order))

    def push(self, due: float, data: bytes, attempts: int,
             order: int) -> None:
        """Queue data, first queued as number order; past
        MAX_QUEUED_BYTES, drop the oldest first."""
        with self.cond:
            entry = [due, order, data, attempts]
            heapq.heappush(self.queue, entry)
            # A retry is as old as its first try: a batch that just failed
            # must not be the first to go (it kept the oldest 16 MiB).
            heapq.heappush(self.ages, (order, attempts, entry))
            self.live += 1
            self.queued += len(data)
            dropped = 0
            while self.queued > MAX_QUEUED_BYTES and len(self.ages) > 1:
                oldest = heapq.heappop(self.ages)[2]
                if oldest[2] is None:
                    continue  # sent already
                self.queued -= len(oldest[2])
                dropped += oldest[2].count(b"\n")
                oldest[2] = None
                self.live -= 1
            self.dropped += dropped
            self.compact()
            # The sending thread, and any wait_sent(), wait on it.
            self.cond.notify_all()
        if dropped:
            with self.drops_lock:
                self.drops.say("dropped", "dropped %s for %s: %s wait "
                               "already" % (lec.plural(dropped, "event"),
                                            self.where,
                                            lec.format_bytes(
                                                MAX_QUEUED_BYTES)),
                               dropped)

    def compact(self) -> None:
        """Rebuild both heaps without what was sent or dropped, once that
        is most of them (under the lock)."""
        # Each stays until it comes up: a dropped retry until due (an hour
        # with --retry-interval 3600), a sent batch while an older retry
        # waits, hundreds a second in a flood.  Rebuilt only past 4 times
        # the live entries: O(1) amortised.
        if len(self.queue) + len(self.ages) <= 4 * self.live + 1024:
            return
        self.queue = [entry for entry in self.queue if entry[2] is not None]
        heapq.heapify(self.queue)
        self.ages = [age for age in self.ages if age[2][2] is not None]
        heapq.heapify(self.ages)

    def say_drops(self, counts: dict, seconds: float) -> str:
        return "%s dropped for %s (%s wait already) in the last %s (not " \
            "shown one by one)" % (
                lec.plural(counts["dropped"], "more event"), self.where,
                lec.format_bytes(MAX_QUEUED_BYTES),
                lec.format_duration(seconds))

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and (
                        not self.queue or
                        self.queue[0][0] > time.monotonic()):
                    self.cond.wait(self.queue[0][0] - time.monotonic()
                                   if self.queue else None)
                if self.closed:
                    return
                entry = heapq.heappop(self.queue)
                _, order, data, attempts = entry
                if data is None:
                    continue  # dropped for newer ones
                entry[2] = None
                self.live -= 1
                self.queued -= len(data)
                while self.ages and self.ages[0][2][2] is None:
                    heapq.heappop(self.ages)
                self.sending = True
            try:
                self.settle(data, attempts, order)
            finally:
                with self.cond:
                    self.sending = False
                    self.cond.notify_all()

    def settle(self, data: bytes, attempts: int, order: int) -> None:
        """Send a batch; count it, or queue its retry, or give it up."""
        error = self.send(data)
        events = data.count(b"\n")
        if error is None:
            self.delivered += events
            self.failures.flush()
            if attempts:
                self.status("delivered %s to %s on retry %d of %d" % (
                    lec.plural(events, "event"), self.where, attempts,
                    self.retries))
        elif attempts < self.retries:
            self.failures.say("failed", "cannot deliver %s to %s: %s; "
                              "retry %d of %d in %g s" % (
                                  lec.plural(events, "event"),
                                  self.where, error, attempts + 1,
                                  self.retries, self.interval))
            self.push(time.monotonic() + self.interval, data,
                      attempts + 1, order)
        else:
            self.given_up += events
            self.failures.say("gave up", "gave up delivering %s to %s: "
                              "%s" % (lec.plural(events, "event"),
                                      self.where, error))

    def wait_sent(self, timeout: float) -> None:
        """Wait until what is due now was tried (sent, or put off to a
        retry), timeout seconds at most."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.closed and (self.sending or (
                    self.queue and self.queue[0][0] <= time.monotonic())):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def undelivered(self) -> int:
        """Return how many events were given up or still wait to be tried
        (again): not delivered, not dropped."""
        with self.cond:
            waiting = sum(entry[2].count(b"\n") for entry in self.queue
                          if entry[2] is not None)
        return waiting + self.given_up

    def send(self, data: bytes) -> Optional[str]:
        """Send data on the kept connection or a new one; return an error."""
        try:
            # A listener never writes: something to read means it closed.
            if self.sock is not None and lec.peer_gone(self.sock):
                self.drop()
            if self.sock is None:
                self.sock = lec.open_connection(self.address, timeout=5)
            self.sock.sendall(data)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a bad name
            self.drop()
            return getattr(exc, "strerror", None) or str(exc)
        return None

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(15)
        self.drop()
        self.failures.flush()
        with self.drops_lock:
            self.drops.flush()


def say_failures(counts: dict, seconds: float) -> str:
    return "%s failed and %s given up in the last %s (not shown one by " \
        "one)" % (lec.plural(counts.get("failed", 0), "more delivery",
                             "more deliveries"),
                  lec.format_count(counts.get("gave up", 0)),
                  lec.format_duration(seconds))


class Capacity:
    """Pace lookups for all connections: eps a second, a bounded queue."""

    def __init__(self, eps: Optional[float], lookup: float,
                 waiting: int = MAX_WAITING) -> None:
        self.gap = 1.0 / eps if eps else 0.0
        self.lookup = lookup
        self.max_waiting = waiting
        self.lock = threading.Lock()
        self.next_slot = 0.0
        self.waiting = 0
        self.dropped = 0

    def admit(self) -> Optional[float]:
        """Return when the event's lookup may start, or None: dropped."""
        with self.lock:
            if self.waiting >= self.max_waiting:
                self.dropped += 1
                return None
            slot = max(time.monotonic(), self.next_slot)
            self.next_slot = slot + self.gap
            self.waiting += 1
            return slot

    def done(self) -> None:
        with self.lock:
            self.waiting -= 1


class FakeCyberTrace:
    """Serve CyberTrace's input protocol; by default on a free port."""

    def __init__(self, output: Optional[tuple] = None, pong: bytes = b"PONG",
                 answer: bool = True, input: tuple = ("127.0.0.1", 0),
                 detect: Optional[Iterable[str]] = None, alert: bool = False,
                 noise: bool = False, retries: int = RETRIES,
                 retry_interval: float = RETRY_INTERVAL,
                 status: Optional[Callable[[str], None]] = None,
                 record: bool = False,
                 idle_timeout: Optional[float] = IDLE_TIMEOUT,
                 alert_output: Optional[tuple] = None,
                 eps: Optional[float] = None, scanners: Optional[int] = None,
                 lookup_ms: float = 0.0, queue: int = MAX_WAITING) -> None:
        self.pong = pong
        # Paced lookups only when asked: the plain path stays fast.
        self.capacity = Capacity(eps, lookup_ms / 1000.0, queue) \
            if eps or lookup_ms else None
        # Connections served at once; PING needs none (CyberTrace keeps a
        # scanner free for it).
        self.scanners = threading.BoundedSemaphore(scanners) \
            if scanners else None
        self.answer = answer
        self.detect = set(INDICATORS if detect is None else detect)
        self.noise = noise
        self.record = record  # keep what each connection sent
        self.idle_timeout = idle_timeout
        self.status = status or (lambda message: None)
        self.lock = threading.Lock()
        self.connections = []  # (flags, raw bytes after the flags)
        self.accepted = 0
        self.threads = []
        self.heard = {}  # each open connection: when it last sent
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.closing = False
        self.server = self.bind(input)
        self.unix = input if isinstance(input, lec.UnixAddress) else None
        self.address = self.unix or self.server.getsockname()[:2]
        self.status("Listening on %s (input); detections go to %s (output)%s;"
                    " detecting %d of %d test indicators" % (
                        lec.format_address(*self.address),
                        lec.format_address(*output) if output else "nowhere",
                        ", alerts to %s" % lec.format_address(*alert_output)
                        if alert_output else "", len(self.detect),
                        len(INDICATORS)))
        self.delivery = self.alerts = None
        if output is not None:
            self.delivery = self.alerts = Delivery(
                output, retries, retry_interval, self.status)
        if alert_output is not None:
            self.alerts = Delivery(alert_output, retries, retry_interval,
                                   self.status)
        if alert and self.alerts is not None:
            self.alerts.put(["%s alert=KL_ALERT_ServiceStarted" % now_date()])
        self.acceptor = threading.Thread(target=self.accept_loop, daemon=True)
        self.acceptor.start()

    @staticmethod
    def bind(address: tuple) -> socket.socket:
        if isinstance(address, lec.UnixAddress):
            # As the listener's: a stale file replaced, a live one refused.
            server = lec.open_unix_server(address.path, 128, lec.SOCKET_MODE)
            server.setblocking(True)
            return server
        if lec.is_pipe(address):
            # Served as a listening socket is; a connection each client.
            return lec.PipeServer(address[0], blocking=True)
        try:
            family = socket.getaddrinfo(address[0], address[1],
                                        type=socket.SOCK_STREAM)[0][0]
            return socket.create_server(address, family=family, backlog=128)
        except OSError as exc:
            # create_server adds the address, in Python's notation, to the
            # system's words: say only the latter, after our own address.
            why = exc.strerror if isinstance(exc, socket.gaierror) else \
                os.strerror(exc.errno) if exc.errno else exc
            raise lec.UserError("cannot listen on %s: %s" % (
                lec.format_address(*address), why))

    def accept_loop(self) -> None:
        """Take connections, a thread each, MAX_CLIENTS at once at most."""
        short = False  # of file descriptors: said once, until it ends
        while True:
            full = not self.slots.acquire(blocking=False)
            try:
                sock, peer = self.server.accept()
                if full:
                    self.make_room()
            except OSError as exc:
                if not full:
                    self.slots.release()
                if self.closing:
                    return
                if exc.errno in lec.OUT_OF_DESCRIPTORS:
                    if not short:
                        self.status("out of file descriptors; new "
                                    "connections wait until some close")
                    short = True
                    time.sleep(0.1)  # a close frees one: do not spin
                continue  # a peer that reset before it was taken
            short = False
            with self.lock:
                self.heard[sock] = time.monotonic()
            thread = threading.Thread(target=self.handle, args=(sock, peer),
                                      daemon=True)
            thread.start()
            self.threads = [t for t in self.threads if t.is_alive()]
            self.threads.append(thread)

    def make_room(self) -> None:
        """Close the connection silent longest, and take its place."""
        with self.lock:
            oldest = min(self.heard, key=self.heard.get)
            silent = time.monotonic() - self.heard.get(oldest, 0)
        try:
            oldest.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.status("all %d places taken: closing the connection silent "
                    "longest (%s) for a new one" % (
                        MAX_CLIENTS, lec.format_duration(silent)))
        self.slots.acquire()

    def handle(self, sock: socket.socket, peer: tuple) -> None:
        if self.unix is not None:
            pid = lec.peer_process(sock)
            peer = self.unix[0] + (" (pid %d)" % pid if pid else "")
        else:
            peer = lec.format_peer(peer)
        scanned = False
        sock.settimeout(self.idle_timeout)
        record = [[], bytearray()]
        tally = [0, 0, 0]  # events, detections, dropped
        watched = Recorder(sock, None, self.lock, self.heard)
        with self.lock:
            self.connections.append(record)
            self.accepted += 1
            self.heard[sock] = time.monotonic()
        try:
            flags, rest = read_flags(watched)
            record[0] = flags
            if self.record:  # what came after the flags
                with self.lock:
                    watched.raw = record[1]
                    watched.raw += rest
            if PING in flags:
                sock.sendall(self.pong)
                self.status("%s: PING, answered %s" % (
                    peer, self.pong.decode("ascii", "backslashreplace")))
                return
            if self.scanners is not None:
                if not self.scanners.acquire(blocking=False):
                    self.status("%s: waits for a scanner (all busy)" % peer)
                    self.scanners.acquire()
                scanned = True
            self.serve_events(watched, flags, rest, tally)
            why = ""
        except OSError as exc:
            why = exc.strerror or str(exc)
        finally:
            with self.lock:
                self.heard.pop(sock, None)
                if not self.record:
                    self.connections.remove(record)
            sock.close()
            if scanned:
                self.scanners.release()
            self.slots.release()
        if PING not in record[0]:
            self.status("%s%s: %s (%s), %s%s%s" % (
                peer, " (%s)" % b"".join(record[0]).decode()
                if record[0] else "", lec.plural(tally[0], "event"),
                lec.format_bytes(watched.bytes),
                lec.plural(tally[1], "detection"),
                ", %s dropped (over --eps or its queue)" % lec.format_count(
                    tally[2]) if tally[2] else "",
                "; %s" % why if why else ""))

    def serve_events(self, sock: "Recorder", flags: list, rest: bytes,
                     tally: list) -> None:
        """Answer each event, counting in tally (events, detections,
        dropped)."""
        reply_back = b"X-KF-ReplyBack" in flags
        send_finished = b"X-KF-SendFinishedEvent" in flags
        if self.noise and self.delivery is not None and not reply_back:
            self.alerts.put([NOISE[0] % now_date()])
            self.delivery.put([NOISE[1]])
            # The alert goes first, also to an output of its own: a lab
            # check that ends once its detections are in must find it.
            self.alerts.wait_sent(NOISE_WAIT)
        blocks = lec.receive_blocks(sock, rest, INBOUND_EVENT_BYTES,
                                    INBOUND_EVENT_BYTES)
        target = sock if reply_back else None
        if self.capacity is not None:
            return self.serve_paced(blocks, send_finished, target, tally)
        for block in blocks:
            count, lines = self.respond(block, send_finished)
            tally[0] += count
            tally[1] += len(lines) - (count if send_finished else 0)
            self.send(lines, target)

    def serve_paced(self, blocks: Iterable, send_finished: bool,
                    target, counts: list) -> None:
        """Answer each event when its lookup is done, as --eps and
        --lookup-ms say, reading on meanwhile."""
        capacity = self.capacity
        cond = threading.Condition()
        waiting = collections.deque()  # (when its lookup may start, event)
        ended = []

        def answer() -> None:
            busy = 0.0  # when this connection's scanner is free again
            while True:
                with cond:
                    while not waiting and not ended:
                        cond.wait()
                    if not waiting:
                        return
                    due, event = waiting.popleft()
                busy = max(due, busy) + capacity.lookup
                time.sleep(max(0.0, busy - time.monotonic()))
                capacity.done()
                found = detections(event, self.detect)
                counts[1] += len(found)
                if send_finished:
                    found.append(finished_event(found))
                try:
                    self.send(found, target)
                except OSError:
                    pass  # the reader sees it too, and says it

        answerer = threading.Thread(target=answer, daemon=True)
        answerer.start()
        try:
            for block in blocks:
                text = bytes(block).decode("utf-8", "replace")[:-1]
                for event in text.split("\n"):
                    counts[0] += 1
                    due = capacity.admit()
                    if due is None:
                        counts[2] += 1
                        continue
                    with cond:
                        waiting.append((due, event))
                        cond.notify()
        finally:
            with cond:
                ended.append(True)
                cond.notify()
            answerer.join()

    def respond(self, block: lec.Block, send_finished: bool) -> tuple:
        """Return (events in block, the lines that answer them)."""
        lines = []
        events = bytes(block).decode("utf-8", "replace")[:-1].split("\n")
        for event in events:
            found = detections(event, self.detect)
            lines.extend(found)
            if send_finished:
                lines.append(finished_event(found))
        return len(events), lines

    def send(self, lines: list, sock: Optional[socket.socket]) -> None:
        if not lines or not self.answer:
            return
        if sock is not None:
            sock.sendall("".join(line + "\n" for line in lines).encode())
        elif self.delivery is not None:
            self.delivery.put(lines)

    def received(self) -> bytes:
        """Return every byte received after the flags, all connections."""
        with self.lock:
            return b"".join(bytes(raw) for _, raw in self.connections)

    def flags(self) -> list:
        with self.lock:
            return [list(flags) for flags, _ in self.connections]

    def close(self) -> None:
        self.closing = True
        try:
            # On Linux, close() alone does not wake a thread in accept().
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        if self.unix is not None:
            try:
                os.unlink(self.unix.path)
            except OSError:
                pass
        with self.lock:
            for sock in list(self.heard):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.acceptor.join(15)
        for thread in self.threads:
            thread.join(15)
        for delivery in {self.delivery, self.alerts} - {None}:
            delivery.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Recorder:
    """A connection that notes when it last sent and how much, and keeps
    every byte received if given raw (for the tests)."""

    def __init__(self, sock: socket.socket, raw: Optional[bytearray],
                 lock: threading.Lock, heard: dict) -> None:
        self.sock = sock
        self.raw = raw
        self.lock = lock
        self.heard = heard
        self.bytes = 0

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        self.bytes += len(data)
        with self.lock:
            if self.raw is not None:
                self.raw += data
            if data:
                self.heard[self.sock] = time.monotonic()
        return data

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)


def output_address(text: str) -> tuple:
    """Parse an address to deliver to, which has a real port."""
    address = lec.parse_address(text)
    if not isinstance(address, lec.UnixAddress) and address[1] == 0:
        # "Any free port" means something only to a listener.
        raise ValueError("port 0 is not a port to deliver to: give the "
                         "port the listener listens on, e.g. 9998")
    return address


def build_parser() -> argparse.ArgumentParser:
    """Describe the command line."""
    address = lec.argument_type(lec.parse_address, "address")
    delivery = lec.argument_type(output_address, "address")
    parser = lec.OneLineParser(
        description="A stand-in for Kaspersky CyberTrace: takes events on "
        "its input port, detects Kaspersky's test indicators in them and "
        "delivers the detections to its output address, as CyberTrace does. "
        "Status goes to stderr.",
        epilog="Try it: run this, then the lab check against it, "
        "'send_events_cybertrace.py --check 9998' (cybertrace-send once "
        "installed). Ctrl+C or SIGTERM stops it (exit 0).")
    parser.add_argument(
        "--input", metavar="ADDR:PORT", type=address, default=INPUT,
        help="where to take events (CyberTrace's InputSettings > "
        "ConnectionString); port 0 picks a free one; unix:/PATH for a UNIX "
        "stream socket, as the 5.0 web UI offers, mode %04o (default: %s)"
        % (lec.SOCKET_MODE, lec.format_address(*INPUT)))
    parser.add_argument(
        "--output", metavar="ADDR:PORT", type=delivery, default=OUTPUT,
        help="where to deliver detections and alerts (OutputSettings > "
        "ConnectionString), or unix:/PATH (default: %s)"
        % lec.format_address(*OUTPUT))
    feeds = parser.add_mutually_exclusive_group()
    feeds.add_argument(
        "--demo-feeds", dest="feeds", action="store_const", const="demo",
        help="detect what the demo feeds carry: %s (the default)"
        % ", ".join(DEMO_FEEDS))
    feeds.add_argument("--detect-all", dest="feeds", action="store_const",
                       const="all", help="detect all 17 test indicators")
    feeds.add_argument("--no-feeds", dest="feeds", action="store_const",
                       const="none", help="detect nothing, as when no feed "
                       "is loaded")
    parser.add_argument(
        "--alert-output", metavar="ADDR:PORT", type=delivery,
        help="deliver service alerts here instead (OutputSettings > "
        "AlertConnectionString), or to unix:/PATH (default: with the "
        "detections)")
    parser.add_argument(
        "--noise", action="store_true",
        help="with each connection's detections, also deliver a service "
        "alert and the detection of an event nobody here sent (192.0.2.10), "
        "as a busy site would")
    parser.add_argument(
        "--retries", metavar="N",
        type=lec.argument_type(lec.bounded(int, 0, 100), "N"),
        default=RETRIES, help="try a failed delivery again N times, 0 to "
        "100 (default: %d)" % RETRIES)
    parser.add_argument(
        "--retry-interval", metavar="SECONDS",
        type=lec.argument_type(lec.bounded(float, 0.01, 3600),
                               "seconds"),
        default=RETRY_INTERVAL,
        help="between tries, 0.01 to 3600 (default: %g)" % RETRY_INTERVAL)
    parser.add_argument(
        "--eps", metavar="N",
        type=lec.argument_type(lec.bounded(float, 1, 10000000), "N"),
        help="look up N events a second at most, all connections together "
        "(CyberTrace's EPSLimit); more wait in a queue (--queue), and "
        "past it are dropped and counted (default: no limit)")
    parser.add_argument(
        "--queue", metavar="N", default=MAX_WAITING,
        type=lec.argument_type(lec.bounded(int, 1, 1000000), "N"),
        help="with --eps or --lookup-ms, at most N events wait for a lookup "
        "(default: %d)" % MAX_WAITING)
    parser.add_argument(
        "--scanners", metavar="N",
        type=lec.argument_type(lec.bounded(int, 1, MAX_CLIENTS), "N"),
        help="serve N connections at once (CyberTrace's ScannersCount); the "
        "next one waits, unread, until one closes; PING is always answered, "
        "as CyberTrace keeps a scanner free for it (default: %d)"
        % MAX_CLIENTS)
    parser.add_argument(
        "--lookup-ms", metavar="X",
        type=lec.argument_type(lec.bounded(float, 0, 60000), "ms"),
        default=0.0, help="each lookup takes X ms, one at a time per "
        "connection (default: 0)")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + lec.__version__)
    parser.set_defaults(feeds="demo")
    return parser


def main(argv: Optional[list] = None) -> int:
    """Run the stand-in until Ctrl+C or SIGTERM; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    detect = {"all": INDICATORS, "demo": DEMO_FEEDS, "none": ()}[args.feeds]
    stop = []  # the signals that asked us to stop
    # Ctrl+C and SIGTERM are only noted: no exception can then cut the
    # start or the shutdown short.  Noted in a list, not a threading.Event:
    # the handler runs in the main thread, which may be holding the
    # event's lock, and would wait on itself for ever.  (A SIGINT ignored
    # by the shell, as for "&" in a script, stays ignored.)
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, lambda number, _: stop.append(number))
    try:
        stand_in = FakeCyberTrace(
            output=args.output, input=args.input, detect=detect, alert=True,
            noise=args.noise, retries=args.retries,
            retry_interval=args.retry_interval, status=CONSOLE.status,
            alert_output=args.alert_output, eps=args.eps,
            scanners=args.scanners, lookup_ms=args.lookup_ms,
            queue=args.queue)
    except lec.UserError as exc:
        CONSOLE.line("%s: error: %s" % (parser.prog, exc))
        return 1
    with stand_in:
        while not stop:
            time.sleep(0.1)
    dropped = stand_in.capacity.dropped if stand_in.capacity else 0
    outputs = [output for output in {stand_in.delivery: 1,
                                     stand_in.alerts: 1} if output]
    # A stop drops what waits for a retry: said, as a CyberTrace's loss.
    undelivered = sum(output.undelivered() for output in outputs)
    lost = sum(output.dropped for output in outputs)
    CONSOLE.status("Stopped: %s, %s delivered%s%s%s" % (
        lec.plural(stand_in.accepted, "connection"),
        lec.plural(sum(output.delivered for output in outputs), "event"),
        ", %s not delivered (its output unreachable)"
        % lec.format_count(undelivered) if undelivered else "",
        ", %s dropped (over --eps or its queue)"
        % lec.format_count(dropped) if dropped else "",
        ", %s dropped for an output that was down" % lec.format_count(lost)
        if lost else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
