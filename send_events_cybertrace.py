#!/usr/bin/env python3
"""Send events to Kaspersky CyberTrace's input port.

By default the events are sent and nothing is awaited: CyberTrace delivers
its detections to its configured output (see listen_events_cybertrace.py).
--reply-back asks CyberTrace to answer on the same connection instead, and
--ping checks that the service is up.  --check ADDR:PORT is the lab check:
it listens where CyberTrace delivers, sends the test events and says what
came back, or which link is broken (see check()).
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import itertools
import os
import re
import random
import select
import signal
import socket
import stat
import sys
import threading
import time
from typing import BinaryIO, Callable, Iterable, Iterator, List, Optional

from listen_events_cybertrace import (
    LISTEN_ADDR, LISTEN_PORT, EmbeddedListener, EventFramer, OneLineParser,
    UserError, argument_type, chunk_receive, format_address, format_bytes,
    format_count, format_duration, format_raw, keep_freed_memory,
    bounded, parse_address, parse_fields, parse_response, plural, SECONDS,
    split_lines, __version__)

try:
    from fcntl import ioctl
    from termios import TIOCOUTQ
except ImportError:  # not on Linux: see unacknowledged_bytes()
    ioctl = TIOCOUTQ = None
# macOS tells the same through a socket option its headers name SO_NWRITE.
SO_NWRITE = getattr(socket, "SO_NWRITE",
                    0x1024 if sys.platform == "darwin" else None)

CYBERTRACE_ADDR = "127.0.0.1"
CYBERTRACE_PORT = 9999
TIMEOUT = 5.0
CHECK_TIMEOUT = 30.0
# How long --check waits for a refused input port to open (see
# connect_patiently).
CONNECT_PATIENCE = 2.0
# --reconnect retries at once, then after 0.5 s, doubling up to 30 s.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 30.0
# Large reads and sends: a million events go out in a few hundred system
# calls.  As for the listener's reads, a block's lines must fit in one of
# Python's 1 MiB arenas, or each block maps and faults in a fresh one.
READ_SIZE = 512 * 1024
# select() said the socket is readable, so even without this flag
# (Windows) the read does not block.
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
REPLY_BACK_FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
PING = b"X-KF-ReplyBackPING"
FINISHED = b"LookupFinished"
EOF_KEY = "Ctrl+Z then Enter" if sys.platform == "win32" else "Ctrl+D"
TERMINAL_NOTICE = ("Reading events from the terminal, one per line; %s to "
                   "send and finish" % EOF_KEY)
# Files smaller than this go out before a progress line could mean anything.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
PROGRESS_INTERVAL = 0.25  # seconds between redraws, as pv's few a second
# --rate's bounds: at the least one event every 100 s, so that a wait for
# the next never overflows a timer.
RATE = (0.01, 1e9)
REPEAT_LIMIT = 10 ** 9

# Indicators that Kaspersky keeps in its feeds so that CyberTrace always
# detects them, with the field each belongs in and the kind of record that
# Kaspersky's test tables list it as (what --check expects).
TEST_RECORDS = [
    ("url", "http://fakess123.nu", "Malicious URL"),
    ("url", "http://fakess123ap.nu", "Phishing URL"),
    ("url", "http://fakess123r.nu", "Ransomware URL"),
    ("url", "http://a7396d61caffe18a4cffbb3b428c9b60.com", "Botnet C&C URL"),
    ("url", "http://5a015004f9fc05290d87e86d69c4b237.com",
     "Botnet C&C URL (demo feed)"),
    ("url", "http://b046f5b25458638f6705d53539c79f62.com", "APT URL"),
    ("url", "http://e593461621ee0f9134c632d00bf108fd.com/.i", "IoT URL"),
    ("dst", "192.0.2.0", "IP reputation"),
    ("dst", "192.0.2.1", "IP reputation (demo feed)"),
    ("dst", "192.0.2.4", "APT IP"),
    ("md5", "C912705B4BBB14EC7E78FA8B370532C9", "Malicious hash (MD5)"),
    ("md5", "776735A8CA96DB15B422879DA599F474",
     "Malicious hash (MD5, demo feed)"),
    ("md5", "7A2E65A0F70EE0615EC0CA34240CF082", "APT hash"),
    ("md5", "60300A92E1D0A55C7FDD360EE40A9DC1", "Mobile malicious hash"),
    ("md5", "001F6251169E6916C455495050A3FB8D", "Mobile botnet hash"),
    ("md5", "D8C1F5B4AD32296649FF46027177C594", "Vulnerability hash"),
    ("md5", "7A8F30B40C6564EFF95E678F7C43346C", "ICS hash"),
]
DEMO_INDICATORS = [(field, value) for field, value, _ in TEST_RECORDS]


class SendError(UserError):
    """Sending failed; the message says how far it got, reason why."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class NothingToSend(UserError):
    """The sources hold no event: nothing is worth a connection."""


class Interrupted(Exception):
    """Ctrl+C or SIGTERM: the message says what got through."""


class HoldInterrupts:
    """Hold Ctrl+C while a count is updated; raise it when done.

    A Ctrl+C just after the kernel took some bytes, before the count says
    so, would report fewer events sent than the peer gets.
    """

    holding = False
    held = False
    number = None  # the signal that stopped us: SIGINT, SIGTERM, SIGBREAK
    stopping = False  # a first Ctrl+C is being reported: ignore the next

    def __enter__(self) -> None:
        HoldInterrupts.holding = True

    def __exit__(self, *exc) -> None:
        HoldInterrupts.holding = False
        if HoldInterrupts.held:
            HoldInterrupts.held = False
            raise KeyboardInterrupt

    @staticmethod
    def on_interrupt(number, frame) -> None:
        if HoldInterrupts.stopping:
            return
        HoldInterrupts.number = number
        if HoldInterrupts.holding:
            HoldInterrupts.held = True
        else:
            raise KeyboardInterrupt


HOLD_INTERRUPTS = HoldInterrupts()


def install_interrupt_handler():
    """Route Ctrl+C through HoldInterrupts; return what to restore."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None  # Ctrl+C is ignored (nohup, cron) or not ours to take
    HoldInterrupts.held = HoldInterrupts.stopping = False
    return signal.signal(signal.SIGINT, HoldInterrupts.on_interrupt)


def install_terminate_handler():
    """Make SIGTERM (systemctl stop, kill) stop us as Ctrl+C does, counts
    and all; return what to restore."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, HoldInterrupts.on_interrupt)


def leave_signals_to_main() -> None:
    """Block Ctrl+C in this helper thread: the main thread must get it."""
    # A signal that lands here would not wake the main thread from select
    # or send, and Ctrl+C would seem to do nothing for a while.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT,
                                                  signal.SIGTERM})


def warn(message: str) -> None:
    """Print a warning on stderr, above the progress line; -q keeps it."""
    line = "warning: " + message
    if Progress.showing is not None:
        Progress.showing.print_above(line)
    else:
        print(line, file=sys.stderr, flush=True)


def demo_events() -> List[bytes]:
    """Return one realistic event line per test indicator."""
    stamp = time.strftime("%b %d %H:%M:%S")
    events = []
    for number, (field, value) in enumerate(DEMO_INDICATORS, 1):
        if field == "url":
            detail = "act=allowed src=198.51.100.7 url=%s" % value
        elif field == "dst":
            detail = "act=blocked src=198.51.100.7 dst=%s dpt=443" % value
        else:
            detail = ("act=detected src=198.51.100.7 md5=%s "
                      "fname=sample%d.exe" % (value, number))
        events.append(("%s demo-host cybertrace-demo[%d]: %s usrName=demo"
                       % (stamp, number, detail)).encode())
    return events


