#!/usr/bin/env python3
"""Send events to Kaspersky CyberTrace's input port.

By default the events are sent and nothing is awaited: CyberTrace delivers
its detections to its configured output (see listen_events_cybertrace.py).
--reply-back asks CyberTrace to answer on the same connection instead, and
--ping checks that the service is up.  --check ADDR:PORT is the lab check:
it listens where CyberTrace delivers, sends the test events and says what
came back, or which link is broken (LabCheck).

The file, top to bottom:

- Ctrl+C and SIGTERM: counts are never torn (HoldInterrupts).
- Events in: files, stdin, -e, --test-events; framing, --repeat, --rate.
- Acknowledgements: AckLedger counts whole events the peer's TCP took;
  Connection is a socket with a ledger.
- --reconnect: Backoff, Outage and Resender.
- --reply-back, --ping, and the progress line.
- The lab check: Arrivals, Probe, LabCheck, CheckResult and diagnose().
- The command line and main().
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import functools
import ipaddress
import itertools
import json
import os
import random
import re
import select
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from typing import (BinaryIO, Callable, Iterable, Iterator, List, Optional,
                    Union)

try:
    from listen_events_cybertrace import (
        FINISHED, LISTEN_ADDR, LISTEN_PORT, LIVE_SECONDS, RECV_SIZE, SECONDS,
        UNIX_PREFIX, Block, Console, EmbeddedListener, EventFramer,
        OneLineParser, RateMeter, UserError, alert_name, argument_type,
        binary_stdout, bounded, escape_block, escape_controls, escape_line,
        format_address, format_bytes, format_count, format_duration,
        format_latency, format_progress, formatter, interface_addresses,
        ip_of, is_pipe, keep_freed_memory, open_connection, parse_address,
        parse_fields, parse_listen, parse_network, parse_response, peer_gone,
        plural, reachable_hosts, receive_blocks, resolved_addresses,
        silence_stdout, split_lines, stream_flags, to_text, write_now,
        write_stdout, __version__)
    import cybertrace_capacity as capacity
    import follow_files
except ModuleNotFoundError as exc:
    if exc.name not in ("listen_events_cybertrace", "cybertrace_capacity",
                        "follow_files"):
        raise
    # Copied alone, without the module it shares its code with.
    sys.exit("%s: error: %s.py must be in the same folder (%s)" % (
        os.path.basename(sys.argv[0] or "send_events_cybertrace.py"),
        exc.name, "it holds the capacity test" if exc.name ==
        "cybertrace_capacity" else "it holds the framing and the lab "
        "check's listener"))

try:
    from fcntl import ioctl
    from termios import TIOCOUTQ
except ImportError:  # not on Linux: see unacknowledged_bytes()
    ioctl = TIOCOUTQ = None
# macOS tells the same through a socket option its headers name SO_NWRITE.
SO_NWRITE = getattr(socket, "SO_NWRITE",
                    0x1024 if sys.platform == "darwin" else None)

# bind() fails with these when another program listens there (WSA: Windows).
ADDRESS_IN_USE = (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", 10048))
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
# A connection lost this soon after it was made does not earn a quick retry:
# a peer that takes the handshake and then drops us (a listener refusing
# this host) acknowledges what arrived before its close, however much its
# receive buffer took, so what it acknowledged proves nothing.
HELD_SECONDS = 3.0
# This many such short connections in a row are warned of, once.
DROPS_WARNING = 3
# select() said the socket is readable, so even without this flag
# (Windows) the read does not block.
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
REPLY_BACK_FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
PING = b"X-KF-ReplyBackPING"
# CyberTrace splits an inbound event over 64 KB into several (online help
# 178566); cutting them here, the same way, keeps the sender's memory and
# time bounded on a line that never ends (a pipe, /dev/zero), where
# holding it whole cost its square in copies.
CYBERTRACE_EVENT_BYTES = 64 * 1024
EOF_KEY = "Ctrl+Z then Enter" if sys.platform == "win32" else "Ctrl+D"
TERMINAL_NOTICE = ("Reading events from the terminal: each line is sent "
                   "when you press Enter; %s to finish" % EOF_KEY)
# A signal that comes while an interruption is reported ends us this soon,
# whatever the report waits on (a stderr nobody reads).
STOP_GRACE = 1.0
# How long a stop waits for the thread that prints --reply-back's answers:
# it looks up from a stdout that takes nothing this often.
REPLIES_POLL = 0.05
REPLIES_JOIN = 1.0
# Files smaller than this go out before a progress line could mean anything.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
# --rate's bounds: at the least one event every 100 s, so that a wait for
# the next never overflows a timer.
RATE = (0.01, 1e9)
REPEAT_LIMIT = 10 ** 9
# --repeat reads a pipe once and keeps it in a temporary file to send
# again: at most this much, so that an endless pipe cannot fill the disk.
SPOOL_LIMIT = 1024 * 1024 * 1024
# --load sends the first this many events round and round.
LOAD_EVENTS = 100000

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
TEST_FIELDS = [(field, value) for field, value, _ in TEST_RECORDS]
TEST_INDICATORS = [value for _, value, _ in TEST_RECORDS]

# Status lines, warnings and the progress line, on stderr; main() sets -q.
console = Console()
# The progress line erases the ^C a terminal echoes after it too.
console.margin = 2


class SendError(UserError):
    """Sending failed; the message says how far it got, reason why."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class NothingToSend(UserError):
    """The sources hold no event: nothing is worth a connection."""


class Interrupted(Exception):
    """Ctrl+C or SIGTERM: the message says what got through."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Counted: from here on a signal must not tear the report.
        HoldInterrupts.stopping = True


# --- Ctrl+C and SIGTERM ------------------------------------------------------

class HoldInterrupts:
    """Hold Ctrl+C while a count is updated; raise it when done.

    A Ctrl+C just after the kernel took some bytes, before the count says
    so, would report fewer events sent than the peer gets.
    """

    holding = False
    pending = False  # a Ctrl+C came while holding
    number = None  # the signal that stopped us: SIGINT, SIGTERM, SIGBREAK
    stopping = False  # counted and being reported (see on_interrupt)
    deadline = None  # the timer that ends us if the report is stuck

    def __enter__(self) -> None:
        HoldInterrupts.holding = True

    def __exit__(self, *exc) -> None:
        HoldInterrupts.holding = False
        if HoldInterrupts.pending:
            HoldInterrupts.pending = False
            raise KeyboardInterrupt

    @staticmethod
    def on_interrupt(number, frame) -> None:
        if HoldInterrupts.stopping:
            # A traceback would tear the report, so none; but whatever the
            # report waits on, this signal too must stop us.
            HoldInterrupts.exit_soon()
            return
        HoldInterrupts.number = number
        if HoldInterrupts.holding:
            HoldInterrupts.pending = True
        else:
            raise KeyboardInterrupt

    @staticmethod
    def exit_soon() -> None:
        """Exit within STOP_GRACE s with the first signal's status."""
        if HoldInterrupts.deadline is None:
            status = 143 if HoldInterrupts.number == getattr(
                signal, "SIGTERM", None) else 130
            timer = threading.Timer(STOP_GRACE, os._exit, (status,))
            timer.daemon = True
            timer.start()
            HoldInterrupts.deadline = timer


HOLD_INTERRUPTS = HoldInterrupts()


def install_interrupt_handlers() -> list:
    """Make Ctrl+C, SIGTERM (systemctl stop, kill) and Ctrl+Break stop us
    with the counts; return what to restore."""
    if threading.current_thread() is not threading.main_thread():
        return []
    HoldInterrupts.pending = HoldInterrupts.stopping = False
    restore = []
    for name, default in (("SIGINT", signal.default_int_handler),
                          ("SIGTERM", signal.SIG_DFL),
                          ("SIGBREAK", signal.SIG_DFL)):
        number = getattr(signal, name, None)
        # Ignored (nohup, cron) or someone else's: not ours to take.
        if number is not None and signal.getsignal(number) is default:
            restore.append((number, signal.signal(
                number, HoldInterrupts.on_interrupt)))
    return restore


def interrupted_status(prog: str, detail: str = "") -> int:
    """Say that Ctrl+C or SIGTERM stopped us; return 130 or 143."""
    HoldInterrupts.stopping = True
    terminated = HoldInterrupts.number == getattr(signal, "SIGTERM", None)
    # On a terminal, write over the ^C it echoed.
    erase = "\r" if console.on_stderr() else ""
    console.line("%s%s: %s%s" % (erase, prog, "terminated" if terminated
                                 else "interrupted",
                                 ": " + detail if detail else ""))
    return 143 if terminated else 130


def leave_signals_to_main() -> None:
    """Block Ctrl+C in this helper thread: the main thread must get it."""
    # A signal that lands here would not wake the main thread from select
    # or send, and Ctrl+C would seem to do nothing for a while.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT,
                                                  signal.SIGTERM})


# --- Events in ---------------------------------------------------------------

def test_events() -> List[bytes]:
    """Return one realistic event line per test indicator."""
    stamp = time.strftime("%b %d %H:%M:%S")
    events = []
    for number, (field, value) in enumerate(TEST_FIELDS, 1):
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


def drop_blank_lines(block: Block) -> tuple:
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