def drop_blank_lines(block) -> tuple:
    """Return a framed block without blank lines, and its event count."""
    lines = split_lines(block)
    # The least line starts with the lowest byte: above b" ", no line is
    # empty or starts with white space, and the block goes out unchanged.
    if not lines or min(lines)[:1] > b" ":
        return block, len(lines)
    lines = [line for line in lines if line.strip()]
    return b"".join(lines), len(lines)


def frame_lines(lines: Iterable[bytes]) -> Iterator[tuple]:
    """Yield (block, events) for events given one by one."""
    framer = EventFramer(sys.maxsize)
    for line in lines:
        block, count = drop_blank_lines(framer.feed(line + b"\n"))
        if count:
            yield block, count


def frame_stream(name: str, stream: BinaryIO, check_binary: bool = True,
                 tally: Optional[list] = None) -> Iterator[tuple]:
    """Yield (block, events) read from a file, one event per line.

    tally[0] grows by the bytes read and not sent (a CR, a blank line, the
    start of an unfinished line): with the bytes sent, how far the file went.
    """
    # Events are not split on the way out: CyberTrace splits long ones.
    framer = EventFramer(sys.maxsize)
    buffer = bytearray(2 * READ_SIZE)
    tally = [0] if tally is None else tally
    while True:
        try:
            before = framer.received
            block = framer.read(stream.readinto, buffer, READ_SIZE)
        except OSError as exc:
            raise UserError("cannot read %s: %s" % (name, exc.strerror))
        if block is None:
            break
        if check_binary:
            check_binary = False
            # The first read is still whole at the start of the buffer.
            if buffer.find(b"\0", 0, framer.received) >= 0:
                warn("%s looks binary (NUL bytes in its first %d KiB); "
                     "sending it as it is" % (name, READ_SIZE // 1024))
        block, count = drop_blank_lines(block)
        dropped = framer.received - before - len(block)
        if count:
            yield block, count
        # Counted once the block went out (it may go out slowly, --rate).
        tally[0] += dropped
    block, count = drop_blank_lines(framer.close())
    if count:
        yield block, count
    tally[0] -= len(block)  # the newline added to the last line


def open_sources(args: argparse.Namespace) -> list:
    """Open every FILE now, so a missing one fails before anything is sent."""
    sources = []
    for name in args.files or ([] if args.event or args.demo else ["-"]):
        try:
            if name == "-":
                stream = open(sys.stdin.fileno(), "rb", buffering=0,
                              closefd=False)
            else:
                stream = open(name, "rb", buffering=0)
        except OSError as exc:
            close_sources(sources)
            raise UserError("cannot read %s: %s" % (
                "stdin" if name == "-" else name, exc.strerror))
        sources.append(("stdin" if name == "-" else name, stream))
    if args.event:
        sources.append(("--event", [e.encode("utf-8", "surrogateescape")
                                    for e in args.event]))
    if args.demo:
        sources.append(("--demo", demo_events()))
    return sources


def close_sources(sources: list) -> None:
    for _, source in sources:
        if not isinstance(source, list):
            source.close()


def event_blocks(sources: list, repeat: int,
                 tally: Optional[list] = None) -> Iterator[tuple]:
    """Yield (block, events) from every source, repeat times over."""
    kept = {}
    for round_number in range(repeat):
        for index, (name, source) in enumerate(sources):
            if isinstance(source, list):
                yield from frame_lines(source)
            elif index in kept:
                yield from kept[index]
            elif repeat > 1 and not source.seekable():
                # A pipe can be read once: keep it to send it again.
                kept[index] = [(bytes(block), count) for block, count in
                               frame_stream(name, source, True, tally)]
                yield from kept[index]
            else:
                if round_number:
                    source.seek(0)
                yield from frame_stream(name, source, not round_number,
                                        tally)


def some_events(blocks: Iterator[tuple]) -> Iterator[tuple]:
    """Return blocks unchanged, or raise NothingToSend if there are none."""
    # Read the first event before connecting: an empty source then costs
    # the peer no connection.
    first = next(blocks, None)
    if first is None:
        raise NothingToSend("no events to send")
    return itertools.chain([first], blocks)


def connect(address: tuple, timeout: float) -> socket.socket:
    """Connect to CyberTrace or raise a one-line UserError."""
    where = format_address(*address)
    try:
        return socket.create_connection(address, timeout=timeout)
    except socket.gaierror as exc:
        raise UserError("cannot resolve %s: %s" % (address[0], exc.strerror))
    except socket.timeout:
        raise UserError("cannot connect to %s: timed out after %g s"
                        % (where, timeout))
    except OSError as exc:
        raise UserError("cannot connect to %s: %s" % (where, exc.strerror))


def unacknowledged_bytes(sock: socket.socket) -> Optional[int]:
    """Return how many sent bytes the peer has not acknowledged yet, or
    None where the kernel cannot tell (Windows)."""
    try:
        if ioctl is not None:
            answer = ioctl(sock.fileno(), TIOCOUTQ, b"\0\0\0\0")
            return int.from_bytes(answer, sys.byteorder)
        if SO_NWRITE is not None:
            return sock.getsockopt(socket.SOL_SOCKET, SO_NWRITE)
    except OSError:
        pass
    return None


def event_start(block, offset: int) -> int:
    """Return where the event holding a block's byte at offset starts."""
    if isinstance(block, memoryview):
        return block.obj.rfind(b"\n", 0, min(offset, len(block))) + 1
    return block.rfind(b"\n", 0, offset) + 1


def say_sent(sent: int, acknowledged: int) -> str:
    return "%s sent, %s acknowledged" % (plural(sent, "event"),
                                          format_count(acknowledged))


def count_lines(block, end: int) -> int:
    """Count the events in the first end bytes of a block."""
    if isinstance(block, memoryview):
        return block.obj.count(b"\n", 0, min(end, len(block)))
    return block.count(b"\n", 0, end)


class Stream:
    """A connection that counts what it sent and what the peer acknowledged."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.events = 0  # events handed whole to the kernel
        self.bytes = 0
        self.acked = 0  # bytes the peer's TCP acknowledged, when last asked
        # What the peer may not have acknowledged yet, from the start of an
        # event, to count the events that arrived if the connection fails
        # and to send them again: (offset, events before it, bytes).
        # Blocks are reused buffers, so only this tail is copied.
        self.tails = []
        self.sending = None  # (block, offset, events before it) in flight
        # Where the kernel cannot tell what the peer acknowledged, what it
        # took counts as delivered, but the last `keep` bytes (a send
        # buffer's worth, for --reconnect) are kept to send again.
        self.measured = True
        self.keep = 0

    def send(self, block, events: int) -> None:
        start, before = self.bytes, self.events
        self.sending = block, start, before
        view = memoryview(block)
        try:
            while view:
                # Wait here, where Ctrl+C is harmless, so that the send
                # itself returns at once and its count is never lost.
                if not select.select([], [self.sock], [],
                                     self.sock.gettimeout())[1]:
                    raise socket.timeout
                with HOLD_INTERRUPTS:
                    sent = self.sock.send(view)
                    view = view[sent:]
                    self.bytes += sent
        except socket.timeout:
            self.update_acked()
            raise SendError("timed out sending to %s after %g s: %s"
                            % (self.where, self.sock.gettimeout(),
                               self.progress(block, start, before)),
                            "no progress for %g s" % self.sock.gettimeout())
        except OSError as exc:
            # After a reset the kernel forgets its queue: keep the count
            # from before, a lower bound.
            raise SendError("connection to %s lost: %s (%s)"
                            % (self.where, exc.strerror,
                               self.progress(block, start, before)),
                            exc.strerror)
        with HOLD_INTERRUPTS:
            self.events += events
            self.sending = None
            self.update_acked()
            kept = self.kept_from()
            if kept < self.bytes:
                cut = event_start(block, max(0, kept - start))
                tail = bytes(memoryview(block)[cut:])
                # Mostly a short tail is unacknowledged: count that only.
                self.tails.append((start + cut,
                                   self.events - tail.count(b"\n"), tail))

    def update_acked(self) -> None:
        """Ask the kernel how much the peer acknowledged."""
        queued = unacknowledged_bytes(self.sock)
        if queued is None:
            self.measured = False
            queued = 0
        self.acked = max(self.acked, self.bytes - queued)
        kept = self.kept_from()
        while self.tails and \
                self.tails[0][0] + len(self.tails[0][2]) <= kept:
            self.tails.pop(0)

    def kept_from(self) -> int:
        """Return the offset from which sent bytes are kept to resend."""
        if self.measured:
            return self.acked
        return max(0, self.bytes - self.keep)

    def delivered(self, block=None, start: int = 0, before: int = 0) -> int:
        """Return how many whole events the peer acknowledged."""
        for offset, events, tail in self.tails:
            if self.acked < offset + len(tail):
                return events + tail.count(b"\n", 0, self.acked - offset)
        if block is not None and self.acked < start + len(block):
            return before + count_lines(block, max(0, self.acked - start))
        return self.events

    def progress(self, block=None, start: int = 0, before: int = 0) -> str:
        return "%s sent, %s acknowledged by the peer" % (
            plural(self.events, "event"),
            format_count(self.delivered(block, start, before)))

    def interrupted(self) -> str:
        """Say what got through when Ctrl+C stopped us, anywhere."""
        return say_sent(*self.counts())

    def counts(self) -> tuple:
        """Return the events sent and acknowledged, even within a send."""
        self.update_acked()
        sent, acked = self.events, self.delivered()
        if self.sending is not None:
            # Stopped within a block: count its events the kernel took whole.
            block, start, before = self.sending
            sent = before + count_lines(block, self.bytes - start)
            acked = self.delivered(block, start, before)
        return sent, min(acked, sent)

    def wait_delivered(self, timeout: float) -> None:
        """Wait until the peer acknowledged every byte sent, or fail."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        watch = [self.sock]
        while True:
            self.update_acked()
            if self.acked >= self.bytes:
                return
            if time.monotonic() >= deadline:
                raise SendError("timed out after %g s: %s" % (
                    timeout, self.progress()),
                    "not acknowledged within %g s" % timeout)
            # A peer that closes after reading everything wakes us at once;
            # one that resets tells us the events did not all arrive.
            if select.select(watch, [], [], pause)[0]:
                try:
                    if not self.sock.recv(65536, DONTWAIT):
                        watch = []
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise SendError("connection to %s lost: %s (%s)" % (
                        self.where, exc.strerror, self.progress()),
                        exc.strerror)
            elif not watch:
                # After its FIN, recv() says nothing more: a reset that
                # follows shows only here.
                error = self.sock.getsockopt(socket.SOL_SOCKET,
                                             socket.SO_ERROR)
                if error:
                    raise SendError("connection to %s lost: %s (%s)" % (
                        self.where, os.strerror(error), self.progress()),
                        os.strerror(error))
                time.sleep(pause)
            pause = min(pause * 2, 0.02)


def paced(blocks: Iterable[tuple], rate: float,
          clock=time.monotonic) -> Iterator[tuple]:
    """Yield the events of blocks in batches, rate events per second."""
    started = clock()
    sent = 0
    for block, _ in blocks:
        events = bytes(block)[:-1].split(b"\n")
        done = 0
        while done < len(events):
            elapsed = clock() - started
            due = int(elapsed * rate) + 1 - sent
            if due <= 0:
                time.sleep(sent / rate - elapsed)
                continue
            batch = events[done:done + due]
            done += len(batch)
            sent += len(batch)
            yield b"\n".join(batch) + b"\n", len(batch)


def echo(block) -> None:
    """Print a block's events to stderr as the tutorial does."""
    text = format_raw(block, [], "", 0.0, sys.stderr.isatty())
    text = bytes(text).decode("utf-8", "backslashreplace")
    sys.stderr.write("".join("Sending:\n%s\n" % line
                             for line in text[:-1].split("\n")))
    sys.stderr.flush()


def send_all(stream: Stream, blocks: Iterable[tuple], verbose: bool) -> None:
    """Send every block, echoing events to stderr when verbose."""
    for block, count in blocks:
        if verbose:
            echo(block)
        stream.send(block, count)


# --- --reconnect: connections that come and go, nothing lost ---------------

def peer_gone(sock: socket.socket) -> str:
    """Return why the peer is gone if it closed or reset, else ""."""
    # As rsyslog's omfwd does before a send: a peer that closed while we
    # waited for input must not get events only its kernel would take.
    try:
        if not select.select([sock], [], [], 0)[0] or \
                sock.recv(1, socket.MSG_PEEK):
            return ""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    return "closed by the peer"


def touched(block, sent: int) -> int:
    """Count the events of a block whose first byte is among sent bytes."""
    return count_lines(block, sent - 1) + 1 if sent > 0 else 0


def unacknowledged(stream: Stream, first: int) -> list:
    """Return (block, events, number) for what the peer may not have
    acknowledged, from the start of its first event; first numbers the
    stream's first event."""
    kept = stream.kept_from()
    window = []
    for offset, before, tail in stream.tails:
        if offset + len(tail) <= kept:
            continue
        if offset < kept:
            cut = tail.rfind(b"\n", 0, kept - offset) + 1
            before += tail.count(b"\n", 0, cut)
            tail = tail[cut:]
        window.append((tail, tail.count(b"\n"), first + before))
    return window


class Resender:
    """Send over connections that come and go (--reconnect), resending
    from the first event the peer's TCP did not acknowledge.

    Events are numbered from 0 in input order; the connection in use
    carries events from number self.first on, so its Stream counts from
    there.  What is held is that stream's unacknowledged tails plus the
    block being sent: input is not read while no connection takes it.
    """

    first_delay = RECONNECT_FIRST
    max_delay = RECONNECT_MAX

    def __init__(self, address: tuple, timeout: float, where: str) -> None:
        self.address = address
        self.timeout = timeout
        self.where = where
        self.stream = None
        self.first = 0
        self.taken = self.bytes = 0  # events and bytes read from the input
        self.sent = 0  # events handed to a kernel, whole or in part
        self.resent = self.reconnects = 0
        # Blocks to send before reading on: (block, events, number).
        self.pending = collections.deque()
        self.failures = 0  # attempts and connections that got nowhere
        self.lost = None  # (when, why) the outage began
        self.offline = 0.0  # seconds of outages, kept out of --rate's clock
        self.connected = False  # ever

    @property
    def events(self) -> int:
        """Events sent: what a progress line shows."""
        return self.sent

    def clock(self) -> float:
        """Return a monotonic clock that stops during outages."""
        # --rate paces by it: after an outage it goes on at the same rate
        # instead of catching up in a burst.
        return time.monotonic() - self.offline

    def send_all(self, blocks: Iterable[tuple], verbose: bool) -> None:
        """Send every block, then wait until the peer acknowledged all."""
        for block, count in blocks:
            if verbose:
                echo(block)
            self.pending.append((block, count, self.taken))
            self.taken += count
            self.bytes += len(block)
            self.flush()
        self.finish()

    def flush(self) -> None:
        """Send the pending blocks over as many connections as it takes."""
        while self.pending:
            if self.stream is None:
                self.connect()
            block, count, number = self.pending[0]
            why = self.check()
            if why:
                self.lose(why)
                continue
            before = self.stream.bytes
            try:
                self.stream.send(block, count)
            except SendError as exc:
                self.count_sent(number, touched(block, self.stream.bytes -
                                                before))
                self.lose(exc.reason)
                continue
            with HOLD_INTERRUPTS:
                self.count_sent(number, count)
                self.pending.popleft()
            if not self.stream.measured:
                self.stream.keep = max(self.stream.keep, send_buffer(
                    self.stream.sock))

    def finish(self) -> None:
        """Wait until the peer acknowledged every event sent."""
        while True:
            self.flush()
            if self.stream is None:
                self.connect()
                continue
            why = self.check()
            if why:
                self.lose(why)
                continue
            try:
                self.stream.sock.shutdown(socket.SHUT_WR)
                self.stream.wait_delivered(self.timeout)
                return
            except SendError as exc:
                self.lose(exc.reason)
            except OSError as exc:
                self.lose(exc.strerror or str(exc))

    def check(self) -> str:
        """Return why the connection is gone, or "" if it seems alive."""
        # Acknowledgements that came while we waited for input shrink
        # what a lost connection makes us send twice.
        self.stream.update_acked()
        return peer_gone(self.stream.sock)

    def count_sent(self, number: int, count: int) -> None:
        self.resent += max(0, min(self.sent, number + count) - number)
        self.sent = max(self.sent, number + count)

    def connect(self) -> None:
        """Connect, retrying with backoff for ever."""
        while True:
            if self.failures:
                delay = min(self.max_delay,
                            self.first_delay * 2 ** (self.failures - 1))
                # Jitter: senders cut off together do not all come back
                # at the same instant.
                time.sleep(delay * random.uniform(0.75, 1.0))
            try:
                sock = socket.create_connection(self.address, self.timeout)
                break
            except OSError as exc:
                self.failures += 1
                if self.lost is None:
                    why = exc.strerror or "timed out after %g s" % (
                        self.timeout)
                    self.lost = time.monotonic(), why
                    warn("cannot connect to %s (%s); retrying" % (
                        self.where, why))
        self.stream = Stream(sock, self.where)
        self.stream.keep = send_buffer(sock)
        self.first = self.pending[0][2] if self.pending else self.taken
        if self.lost is not None:
            took = time.monotonic() - self.lost[0]
            self.offline += took
            if self.connected:
                self.reconnects += 1
                resend = self.sent - self.first
                warn("reconnected after %.1f s%s" % (took, "; resending %s "
                     "not acknowledged" % plural(resend, "event")
                     if resend else ""))
            else:
                warn("connected after %.1f s" % took)
        self.lost = None
        self.connected = True

    def lose(self, why: str) -> None:
        """Close a lost connection; keep what may not have arrived."""
        stream, self.stream = self.stream, None
        if why == "closed by the peer":
            # It is closing: what we sent may still be read, so wait for
            # it rather than send it twice.
            try:
                stream.sock.shutdown(socket.SHUT_WR)
                stream.wait_delivered(self.timeout)
            except (SendError, OSError):
                pass
        stream.sock.close()
        window = unacknowledged(stream, self.first)
        self.pending.extendleft(reversed(window))
        self.first = self.pending[0][2] if self.pending else self.taken
        # A connection that got something across earns a quick retry;
        # one that got nowhere (accepted, then closed) backs off.
        self.failures = 0 if stream.acked else self.failures + 1
        self.lost = time.monotonic(), why
        warn("connection to %s lost (%s) after %s; retrying" % (
            self.where, why, plural(self.sent, "event")))

    def counts(self) -> tuple:
        """Return the events sent and acknowledged, outage or not."""
        if self.stream is None:
            return self.sent, self.first
        sent, acked = self.stream.counts()
        return max(self.sent, self.first + sent), self.first + acked

    def close(self) -> None:
        if self.stream is not None:
            self.stream.sock.close()

    def summary(self, took: float) -> str:
        line = "Sent %s, %s to %s in %.2f s" % (
            plural(self.taken, "event"), format_bytes(self.bytes), self.where,
            took)
        if self.reconnects:
            line += "; %s, %s resent" % (
                plural(self.reconnects, "reconnect"),
                plural(self.resent, "event"))
        return line


def send_buffer(sock: socket.socket) -> int:
    """Return the size of a socket's send buffer."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def send_reconnecting(args: argparse.Namespace, blocks: Iterable[tuple],
                      where: str, watch: Optional[tuple]) -> str:
    """Send with --reconnect; return the summary line.

    watch: (tally, total) for a progress line, as Progress takes them.
    """
    resender = Resender(args.connect, args.timeout, where)
    if args.rate:
        blocks = paced(blocks, args.rate, resender.clock)
    started = time.monotonic()
    progress = None
    try:
        if watch is not None:
            progress = Progress(resender, watch[0], watch[1] or None)
        resender.send_all(blocks, args.verbose)
    except KeyboardInterrupt:
        raise Interrupted(say_sent(*resender.counts())) from None
    finally:
        if progress is not None:
            progress.stop()
        resender.close()
    return resender.summary(time.monotonic() - started)


class Replies:
    """Read CyberTrace's answers in a thread and print them to stdout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.events = 0
        self.finished = 0
        self.error = None
        self.closed = False
        self.cond = threading.Condition()
        self.terminal = sys.stdout.isatty()
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        leave_signals_to_main()
        framer = EventFramer()
        out = sys.stdout.buffer
        try:
            for data in chunk_receive(self.sock):
                self.take(framer.feed(data), out)
            self.take(framer.close(), out)
        except socket.timeout:
            self.error = "timed out waiting for answers"
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def take(self, block: bytes, out: BinaryIO) -> None:
        if not block:
            return
        block = bytes(block)
        out.write(format_raw(block, [], "", 0.0, self.terminal))
        out.flush()
        finished = block.count(FINISHED)
        if finished:
            finished = sum(FINISHED in line for line in block.split(b"\n"))
        with self.cond:
            self.events += block.count(b"\n")
            self.finished += finished
            self.cond.notify_all()

    def wait_finished(self, expected: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.finished >= expected or
                               self.closed)


class Progress:
    """A pv-like line on stderr: events, rate, and for files percent and ETA.

    A thread redraws it a few times a second from the stream's counters, so
    the send loop pays nothing for it; stop() erases it.
    """

    showing = None  # the line on screen: warn() prints above it

    def __init__(self, stream: Stream, tally: list,
                 total: Optional[int]) -> None:
        self.stream = stream
        self.base = stream.bytes  # the reply-back flags are no event
        self.tally = tally  # tally[0]: bytes read from files and not sent
        self.total = total  # bytes the sources hold, if known
        self.started = time.monotonic()
        # The rate is over the last second or so, as pv's.
        self.samples = collections.deque([(self.started, 0)],
                                         int(1 / PROGRESS_INTERVAL) + 1)
        self.shown = ""  # the text on screen
        self.width = 80
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        Progress.showing = self
        self.thread.start()

    @staticmethod
    def wanted(args: argparse.Namespace, sources: list) -> bool:
        """Return whether a send is long enough and watched on a terminal."""
        if args.quiet or args.verbose or not sys.stderr.isatty() or \
                args.reply_back and sys.stdout.isatty() or \
                reading_terminal(sources):
            return False  # other lines would tear it
        total = source_bytes(sources, args.repeat)
        return bool(args.rate) or total is None or \
            total >= PROGRESS_MIN_BYTES

    def run(self) -> None:
        leave_signals_to_main()
        while not self.done.wait(PROGRESS_INTERVAL):
            with self.lock:
                try:
                    self.draw(self.line())
                except OSError:  # the terminal went away: sending goes on
                    self.shown = ""
                    return

    def line(self) -> str:
        now = time.monotonic()
        events = self.stream.events
        self.samples.append((now, events))
        then, before = self.samples[0]
        rate = (events - before) / (now - then) if now > then else 0.0
        # As the listener's live line, with pv's percentage and ETA.
        text = "%s  %s  %s/s" % (plural(events, "event"),
                                 format_bytes(self.stream.bytes),
                                 format_count(int(rate)))
        if not self.total:
            return text + "  " + format_duration(now - self.started)
        done = self.stream.bytes - self.base + self.tally[0]
        done = max(0, min(done, self.total))
        text += "  %d%%" % (100 * done // self.total)
        speed = done / (now - self.started)
        if speed > 0:
            text += "  ETA " + format_duration((self.total - done) / speed)
        return text

    def draw(self, text: str) -> None:
        try:
            self.width = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            pass
        # A line as wide as the terminal would wrap, and \r not undo it.
        text = text[:self.width - 1]
        # Spaces, not an ANSI erase, as the listener's live line: every
        # console understands them.
        gone = max(0, len(self.shown) - len(text))
        sys.stderr.write("\r" + text + " " * gone + "\b" * gone)
        sys.stderr.flush()
        self.shown = text

    def erase(self) -> None:
        if self.shown:
            self.shown, shown = "", self.shown
            # Two more for the ^C a terminal echoes after the line.
            blank = " " * min(len(shown) + 2, self.width - 1)
            try:
                sys.stderr.write("\r" + blank + "\r")
                sys.stderr.flush()
            except OSError:
                pass

    def print_above(self, line: str) -> None:
        with self.lock:
            self.erase()
            print(line, file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop redrawing and erase the line."""
        self.done.set()
        self.thread.join()
        Progress.showing = None
        self.erase()


def source_bytes(sources: list, repeat: int) -> Optional[int]:
    """Return how many bytes the sources hold, or None if one is a pipe."""
    total = 0
    for _, source in sources:
        if isinstance(source, list):
            total += sum(len(event) + 1 for event in source)
            continue
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        total += info.st_size - source.tell()
    return total * repeat


def reading_terminal(sources: list) -> bool:
    """Return whether a source is the terminal a person types on."""
    return any(not isinstance(source, list) and source.isatty()
               for _, source in sources)


def ping(address: tuple, timeout: float) -> float:
    """Send CyberTrace's ping; return seconds until PONG, or raise."""
    where = format_address(*address)
    started = time.monotonic()
    with connect(address, timeout) as sock:
        answer = b""
        try:
            sock.sendall(PING)
            for data in chunk_receive(sock):
                answer += data
                if answer.strip() == b"PONG" or len(answer) > 64:
                    break
        except socket.timeout:
            raise UserError("no PONG from %s within %g s" % (where, timeout))
        except OSError as exc:
            raise UserError("no PONG from %s: %s" % (where, exc.strerror))
    if answer.strip() != b"PONG":
        raise UserError("no PONG from %s: got %r" % (where, answer[:64]))
    return time.monotonic() - started


# --- The lab check (--check) ------------------------------------------------
#
# One process plays the whole lab: it listens where CyberTrace delivers
# detections (with the listener's own code), sends the test events to
# CyberTrace's input, and matches what comes back.  Alongside, a second
# connection asks CyberTrace directly (reply-back) which indicators it
# detects: that tells a broken delivery from missing feeds, and lets the
# check end as soon as everything CyberTrace detects has arrived.

def token_pattern(indicators: List[str]) -> "re.Pattern":
    """Match any of indicators as a whole token, in any letter case."""
    # A token ends where no character could go on with it: 192.0.2.1 is
    # not in 192.0.2.10, 10.192.0.2.1 or 192.0.2.1/24.  A URL may come
    # without its scheme or with a final "/", as feeds and templates vary.
    alternatives = []
    for number, indicator in enumerate(indicators):
        scheme, sep, rest = indicator.partition("://")
        text = (r"(?:[a-z]+://)?%s/?" % re.escape(rest) if sep
                else re.escape(indicator))
        alternatives.append("(?P<i%d>%s)" % (number, text))
    return re.compile(r"(?<![\w.\-])(?:%s)(?![\w.\-]|/[\w.\-~%%])"
                      % "|".join(alternatives), re.IGNORECASE)


TEST_INDICATORS = [value for _, value, _ in TEST_RECORDS]
_TEST_TOKEN = token_pattern(TEST_INDICATORS)


def named_indicators(event: str) -> set:
    """Return the test indicators that event names, wherever they are."""
    return {TEST_INDICATORS[int(found.lastgroup[1:])]
            for found in _TEST_TOKEN.finditer(event)}


def carried_category(event: str) -> Optional[str]:
    """Return the event's category= (or Category=) field, if it has one."""
    for key, value in parse_fields(event).items():
        if key.lower() == "category":
            value = (value[0] if isinstance(value, list) else value).strip()
            return value if value not in ("", "-") else None
    return None


def visible(event: str, width: int = 0) -> str:
    """Return event safe to print on a terminal, cut to width if given."""
    if width and len(event) > width:
        event = event[:width - 3] + "..."
    return bytes(format_raw(event.encode("utf-8", "surrogateescape"), [],
                            "", 0.0, True)).decode("utf-8", "replace")


class Arrivals:
    """The events that reach the check's listener, sorted as they come."""

    def __init__(self, sent: List[bytes]) -> None:
        self.cond = threading.Condition()
        self.sent = {event.decode() for event in sent}
        self.sent_at = None  # monotonic time the test events went out
        self.latency = {}  # indicator: seconds from sending to arrival
        self.categories = {}  # indicator: categories its events carried
        self.events = 0
        self.others = 0
        self.first_other = None
        self.connections = 0  # set when the listener is done

    def take(self, block: bytes) -> None:
        """Sort a block of events (called by the listener's thread)."""
        now = time.monotonic()
        with self.cond:
            for line in split_lines(block):
                event = line[:-1].decode("utf-8", "replace")
                self.events += 1
                # Before the test events went out, or one of them coming
                # back unchanged, it cannot be a detection of them.
                named = set()
                if self.sent_at is not None and event not in self.sent:
                    named = named_indicators(event)
                if not named:
                    self.others += 1
                    if self.first_other is None:
                        self.first_other = event
                    continue
                category = carried_category(event)
                for indicator in named:
                    self.latency.setdefault(indicator, now - self.sent_at)
                    kinds = self.categories.setdefault(indicator, [])
                    if category and category not in kinds:
                        kinds.append(category)
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(self, probe: "Probe", deadline: float) -> None:
        """Wait until every indicator CyberTrace detects came, or deadline."""
        def complete() -> bool:
            if len(self.latency) == len(TEST_INDICATORS):
                return True
            return probe.answered_all() and probe.detected <= set(
                self.latency)
        with self.cond:
            while not complete():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)


class Probe:
    """Ask CyberTrace directly which test indicators it detects.

    A connection of its own sends the test events with
    X-KF-SendFinishedEventX-KF-ReplyBack: the detections come back on it,
    whatever the output ConnectionString says, then one LookupFinished
    event per event.
    """

    def __init__(self, address: tuple, events: List[bytes], deadline: float,
                 wake: Callable[[], None]) -> None:
        self.address = address
        self.events = events
        self.deadline = deadline
        self.wake = wake
        self.detected = set()
        self.answered = 0
        self.error = None
        self.done = False
        self.sock = None
        self.aborted = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def answered_all(self) -> bool:
        return self.done and self.answered >= len(self.events)

    def run(self) -> None:
        leave_signals_to_main()
        try:
            self.ask()
        except UserError as exc:
            self.error = str(exc)
        except socket.timeout:
            self.error = "no answer within the timeout"
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        finally:
            with self.lock:
                self.done = True
                if self.sock is not None:
                    self.sock.close()
            self.wake()

    def ask(self) -> None:
        sock = connect(self.address, self.left())
        with self.lock:
            self.sock = sock
            if self.aborted:
                return
        sock.settimeout(self.left())
        # The flags go alone, as Kaspersky's own clients send them.
        sock.sendall(REPLY_BACK_FLAGS)
        sock.sendall(b"".join(event + b"\n" for event in self.events))
        for event in parse_response(sock):
            if FINISHED in event:
                # Counted apart: a finished event may quote the event.
                self.answered += 1
                if self.answered >= len(self.events):
                    return
            else:
                self.detected |= named_indicators(
                    event.decode("utf-8", "replace"))
            sock.settimeout(self.left())
        if not self.aborted:
            self.error = "CyberTrace closed the connection after %s" % (
                plural(self.answered, "answer"))

    def left(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def stop(self, patience: float) -> None:
        """Let the probe finish for patience seconds, then cut it short."""
        self.thread.join(patience)
        with self.lock:
            self.aborted = True
            if self.sock is not None and not self.done:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        # Only a connect() still waiting could hold it, until the deadline.
        self.thread.join(max(0.0, self.deadline - time.monotonic()) + 1)

    def finding(self) -> str:
        """Say what the probe found, for a diagnosis."""
        total = len(self.events)
        if self.answered_all():
            if not self.detected:
                return ("its feeds detect none of the test indicators: "
                        "check that feeds are loaded (CyberTrace answered "
                        "all %d when asked directly)" % total)
            return "CyberTrace detects %d of %d when asked directly" % (
                len(self.detected), total)
        if self.aborted and self.error is None:
            return "CyberTrace did not answer in time when asked directly " \
                   "(%d of %d answered)" % (self.answered, total)
        return "CyberTrace did not answer when asked directly: %s" % (
            self.error or "no answer")


def connect_patiently(address: tuple, deadline: float) -> socket.socket:
    """Connect to CyberTrace's input; a refusal is tried again briefly."""
    # Started on one command line with the check (stand-in & check), a
    # CyberTrace or its stand-in may not listen yet for a moment.
    patience = min(deadline, time.monotonic() + CONNECT_PATIENCE)
    while True:
        try:
            return connect(address, max(0.1, round(
                deadline - time.monotonic(), 1)))
        except UserError as exc:
            refused = isinstance(exc.__context__, ConnectionRefusedError)
            if not refused or time.monotonic() + 0.05 >= patience:
                raise
        time.sleep(0.05)


def send_test_events(args: argparse.Namespace, events: List[bytes],
                     arrivals: Arrivals, deadline: float) -> None:
    """Send the test events to CyberTrace's input as the step-5 mode does."""
    where = format_address(*args.connect)
    with connect_patiently(args.connect, deadline) as sock:
        stream = Stream(sock, where)
        with arrivals.cond:
            arrivals.sent_at = time.monotonic()
        send_all(stream, frame_lines(events), args.verbose)
        sock.shutdown(socket.SHUT_WR)
        stream.wait_delivered(max(0.001, deadline - time.monotonic()))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def check(args: argparse.Namespace, prog: str) -> int:
    """Run the lab check; print the table and return the exit status."""
    started = time.monotonic()
    deadline = started + args.timeout
    events = demo_events()
    arrivals = Arrivals(events)
    listener = EmbeddedListener(args.check, arrivals.take)
    serving = None
    try:
        try:
            here = listener.bind()
        except UserError as exc:
            if "in use" in str(exc):
                raise UserError("%s (stop the listener there while the "
                                "check runs: the check listens in its place)"
                                % exc)
            raise
        failure = []
        serving = threading.Thread(target=serve_check, daemon=True,
                                   args=(listener, failure))
        serving.start()
        say(args, "Listening on %s for CyberTrace's detections (its "
                  "OutputSettings > ConnectionString)" % here)
        if is_loopback(args.check[0]) and not is_loopback(args.connect[0]):
            warn("CyberTrace at %s cannot reach %s: use --check 0.0.0.0:%d "
                 "and point its ConnectionString at this host"
                 % (args.connect[0], here, args.check[1]))
        probe = None
        interrupted = False
        try:
            send_test_events(args, events, arrivals, deadline)
            probe = Probe(args.connect, events, deadline, arrivals.wake)
            say(args, "Sent %d test events to %s; waiting up to %.0f s for "
                      "their detections" % (len(events),
                                            format_address(*args.connect),
                                            deadline - time.monotonic()))
            arrivals.wait(probe, deadline)
        except KeyboardInterrupt:
            interrupted = True  # still say what came
        ended = time.monotonic()
        if probe is not None:
            # A probe about to finish may; its answers are not needed.
            probe.stop(0 if interrupted else
                       min(0.2, max(0.0, deadline - ended)))
    finally:
        listener.stop()
        if serving is not None:
            serving.join()
        arrivals.connections = listener.accepted
        listener.close()
    if failure:
        raise UserError("the check's listener failed: %r" % failure[0])
    print_check_table(arrivals, here, ended)
    if interrupted:
        if HoldInterrupts.number == signal.SIGTERM:
            print("%s: terminated" % prog, file=sys.stderr)
            return 143
        print("%s: interrupted" % prog, file=sys.stderr)
        return 130
    found = len(arrivals.latency)
    for line in diagnose(args, arrivals, probe, here, ended):
        print(line, file=sys.stderr)
    if found == len(TEST_INDICATORS) or (found and not args.strict):
        return 0
    return 1


def serve_check(listener: EmbeddedListener, failure: list) -> None:
    """Run the check's listener; keep what stopped it, if not stop()."""
    leave_signals_to_main()
    try:
        listener.serve()
    except Exception as exc:  # reported by check(), not lost in a thread
        failure.append(exc)


def say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def print_check_table(arrivals: Arrivals, here: str, ended: float) -> None:
    """Print one row per test indicator, the count and the other events."""
    rows = [("indicator", "expected", "carried", "latency")]
    for _, indicator, expected in TEST_RECORDS:
        if indicator in arrivals.latency:
            latency = "{:,.1f} ms".format(arrivals.latency[indicator] * 1000)
            carried = ", ".join(arrivals.categories[indicator]) or "-"
        else:
            latency, carried = "not detected", "-"
        rows.append((indicator, expected, visible(carried, 40), latency))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(text.ljust(width) for text, width in
                       zip(row, widths)) + "  " + row[3] for row in rows]
    found = len(arrivals.latency)
    took = max(arrivals.latency.values()) if found else \
        ended - (arrivals.sent_at or ended)
    lines.append("%d of %d test indicators detected and delivered to %s in "
                 "%.1f s" % (found, len(TEST_INDICATORS), here, took))
    if arrivals.others:
        lines.append("%s (service alerts, detections of events this check "
                     "did not send); the first: %s" % (
                         plural(arrivals.others, "other event"),
                         visible(arrivals.first_other, 300)))
    else:
        lines.append("no other events")
    try:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (| head): as cat, say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def diagnose(args: argparse.Namespace, arrivals: Arrivals, probe: Probe,
             here: str, ended: float) -> List[str]:
    """Say which link is broken, in a line or two, if one is."""
    total = len(TEST_INDICATORS)
    found = len(arrivals.latency)
    waited = ended - (arrivals.sent_at or ended)
    if found == total:
        return []
    directly = probe.answered_all() and probe.detected
    lost = directly and not probe.detected <= set(arrivals.latency)
    if found:
        lines = []
        if lost:
            lines.append("CyberTrace detects %d of %d when asked directly, "
                         "but only %d reached %s in %.1f s" % (
                             len(probe.detected), total, found, here,
                             waited))
        elif args.strict:
            lines.append(probe.finding() + (
                ": its feeds lack the others" if directly else ""))
        if args.strict:
            lines.insert(0, "--strict: %d of %d test indicators did not "
                            "come back" % (total - found, total))
            return lines
        return ["warning: " + line for line in lines]
    if probe.answered_all() and not probe.detected:
        first = probe.finding()
        if not arrivals.events:
            return [first, "nothing reached %s either, as nothing was "
                           "detected: run the check again once feeds are "
                           "loaded" % here]
        return [first]
    if not arrivals.connections:
        line = ("no connection reached %s in %.1f s: check that CyberTrace's"
                " OutputSettings > ConnectionString points here and that no "
                "firewall blocks the port" % (here, waited))
        if is_loopback(args.check[0]) and not is_loopback(args.connect[0]):
            line += " (%s is loopback: use --check 0.0.0.0:%d)" % (
                here, args.check[1])
    elif not arrivals.events:
        line = "%s reached %s but sent no events" % (
            plural(arrivals.connections, "connection"), here)
    else:
        line = "%s reached %s with %s, none naming a test indicator; the " \
               "first: %s" % (plural(arrivals.connections, "connection"),
                              here, plural(arrivals.events, "event"),
                              visible(arrivals.first_other, 200))
    if directly:
        if arrivals.connections and arrivals.events:
            second = ("CyberTrace detects %d of %d when asked directly, but "
                      "sent no detection here: point OutputSettings > "
                      "ConnectionString (not only AlertConnectionString) "
                      "at %s" % (len(probe.detected), total, here))
        else:
            second = ("CyberTrace detects %d of %d when asked directly: "
                      "detection works, delivery to %s does not"
                      % (len(probe.detected), total, here))
    else:
        second = probe.finding()
    return [line, second]


def build_parser() -> argparse.ArgumentParser:
    """Describe the command line."""
    default = format_address(CYBERTRACE_ADDR, CYBERTRACE_PORT)
    parser = OneLineParser(
        description="Send events to Kaspersky CyberTrace's input port, one "
        "line per event. With no FILE, --event or --demo, read stdin. "
        "--check ADDR:PORT runs the lab check instead: it listens at ADDR:PORT"
        " (where CyberTrace's output ConnectionString points), sends the 17 "
        "test events and prints a table of the detections that came back.",
        epilog="Exit status: 0 when the peer acknowledged every event (and, "
        "with --reply-back, answered it), 1 on an error or when there are no "
        "events to send, 2 on bad arguments, 130 on Ctrl+C, 143 on SIGTERM;"
        " with --check, 0 when at least one test indicator came back "
        "(--strict: all 17), else 1. "
        "'Acknowledged by the peer' means that the peer's TCP stack "
        "received the bytes, not that a program read or processed them: a "
        "listener that rejects the connection after the TCP handshake still "
        "acknowledges what arrived before it closed. Only --reply-back's "
        "LookupFinished answers show that CyberTrace processed each event.")
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="files of events, one per line ('-' is stdin)")
    parser.add_argument("-e", "--event", action="append", metavar="TEXT",
                        help="send TEXT as an event (repeatable)")
    parser.add_argument("--demo", action="store_true",
                        help="send one event per test indicator of "
                        "Kaspersky's test records (http://fakess123.nu, "
                        "192.0.2.1, 776735A8CA96DB15B422879DA599F474 and 14 "
                        "more); the demo feeds detect 3 of them, the full "
                        "feeds all 17")
    parser.add_argument(
        "-c", "--connect", metavar="ADDR:PORT", default=(CYBERTRACE_ADDR,
                                                         CYBERTRACE_PORT),
        type=argument_type(lambda text: parse_address(text, CYBERTRACE_ADDR),
                       "address"),
        help="CyberTrace's input address (InputSettings > ConnectionString)"
        ": 192.0.2.10:9999, [::1]:9999 or a bare PORT (default: %s)"
        % default)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reply-back", action="store_true",
                      help="ask CyberTrace to answer on this connection "
                      "(X-KF-SendFinishedEventX-KF-ReplyBack), print its "
                      "answers to stdout and wait for a LookupFinished per "
                      "event")
    mode.add_argument("--ping", action="store_true",
                      help="check that CyberTrace is up: exit 0 on PONG")
    mode.add_argument(
        "--check", metavar="ADDR:PORT",
        type=argument_type(lambda text: parse_address(text, LISTEN_ADDR),
                       "address"),
        help="the lab check: listen at ADDR:PORT (CyberTrace's OutputSettings"
        " > ConnectionString, same syntax as the listener's --listen: 9998 "
        "is 127.0.0.1:9998; 0.0.0.0:9998 when CyberTrace runs on another "
        "host), send the test events to --connect and print which came back "
        "detected, with their latency; on failure, say which link is broken")
    parser.add_argument("--strict", action="store_true",
                        help="with --check, exit 0 only if all 17 test "
                        "indicators came back (the demo feeds detect 3)")
    parser.add_argument(
        "-t", "--timeout", metavar="SECONDS",
        type=argument_type(bounded(float, *SECONDS), "seconds"),
        help="give up when connecting, sending or waiting for an answer "
        "stalls this long (default: %g); with --check, how long to wait for "
        "the detections, all included (default: %g)"
        % (TIMEOUT, CHECK_TIMEOUT))
    parser.add_argument(
        "--reconnect", action="store_true",
        help="ride out outages (CyberTrace restarting): when connecting "
        "fails or the connection is lost, retry for ever (at once, then "
        "after 0.5 s, doubling up to 30 s), then resend every event from "
        "the first one the peer's TCP did not acknowledge, so events may "
        "arrive twice but none the kernel could tell about is lost. Where "
        "the kernel does not say what was acknowledged (Linux's TIOCOUTQ, "
        "macOS's SO_NWRITE; Windows has neither), the events of the last "
        "send buffer's worth of bytes are resent. Input is not read while "
        "disconnected. Not with --ping, --reply-back or --check")
    parser.add_argument("--rate", metavar="EPS",
                        type=argument_type(bounded(float, *RATE), "EPS"),
                        help="send at most EPS events per second")
    parser.add_argument("--repeat", metavar="N", default=1,
                        type=argument_type(bounded(int, 1, REPEAT_LIMIT), "N"),
                        help="send the input N times")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="print each event to stderr as Kaspersky's "
                      "tutorial does ('Sending:' then the event)")
    talk.add_argument("-q", "--quiet", action="store_true",
                      help="print nothing but errors and warnings")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    return parser


def run(args: argparse.Namespace) -> str:
    """Send as the arguments say; return the summary line."""
    where = format_address(*args.connect)
    if args.ping:
        took = ping(args.connect, args.timeout)
        return "PONG from %s in %.1f ms" % (where, took * 1000)
    sources = []
    stream = replies = None
    try:
        sources = open_sources(args)
        if reading_terminal(sources) and not args.quiet:
            print(TERMINAL_NOTICE, file=sys.stderr, flush=True)
        tally = [0]
        # Sizes are known before anything is read.
        watched = Progress.wanted(args, sources)
        total = watched and source_bytes(sources, args.repeat)
        blocks = some_events(event_blocks(sources, args.repeat, tally))
        if args.reconnect:
            return send_reconnecting(args, blocks, where,
                                     (tally, total) if watched else None)
        if args.rate:
            blocks = paced(blocks, args.rate)
        started = time.monotonic()
        with connect(args.connect, args.timeout) as sock:
            stream = Stream(sock, where)
            replies = progress = None
            try:
                if args.reply_back:
                    stream.send(REPLY_BACK_FLAGS, 0)
                    replies = Replies(sock)
                if watched:
                    progress = Progress(stream, tally, total or None)
                send_all(stream, blocks, args.verbose)
                if replies is None:
                    sock.shutdown(socket.SHUT_WR)
                    stream.wait_delivered(args.timeout)
                else:
                    replies.wait_finished(stream.events)
            except KeyboardInterrupt:
                # Count now, while the socket still answers; a second
                # Ctrl+C must not cut the cleanup short.
                HoldInterrupts.stopping = True
                raise Interrupted(interrupted(stream, replies)) from None
            finally:
                if progress is not None:
                    progress.stop()
                if replies is not None:
                    # Wake the reader if it is still waiting for data.
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    replies.thread.join()
        took = time.monotonic() - started
    except KeyboardInterrupt:
        if stream is None:  # before the connection: nothing went out
            raise Interrupted("0 events sent, 0 acknowledged") from None
        raise Interrupted(interrupted(stream, replies)) from None
    finally:
        close_sources(sources)
    summary = "Sent %s, %s to %s in %.2f s" % (
        plural(stream.events, "event"), format_bytes(stream.bytes), where,
        took)
    if replies is not None:
        if replies.finished < stream.events:
            raise SendError("%s: %s of %s answered (%s)" % (
                where, format_count(replies.finished),
                plural(stream.events, "event"),
                replies.error or "connection closed by CyberTrace"))
        summary += "; %s answered: %s" % (
            plural(replies.finished, "event"),
            plural(replies.events - replies.finished, "detection"))
    return summary