def frame_file(name: str, source: BinaryIO, sniff: bool = True,
               tally: Optional[list] = None) -> Iterator[tuple]:
    """Yield (block, events) read from a file, one event per line.

    sniff: warn if the first read looks binary.  tally[0] grows by the
    bytes read and not sent (a CR, a blank line, the start of an
    unfinished line): with the bytes sent, how far the file went.
    """
    framer = EventFramer(CYBERTRACE_EVENT_BYTES)
    # Read as the listener reads, for its reasons: a million events go out
    # in a few hundred system calls, and a block fits one 1 MiB arena.
    buffer = bytearray(2 * RECV_SIZE)
    tally = [0] if tally is None else tally
    while True:
        try:
            before = framer.received
            block = framer.read(source.readinto, buffer, RECV_SIZE)
        except OSError as exc:
            raise UserError("cannot read %s: %s" % (name, exc.strerror))
        if block is None:
            break
        if sniff:
            sniff = False
            # The first read is still whole at the start of the buffer.
            if buffer.find(b"\0", 0, framer.received) >= 0:
                console.warn("%s looks binary (NUL bytes in its first %d "
                             "KiB); sending it as it is"
                             % (name, RECV_SIZE // 1024))
        if framer.split_events:
            warn_split(escape_line(name))
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
    if framer.split_events:
        warn_split(escape_line(name))


# The files whose long lines were cut, each said once: a file of long lines,
# or one sent again by --repeat, must not become a flood of warnings.
_SPLIT_SAID: set = set()


def warn_split(name: str) -> None:
    """Say at once, the first time only, that a line of name went out in
    pieces: a pipe or a followed file may never reach its end."""
    if name in _SPLIT_SAID:
        return
    _SPLIT_SAID.add(name)
    console.warn("%s: a line longer than %d KiB sent in pieces of %d KiB, "
                 "as CyberTrace splits them (said once per file)" % (
                     name, CYBERTRACE_EVENT_BYTES // 1024,
                     CYBERTRACE_EVENT_BYTES // 1024))


class Spool:
    """Read a pipe once for --repeat, keeping what it gives in a temporary
    file (at most SPOOL_LIMIT bytes) to read it again."""

    def __init__(self, name: str, source: BinaryIO,
                 limit: Optional[int] = None) -> None:
        self.name = name
        self.source = source
        self.limit = limit or SPOOL_LIMIT
        self.size = 0
        self.file = tempfile.TemporaryFile()

    def readinto(self, buffer) -> int:
        got = self.source.readinto(buffer)
        if got:
            self.size += got
            if self.size > self.limit:
                raise UserError(
                    "--repeat keeps %s to send it again, and it passed %s: "
                    "save it to a file and give that instead" % (
                        self.name, format_bytes(self.limit)))
            try:
                self.file.write(memoryview(buffer)[:got])
            except OSError as exc:
                raise UserError("--repeat keeps %s in a temporary file to "
                                "send it again, and cannot write it: %s" % (
                                    self.name, exc.strerror)) from None
        return got

    def replay(self) -> BinaryIO:
        """Return the temporary file, from its start."""
        self.file.flush()
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self.file.close()


def open_sources(args: argparse.Namespace) -> list:
    """Open every FILE now, so a missing one fails before anything is sent."""
    sources = []
    for name in args.files or ([] if args.event or args.test_events
                               else ["-"]):
        shown = "stdin" if name == "-" else escape_line(name)
        try:
            if name == "-":
                source = open(sys.stdin.fileno(), "rb", buffering=0,
                              closefd=False)
            else:
                source = open(name, "rb", buffering=0)
        except OSError as exc:
            close_sources(sources)
            raise UserError("cannot read %s: %s" % (shown, exc.strerror))
        sources.append((shown, source))
    if args.event:
        sources.append(("--event", [e.encode("utf-8", "surrogateescape")
                                    for e in args.event]))
    if args.test_events:
        sources.append(("--test-events", test_events()))
    return sources


def close_sources(sources: list) -> None:
    for _, source in sources:
        if not isinstance(source, list):
            source.close()


def event_blocks(sources: list, repeat: int,
                 tally: Optional[list] = None) -> Iterator[tuple]:
    """Yield (block, events) from every source, repeat times over."""
    spools = {}
    try:
        for round_number in range(repeat):
            for index, (name, source) in enumerate(sources):
                if isinstance(source, list):
                    yield from frame_lines(source)
                elif index in spools:
                    yield from frame_file(name, spools[index].replay(),
                                          False, tally)
                elif repeat > 1 and not source.seekable():
                    # A pipe can be read once: keep it to send it again.
                    spools[index] = Spool(name, source)
                    yield from frame_file(name, spools[index], True, tally)
                else:
                    if round_number:
                        source.seek(0)
                    yield from frame_file(name, source, not round_number,
                                          tally)
    finally:
        for spool in spools.values():
            spool.close()


def some_events(blocks: Iterator[tuple]) -> Iterator[tuple]:
    """Return blocks unchanged, or raise NothingToSend if there are none."""
    # Read the first event before connecting: an empty source then costs
    # the peer no connection.
    first = next(blocks, None)
    if first is None:
        raise NothingToSend("no events to send")
    return itertools.chain([first], blocks)


def typed_events(blocks: Iterator[tuple]) -> Iterator[tuple]:
    """Yield the blocks a person types, saying how once connected (this
    runs at the first read); raise NothingToSend if none came."""
    console.status(TERMINAL_NOTICE)
    typed = False
    for item in blocks:
        typed = True
        yield item
    if not typed:
        raise NothingToSend("no events to send")


def paced(blocks: Iterable[tuple], rate: float,
          clock: Callable[[], float] = time.monotonic) -> Iterator[tuple]:
    """Yield the events of blocks in batches, rate events per second."""
    started = clock()
    sent = 0
    for block, _ in blocks:
        events = bytes(block)[:-1].split(b"\n")
        taken = 0
        while taken < len(events):
            elapsed = clock() - started
            due = int(elapsed * rate) + 1 - sent
            if due <= 0:
                time.sleep(sent / rate - elapsed)
                continue
            batch = events[taken:taken + due]
            taken += len(batch)
            sent += len(batch)
            yield b"\n".join(batch) + b"\n", len(batch)


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


# --- Acknowledgements --------------------------------------------------------

def count_lines(block: Block, end: int) -> int:
    """Count the events in the first end bytes of a block."""
    if isinstance(block, memoryview):
        return block.obj.count(b"\n", 0, min(end, len(block)))
    return block.count(b"\n", 0, end)


def event_start(block: Block, offset: int) -> int:
    """Return where the event holding a block's byte at offset starts."""
    if isinstance(block, memoryview):
        return block.obj.rfind(b"\n", 0, min(offset, len(block))) + 1
    return block.rfind(b"\n", 0, offset) + 1


class AckLedger:
    """What went out on one connection, and how much of it the peer's TCP
    acknowledged, counted in whole events.  No socket: the caller says what
    the kernel took (took, sent) and what it holds unacknowledged
    (acknowledge).

    Blocks are reused buffers, so only the tail that may not have arrived
    is copied: (offset, events before it, bytes), from an event's start.
    """

    def __init__(self) -> None:
        self.events = 0  # events handed whole to the kernel
        self.bytes = 0
        self.acked = 0  # bytes acknowledged, when last asked
        self.acked_events = 0  # whole events acknowledged, when last asked
        self.tails = []
        self.sending = None  # (block, offset, events before it) in flight
        # Where the kernel cannot tell what the peer acknowledged, what it
        # took counts as delivered, but the last `keep` bytes (a send
        # buffer's worth, for --reconnect) are kept to send again.
        self.measured = True
        self.keep = 0

    def begin(self, block: Block) -> None:
        """Start sending block."""
        self.sending = block, self.bytes, self.events

    def took(self, count: int) -> None:
        """Count bytes of the block in flight that the kernel took."""
        self.bytes += count

    def sent(self, events: int) -> None:
        """The kernel took the whole block in flight, of events events."""
        block, start, _ = self.sending
        self.events += events
        self.sending = None
        kept = self.kept_from()
        if kept < self.bytes:
            cut = event_start(block, max(0, kept - start))
            tail = bytes(memoryview(block)[cut:])
            # Mostly a short tail is unacknowledged: count that only.
            self.tails.append((start + cut, self.events - tail.count(b"\n"),
                               tail))

    def acknowledge(self, unacknowledged: Optional[int]) -> None:
        """Take the kernel's count of bytes not acknowledged yet (None: it
        cannot tell)."""
        if unacknowledged is None:
            self.measured = False
            unacknowledged = 0
        self.acked = max(self.acked, self.bytes - unacknowledged)
        kept = self.kept_from()
        while self.tails and \
                self.tails[0][0] + len(self.tails[0][2]) <= kept:
            self.tails.pop(0)
        if self.sending is None:
            # Read by the progress line's thread, which must not ask the
            # kernel or walk the tails itself.
            self.acked_events = min(self.delivered(), self.events)

    def surely_delivered(self, first: int = 0) -> int:
        """Return how many events (numbered from first) precede the first
        one that may not have arrived: what a saved position may pass."""
        window = self.unacknowledged(first)
        return window[0][2] if window else first + self.events

    def kept_from(self) -> int:
        """Return the offset from which sent bytes are kept to resend."""
        if self.measured:
            return self.acked
        return max(0, self.bytes - self.keep)

    def delivered(self, block: Optional[Block] = None, start: int = 0,
                  before: int = 0) -> int:
        """Return how many whole events the peer acknowledged."""
        for offset, events, tail in self.tails:
            if self.acked < offset + len(tail):
                return events + tail.count(b"\n", 0, self.acked - offset)
        if block is not None and self.acked < start + len(block):
            return before + count_lines(block, max(0, self.acked - start))
        return self.events

    def counts(self) -> tuple:
        """Return the events sent and acknowledged, even within a send."""
        sent, acked = self.events, self.delivered()
        if self.sending is not None:
            # Stopped within a block: count its events the kernel took whole.
            block, start, before = self.sending
            sent = before + count_lines(block, self.bytes - start)
            acked = self.delivered(block, start, before)
        return sent, min(acked, sent)

    def unacknowledged(self, first: int) -> list:
        """Return (block, events, number) for what the peer may not have
        acknowledged, from the start of its first event; first numbers the
        connection's first event."""
        kept = self.kept_from()
        window = []
        for offset, before, tail in self.tails:
            if offset + len(tail) <= kept:
                continue
            if offset < kept:
                cut = tail.rfind(b"\n", 0, kept - offset) + 1
                before += tail.count(b"\n", 0, cut)
                tail = tail[cut:]
            window.append((tail, tail.count(b"\n"), first + before))
        return window


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


def say_sent(sent: int, acknowledged: int) -> str:
    return "%s sent, %s acknowledged" % (plural(sent, "event"),
                                         format_count(acknowledged))


def connect(address: tuple, timeout: float) -> socket.socket:
    """Connect to CyberTrace or raise a one-line UserError."""
    where = format_address(*address)
    try:
        return open_connection(address, timeout)
    except socket.gaierror as exc:
        raise UserError("cannot resolve %s: %s" % (address[0], exc.strerror))
    except socket.timeout:
        raise UserError("cannot connect to %s: timed out after %g s"
                        % (where, timeout))
    except OSError as exc:
        raise UserError("cannot connect to %s: %s" % (where, exc.strerror))


class Connection:
    """A connection to CyberTrace's input, with the ledger of what it sent
    and what the peer acknowledged."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.ledger = AckLedger()

    @property
    def events(self) -> int:
        return self.ledger.events

    @property
    def bytes(self) -> int:
        return self.ledger.bytes

    @property
    def sent_bytes(self) -> int:
        """Bytes the kernel took: what a progress line shows."""
        return self.ledger.bytes

    @property
    def acked_events(self) -> int:
        return self.ledger.acked_events

    def send(self, block: Block, events: int) -> None:
        """Send a block of events whole, or raise SendError with counts."""
        ledger = self.ledger
        ledger.begin(block)
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
                    ledger.took(sent)
        except socket.timeout:
            self.update_acked()
            raise SendError("timed out sending to %s after %g s: %s"
                            % (self.where, self.sock.gettimeout(),
                               self.progress()),
                            "no progress for %g s" % self.sock.gettimeout())
        except OSError as exc:
            # After a reset the kernel forgets its queue: keep the count
            # from before, a lower bound.
            raise self.lost(exc.strerror)
        with HOLD_INTERRUPTS:
            ledger.sent(events)
            self.update_acked()

    def update_acked(self) -> None:
        """Ask the kernel how much the peer acknowledged."""
        self.ledger.acknowledge(unacknowledged_bytes(self.sock))

    def progress(self) -> str:
        """Say how far the sending got, for an error."""
        return say_sent(*self.ledger.counts()) + " by the peer"

    def lost(self, why: str) -> SendError:
        """Return the error of a connection that failed for why."""
        return SendError("connection to %s lost: %s (%s)" % (
            self.where, why, self.progress()), why)

    def counts(self) -> tuple:
        """Return the events sent and acknowledged, even within a send."""
        self.update_acked()
        return self.ledger.counts()

    def finish(self, timeout: float) -> None:
        """Say that nothing more comes (FIN), then wait until the peer
        acknowledged every byte, or fail."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the peer closed, or reset, already
            raise self.lost(exc.strerror or str(exc)) from None
        self.wait_delivered(timeout)

    def wait_delivered(self, timeout: float) -> None:
        """Wait until the peer acknowledged every byte sent, or fail."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        watch = [self.sock]
        while True:
            self.update_acked()
            if self.ledger.acked >= self.ledger.bytes:
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
                    raise self.lost(exc.strerror)
            elif not watch:
                # After its FIN, recv() says nothing more: a reset that
                # follows shows only here.
                error = self.sock.getsockopt(socket.SOL_SOCKET,
                                             socket.SO_ERROR)
                if error:
                    raise self.lost(os.strerror(error))
                time.sleep(pause)
            pause = min(pause * 2, 0.02)


def echo(block: Block) -> None:
    """Print a block's events to stderr as the tutorial does."""
    if console.on_stderr():
        block = escape_block(block)
    text = to_text(block)
    console.write("".join("Sending:\n%s\n" % line
                          for line in text[:-1].split("\n")))


def send_all(sender: Union[Connection, Resender], blocks: Iterable[tuple],
             verbose: bool) -> None:
    """Send every block with sender.send (a Connection, or a Resender),
    echoing events to stderr when verbose."""
    for block, count in blocks:
        if verbose:
            echo(block)
        sender.send(block, count)


def sent_summary(events: int, size: int, where: str, took: float) -> str:
    """Return the line that ends a send."""
    return "Sent %s, %s to %s in %.2f s" % (
        plural(events, "event"), format_bytes(size), where, took)


# --- --reconnect: connections that come and go, nothing lost -----------------

class Backoff:
    """How long to wait before the next connection attempt: not at all
    after a connection that got something across, then first, doubling up
    to most, with jitter."""

    def __init__(self, first: float = RECONNECT_FIRST,
                 most: float = RECONNECT_MAX) -> None:
        self.first = first
        self.most = most
        self.failures = 0  # attempts and connections that got nowhere

    def delay(self) -> float:
        if not self.failures:
            return 0.0
        return min(self.most, self.first * 2 ** (self.failures - 1))

    def wait(self) -> None:
        # Jitter: senders cut off together do not all come back at the
        # same instant.
        delay = self.delay()
        if delay:
            time.sleep(delay * random.uniform(0.75, 1.0))

    def failed(self) -> None:
        self.failures += 1

    def reset(self) -> None:
        self.failures = 0


class Outage:
    """When the connection was lost, and why; the time spent disconnected,
    kept out of --rate's clock."""

    def __init__(self) -> None:
        self.since = None  # (when, why) the outage under way began
        self.offline = 0.0

    def begin(self, why: str) -> bool:
        """Start an outage, unless one is under way; tell if it started."""
        if self.since is not None:
            return False
        self.since = time.monotonic(), why
        return True

    def restart(self, why: str) -> None:
        """Start an outage now: the connection made after the last one got
        nowhere either."""
        self.since = None
        self.begin(why)

    def end(self) -> Optional[float]:
        """End the outage under way; return how long it lasted."""
        if self.since is None:
            return None
        took = time.monotonic() - self.since[0]
        self.offline += took
        self.since = None
        return took

    def clock(self) -> float:
        """Return a monotonic clock that stops during outages."""
        # --rate paces by it: after an outage it goes on at the same rate
        # instead of catching up in a burst.
        return time.monotonic() - self.offline


class Resender:
    """Send over connections that come and go (--reconnect), resending
    from the first event the peer's TCP did not acknowledge.

    Events are numbered from 0 in input order; the connection in use
    carries events from number self.first on, so its ledger counts from
    there.  What is held is that connection's unacknowledged tails plus
    the block being sent: input is not read while no connection takes it.
    """

    def __init__(self, address: tuple, timeout: float, where: str,
                 retry_max: float = RECONNECT_MAX) -> None:
        self.address = address
        self.timeout = timeout
        self.where = where
        self.connection = None
        self.first = 0
        self.taken = self.bytes = 0  # events and bytes read from the input
        self.sent = 0  # events handed to a kernel, whole or in part
        self.resent = self.reconnects = 0
        # Blocks to send before reading on: (block, events, number).
        self.queue = collections.deque()
        self.backoff = Backoff(min(RECONNECT_FIRST, retry_max), retry_max)
        self.outage = Outage()
        self.connected = False  # ever
        self.connected_at = 0.0  # when the connection in use was made
        self.drops = 0  # short connections in a row (HELD_SECONDS)
        # Bytes of input that went out, each once (a resend is not new):
        # what a progress line shows, with how far into the head block of
        # the queue a lost connection had got.
        self.sent_bytes = 0
        self.head_taken = 0

    @property
    def events(self) -> int:
        """Events sent: what a progress line shows."""
        return self.sent

    @property
    def acked_events(self) -> int:
        """Events acknowledged, as last asked (for another thread)."""
        connection, first = self.connection, self.first
        acked = first + (connection.ledger.acked_events if connection
                         else 0)
        return min(acked, self.sent)

    def send(self, block: Block, count: int) -> None:
        """Send a block of count events over whatever connection works."""
        self.queue.append((block, count, self.taken))
        self.taken += count
        self.bytes += len(block)
        self.flush()

    def flush(self) -> None:
        """Send the queued blocks over as many connections as it takes."""
        while self.queue:
            if self.connection is None:
                self.connect()
            block, count, number = self.queue[0]
            why = self.connection_lost()
            if why:
                self.lose(why)
                continue
            before = self.connection.bytes
            try:
                self.connection.send(block, count)
            except SendError as exc:
                taken = self.connection.bytes - before
                self.count_bytes(number, count, taken, len(block))
                self.count_sent(number, touched(block, taken))
                self.lose(exc.reason)
                continue
            with HOLD_INTERRUPTS:
                self.count_bytes(number, count, len(block), len(block))
                self.count_sent(number, count)
                self.queue.popleft()
            ledger = self.connection.ledger
            if not ledger.measured:
                ledger.keep = max(ledger.keep, send_buffer(
                    self.connection.sock))

    def finish(self) -> None:
        """Wait until the peer acknowledged every event sent."""
        while True:
            self.flush()
            if self.connection is None:
                self.connect()
                continue
            why = self.connection_lost()
            if why:
                self.lose(why)
                continue
            try:
                self.connection.finish(self.timeout)
                return
            except SendError as exc:
                self.lose(exc.reason)

    def connection_lost(self) -> str:
        """Return why the connection is gone, or "" if it seems alive."""
        # Acknowledgements that came while we waited for input shrink
        # what a lost connection makes us send twice.
        self.connection.update_acked()
        return peer_gone(self.connection.sock)

    def count_bytes(self, number: int, count: int, taken: int,
                    size: int) -> None:
        """Count the bytes of input a kernel took for the first time:
        taken of the size bytes of the block of events number on."""
        if number + count <= self.sent:
            return  # a resend
        # Only the block a lost connection cut short was partly out.
        already = self.head_taken if number < self.sent else 0
        self.sent_bytes += max(0, taken - already)
        self.head_taken = 0 if taken >= size else max(already, taken)

    def count_sent(self, number: int, count: int) -> None:
        """Count events number to number + count as handed to a kernel;
        those handed over before count as resent."""
        self.resent += max(0, min(self.sent, number + count) - number)
        self.sent = max(self.sent, number + count)

    def connect(self) -> None:
        """Connect, retrying with backoff for ever."""
        while True:
            self.backoff.wait()
            try:
                sock = open_connection(self.address, self.timeout)
                break
            except OSError as exc:
                self.backoff.failed()
                why = exc.strerror or "timed out after %g s" % self.timeout
                if self.outage.begin(why):
                    console.warn("cannot connect to %s (%s); retrying"
                                 % (self.where, why))
        self.connection = Connection(sock, self.where)
        self.connection.ledger.keep = send_buffer(sock)
        self.connected_at = time.monotonic()
        self.first = self.queue[0][2] if self.queue else self.taken
        took = self.outage.end()
        if took is not None:
            if self.connected:
                self.reconnects += 1
                resend = self.sent - self.first
                console.warn("reconnected after %.1f s%s" % (
                    took, "; resending %s not acknowledged" % plural(
                        resend, "event") if resend else ""))
            else:
                console.warn("connected after %.1f s" % took)
        self.connected = True

    def lose(self, why: str) -> None:
        """Close a lost connection; keep what may not have arrived."""
        connection, self.connection = self.connection, None
        if why == "closed by the peer":
            # It is closing: what we sent may still be read, so wait for
            # it rather than send it twice.
            try:
                connection.finish(self.timeout)
            except SendError:
                pass
        connection.sock.close()
        window = connection.ledger.unacknowledged(self.first)
        self.queue.extendleft(reversed(window))
        self.first = self.queue[0][2] if self.queue else self.taken
        self.outage.restart(why)
        console.warn("connection to %s lost (%s) after %s; retrying" % (
            self.where, why, plural(self.sent, "event")))
        self.back_off(connection)

    def back_off(self, connection: Connection) -> None:
        """Retry at once after a connection that held; back off after one
        that got nowhere or ended soon (accepted, then dropped)."""
        lasted = time.monotonic() - self.connected_at
        if lasted >= HELD_SECONDS:
            self.backoff.reset()
            self.drops = 0
            return
        self.backoff.failed()
        self.drops += 1
        if self.drops == DROPS_WARNING:
            console.warn(
                "%s accepted and then dropped %d connections in a row, "
                "each within %g s: what its TCP acknowledged may not have "
                "been processed (a listener refusing this host does that); "
                "backing off. --reply-back (without --reconnect) shows for "
                "sure: CyberTrace answers each event it processed" % (
                    self.where, self.drops, HELD_SECONDS))

    def check_peer(self) -> None:
        """While input waits: notice a lost connection now, and connect
        again (resending what may not have arrived) before reading on."""
        if self.connection is None:
            return
        why = self.connection_lost()
        if why:
            self.lose(why)
            if not self.queue:
                self.connect()
            self.flush()

    def surely_acknowledged(self) -> int:
        """Return how many events, in input order, precede the first one
        the peer may not have: what a saved position may pass."""
        if self.connection is None:
            return self.first
        self.connection.update_acked()
        return self.connection.ledger.surely_delivered(self.first)

    def counts(self) -> tuple:
        """Return the events sent and acknowledged, outage or not."""
        if self.connection is None:
            return self.sent, self.first
        sent, acked = self.connection.counts()
        return max(self.sent, self.first + sent), self.first + acked

    def close(self) -> None:
        if self.connection is not None:
            self.connection.sock.close()

    def summary(self, took: float) -> str:
        return sent_summary(self.taken, self.bytes, self.where, took) + \
            self.say_reconnects()

    def say_reconnects(self) -> str:
        """Say how many reconnects and resends it took, if any."""
        if not self.reconnects:
            return ""
        return "; %s, %s resent" % (plural(self.reconnects, "reconnect"),
                                    plural(self.resent, "event"))


def touched(block: Block, sent: int) -> int:
    """Count the events of a block whose first byte is among sent bytes."""
    return count_lines(block, sent - 1) + 1 if sent > 0 else 0


def send_buffer(sock: socket.socket) -> int:
    """Return the size of a socket's send buffer."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def send_reconnecting(args: argparse.Namespace, blocks: Iterable[tuple],
                      where: str, watch: Optional[tuple],
                      connect_first: bool = False,
                      follower=None) -> str:
    """Send with --reconnect; return the summary line.

    watch: (tally, total) for a progress line, as Progress takes them;
    connect_first: connect (waiting for the peer, saying so) before the
    first read, as at a terminal; follower: --follow's, told what the
    peer acknowledged.
    """
    resender = Resender(args.connect, args.timeout, where, args.retry_max)
    if follower is not None:
        follower.acknowledged = resender.surely_acknowledged
        follower.check = resender.check_peer
    if args.rate:
        blocks = paced(blocks, args.rate, resender.outage.clock)
    started = time.monotonic()
    progress = None
    try:
        if connect_first:
            resender.connect()
        if watch is not None:
            progress = Progress(resender, *watch)
        send_all(resender, blocks, args.verbose)
        resender.finish()
    except KeyboardInterrupt:
        # --follow ends only so: its last line counts the outages too.
        raise Interrupted(say_sent(*resender.counts()) +
                          resender.say_reconnects()) from None
    finally:
        if progress is not None:
            progress.stop()
        if follower is not None:
            # Before the socket closes: its kernel still knows.
            follower.close(resender.surely_acknowledged())
        resender.close()
    return resender.summary(time.monotonic() - started)


# --- --reply-back, --ping and the progress line ------------------------------

class Replies:
    """Read CyberTrace's answers in a thread and print them to stdout.

    stdout is written without waiting where a reader can stall it (a
    pipe nobody reads), so that stop() always ends the thread: a thread
    blocked in a write would hold the sender past -t and past every
    signal, and sys.stdout's lock would hold its exit too.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.events = 0
        self.finished = 0
        self.error = None
        self.closed = False
        self.cond = threading.Condition()
        self.escape = sys.stdout.isatty()
        self.out = binary_stdout()
        self.flags = stream_flags(self.out)
        self.stopping = threading.Event()
        self.stalled_since = None  # when stdout last took nothing
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        leave_signals_to_main()
        error = None
        try:
            for block in receive_blocks(self.sock):
                self.take(block)
                if self.stopping.is_set():
                    break
        except socket.timeout:
            error = "timed out waiting for answers"
        except OSError as exc:
            error = exc.strerror or str(exc)
        except UserError as exc:
            error = str(exc)
        with self.cond:
            # The first reason stays: a wait that timed out shuts the
            # socket down, which this read then fails on.
            self.error = self.error or error
            self.closed = True
            self.cond.notify_all()

    def take(self, block: bytes) -> None:
        data = escape_block(block) if self.escape else block
        written = self.write(data)
        if written < len(data):  # stopped: count the lines printed whole
            block = data[:data.rfind(b"\n", 0, written) + 1]
        finished = block.count(FINISHED)
        if finished:
            finished = sum(FINISHED in line for line in block.split(b"\n"))
        with self.cond:
            self.events += block.count(b"\n")
            self.finished += finished
            self.cond.notify_all()

    def write(self, data: bytes) -> int:
        """Write data to stdout; return how much of it, less once stopped."""
        view = memoryview(data)
        done = 0
        while done < len(data) and not self.stopping.is_set():
            if self.flags is not None and not select.select(
                    [], [self.out], [], REPLIES_POLL)[1]:
                if self.stalled_since is None:
                    self.stalled_since = time.monotonic()
                continue
            try:
                done += write_now(self.out, view[done:], self.flags)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                silence_stdout()
                raise UserError("cannot write to stdout: Broken pipe") \
                    from None
            except OSError as exc:
                raise UserError("cannot write to stdout: %s" % (
                    exc.strerror or exc)) from None
            self.stalled_since = None
        return done

    def stalled(self) -> str:
        """Say how long stdout has taken no answer, if it has stalled."""
        since = self.stalled_since
        if since is None:
            return ""
        return "stdout has taken no answer for %.1f s" % (
            time.monotonic() - since)

    def stop(self) -> None:
        """Stop reading and printing answers; wait for that, briefly."""
        self.stopping.set()
        # Wake the reader if it is still waiting for data.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # Where a write cannot be given up (Windows), the thread is left
        # behind: it holds no lock that exit needs.
        self.thread.join(REPLIES_JOIN)

    def wait_finished(self, expected: int, timeout: float) -> None:
        """Wait for expected LookupFinished answers, at most timeout s,
        however slowly they trickle in."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.finished < expected and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.error = self.error or self.stalled() or \
                        "timed out waiting for answers"
                    return
                self.cond.wait(left)

    def summary(self) -> str:
        return "%s answered: %s" % (
            plural(self.finished, "event"),
            plural(self.events - self.finished, "detection"))


def ping(address: tuple, timeout: float) -> float:
    """Send CyberTrace's ping; return seconds until PONG, or raise."""
    where = format_address(*address)
    started = time.monotonic()
    deadline = started + timeout
    with connect(address, timeout) as sock:
        answer = b""
        try:
            sock.sendall(PING)
            # The whole answer within the timeout, however it trickles.
            while answer.strip() != b"PONG" and len(answer) <= 64:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                data = sock.recv(64)
                if not data:
                    break
                answer += data
        except socket.timeout:
            raise UserError("no PONG from %s within %g s" % (where, timeout))
        except OSError as exc:
            raise UserError("no PONG from %s: %s" % (where, exc.strerror))
    if not answer:
        raise UserError("no PONG from %s: it closed the connection without "
                        "a word" % where)
    if answer.strip() != b"PONG":
        raise UserError("no PONG from %s: it answered %s" % (
            where, visible(to_text(answer[:64]))))
    return time.monotonic() - started


class Progress:
    """A pv-like line on stderr: events and bytes sent, rate, events
    acknowledged, and for files percent and ETA.

    A thread redraws it a few times a second from the sender's counters
    (events, sent_bytes, acked_events: what went out, never what was only
    read), so the send loop pays nothing for it; stop() erases it.
    """

    def __init__(self, counters, tally: list,
                 total: Optional[int]) -> None:
        self.counters = counters
        self.base = counters.sent_bytes  # the reply-back flags are no event
        self.tally = tally  # tally[0]: bytes read from files and not sent
        self.total = total  # bytes the sources hold, if known
        self.started = time.monotonic()
        self.meter = RateMeter(self.started, int(1 / LIVE_SECONDS) + 1)
        self.stopped = threading.Event()
        console.live = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def watched(args: argparse.Namespace, sources: list) -> bool:
        """Return whether a send is watched on a terminal, alone."""
        # Other lines (-v, answers, typing) would tear it.
        return not (args.quiet or args.verbose or not console.on_stderr() or
                    args.reply_back and sys.stdout.isatty() or
                    reading_terminal(sources))

    @staticmethod
    def wanted(args: argparse.Namespace, sources: list) -> bool:
        """Return whether a send is long enough and watched on a terminal."""
        if not Progress.watched(args, sources):
            return False
        total = source_bytes(sources, args.repeat)
        return bool(args.rate) or total is None or \
            total >= PROGRESS_MIN_BYTES

    def run(self) -> None:
        leave_signals_to_main()
        while not self.stopped.wait(LIVE_SECONDS):
            console.show(self.line())

    def line(self) -> str:
        now = time.monotonic()
        events, size = self.counters.events, self.counters.sent_bytes
        # As the listener's live line, with pv's percentage and ETA.
        text = format_progress(events, size, self.meter.rate(now, events))
        text += "  %s acknowledged" % format_count(
            self.counters.acked_events)
        if not self.total:
            return text + "  " + format_duration(now - self.started)
        done = size - self.base + self.tally[0]
        done = max(0, min(done, self.total))
        text += "  %d%%" % (100 * done // self.total)
        speed = done / (now - self.started)
        if speed > 0:
            text += "  ETA " + format_duration((self.total - done) / speed)
        return text

    def stop(self) -> None:
        """Stop redrawing and erase the line."""
        self.stopped.set()
        self.thread.join()
        console.clear()
        console.live = False


# --- The lab check (--check) -------------------------------------------------
#
# One process plays the whole lab: it listens where CyberTrace delivers
# detections (with the listener's own code), sends the test events to
# CyberTrace's input, and matches what comes back.  Alongside, a second
# connection asks CyberTrace directly (reply-back) which indicators it
# detects: that tells a broken delivery from missing feeds, confirms that
# what arrived is what CyberTrace detects, and lets the check end as soon
# as everything CyberTrace detects has arrived.  Only CyberTrace's host
# (the -c host, or --allow) may deliver.

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
    return escape_controls(event)


def is_loopback(host: str) -> bool:
    if host.startswith(UNIX_PREFIX):
        return True  # a UNIX socket's peer is on this host
    try:
        return ip_of(host).is_loopback
    except ValueError:
        return host == "localhost"


def cybertrace_hosts(host: str) -> list:
    """Return the networks CyberTrace at host delivers from: its addresses,
    and, when it runs on this host, this host's own."""
    if host.startswith(UNIX_PREFIX):
        host = "localhost"  # reached over a UNIX socket: on this host
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UserError("cannot resolve %s" % host) from None
    found = {ip_of(info[4][0]) for info in infos}
    if any(ip.is_loopback for ip in found):
        # Delivering to a check on 0.0.0.0, it comes from the address it
        # connects to; and localhost is 127.0.0.1 and ::1 alike.
        found |= set(interface_addresses() or resolved_addresses())
        found |= {ipaddress.ip_address("127.0.0.1"),
                  ipaddress.ip_address("::1")}
    return [ipaddress.ip_network(ip) for ip in sorted(
        found, key=lambda ip: (ip.version, ip))]


def shown_addresses(server: socket.socket) -> List[str]:
    """Return where server can be reached, as the listener says it: a
    wildcard address is the host's addresses (see announce())."""
    host, port = server.getsockname()[:2]
    if port is None:  # a named pipe
        return [host]
    hosts = reachable_hosts(server)
    if hosts is None:
        return [format_address(host, port)]
    if not hosts:
        return ["this host's address:%d" % port]
    return [format_address(each, port) for each in hosts]


class OtherEvents:
    """Write the events that are not the check's answers, whole, in a
    listener format: to stdout, or appended to a file (-o)."""

    def __init__(self, path: Optional[str], name: str) -> None:
        self.path = path
        self.file = None
        if path is not None:
            try:
                # 0640 as the listener's files: detections are not for all.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                             getattr(os, "O_BINARY", 0), 0o640)
            except OSError as exc:
                raise UserError("cannot open %s: %s" % (
                    escape_line(path), exc.strerror)) from None
            self.file = os.fdopen(fd, "ab")
        self.escape = path is None and sys.stdout is not None and \
            sys.stdout.isatty()
        self.format = formatter(name, self.escape)
        self.lock = threading.Lock()
        self.written = 0
        self.error = None  # why writing failed, once it did

    @property
    def where(self) -> str:
        return "stdout" if self.path is None else escape_line(self.path)

    def write(self, lines: list, peer: str, listen: str = "") -> None:
        """Write lines (events with their b"\\n", from peer, arrived at
        listen) whole."""
        with self.lock:
            if self.error is not None:
                return
            data = self.format(b"".join(lines), lines, peer, time.time(),
                               self.escape, listen=listen)
            try:
                if self.file is None:
                    write_stdout(bytes(data))
                else:
                    self.file.write(data)
                    self.file.flush()
                self.written += len(lines)
            except UserError as exc:
                self.error = str(exc)
            except OSError as exc:
                self.error = "cannot write to %s: %s" % (
                    self.where, exc.strerror or exc)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                if self.error is None:
                    self.error = "cannot write to %s: %s" % (
                        self.where, exc.strerror or exc)


class Arrival:
    """The first event that named a test indicator, and what it carried."""

    def __init__(self, latency: float, peer: str, at: int = 0) -> None:
        self.latency = latency
        self.peer = peer
        self.at = at  # which of the check's addresses it arrived at
        self.categories = []


class Arrivals:
    """The events that reach the check's listener, sorted as they come."""

    def __init__(self, sent: List[bytes],
                 write: Optional[Callable[[list, str, str], None]] = None
                 ) -> None:
        self.cond = threading.Condition()
        self.sent = {event.decode() for event in sent}
        self.sent_at = None  # monotonic time the test events went out
        self.found = {}  # indicator: Arrival
        self.events = 0
        self.others = 0
        self.first_other = None
        self.others_at = collections.Counter()  # address number: events
        self.alerts_at = {}  # address number: alert names, as they came
        # Where the other events go, whole (OtherEvents.write): a check in
        # the listener's place must drop nothing CyberTrace delivers.
        self.write = write
        # Each address number's name, as the listener's JSON "listen" has
        # it (the address as bound), once listening.
        self.places = []

    def take(self, block: bytes, peer: str, at: int = 0) -> None:
        """Sort a block of events that arrived at the check's address
        number at (called by that address's listener thread)."""
        now = time.monotonic()
        others = []
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
                    self.note_other(event, at)
                    others.append(line)
                    continue
                category = carried_category(event)
                for indicator in named:
                    arrival = self.found.setdefault(
                        indicator, Arrival(now - self.sent_at, peer, at))
                    if category and category not in arrival.categories:
                        arrival.categories.append(category)
            self.cond.notify_all()
        if others and self.write is not None:
            self.write(others, peer, self.places[at]
                       if at < len(self.places) else "")

    def note_other(self, event: str, at: int) -> None:
        """Count an event that is none of the check's answers."""
        self.others += 1
        self.others_at[at] += 1
        if self.first_other is None:
            self.first_other = event
        name = alert_name(event)
        if name is not None:
            names = self.alerts_at.setdefault(at, [])
            if name not in names:
                names.append(name)

    def mark_sent(self) -> None:
        """Note that the test events go out now: latencies count from here,
        and only what comes after can be their detection."""
        with self.cond:
            self.sent_at = time.monotonic()

    def wake(self) -> None:
        """Make wait() look again (another thread's news)."""
        with self.cond:
            self.cond.notify_all()

    def wait(self, complete: Callable[[set], bool], deadline: float) -> None:
        """Wait until complete(the indicators that came) says so, or the
        deadline."""
        with self.cond:
            while not complete(set(self.found)):
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
                 wake) -> None:
        self.address = address
        self.events = events
        self.deadline = deadline
        self.wake = wake
        self.detected = set()
        self.answered = 0
        self.error = None
        self.finished = False
        self.sock = None
        self.aborted = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def outcome(self) -> ProbeOutcome:
        """Return what CyberTrace said so far."""
        return ProbeOutcome(
            asked=len(self.events), answered=self.answered,
            finished=self.finished, detected=set(self.detected),
            late=self.aborted and self.error is None, error=self.error)

    def has_come(self, found: set) -> bool:
        """Tell whether found holds every indicator CyberTrace detects
        when asked; without its answer, all 17."""
        if not self.finished:
            return False
        outcome = self.outcome()
        if outcome.answered_all:
            return outcome.detected <= found
        return len(found) == len(TEST_INDICATORS)

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
                self.finished = True
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
            if self.sock is not None and not self.finished:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        # Only a connect() still waiting could hold it, until the deadline.
        self.thread.join(max(0.0, self.deadline - time.monotonic()) + 1)


@dataclasses.dataclass
class ProbeOutcome:
    """What CyberTrace said when asked directly (the probe)."""

    asked: int = 0  # test events asked about; 0: not asked
    answered: int = 0
    finished: bool = False
    detected: set = dataclasses.field(default_factory=set)
    late: bool = False  # cut short at the deadline
    error: Optional[str] = None

    @property
    def answered_all(self) -> bool:
        """Tell whether CyberTrace answered every test event directly."""
        return self.finished and self.asked > 0 and \
            self.answered >= self.asked


@dataclasses.dataclass
class CheckResult:
    """What the check found: all the report and the diagnosis read."""

    here: str  # where the check listened, as ConnectionStrings
    strict: bool
    loopback_only: bool  # the check listened on loopback, CyberTrace not
    check_port: int
    arrivals: Arrivals
    waited: float  # seconds from sending to the end of the wait
    connections: int  # connections the check's listener took
    rejected: int  # connections refused: not from CyberTrace's host
    first_rejected: str
    probe: ProbeOutcome
    # Each address the check listened at, as a ConnectionString.
    addresses: List[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False  # by Ctrl+C or SIGTERM: no verdict
    others_to: str = ""  # where the other events were written

    @property
    def confirmed(self) -> list:
        """The indicators that arrived and that CyberTrace detects when
        asked directly; all that arrived when it did not answer."""
        found = self.arrivals.found
        if not self.probe.answered_all:
            return [i for i in TEST_INDICATORS if i in found]
        return [i for i in TEST_INDICATORS
                if i in found and i in self.probe.detected]

    @property
    def unconfirmed(self) -> list:
        """The indicators that arrived, yet CyberTrace does not detect."""
        return [i for i in TEST_INDICATORS if i in self.arrivals.found and
                i not in self.confirmed]

    def status(self) -> int:
        found = len(self.confirmed)
        if found == len(TEST_INDICATORS) or (found and not self.strict):
            return 0
        return 1


class LabCheck:
    """The lab check, in phases: listen, send, probe, wait, report."""

    def __init__(self, args: argparse.Namespace, prog: str) -> None:
        self.args = args
        self.prog = prog
        self.deadline = time.monotonic() + args.timeout
        self.events = test_events()
        self.result_file = None
        if args.check_json is not None:
            # Opened first: a file that cannot be written is said at once.
            self.result_file = open_result_file(args.check_json)
        self.others = OtherEvents(args.output, args.format)
        self.arrivals = Arrivals(self.events, self.others.write)
        # A pipe's CyberTrace runs on this host.
        allow = args.allow or cybertrace_hosts(
            LISTEN_ADDR if is_pipe(args.connect) else args.connect[0])
        # One listener per address, each telling the arrivals its number.
        self.listeners = [
            EmbeddedListener(address, functools.partial(
                self.arrivals.take, at=number), allow)
            for number, address in enumerate(args.check)]
        self.addresses = []
        self.serving = []
        self.failure = []
        self.probe = None

    @property
    def here(self) -> str:
        return ", ".join(self.addresses)

    def run(self) -> int:
        """Run the phases; print the table and diagnosis; return the exit
        status."""
        try:
            return self.run_phases()
        except UserError as exc:
            self.save({"status": 1, "verdict": None, "error": str(exc)})
            raise
        finally:
            self.others.close()
            if self.result_file is not None:
                self.result_file.close()

    def run_phases(self) -> int:
        interrupted = False
        try:
            self.listen()
            try:
                self.send()
                self.probe_directly()
                self.wait()
            except KeyboardInterrupt:
                interrupted = True  # still say what came
            ended = time.monotonic()
            if self.probe is not None:
                # A probe about to finish may; its answers are not needed.
                self.probe.stop(0 if interrupted else
                                min(0.2, max(0.0, self.deadline - ended)))
        finally:
            self.stop_listening()
        if self.failure:
            raise UserError("the check's listener failed: %r"
                            % self.failure[0])
        return self.report(self.result(ended, interrupted))

    def listen(self) -> None:
        """Listen where CyberTrace delivers, before anything is sent."""
        # Every address first, as the listener does: one that cannot be
        # bound is the only line, not one after the others' "Listening".
        for listener in self.listeners:
            try:
                listener.bind()
            except UserError as exc:
                if getattr(exc, "errno", None) in ADDRESS_IN_USE:
                    raise UserError("%s (stop the listener there while the "
                                    "check runs: the check listens in its "
                                    "place and writes what is not its own "
                                    "to stdout or -o)" % exc)
                raise
        for listener, address in zip(self.listeners, self.args.check):
            shown = shown_addresses(listener.listener.admission.server)
            self.addresses.append(shown[0])
            named = format_address(*listener.listener.address())
            self.arrivals.places.append(named)
            if shown != [named]:
                named += " (this host: %s)" % ", ".join(shown[:6] + (
                    ["and %d more" % (len(shown) - 6)] if len(shown) > 6
                    else []))
            console.status("Listening on %s for CyberTrace's detections "
                           "(its OutputSettings > ConnectionString%s)" % (
                               named, " or AlertConnectionString"
                               if len(self.listeners) > 1 else ""))
            if self.loopback_only(address):
                console.warn("CyberTrace at %s cannot reach %s: use --check "
                             "0.0.0.0:%d and point its ConnectionString at "
                             "this host" % (self.args.connect[0], shown[0],
                                            address[1]))
        for listener in self.listeners:
            thread = threading.Thread(target=self.serve, args=(listener,),
                                      daemon=True)
            thread.start()
            self.serving.append(thread)

    def serve(self, listener: EmbeddedListener) -> None:
        """Run a listener; keep what stopped it, if not stop()."""
        leave_signals_to_main()
        try:
            listener.serve()
        except Exception as exc:  # reported by run(), not lost in a thread
            self.failure.append(exc)

    def loopback_only(self, address: tuple) -> bool:
        """Tell whether address is loopback while CyberTrace is not."""
        return is_loopback(address[0]) and \
            not is_loopback(self.args.connect[0])

    def send(self) -> None:
        """Send the test events to CyberTrace's input as the step-5 mode
        does: no flags, nothing awaited but the acknowledgements."""
        address = self.args.connect
        with connect_patiently(address, self.deadline) as sock:
            connection = Connection(sock, format_address(*address))
            self.arrivals.mark_sent()
            send_all(connection, frame_lines(self.events), self.args.verbose)
            connection.finish(max(0.001, self.deadline - time.monotonic()))

    def probe_directly(self) -> None:
        """Ask CyberTrace directly, alongside, what it detects."""
        self.probe = Probe(self.args.connect, self.events, self.deadline,
                           self.arrivals.wake)
        console.status("Sent %d test events to %s; waiting up to %.0f s for "
                       "their detections" % (
                           len(self.events),
                           format_address(*self.args.connect),
                           self.deadline - time.monotonic()))

    def wait(self) -> None:
        """Wait for what CyberTrace detects, or the deadline."""
        self.arrivals.wait(self.probe.has_come, self.deadline)

    def report(self, result: CheckResult) -> int:
        """Print the table, then the diagnosis; return the exit status."""
        table_error = None
        try:
            write_stdout(report(result).encode())
        except UserError as exc:
            table_error = exc
        diagnosis = [] if result.interrupted else diagnose(result)
        status = (interrupted_status(self.prog) if result.interrupted
                  else result.status())
        self.save(result_json(result, status, diagnosis))
        if result.interrupted:
            return status
        for line in diagnosis:
            console.line(line)
        if table_error is not None:
            raise table_error
        if self.others.error is not None:
            raise UserError(self.others.error)
        return status

    def save(self, record: dict) -> None:
        """Write the result for monitoring (--check-json), if asked."""
        if self.result_file is None:
            return
        try:
            json.dump(record, self.result_file, indent=2)
            self.result_file.write("\n")
            self.result_file.flush()
        except OSError as exc:
            raise UserError("cannot write to %s: %s" % (
                escape_line(self.args.check_json), exc.strerror)) from None

    def stop_listening(self) -> None:
        for listener in self.listeners:
            listener.stop()
        for thread in self.serving:
            thread.join()
        for listener in self.listeners:
            listener.close()

    def result(self, ended: float, interrupted: bool) -> CheckResult:
        """Gather what the phases found."""
        rejected = [listener.first_rejected for listener in self.listeners
                    if listener.first_rejected]
        return CheckResult(
            here=self.here, strict=self.args.strict,
            loopback_only=all(self.loopback_only(address)
                              for address in self.args.check),
            check_port=self.args.check[0][1], arrivals=self.arrivals,
            waited=ended - (self.arrivals.sent_at or ended),
            connections=sum(each.accepted for each in self.listeners),
            rejected=sum(each.rejected for each in self.listeners),
            first_rejected=rejected[0] if rejected else "",
            probe=self.probe.outcome() if self.probe else ProbeOutcome(),
            addresses=list(self.addresses), interrupted=interrupted,
            others_to=self.others.where)


def open_result_file(path: str):
    """Open --check-json's file for writing; UserError if it cannot be."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UserError("cannot open %s: %s" % (escape_line(path),
                                                exc.strerror)) from None


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


def report(result: CheckResult) -> str:
    """Return the table: a row per test indicator, the count, the others."""
    arrivals = result.arrivals
    confirmed = set(result.confirmed)
    # Where each came is a column of its own once there are several.
    several = len(result.addresses) > 1
    rows = [("indicator", "expected", "carried", "from") +
            (("at",) if several else ()) + ("latency",)]
    for _, indicator, expected in TEST_RECORDS:
        arrival = arrivals.found.get(indicator)
        if arrival is None:
            rows.append((indicator, expected, "-", "-") +
                        (("-",) if several else ()) + ("not detected",))
            continue
        latency = format_latency(arrival.latency)
        if indicator not in confirmed:
            latency += " (unconfirmed)"
        rows.append((indicator, expected,
                     visible(", ".join(arrival.categories) or "-", 40),
                     arrival.peer) +
                    ((result.addresses[arrival.at],) if several else ()) +
                    (latency,))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(text.ljust(width) for text, width in
                       zip(row[:-1], widths)) + "  " + row[-1]
             for row in rows]
    found = len(confirmed)
    if result.interrupted:
        lines.append("interrupted after %s, before the check could tell: no "
                     "verdict" % format_latency(result.waited))
    else:
        took = max(arrivals.found[i].latency for i in confirmed) if found \
            else result.waited
        # Where they came, of the addresses watched (all, if none came).
        came = sorted({arrivals.found[i].at for i in confirmed})
        where = ", ".join(result.addresses[at] for at in came) \
            if came else result.here
        lines.append("%d of %d test indicators detected and delivered to %s"
                     " in %s" % (found, len(TEST_INDICATORS), where,
                                 format_latency(took)))
    lines.append(say_others(result))
    return "".join(line + "\n" for line in lines)


def say_others(result: CheckResult) -> str:
    """Say how many other events came, where they were written, and which
    service alerts came to which address."""
    arrivals = result.arrivals
    if not arrivals.others:
        return "no other events"
    line = "%s (service alerts, detections of events this check did not " \
           "send), written to %s" % (plural(arrivals.others, "other event"),
                                     result.others_to)
    for number, address in enumerate(result.addresses):
        alerts = arrivals.alerts_at.get(number)
        alerts = ("service alerts " + visible(", ".join(alerts), 200)
                  if alerts else "no service alert")
        if len(result.addresses) == 1:
            return line + "; " + alerts
        line += "; at %s: %d, %s" % (
            address, arrivals.others_at.get(number, 0), alerts)
    return line


def result_json(result: CheckResult, status: int,
                diagnosis: List[str]) -> dict:
    """Return the whole result, as --check-json writes it."""
    arrivals, confirmed = result.arrivals, set(result.confirmed)
    indicators = []
    for _, indicator, expected in TEST_RECORDS:
        arrival = arrivals.found.get(indicator)
        indicators.append({
            "indicator": indicator, "expected": expected,
            "arrived": arrival is not None,
            "confirmed": indicator in confirmed,
            "categories": arrival.categories if arrival else [],
            "from": arrival.peer if arrival else None,
            "at": result.addresses[arrival.at] if arrival else None,
            "latency": round(arrival.latency, 4) if arrival else None})
    probe = result.probe
    verdict = None
    if not result.interrupted:
        verdict = "pass" if status == 0 else "fail"
    return {
        "version": __version__, "status": status, "verdict": verdict,
        "interrupted": result.interrupted, "strict": result.strict,
        "found": len(confirmed), "total": len(TEST_INDICATORS),
        "addresses": result.addresses, "waited": round(result.waited, 4),
        "indicators": indicators,
        "others": {
            "events": arrivals.others, "written_to": result.others_to,
            "at": {address: {"events": arrivals.others_at.get(number, 0),
                             "alerts": arrivals.alerts_at.get(number, [])}
                   for number, address in enumerate(result.addresses)}},
        "connections": result.connections, "rejected": result.rejected,
        "first_rejected": result.first_rejected or None,
        "probe": {"asked": probe.asked, "answered": probe.answered,
                  "detected": [i for i in TEST_INDICATORS
                               if i in probe.detected],
                  "error": probe.error},
        "diagnosis": diagnosis}


def probe_note(result: CheckResult) -> str:
    """Say what CyberTrace answered when asked directly."""
    total, probe = len(TEST_INDICATORS), result.probe
    if probe.answered_all:
        if not probe.detected:
            return ("its feeds detect none of the test indicators: check "
                    "that feeds are loaded (CyberTrace answered all %d when "
                    "asked directly)" % total)
        return "CyberTrace detects %d of %d when asked directly" % (
            len(probe.detected), total)
    if probe.late:
        return "CyberTrace did not answer in time when asked directly " \
               "(%d of %d answered)" % (probe.answered, total)
    return "CyberTrace did not answer when asked directly: %s" % (
        probe.error or "no answer")


def diagnose(result: CheckResult) -> List[str]:
    """Return the lines for stderr: what arrived that cannot be trusted,
    then which link is broken, if one is."""
    lines = []
    unconfirmed = result.unconfirmed
    if unconfirmed:
        peers = sorted({result.arrivals.found[i].peer for i in unconfirmed})
        lines.append("warning: %s arrived that CyberTrace does not detect "
                     "when asked directly, from %s: not counted (is "
                     "something other than CyberTrace sending to %s?)" % (
                         plural(len(unconfirmed), "test indicator"),
                         ", ".join(peers), result.here))
    found = len(result.confirmed)
    if found == len(TEST_INDICATORS):
        return lines
    if found:
        return lines + diagnose_some(result, found)
    if result.probe.answered_all and not result.probe.detected:
        if not result.arrivals.events:
            return lines + [probe_note(result), "nothing reached %s either, "
                            "as nothing was detected: run the check again "
                            "once feeds are loaded" % result.here]
        return lines + [probe_note(result)]
    return lines + [diagnose_delivery(result), diagnose_detection(result)]


def diagnose_some(result: CheckResult, found: int) -> List[str]:
    """Say why only some came back: lost on the way, or not in the feeds
    (warnings, or errors with --strict)."""
    total = len(TEST_INDICATORS)
    detected = result.probe.detected
    directly = result.probe.answered_all and detected
    lines = []
    if directly and not detected <= set(result.arrivals.found):
        lines.append("CyberTrace detects %d of %d when asked directly, but "
                     "only %d reached %s in %.1f s" % (
                         len(detected), total, found, result.here,
                         result.waited))
    elif result.strict:
        lines.append(probe_note(result) + (
            ": its feeds lack the others" if directly else ""))
    if result.strict:
        return ["--strict: %d of %d test indicators did not come back"
                % (total - found, total)] + lines
    return ["warning: " + line for line in lines]


def diagnose_delivery(result: CheckResult) -> str:
    """Say what reached the check, when no detection did."""
    here, arrivals = result.here, result.arrivals
    if result.rejected and not result.connections:
        return ("%s from other hosts than CyberTrace's refused (the first "
                "from %s): if CyberTrace delivers from there, add --allow "
                "with its address" % (plural(result.rejected, "connection"),
                                      result.first_rejected))
    if not result.connections:
        line = ("no connection reached %s in %.1f s: check that CyberTrace's"
                " OutputSettings > ConnectionString points here and that no "
                "firewall blocks the port" % (here, result.waited))
        if result.loopback_only:
            line += " (%s is loopback: use --check 0.0.0.0:%d)" % (
                here, result.check_port)
        return line
    if not arrivals.events:
        return "%s reached %s but sent no events" % (
            plural(result.connections, "connection"), here)
    return "%s reached %s with %s, none naming a test indicator; the " \
           "first: %s" % (plural(result.connections, "connection"), here,
                          plural(arrivals.events, "event"),
                          visible(arrivals.first_other or "-", 200))


def diagnose_detection(result: CheckResult) -> str:
    """Say what CyberTrace detects when asked, beside what reached us."""
    detected = result.probe.detected
    if not (result.probe.answered_all and detected):
        return probe_note(result)
    total, here = len(TEST_INDICATORS), result.here
    if result.connections and result.arrivals.events:
        return ("CyberTrace detects %d of %d when asked directly, but sent "
                "no detection here: point OutputSettings > ConnectionString "
                "(not only AlertConnectionString) at %s" % (
                    len(detected), total, here))
    return ("CyberTrace detects %d of %d when asked directly: detection "
            "works, delivery to %s does not" % (len(detected), total, here))


# --- The command line --------------------------------------------------------

def peer_address(text: str) -> tuple:
    """Parse CyberTrace's input address, which has a real port."""
    address = parse_address(text, CYBERTRACE_ADDR)
    if address[1] == 0:
        # Port 0 means "any free port" only to a listener; to connect
        # to it is a refusal that says nothing about the mistake.
        raise ValueError("port 0 is not a port to connect to: give "
                         "CyberTrace's input port (InputSettings > "
                         "ConnectionString), e.g. 9999")
    return address


def check_address(text: str) -> tuple:
    """Parse an address of --check: the listener's -l syntax, but for a
    label."""
    found = parse_listen(text)
    if found.label:
        # Else "alerts=127.0.0.1" would be a host name, failing late.
        raise ValueError("LABEL= names a listener's -l address; the check "
                         "names each address by itself: give ADDR:PORT")
    return found.address


def build_parser() -> argparse.ArgumentParser:
    """Describe the command line."""
    default = format_address(CYBERTRACE_ADDR, CYBERTRACE_PORT)
    parser = OneLineParser(
        description="Send events to Kaspersky CyberTrace's input port, one "
        "line per event. With no FILE, --event or --test-events, read stdin. "
        "--check ADDR:PORT runs the lab check instead: it listens at ADDR:PORT"
        " (where CyberTrace's output ConnectionString points), sends the 17 "
        "test events and prints a table of the detections that came back.",
        epilog="Exit status: 0 when the peer acknowledged every event (and, "
        "with --reply-back, answered it), 1 on an error or when there are no "
        "events to send, 2 on bad arguments, 130 on Ctrl+C, 143 on SIGTERM;"
        " with --check, 0 when at least one test indicator came back "
        "(--strict: all 17), else 1; with --load, 0 when a step kept up, "
        "else 1. "
        "'Acknowledged by the peer' means that the peer's TCP stack "
        "received the bytes, not that a program read or processed them: a "
        "listener that rejects the connection after the TCP handshake still "
        "acknowledges what arrived before it closed. Only --reply-back's "
        "LookupFinished answers show that CyberTrace processed each event.")
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="files of events, one per line ('-' is stdin)")
    parser.add_argument("-e", "--event", action="append", metavar="TEXT",
                        help="send TEXT as an event (repeatable)")
    parser.add_argument(
        "--follow", nargs="+", metavar="FILE",
        help="send what is appended to each FILE, for ever, as tail -F reads"
        " it: across rotation by rename (the old file is finished first) or"
        " copytruncate, files that appear later or are removed; a last line"
        " waits for its newline. Starts at each file's end (as tail -n 0 -F)"
        " unless --state has its position. It never ends by itself: stop it"
        " with SIGTERM (exit 143) or Ctrl+C (130); a lost connection ends "
        "it with exit 1 unless --reconnect")
    parser.add_argument(
        "--state", metavar="FILE",
        help="with --follow, keep in FILE how far into each followed file "
        "the peer acknowledged (its TCP, or with --reply-back CyberTrace's "
        "LookupFinished), with the file's device, inode and first bytes; "
        "written atomically at most once a second and on exit. A restart "
        "resumes there: every line is sent at least once, across restarts, "
        "crashes and reboots; twice, only what was in flight (after a kill "
        "or crash, up to a second more). A damaged state, or one from another "
        "host or disk, is a warning and each file starts at its end "
        "(--from-start: its start); a file replaced meanwhile (rotated, the "
        "old one gone) is read from its start. Its folder must be writable "
        "(docs/sender.md)")
    parser.add_argument(
        "--from-start", action="store_true",
        help="with --follow, start a file that has no usable saved position "
        "at its start instead of its end")
    parser.add_argument("--test-events", action="store_true",
                        help="send one event per test indicator of "
                        "Kaspersky's test records (http://fakess123.nu, "
                        "192.0.2.1, 776735A8CA96DB15B422879DA599F474 and 14 "
                        "more); CyberTrace's demo feeds detect 3 of them, "
                        "the full feeds all 17")
    # The name it had first, kept for those who use it: the demo feeds
    # detect only 3 of the 17.
    parser.add_argument("--demo", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument(
        "-c", "--connect", metavar="ADDR:PORT", default=(CYBERTRACE_ADDR,
                                                         CYBERTRACE_PORT),
        type=argument_type(peer_address, "address"),
        help="CyberTrace's input address (InputSettings > ConnectionString)"
        ": 192.0.2.10:9999, [::1]:9999 or a bare PORT; unix:/PATH for a "
        "UNIX stream socket (the 5.0 web UI's UNIX socket input; Linux, "
        "macOS) (default: %s)" % default)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--reply-back", action="store_true",
                      help="ask CyberTrace to answer on this connection "
                      "(X-KF-SendFinishedEventX-KF-ReplyBack), print its "
                      "answers to stdout and wait for a LookupFinished per "
                      "event")
    mode.add_argument(
        "--load", action="store_true",
        help="the capacity test: ramp the rate up over --connections "
        "reply-back connections until CyberTrace falls behind, and print "
        "per step the answered rate and the lookup latency (see "
        "docs/sender.md, 'Measuring capacity'); it loads the CyberTrace "
        "it is pointed at, production or lab")
    mode.add_argument("--ping", action="store_true",
                      help="check that CyberTrace is up: exit 0 on PONG")
    mode.add_argument(
        "--check", metavar="ADDR:PORT", nargs="+", action="extend",
        type=argument_type(check_address, "address"),
        help="the lab check: listen at ADDR:PORT (CyberTrace's OutputSettings"
        " > ConnectionString: 9998 is 127.0.0.1:9998; 0.0.0.0:9998 when "
        "CyberTrace runs on another host; [::1]:9998; on Windows "
        "\\\\.\\pipe\\NAME; not unix:/PATH: CyberTrace's outputs "
        "take none), send the test events to --connect and print which "
        "came back detected, from where, with their latency; on failure, "
        "say which link is broken. Several addresses (or --check again) "
        "watch each output at once: a tenant's, the AlertConnectionString. "
        "Only CyberTrace's host (-c) may deliver, and only what CyberTrace "
        "detects when asked directly counts. Every other event is written "
        "whole, as the listener would (-f, -o): the check can stand in for "
        "the listener")
    parser.add_argument(
        "--allow", metavar="CIDR", action="append",
        type=argument_type(parse_network, "network"),
        help="with --check, take detections from this network (repeatable) "
        "instead of from the -c host's addresses: where CyberTrace delivers "
        "from another address than its input's")
    parser.add_argument("--strict", action="store_true",
                        help="with --check, exit 0 only if all 17 test "
                        "indicators came back (the demo feeds detect 3)")
    parser.add_argument(
        "-f", "--format", choices=("text", "raw", "json"), default=None,
        help="with --check, the listener's format for the events that are "
        "not the check's answers (service alerts, others' detections): "
        "text (default), raw or json")
    parser.add_argument(
        "-o", "--output", metavar="FILE",
        help="with --check, append those events to FILE (created 0640) "
        "instead of stdout, which then holds only the table")
    parser.add_argument(
        "--check-json", metavar="FILE",
        help="with --check, also write the whole result to FILE as one "
        "JSON object, for cron or monitoring (fields: docs/sender.md); the "
        "exit status is the same")
    parser.add_argument(
        "-t", "--timeout", metavar="SECONDS",
        type=argument_type(bounded(float, *SECONDS), "seconds"),
        help="give up when connecting or sending stalls this long, or when "
        "the answers (--reply-back, --ping) take longer than this after the "
        "last event, however they trickle in (default: %g); with --check, "
        "how long to wait for the detections, all included (default: %g)"
        % (TIMEOUT, CHECK_TIMEOUT))
    parser.add_argument(
        "--reconnect", action="store_true",
        help="ride out outages (CyberTrace restarting): when connecting "
        "fails or the connection is lost, retry for ever (at once after a "
        "connection that lasted %g s, else after 0.5 s, doubling up to "
        "--retry-max), then resend every event from the first one the "
        "peer's TCP did not acknowledge, so events may arrive twice but "
        "none the kernel could tell about is lost. Where the kernel does "
        "not say what was acknowledged (Linux's TIOCOUTQ, macOS's "
        "SO_NWRITE; Windows has neither), the events of the last send "
        "buffer's worth of bytes are resent. A peer that keeps accepting "
        "and dropping connections is warned of. Input is not read while "
        "disconnected. Not with --ping, --reply-back or --check"
        % HELD_SECONDS)
    parser.add_argument(
        "--retry-max", metavar="SECONDS", default=RECONNECT_MAX,
        type=argument_type(bounded(float, 0.01, 3600), "seconds"),
        help="with --reconnect, wait at most this long between attempts "
        "(default: %g)" % RECONNECT_MAX)
    load = parser.add_argument_group("the capacity test (--load)")
    load.add_argument(
        "--connections", metavar="N", default=capacity.CONNECTIONS,
        type=argument_type(bounded(int, 1, 1000), "N"),
        help="connections to open (default: %d: CyberTrace serves "
        "ScannersCount connections at once, 9 by default, and one must stay "
        "free for PING)" % capacity.CONNECTIONS)
    load.add_argument(
        "--start-rate", metavar="EPS", default=capacity.START_RATE,
        type=argument_type(bounded(float, *RATE), "EPS"),
        help="the first step's rate; each next doubles it until one falls "
        "behind, then the ramp narrows (default: %g)" % capacity.START_RATE)
    load.add_argument("--max-rate", metavar="EPS",
                      type=argument_type(bounded(float, *RATE), "EPS"),
                      help="climb no higher than this rate")
    load.add_argument(
        "--step-seconds", metavar="SECONDS", default=capacity.STEP_SECONDS,
        type=argument_type(bounded(float, 0.1, 3600), "seconds"),
        help="how long each step lasts (default: %g)" % capacity.STEP_SECONDS)
    load.add_argument("--duration", metavar="SECONDS",
                      type=argument_type(bounded(float, *SECONDS), "seconds"),
                      help="stop the ramp after this long")
    load.add_argument(
        "--max-latency", metavar="SECONDS", default=capacity.MAX_LATENCY,
        type=argument_type(bounded(float, *SECONDS), "seconds"),
        help="a step whose p99 latency passes this fell behind (default: %g)"
        % capacity.MAX_LATENCY)
    load.add_argument(
        "--in-flight", metavar="N", default=capacity.IN_FLIGHT,
        type=argument_type(bounded(int, 1, 10 ** 7), "N"),
        help="events awaiting an answer per connection at most; past it "
        "events are not sent and count as unanswered (default: %s)"
        % format_count(capacity.IN_FLIGHT))
    load.add_argument("--json", metavar="FILE",
                      help="write the whole result as JSON to FILE")
    parser.add_argument("--rate", metavar="EPS",
                        type=argument_type(bounded(float, *RATE), "EPS"),
                        help="send at most EPS events per second")
    parser.add_argument("--repeat", metavar="N", default=1,
                        type=argument_type(bounded(int, 1, REPEAT_LIMIT),
                                           "N"),
                        help="send the input N times (stdin is kept in a "
                        "temporary file to send again, %s at most)"
                        % format_bytes(SPOOL_LIMIT))
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="print each event to stderr as Kaspersky's "
                      "tutorial does ('Sending:' then the event)")
    talk.add_argument("-q", "--quiet", action="store_true",
                      help="print nothing but errors and warnings")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    return parser


def refuse_ignored(parser: argparse.ArgumentParser,
                   args: argparse.Namespace) -> None:
    """Exit 2 on arguments that this combination would silently ignore."""
    if args.ping:
        ignored = [("FILE", args.files), ("-e/--event", args.event),
                   ("--test-events", args.test_events), ("--demo", args.demo),
                   ("--rate", args.rate),
                   ("--repeat", args.repeat != 1),
                   ("-v/--verbose", args.verbose)]
        for name, given in ignored:
            if given:
                parser.error("argument --ping: not allowed with %s (a ping "
                             "sends no events)" % name)
    if args.follow:
        for name, given in (("FILE", args.files), ("-e/--event", args.event),
                            ("--test-events", args.test_events),
                            ("--demo", args.demo), ("--ping", args.ping),
                            ("--check", args.check), ("--load", args.load),
                            ("--repeat", args.repeat != 1)):
            if given:
                parser.error("argument --follow: not allowed with %s (it "
                             "sends what is appended to its files)" % name)
        absolute = [os.path.abspath(name) for name in args.follow]
        if len(set(absolute)) < len(absolute):
            parser.error("argument --follow: a file given twice")
        for name in args.follow:
            kind = not_a_file(name)
            if kind:
                parser.error("argument --follow: %s is %s; it follows "
                             "regular files%s" % (name, kind, (
                                 ": name the logs in it" if kind ==
                                 "a directory" else " (a pipe's events: "
                                 "give it as FILE, or on stdin)")))
        if args.state is not None and any(
                same_path(args.state, name) for name in args.follow):
            # The state written over it would replace the log itself.
            parser.error("argument --state: %s is a file --follow reads; "
                         "give the state its own file" % args.state)
    else:
        for name, given in (("--state", args.state),
                            ("--from-start", args.from_start)):
            if given:
                parser.error("argument %s: only with --follow" % name)
    if args.files.count("-") > 1:
        # The first '-' reads stdin to its end: the others would get nothing.
        parser.error("argument FILE: '-' (stdin) given more than once")
    if args.retry_max != RECONNECT_MAX and not args.reconnect:
        parser.error("argument --retry-max: only with --reconnect")
    if args.reconnect:
        for name in ("ping", "reply_back", "check"):
            if getattr(args, name, False):
                parser.error("argument --reconnect: not allowed with --%s"
                             % name.replace("_", "-"))


def not_a_file(path: str) -> str:
    """Say what a path is when it exists and is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""  # not there yet, or not ours to see: followed, said then
    if stat.S_ISDIR(mode):
        return "a directory"
    return "" if stat.S_ISREG(mode) else "a pipe, socket or device"


def same_path(one: str, other: str) -> bool:
    """Tell whether two paths name the same file, by name or, when both
    exist, by device and inode (a link)."""
    if os.path.realpath(one) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def refuse_for_the_check(parser: argparse.ArgumentParser,
                         args: argparse.Namespace) -> None:
    """Exit 2 on what --check cannot take, or what only it takes."""
    if not args.check:
        for name, given in (("--strict", args.strict),
                            ("--allow", args.allow),
                            ("-f/--format", args.format),
                            ("-o/--output", args.output),
                            ("--check-json", args.check_json)):
            if given:
                parser.error("argument %s: only with --check" % name)
        return
    args.format = args.format or "text"
    # The check sends its own 17 test events, once, at once.
    for name, given in [("FILE", args.files), ("-e/--event", args.event),
                        ("--rate", args.rate),
                        ("--repeat", args.repeat != 1)]:
        if given:
            parser.error("argument --check: not allowed with %s (the check "
                         "sends the test events)" % name)
    for number, (host, port) in enumerate(args.check):
        if port is None and not is_pipe((host, port)):
            parser.error("argument --check: %s: the check listens on "
                         "ADDR:PORT or, on Windows, \\\\.\\pipe\\NAME, as "
                         "CyberTrace's OutputSettings > ConnectionString "
                         "takes" % host)
        if port and (host, port) in args.check[:number]:
            parser.error("argument --check: %s given twice"
                         % format_address(host, port))
        if port == args.connect[1] and (host == args.connect[0] or host in (
                "0.0.0.0", "::") or is_loopback(host) and
                is_loopback(args.connect[0])):
            parser.error("argument --check: %s is CyberTrace's input (-c); "
                         "--check takes where CyberTrace delivers "
                         "detections, e.g. %d" % (format_address(host, port),
                                                  LISTEN_PORT))


def refuse_for_the_load(parser: argparse.ArgumentParser,
                        args: argparse.Namespace) -> None:
    """Exit 2 on what --load cannot take, or what only it takes."""
    if args.load:
        for name, given in (("--rate", args.rate),
                            ("--repeat", args.repeat != 1),
                            ("--reconnect", args.reconnect),
                            ("-v/--verbose", args.verbose)):
            if given:
                parser.error("argument --load: not allowed with %s (the "
                             "capacity test sets the pace)" % name)
        return
    defaults = build_parser()
    for name in ("connections", "start_rate", "max_rate", "step_seconds",
                 "duration", "max_latency", "in_flight", "json"):
        if getattr(args, name) != defaults.get_default(name):
            parser.error("argument --%s: only with --load"
                         % name.replace("_", "-"))


def run(args: argparse.Namespace) -> str:
    """Send as the arguments say; return the summary line."""
    where = format_address(*args.connect)
    if args.ping:
        took = ping(args.connect, args.timeout)
        return "PONG from %s in %.1f ms" % (where, took * 1000)
    if args.follow:
        return follow(args, where)
    sources = []
    try:
        sources = open_sources(args)
        terminal = reading_terminal(sources)
        tally = [0]
        # Sizes are known before anything is read.
        watch = None
        if Progress.wanted(args, sources):
            watch = tally, source_bytes(sources, args.repeat) or None
        blocks = event_blocks(sources, args.repeat, tally)
        if terminal:
            # Connect first: a wrong -c shows at once, not once the user
            # has typed an event.
            blocks = typed_events(blocks)
        else:
            blocks = some_events(blocks)
        if args.reconnect:
            return send_reconnecting(args, blocks, where, watch, terminal)
        if args.rate:
            blocks = paced(blocks, args.rate)
        return send_once(args, blocks, where, watch)
    except KeyboardInterrupt:  # before the connection: nothing went out
        raise Interrupted("0 events sent, 0 acknowledged") from None
    finally:
        close_sources(sources)


def follow(args: argparse.Namespace, where: str) -> str:
    """Send what is appended to --follow's files until stopped, keeping
    the acknowledged positions in --state; return the summary line."""
    try:
        follower = follow_files.Follower(
            args.follow, escape_line,
            lambda: EventFramer(CYBERTRACE_EVENT_BYTES), drop_blank_lines,
            console.warn, console.status, args.state, args.from_start,
            split=warn_split)
    except follow_files.StateError as exc:
        raise UserError(str(exc)) from None
    try:
        watch = None
        if Progress.watched(args, []):  # it never ends
            watch = [0], None
        blocks = follower.blocks()
        if args.reconnect:
            # Connected first, as without --reconnect: a CyberTrace that is
            # not there shows when the service starts, not at its first line.
            return send_reconnecting(args, blocks, where, watch, True,
                                     follower)
        return send_once(args, blocks, where, watch, follower)
    except follow_files.StateError as exc:
        raise UserError(str(exc)) from None
    finally:
        try:
            follower.close()
        except follow_files.StateError as exc:
            console.warn(str(exc))


def send_once(args: argparse.Namespace, blocks: Iterable[tuple], where: str,
              watch: Optional[tuple], follower=None) -> str:
    """Send over one connection and wait until the peer acknowledged all
    (--reply-back: answered all); return the summary line."""
    started = time.monotonic()
    with connect(args.connect, args.timeout) as sock:
        connection = Connection(sock, where)
        replies = progress = None
        try:
            try:
                if args.reply_back:
                    connection.send(REPLY_BACK_FLAGS, 0)
                    replies = Replies(sock)
                if follower is not None:
                    follower.acknowledged = acknowledged_by(connection,
                                                            replies)
                    follower.check = watch_peer(connection, replies)
                if watch is not None:
                    progress = Progress(connection, *watch)
                send_all(connection, blocks, args.verbose)
                if replies is None:
                    connection.finish(args.timeout)
                else:
                    replies.wait_finished(connection.events, args.timeout)
            except SendError as exc:
                # CyberTrace waits for us to read its answers: say why.
                stalled = replies.stalled() if replies else ""
                if not stalled:
                    raise
                raise SendError("%s; %s" % (exc, stalled), exc.reason) \
                    from None
            finally:
                if progress is not None:
                    progress.stop()
                if replies is not None:
                    replies.stop()
                if follower is not None:
                    # Before the socket closes: its kernel still knows.
                    follower.close(acknowledged_by(connection, replies)())
        except KeyboardInterrupt:
            # Here too when a signal cut the cleanup above short: the
            # counts are the connection's, whatever the stage.
            raise Interrupted(say_got_through(connection, replies)) \
                from None
    summary = sent_summary(connection.events, connection.bytes, where,
                           time.monotonic() - started)
    if replies is None:
        return summary
    if replies.finished < connection.events:
        raise SendError("%s: %s of %s answered (%s)" % (
            where, format_count(replies.finished),
            plural(connection.events, "event"),
            replies.error or "connection closed by CyberTrace"))
    return summary + "; " + replies.summary()


def acknowledged_by(connection: Connection,
                    replies: Optional[Replies]) -> Callable[[], int]:
    """Return a function that counts the events, in input order, that
    the peer surely has: answered (--reply-back), or acknowledged by TCP."""
    if replies is not None:
        return lambda: replies.finished
    # Where the kernel cannot say (Windows), a send buffer's worth is not.
    connection.ledger.keep = send_buffer(connection.sock)

    def acknowledged() -> int:
        connection.update_acked()
        return connection.ledger.surely_delivered()
    return acknowledged


def watch_peer(connection: Connection,
               replies: Optional[Replies]) -> Callable[[], None]:
    """Return a check for --follow's quiet spells: SendError once the peer
    closed or reset the connection."""
    def check() -> None:
        if replies is not None:
            # Its thread reads the socket: it knows.
            why = replies.closed and (replies.error or
                                      "closed by CyberTrace")
        else:
            why = peer_gone(connection.sock)
        if why:
            raise connection.lost(why)
    return check


def run_load(args: argparse.Namespace) -> int:
    """Run the capacity test (cybertrace_capacity) with the events the
    arguments name; return its exit status."""
    args.test_events = args.test_events or not (args.files or args.event)
    sources = open_sources(args)
    try:
        events = []
        for block, _ in event_blocks(sources, 1):
            events.extend(bytes(block)[:-1].split(b"\n"))
            # Sent round and round: a sample this size is plenty.
            if len(events) >= LOAD_EVENTS:
                break
    finally:
        close_sources(sources)
    if not events:
        raise NothingToSend("no events to send")
    options = {name: getattr(args, name) for name in (
        "connections", "start_rate", "max_rate", "step_seconds", "duration",
        "max_latency", "in_flight", "timeout")}
    live = Console.for_stderr(args.quiet)
    return capacity.run_load(args.connect, events[:LOAD_EVENTS], options,
                             live, args.json)


def say_got_through(connection: Connection,
                    replies: Optional[Replies]) -> str:
    """Say what got through before Ctrl+C."""
    text = say_sent(*connection.counts())
    if replies is not None:
        text += "; " + replies.summary()
    return text


def main(argv: Optional[list] = None) -> int:
    """Run the sender; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_ignored(parser, args)
    refuse_for_the_check(parser, args)
    refuse_for_the_load(parser, args)
    if args.timeout is None:
        args.timeout = CHECK_TIMEOUT if args.check else TIMEOUT
    args.test_events = args.test_events or args.demo
    console.quiet = args.quiet
    keep_freed_memory()
    restore = install_interrupt_handlers()
    try:
        if args.check:
            return LabCheck(args, parser.prog).run()
        if args.load:
            return run_load(args)
        summary = run(args)
    except NothingToSend as exc:
        console.warn(str(exc))
        return 1
    except Interrupted as exc:
        return interrupted_status(parser.prog, str(exc))
    except UserError as exc:
        console.line("%s: error: %s" % (parser.prog, exc))
        return 1
    except KeyboardInterrupt:
        return interrupted_status(parser.prog)
    finally:
        for number, handler in restore:
            signal.signal(number, handler)
    console.status(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