def interrupted(stream: Stream, replies: Optional[Replies]) -> str:
    """Say what got through before Ctrl+C."""
    text = stream.interrupted()
    if replies is not None:
        text += "; %s answered: %s" % (
            plural(replies.finished, "event"),
            plural(replies.events - replies.finished, "detection"))
    return text


def refuse_ignored(parser: argparse.ArgumentParser,
                   args: argparse.Namespace) -> None:
    """Exit 2 on arguments that this combination would silently ignore."""
    if args.ping:
        ignored = [("FILE", args.files), ("-e/--event", args.event),
                   ("--demo", args.demo), ("--rate", args.rate),
                   ("--repeat", args.repeat != 1),
                   ("-v/--verbose", args.verbose)]
        for name, given in ignored:
            if given:
                parser.error("argument --ping: not allowed with %s (a ping "
                             "sends no events)" % name)
    if args.files.count("-") > 1:
        # The first '-' reads stdin to its end: the others would get nothing.
        parser.error("argument FILE: '-' (stdin) given more than once")


def check_arguments(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> None:
    """Exit 2 on what --check cannot take; give -t its default."""
    if args.timeout is None:
        args.timeout = CHECK_TIMEOUT if args.check else TIMEOUT
    if not args.check:
        if args.strict:
            parser.error("argument --strict: only with --check")
        return
    # The check sends its own 17 test events, once, at once.
    for name, given in [("FILE", args.files), ("-e/--event", args.event),
                        ("--rate", args.rate),
                        ("--repeat", args.repeat != 1)]:
        if given:
            parser.error("argument --check: not allowed with %s (the check "
                         "sends the test events)" % name)
    host, port = args.check
    if port == args.connect[1] and (host == args.connect[0] or host in (
            "0.0.0.0", "::") or is_loopback(host) and
            is_loopback(args.connect[0])):
        parser.error("argument --check: %s is CyberTrace's input (-c); "
                     "--check takes where CyberTrace delivers detections, "
                     "e.g. %d" % (format_address(host, port), LISTEN_PORT))


def refuse_with_reconnect(parser: argparse.ArgumentParser,
                          args: argparse.Namespace) -> None:
    """Exit 2 on modes --reconnect cannot resume."""
    if args.reconnect:
        for name in ("ping", "reply_back", "check"):
            if getattr(args, name, False):
                parser.error("argument --reconnect: not allowed with --%s"
                             % name.replace("_", "-"))


def main(argv: Optional[list] = None) -> int:
    """Run the sender; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_ignored(parser, args)
    check_arguments(parser, args)
    refuse_with_reconnect(parser, args)
    keep_freed_memory()
    if hasattr(signal, "SIGBREAK"):
        # Ctrl+Break in a Windows console stops the sender as Ctrl+C does.
        signal.signal(signal.SIGBREAK, HoldInterrupts.on_interrupt)
    previous = install_interrupt_handler()
    terminate = install_terminate_handler()
    try:
        if args.check:
            return check(args, parser.prog)
        summary = run(args)
    except NothingToSend as exc:
        warn(str(exc))
        return 1
    except Interrupted as exc:
        # On a terminal, write over the ^C it echoed.
        erase = "\r" if sys.stderr.isatty() else ""
        if HoldInterrupts.number == signal.SIGTERM:
            print("%s%s: terminated: %s" % (erase, parser.prog, exc),
                  file=sys.stderr)
            return 143
        print("%s%s: interrupted: %s" % (erase, parser.prog, exc),
              file=sys.stderr)
        return 130
    except UserError as exc:
        print("%s: error: %s" % (parser.prog, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("%s: interrupted" % parser.prog, file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)
    if not args.quiet:
        print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
